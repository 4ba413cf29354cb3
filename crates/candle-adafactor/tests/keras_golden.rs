//! Golden values from Keras's own tests (`keras/src/optimizers/adafactor_test.py` and
//! `optimizer_test.py`, Keras 3.15.1) and the extra Keras traces in the project's Keras spec
//! (section 4), each on both data paths. Where Keras's test uses SGD, the property under test
//! (clipping, loss scaling, accumulation) is checked through Adafactor's state instead.

mod common;

use candle_adafactor::{Adafactor, AdafactorConfig};
use candle_core::{DType, Device, Tensor, Var};

use common::PATHS;

fn cfg(jit: bool, lr: f64) -> AdafactorConfig {
    AdafactorConfig {
        jit_compile: jit,
        ..AdafactorConfig::with_learning_rate(lr)
    }
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= tol + tol * w.abs(),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("a tensor")
}

fn state(opt: &Adafactor, name: &str) -> Vec<f32> {
    let vars = opt.variables().expect("variables");
    let (_, t) = vars
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no optimizer variable {name}"));
    flat(t)
}

fn one_step(jit: bool, init: &Tensor, grad: &Tensor) -> Vec<f32> {
    let w = Var::from_tensor(init).expect("var");
    let mut opt = Adafactor::new_named(vec![("w".into(), w.clone())], cfg(jit, 0.5)).expect("opt");
    opt.apply_gradients(&[(Some(grad), &w)]).expect("step");
    flat(w.as_tensor())
}

#[test]
fn single_step_1d() {
    let dev = Device::Cpu;
    for jit in PATHS {
        let got = one_step(
            jit,
            &Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev).unwrap(),
            &Tensor::new(&[1f32, 6.0, 7.0, 2.0], &dev).unwrap(),
        );
        // Keras: [-0.3693, 0.6307, 1.6307, 2.6307] at 1e-4; full float32 values.
        assert_close(
            &got,
            &[-0.36930645, 0.63069355, 1.6306936, 2.6306934],
            1e-6,
            "1d",
        );
    }
}

#[test]
fn single_step_2d() {
    let dev = Device::Cpu;
    for jit in PATHS {
        let got = one_step(
            jit,
            &Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap(),
            &Tensor::new(&[[1f32, 6.0], [7.0, 2.0]], &dev).unwrap(),
        );
        // Keras: [[0.7007, -0.0081], [1.2492, 3.4407]] at 1e-4; full float32 values.
        assert_close(
            &got,
            &[0.7006545, -0.008070946, 1.2492113, 3.440731],
            1e-6,
            "2d",
        );
    }
}

#[test]
fn weight_decay_with_exclusions() {
    let dev = Device::Cpu;
    for jit in PATHS {
        let var = || Var::new(2f32, &dev).unwrap();
        let (var1, var2, var3) = (var(), var(), var());
        let zero = Tensor::new(0f32, &dev).unwrap();
        let config = AdafactorConfig {
            weight_decay: Some(0.004),
            ..cfg(jit, 1.0)
        };
        let mut opt1 =
            Adafactor::new_named(vec![("var1".into(), var1.clone())], config.clone()).unwrap();
        let mut opt2 = Adafactor::new_named(
            vec![
                ("var1".into(), var1.clone()),
                ("exclude".into(), var2.clone()),
            ],
            config.clone(),
        )
        .unwrap();
        opt2.exclude_from_weight_decay(&[], &["exclude"]).unwrap();
        let mut opt3 = Adafactor::new_named(
            vec![("var1".into(), var1.clone()), ("var3".into(), var3.clone())],
            config,
        )
        .unwrap();
        opt3.exclude_from_weight_decay(&[&var3], &[]).unwrap();
        opt1.apply_gradients(&[(Some(&zero), &var1)]).unwrap();
        opt2.apply_gradients(&[(Some(&zero), &var1), (Some(&zero), &var2)])
            .unwrap();
        opt3.apply_gradients(&[(Some(&zero), &var1), (Some(&zero), &var3)])
            .unwrap();
        // Keras: var1 = 1.9760959 (= 2 * 0.996^3, decimal 6), var2 = var3 = 2.0.
        assert_close(&flat(var1.as_tensor()), &[1.9760959], 1e-6, "var1");
        assert_eq!(flat(var2.as_tensor()), [2.0]);
        assert_eq!(flat(var3.as_tensor()), [2.0]);
    }
}

