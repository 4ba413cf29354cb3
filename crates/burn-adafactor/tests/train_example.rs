//! Tests of the `burn_train` example (`examples/burn_train.rs`), on its own code with a tiny GPT: gradients
//! reaching every parameter, causality, shared initial weights, short runs of every optimizer
//! lowering the loss, the `result` lines and the options.

#[allow(dead_code)]
#[path = "../examples/burn_train/cli.rs"]
mod cli;
#[allow(dead_code)]
#[path = "../../candle-adafactor/examples/train/corpus.rs"]
mod corpus;
#[allow(dead_code)]
#[path = "../examples/burn_train/model.rs"]
mod model;
#[allow(dead_code)]
#[path = "../../candle-adafactor/examples/common/rng.rs"]
mod rng;
#[allow(dead_code)]
#[path = "../examples/burn_train/training.rs"]
mod training;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use cli::parse_args;
use corpus::{CORPUS, Corpus, windows};
use model::{Gpt, int_tensor};
use std::collections::HashMap;
use training::{ParamIds, RUNS, RunResult, TrainConfig, train_run};

/// The first 40,000 characters: enough for a few dozen steps, small enough that the final
/// evaluation over the whole validation part takes milliseconds.
fn small_corpus() -> Corpus {
    Corpus::from_text(&CORPUS[..40_000]).expect("the corpus splits")
}

/// Every parameter's values, in visit order.
fn weights(model: &Gpt) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0.push(data.try_to_vec::<f32>().expect("f32 values"));
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

#[test]
fn every_parameter_receives_a_gradient() {
    let corpus = small_corpus();
    let cfg = TrainConfig::tiny(corpus.tokenizer.vocab_size(), 10);
    let device = Device::flex().autodiff();
    let model = Gpt::new(cfg.model, cfg.seed, &device).expect("a valid shape");
    let ids = ParamIds::of(&model).expect("vectors and matrices");
    // tok, pos, ln_f, head and per block ln1, qkv, proj, ln2, fc, fc_proj.
    assert_eq!(ids.vectors.len() + ids.matrices.len(), 4 + 6);
    let t = cfg.model.context;
    let (x, y) = windows(&corpus.train, &[0, 100, 200], t).expect("windows fit");
    let loss = model.loss(int_tensor(x, 3, t, &device), int_tensor(y, 3, t, &device));
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    assert_eq!(ids.without_gradient(&grads), Vec::<String>::new());
    // The check can fail: without the head's gradient, the head is named.
    let mut grads = grads;
    let head = ids.matrices.iter().find(|(p, _)| p == "head.weight");
    let (_, head_id) = head.expect("a parameter at head.weight");
    grads
        .remove::<2>(*head_id)
        .expect("the head had a gradient");
    assert_eq!(
        ids.without_gradient(&grads),
        vec!["head.weight".to_string()]
    );
}

#[test]
fn the_model_is_causal() {
    let corpus = small_corpus();
    let cfg = TrainConfig::tiny(corpus.tokenizer.vocab_size(), 10);
    let device = Device::flex();
    let model = Gpt::new(cfg.model, cfg.seed, &device).expect("a valid shape");
    let t = cfg.model.context;
    let a: Vec<u32> = corpus.train[..t].to_vec();
    let mut b = a.clone();
    b[t - 1] = (b[t - 1] + 1) % cfg.model.vocab_size as u32;
    let logits = |tokens: Vec<u32>| -> Vec<f32> {
        let out = model.forward(int_tensor(tokens, 1, t, &device));
        out.into_data().try_to_vec::<f32>().expect("f32 logits")
    };
    let (la, lb) = (logits(a), logits(b));
    let v = cfg.model.vocab_size;
    // Changing the last token leaves every earlier position's logits alone, and changes its own.
    assert_eq!(la[..(t - 1) * v], lb[..(t - 1) * v]);
    assert_ne!(la[(t - 1) * v..], lb[(t - 1) * v..]);
}

#[test]
fn the_initial_weights_depend_on_the_seed_only() {
    let corpus = small_corpus();
    let cfg = TrainConfig::tiny(corpus.tokenizer.vocab_size(), 10);
    let device = Device::flex().autodiff();
    let a = weights(&Gpt::new(cfg.model, cfg.seed, &device).expect("model"));
    // Something else drawn from the device between two builds changes nothing.
    let _noise = {
        let _rng = model::DEVICE_RNG.lock().unwrap_or_else(|e| e.into_inner());
        Tensor::<1>::random([7], burn::tensor::Distribution::Default, &device)
    };
    let b = weights(&Gpt::new(cfg.model, cfg.seed, &device).expect("model"));
    let c = weights(&Gpt::new(cfg.model, cfg.seed + 1, &device).expect("model"));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(
        Gpt::new(
            model::GptConfig {
                heads: 3,
                ..cfg.model
            },
            1,
            &device
        )
        .expect_err("3 heads do not divide 32")
        .contains("heads must divide width")
    );
}

