//! burn's per-tensor `Optimizer` (through `ModuleOptimizer`, as burn-train's `Learner` uses it)
//! gives the module-level optimizer's results bit for bit on every per-tensor feature, with one
//! global `iterations` (driven by the clock scheduler, or by the heuristic without it).

mod common;

use burn::module::ParamGroup;
use burn::optim::ModuleOptimizer;
use burn::optim::lr_scheduler::LrScheduler;
use burn::tensor::{DType, Device};
use burn_adafactor::{Adafactor, AdafactorConfig, KerasAdafactor, LearningRateSchedule};
use common::Handle;

fn config(jit: bool) -> AdafactorConfig {
    AdafactorConfig {
        learning_rate: LearningRateSchedule::exponential_decay(0.1, 3.0, 0.5, false)
            .expect("schedule")
            .into(),
        weight_decay: Some(0.05),
        clipnorm: Some(1.0),
        use_ema: true,
        ema_overwrite_frequency: Some(3),
        gradient_accumulation_steps: Some(2),
        loss_scale_factor: Some(2.0),
        jit_compile: jit,
        ..Default::default()
    }
}

fn vars() -> Vec<(Vec<usize>, Vec<f32>)> {
    vec![
        (vec![3, 4], (0..12).map(|k| k as f32 * 0.1 - 0.5).collect()),
        (vec![4], vec![0.5, -1.0, 2.0, 0.25]),
        (
            vec![2, 2, 3],
            (0..12).map(|k| 1.0 - k as f32 * 0.07).collect(),
        ),
    ]
}

fn grads(h: &[Handle], step: usize) -> Vec<Option<Vec<f32>>> {
    h.iter()
        .map(|h| {
            Some(
                (0..h.shape.iter().product::<usize>())
                    .map(|k| ((k + 5 * step) as f32 * 0.61).sin())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn per_tensor_matches_the_module_optimizer() {
    const STEPS: usize = 7;
    for jit in [true, false] {
        let dev = Device::flex().autodiff();
        // The module-level optimizer, with `r3.0` excluded from weight decay.
        let (mut m, h) = common::build(&vars(), &dev, None);
        let mut opt = Adafactor::new(config(jit)).expect("optimizer");
        opt.exclude_from_weight_decay(&["r3"]).expect("exclusions");
        for s in 0..STEPS {
            m = opt
                .step(m, common::grads(&h, &grads(&h, s), &dev, DType::F32))
                .expect("step");
        }
        for use_clock in [true, false] {
            let (mut p, hp) = common::build(&vars(), &dev, None);
            let keras = KerasAdafactor::new(config(jit)).expect("per-tensor optimizer");
            let mut clock = keras.clock();
            let group = ParamGroup::from_any_regexes(vec!["r3".to_string()]).expect("group");
            let mut po: ModuleOptimizer = ModuleOptimizer::from(keras.clone()).with_group(
                group,
                keras.without_weight_decay(),
                None,
            );
            for s in 0..STEPS {
                let lr = if use_clock { clock.step() } else { 0.0 };
                p = po.step(lr, p, common::grads(&hp, &grads(&hp, s), &dev, DType::F32));
            }
            assert_eq!(
                keras.raw_iterations(),
                STEPS as u64 - 1,
                "the index of the last step"
            );
            for (a, b) in h.iter().zip(&hp) {
                assert_eq!(
                    common::bits(&m, a),
                    common::bits(&p, b),
                    "jit={jit} clock={use_clock}: `{}`",
                    a.path()
                );
                assert!(common::requires_grad(&p, b));
            }
        }
    }
}

#[test]
fn global_clipnorm_needs_the_module_optimizer() {
    let cfg = AdafactorConfig {
        global_clipnorm: Some(1.0),
        ..Default::default()
    };
    let e = KerasAdafactor::new(cfg).expect_err("refused");
    assert!(e.to_string().contains("global_clipnorm"), "{e}");
}

#[test]
fn the_clock_record_resumes_the_count() {
    let keras = KerasAdafactor::new(AdafactorConfig::default()).expect("optimizer");
    let mut clock = keras.clock();
    for _ in 0..4 {
        clock.step();
    }
    let record = clock.to_record();
    let fresh = KerasAdafactor::new(AdafactorConfig::default()).expect("optimizer");
    let mut resumed = fresh.clock();
    resumed.load_record(record);
    resumed.step();
    assert_eq!(fresh.raw_iterations(), 4);
}