#[test]
fn correctness_with_golden() {
    // A float64 variable, as in Keras's test; `relative_step=False` changes nothing.
    let dev = Device::Cpu;
    let golden: [[f64; 10]; 5] = [
        [0.55; 10],
        [
            0.3031, 0.3026, 0.3025, 0.3024, 0.3024, 0.3024, 0.3024, 0.3024, 0.3024, 0.3024,
        ],
        [
            0.1671, 0.1665, 0.1663, 0.1663, 0.1663, 0.1663, 0.1663, 0.1663, 0.1663, 0.1663,
        ],
        [
            0.0923, 0.0916, 0.0915, 0.0914, 0.0914, 0.0914, 0.0914, 0.0914, 0.0914, 0.0914,
        ],
        [
            0.0554, 0.0548, 0.0546, 0.0546, 0.0546, 0.0546, 0.0546, 0.0545, 0.0545, 0.0545,
        ],
    ];
    let row1 = [
        0.303092864,
        0.302567179,
        0.30246946,
        0.302435232,
        0.302419384,
        0.302410774,
        0.302405582,
        0.302402212,
        0.302399902,
        0.302398249,
    ];
    let row4 = [
        0.055449711,
        0.054763045,
        0.054635477,
        0.054590798,
        0.054570113,
        0.054558875,
        0.054552098,
        0.0545477,
        0.054544684,
        0.054542527,
    ];
    for jit in PATHS {
        let x = Var::from_tensor(&Tensor::ones(10, DType::F64, &dev).unwrap()).unwrap();
        let config = AdafactorConfig {
            beta_2_decay: -0.65,
            epsilon_1: 1e-15,
            epsilon_2: 1e-4,
            clip_threshold: 0.9,
            relative_step: false,
            ..cfg(jit, 0.5)
        };
        let mut opt = Adafactor::new_named(vec![("x".into(), x.clone())], config).unwrap();
        let grads: Vec<f64> = (1..=10).map(|i| i as f64 / 10.0).collect();
        let grads = Tensor::new(grads.as_slice(), &dev).unwrap();
        let first = Tensor::full(0.01f64, 10, &dev).unwrap();
        opt.apply_gradients(&[(Some(&first), &x)]).unwrap();
        for (i, want) in golden.iter().enumerate() {
            let got = flat(x.as_tensor());
            assert_close(&got, want, 5e-4, &format!("golden row {i}"));
            if i == 1 {
                assert_close(&got, &row1, 1e-6, "row 1, full precision");
            }
            if i == 4 {
                assert_close(&got, &row4, 1e-6, "row 4, full precision");
            }
            opt.apply_gradients(&[(Some(&grads), &x)]).unwrap();
        }
    }
}

/// The clipped gradient, read back from the statistics after one step: at t = 1, beta2 = 0, so
/// a vector's `v` is `g_clipped^2 + epsilon_1`.
fn clipped_square(jit: bool, config: AdafactorConfig, grads: &[[f32; 2]]) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let vars: Vec<(String, Var)> = (0..grads.len())
        .map(|i| (format!("w{i}"), Var::new(&[1f32, 1.0], &dev).unwrap()))
        .collect();
    let mut opt = Adafactor::new_named(
        vars.clone(),
        AdafactorConfig {
            jit_compile: jit,
            ..config
        },
    )
    .unwrap();
    let gs: Vec<Tensor> = grads
        .iter()
        .map(|g| Tensor::new(g, &dev).unwrap())
        .collect();
    let pairs: Vec<(Option<&Tensor>, &Var)> = gs
        .iter()
        .map(Some)
        .zip(vars.iter().map(|(_, v)| v))
        .collect();
    opt.apply_gradients(&pairs).unwrap();
    (0..grads.len())
        .map(|i| state(&opt, &format!("w{i}/v")))
        .collect()
}