fn parse_result_line(line: &str) -> HashMap<String, String> {
    let rest = line.strip_prefix("result ").expect("starts with `result `");
    rest.split(' ')
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("key=value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn short_run(corpus: &Corpus, name: &str, cfg: &TrainConfig) -> RunResult {
    let mut evals = Vec::new();
    let result = train_run(corpus, name, cfg, &mut |s, t, v| evals.push((s, t, v)))
        .unwrap_or_else(|e| panic!("run {name}: {e}"));
    assert_eq!(evals.first().map(|e| e.0), Some(0));
    assert_eq!(evals.last().map(|e| e.0), Some(cfg.iterations));
    result
}

#[test]
fn short_runs_of_every_optimizer_lower_the_loss_and_report_parsable_results() {
    let corpus = small_corpus();
    let cfg = TrainConfig::tiny(corpus.tokenizer.vocab_size(), 30);
    for (name, _, peak) in RUNS {
        let run = short_run(&corpus, name, &cfg);
        let start = run.val_curve[0].1;
        assert!(
            run.val_loss < start - 0.2,
            "{name}: validation loss {start} -> {}",
            run.val_loss
        );
        let fields = parse_result_line(&run.result_line());
        assert_eq!(fields["optimizer"], name);
        for key in ["val_loss", "train_loss", "tokens_per_s", "seconds"] {
            let value: f64 = fields[key].parse().expect("a number");
            assert!(value.is_finite() && value > 0.0, "{name}: {key}={value}");
        }
        let params: usize = fields["params"].parse().expect("a count");
        let state: usize = fields["state_bytes"].parse().expect("a count");
        assert_eq!(params, run.params);
        assert!(state > 0 && state < 3 * 4 * params, "{name}: {state} bytes");
        assert_eq!(run.learning_rate, peak);
    }
}

#[test]
fn runs_share_their_start_and_differ_by_the_optimizer_only() {
    let corpus = small_corpus();
    let cfg = TrainConfig::tiny(corpus.tokenizer.vocab_size(), 8);
    let runs: Vec<RunResult> = RUNS.iter().map(|r| short_run(&corpus, r.0, &cfg)).collect();
    // The same initial weights and the same validation windows: the same loss at step 0.
    assert!(runs.iter().all(|r| r.val_curve[0] == runs[0].val_curve[0]));
    // A second run of the same optimizer repeats the first exactly.
    let again = short_run(&corpus, "keras-adafactor", &cfg);
    assert_eq!(again.val_curve, runs[0].val_curve);
    assert_ne!(runs[0].val_curve, runs[1].val_curve);
}

#[test]
fn adafactor_state_is_a_fraction_of_adamw_state_on_the_reference_model() {
    let corpus = small_corpus();
    let cfg = TrainConfig {
        iterations: 1,
        warmup: 0,
        eval_batches: 1,
        ..TrainConfig::reference(corpus.tokenizer.vocab_size())
    };
    let states: Vec<(usize, usize)> = RUNS
        .iter()
        .map(|r| {
            let run = short_run(&corpus, r.0, &cfg);
            (run.state_bytes, run.params)
        })
        .collect();
    let (keras, burn, adamw) = (states[0], states[1], states[2]);
    assert_eq!(adamw.0, 8 * adamw.1);
    assert!(keras.0 * 50 < adamw.0, "{keras:?} vs {adamw:?}");
    assert!(burn.0 * 50 < adamw.0, "{burn:?} vs {adamw:?}");
}

fn args(list: &[&str]) -> Result<Option<(TrainConfig, Vec<String>)>, String> {
    parse_args(list.iter().map(|s| s.to_string()), 65)
}

#[test]
fn options_set_steps_seed_and_runs_and_name_what_is_wrong() {
    let (cfg, runs) = args(&[]).expect("defaults").expect("not help");
    assert_eq!(cfg.iterations, training::QUICK_ITERATIONS);
    assert_eq!(cfg.seed, 1337);
    assert_eq!(runs, ["keras-adafactor", "burn-adafactor", "burn-adamw"]);
    let (cfg, _) = args(&["--full"]).expect("full").expect("not help");
    assert_eq!(cfg.iterations, 2000);
    let (cfg, runs) = args(&["--steps=150", "--seed", "3", "--runs", "burn-adamw"])
        .expect("valid")
        .expect("not help");
    assert_eq!((cfg.iterations, cfg.seed), (150, 3));
    assert_eq!(runs, ["burn-adamw"]);
    assert_eq!(args(&["--help"]), Ok(None));
    for (bad, expected) in [
        (&["--steps", "50"][..], "above the 100 warm-up steps"),
        (&["--steps", "x"][..], "--steps expects a whole number"),
        (&["--runs", "sgd"][..], "unknown run `sgd`"),
        (&["--seed"][..], "--seed expects a value"),
        (&["--epochs", "3"][..], "unknown argument `--epochs`"),
    ] {
        let err = args(bad).expect_err("rejected");
        assert!(err.contains(expected), "{bad:?}: {err}");
    }
}
