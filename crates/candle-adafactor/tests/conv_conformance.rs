//! Recorded runs of the real Keras 3.15.1 Adafactor on `Conv2D` kernels (`conformance/conv/`,
//! Keras's layout `[kh, kw, in, out]`) replayed on the same kernels in candle's layout
//! `[out, in, kh, kw]` with [`Adafactor::factor_convolutions`]: after transposing back, every
//! weight and EMA average after every step matches Keras within the conformance tolerance, on
//! both data paths; and the statistics have Keras's shapes, `r` `[kh, kw, in]` and `c`
//! `[kh, kw, out]`.

mod common;

use candle_adafactor::{Adafactor, DataPath};
use candle_core::{Device, Tensor, Var};
use common::close;
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a list of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// Keras `[kh, kw, in, out]` to candle `[out, in, kh, kw]` (rank 4); other ranks as they are.
fn to_candle(t: Tensor) -> Tensor {
    if t.rank() == 4 {
        t.permute((3, 2, 0, 1)).unwrap().contiguous().unwrap()
    } else {
        t
    }
}

/// candle `[out, in, kh, kw]` to Keras `[kh, kw, in, out]`.
fn to_keras(t: &Tensor) -> Tensor {
    if t.rank() == 4 {
        t.permute((2, 3, 1, 0)).unwrap().contiguous().unwrap()
    } else {
        t.clone()
    }
}

fn keras_tensor(values: &Value, shape: &[usize]) -> Tensor {
    to_candle(Tensor::from_vec(floats(values), shape, &Device::Cpu).unwrap())
}

fn compare(what: &str, got: &Tensor, want: &Value) -> Result<(), String> {
    let got: Vec<f32> = to_keras(got).flatten_all().unwrap().to_vec1().unwrap();
    let want = floats(want);
    assert_eq!(got.len(), want.len(), "{what}");
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        if !close(*g, *w as f64) {
            return Err(format!(
                "{what}, index {k} (Keras order): expected {w}, got {g}"
            ));
        }
    }
    Ok(())
}

fn run_case(case: &Value, jit: bool) -> Result<(), String> {
    let name = case["name"].as_str().unwrap_or("?");
    let fail = |m: String| format!("case {name} (jit_compile={jit}): {m}");
    let mut config = case["config"].clone();
    config["config"]["jit_compile"] = Value::Bool(jit);
    let mut opt = Adafactor::from_config(&config).map_err(|e| fail(e.to_string()))?;
    let shapes: Vec<Vec<usize>> = case["variables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect()
        })
        .collect();
    let vars: Vec<(String, Var)> = case["variables"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&shapes)
        .map(|(v, shape)| {
            let t = keras_tensor(&v["initial"], shape);
            let name = v["name"].as_str().unwrap().to_string();
            (name, Var::from_tensor(&t).unwrap())
        })
        .collect();
    opt.build_named(vars.clone())
        .map_err(|e| fail(e.to_string()))?;
    let set = opt.factor_convolutions().map_err(|e| fail(e.to_string()))?;
    assert_eq!(
        set,
        ["conv1x1/kernel", "conv3x3/kernel", "conv5x3/kernel"],
        "the kernels, none of the biases"
    );
    // The statistics in Keras's shapes: r is [kh, kw, in], c is [kh, kw, out].
    let state: Vec<(String, Vec<usize>)> = opt
        .variables()
        .map_err(|e| fail(e.to_string()))?
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect();
    for (n, want) in [
        ("conv3x3/kernel/r", vec![3, 3, 4]),
        ("conv3x3/kernel/c", vec![3, 3, 6]),
        ("conv5x3/kernel/c", vec![5, 3, 3]),
    ] {
        let got = state.iter().find(|(m, _)| m == n).map(|(_, s)| s.clone());
        assert_eq!(got, Some(want), "{n}");
    }
    let names: Vec<&str> = case["exclude_from_weight_decay"]["var_names"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    opt.exclude_from_weight_decay(&[], &names)
        .map_err(|e| fail(e.to_string()))?;
    let want_path = if jit {
        DataPath::Fused
    } else {
        DataPath::Composed
    };
    for (k, step) in case["steps"].as_array().unwrap().iter().enumerate() {
        let at = |m: String| fail(format!("step {}: {m}", k + 1));
        let grads: Vec<Tensor> = step["gradients"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&shapes)
            .map(|(g, shape)| keras_tensor(g, shape))
            .collect();
        let pairs: Vec<(Option<&Tensor>, &Var)> = grads
            .iter()
            .zip(&vars)
            .map(|(g, (_, v))| (Some(g), v))
            .collect();
        opt.apply_gradients(&pairs)
            .map_err(|e| at(format!("apply_gradients: {e}")))?;
        if opt.data_path() != want_path {
            return Err(at(format!("ran on {:?}", opt.data_path())));
        }
        for ((vname, var), want) in vars.iter().zip(step["variables"].as_array().unwrap()) {
            compare(&format!("variable {vname}"), var.as_tensor(), want).map_err(at)?;
        }
        if let Some(emas) = step.get("ema").and_then(Value::as_array) {
            for ((vname, var), want) in vars.iter().zip(emas) {
                let avg = opt.moving_average(var).unwrap().expect("an EMA average");
                compare(&format!("EMA of {vname}"), &avg, want).map_err(at)?;
            }
        }
    }
    Ok(())
}

fn cases() -> Vec<Value> {
    adafactor_conformance::conv_cases()
}

#[test]
fn keras_conv2d_runs_replay_in_candle_layout() {
    let mut failures = Vec::new();
    for case in cases() {
        for jit in [true, false] {
            match run_case(&case, jit) {
                Ok(()) => println!("{} jit={jit}: ok", case["name"]),
                Err(m) => failures.push(m),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The same kernel without the convolution helper (Keras's last two axes of candle's layout)
/// is a different optimizer: its replay fails where the helper's passes, so the test above
/// can tell.
#[test]
fn without_the_helper_the_runs_differ() {
    let cases = cases();
    let case = &cases[1];
    assert_eq!(
        case["name"], "conv2d_paper_lr",
        "no cross-variable clipping"
    );
    let shapes = [3usize, 3, 4, 6];
    for helper in [true, false] {
        let w = Var::from_tensor(&keras_tensor(&case["variables"][0]["initial"], &shapes)).unwrap();
        let mut opt = Adafactor::from_config(&case["config"]).unwrap();
        opt.build_named(vec![("conv3x3/kernel".into(), w.clone())])
            .unwrap();
        if helper {
            opt.factor_convolutions().unwrap();
        }
        for k in 0..2 {
            let g = keras_tensor(&case["steps"][k]["gradients"][0], &shapes);
            opt.apply_gradients(&[(Some(&g), &w)]).unwrap();
        }
        let want = &case["steps"][1]["variables"][0];
        let got = compare("conv3x3/kernel", w.as_tensor(), want);
        assert_eq!(got.is_ok(), helper, "{got:?}");
    }
}