#[test]
fn clip_norm_and_clip_value() {
    for jit in PATHS {
        // Keras: clipnorm=1 on [100, 100] gives [sqrt(2)/2, sqrt(2)/2]; clipvalue=1 gives [1, 1].
        let v = clipped_square(
            jit,
            AdafactorConfig {
                clipnorm: Some(1.0),
                ..Default::default()
            },
            &[[100.0, 100.0]],
        );
        assert_close(&v[0], &[0.5, 0.5], 1e-6, "clipnorm");
        let v = clipped_square(
            jit,
            AdafactorConfig {
                clipvalue: Some(1.0),
                ..Default::default()
            },
            &[[100.0, 100.0]],
        );
        assert_close(&v[0], &[1.0, 1.0], 1e-6, "clipvalue");
        // optimizer_test: global_clipnorm=1 with two gradients [100, 100] gives [0.5, 0.5] each.
        let v = clipped_square(
            jit,
            AdafactorConfig {
                global_clipnorm: Some(1.0),
                ..Default::default()
            },
            &[[100.0, 100.0], [100.0, 100.0]],
        );
        assert_close(&v[0], &[0.25, 0.25], 1e-6, "global_clipnorm, first");
        assert_close(&v[1], &[0.25, 0.25], 1e-6, "global_clipnorm, second");
    }
}

#[test]
fn static_loss_scaling_unscales_exactly() {
    let dev = Device::Cpu;
    for jit in PATHS {
        let run = |scale: Option<f64>| {
            let w = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
            let config = AdafactorConfig {
                loss_scale_factor: scale,
                ..cfg(jit, 0.1)
            };
            let mut opt = Adafactor::new_named(vec![("w".into(), w.clone())], config).unwrap();
            let g = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
            let g = (g * scale.unwrap_or(1.0)).unwrap();
            opt.apply_gradients(&[(Some(&g), &w)]).unwrap();
            (flat(w.as_tensor()), opt)
        };
        let (scaled, opt) = run(Some(1024.0));
        let (plain, _) = run(None);
        assert_eq!(scaled, plain);
        let loss = opt.scale_loss(&Tensor::new(1f32, &dev).unwrap()).unwrap();
        assert_eq!(loss.to_scalar::<f32>().unwrap(), 1024.0);
    }
}

#[test]
fn gradient_accumulation_counts_and_averages() {
    let dev = Device::Cpu;
    for jit in PATHS {
        // optimizer_test (k = 3): (raw, iterations) = (1,0), (2,0), (3,1), (4,1); only the third
        // apply changes the weights.
        let w = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let config = AdafactorConfig {
            gradient_accumulation_steps: Some(3),
            ..cfg(jit, 0.1)
        };
        let mut opt = Adafactor::new_named(vec![("w".into(), w.clone())], config).unwrap();
        let g = Tensor::ones((2, 2), DType::F32, &dev).unwrap();
        let start = flat(w.as_tensor());
        let mut seen = Vec::new();
        for _ in 0..4 {
            opt.apply_gradients(&[(Some(&g), &w)]).unwrap();
            seen.push((
                opt.raw_iterations(),
                opt.iterations(),
                flat(w.as_tensor()) != start,
            ));
        }
        assert_eq!(
            seen,
            [(1, 0, false), (2, 0, false), (3, 1, true), (4, 1, true)]
        );
        assert_eq!(state(&opt, "w/accumulator"), [1.0; 4]);

        // Two accumulated applies of the same gradient equal one plain apply.
        let acc_w = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let plain_w = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let g = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap();
        let config = AdafactorConfig {
            gradient_accumulation_steps: Some(2),
            ..cfg(jit, 0.1)
        };
        let mut acc = Adafactor::new_named(vec![("w".into(), acc_w.clone())], config).unwrap();
        let mut plain =
            Adafactor::new_named(vec![("w".into(), plain_w.clone())], cfg(jit, 0.1)).unwrap();
        acc.apply_gradients(&[(Some(&g), &acc_w)]).unwrap();
        acc.apply_gradients(&[(Some(&g), &acc_w)]).unwrap();
        plain.apply_gradients(&[(Some(&g), &plain_w)]).unwrap();
        assert_eq!(flat(acc_w.as_tensor()), flat(plain_w.as_tensor()));
    }
}

#[test]
fn rank3_trace() {
    // Spec 4.3: Adafactor(learning_rate=0.1), X = arange(1, 13).reshape(2, 2, 3) / 10,
    // G = (arange(12).reshape(2, 2, 3) - 5.5) / 4, the same G each step.
    let dev = Device::Cpu;
    let step1 = [
        0.17152017, 0.2745304, 0.37777236, 0.48705798, 0.56652963, 0.629753, 0.670247, 0.7334704,
        0.81294197, 0.9222276, 1.0254697, 1.1284798,
    ];
    let step3 = [
        0.30724758, 0.4159705, 0.5253649, 0.6522723, 0.6927862, 0.68621665, 0.61378336, 0.6072138,
        0.64772767, 0.7746351, 0.88402957, 0.99275243,
    ];
    for jit in PATHS {
        let x: Vec<f32> = (1..=12).map(|i| i as f32 / 10.0).collect();
        let g: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) / 4.0).collect();
        let w = Var::from_vec(x, (2, 2, 3), &dev).unwrap();
        let g = Tensor::from_vec(g, (2, 2, 3), &dev).unwrap();
        let mut opt = Adafactor::new_named(vec![("x".into(), w.clone())], cfg(jit, 0.1)).unwrap();
        opt.apply_gradients(&[(Some(&g), &w)]).unwrap();
        assert_close(&flat(w.as_tensor()), &step1, 1e-6, "step 1");
        opt.apply_gradients(&[(Some(&g), &w)]).unwrap();
        opt.apply_gradients(&[(Some(&g), &w)]).unwrap();
        assert_close(&flat(w.as_tensor()), &step3, 1e-6, "step 3");
        assert_close(
            &state(&opt, "x/r"),
            &[1.3072916, 0.18229167, 0.18229167, 1.3072916],
            1e-6,
            "r",
        );
        assert_close(
            &state(&opt, "x/c"),
            &[1.140625, 0.703125, 0.390625, 0.390625, 0.703125, 1.140625],
            1e-6,
            "c",
        );
    }
}

#[test]
fn adafactor_ema_trace() {
    // Spec 4.3: Adafactor(0.5, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=2),
    // var [1, 2, 3, 4], grad [1, 6, 7, 2] every step.
    let dev = Device::Cpu;
    let xs: [[f64; 4]; 4] = [
        [-0.36930645, 0.63069355, 1.6306936, 2.6306934],
        [-0.44881225, 0.55118775, 1.5511878, 2.5511878],
        [-1.216112, -0.21611202, 0.783888, 1.783888],
        [-0.6522749, 0.3477251, 1.347725, 2.3477252],
    ];
    let avg3 = [-0.52554226, 0.47445774, 1.4744577, 2.4744577];
    for jit in PATHS {
        let w = Var::new(&[1f32, 2.0, 3.0, 4.0], &dev).unwrap();
        let g = Tensor::new(&[1f32, 6.0, 7.0, 2.0], &dev).unwrap();
        let config = AdafactorConfig {
            use_ema: true,
            ema_momentum: 0.9,
            ema_overwrite_frequency: Some(2),
            ..cfg(jit, 0.5)
        };
        let mut opt = Adafactor::new_named(vec![("w".into(), w.clone())], config).unwrap();
        for (k, want) in xs.iter().enumerate() {
            opt.apply_gradients(&[(Some(&g), &w)]).unwrap();
            assert_close(
                &flat(w.as_tensor()),
                want,
                1e-6,
                &format!("x after step {}", k + 1),
            );
            let avg = flat(&opt.moving_average(&w).unwrap().expect("an average"));
            let want_avg: &[f64] = if k == 2 { &avg3 } else { want };
            assert_close(
                &avg,
                want_avg,
                1e-6,
                &format!("average after step {}", k + 1),
            );
        }
    }
}
