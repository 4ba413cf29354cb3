//! Memory stays flat over many steps, for every configuration, on both data paths.
//!
//! A counting global allocator tracks the bytes alive in this process. After a warm-up, a few
//! hundred steps (with `set_weights`, `set_keras_weights`, `load_state_dict` and
//! `finalize_variable_values` in between) may not leave more than a small allowance alive: a
//! kept tensor that holds a reference to the previous step (an EMA average still tied to
//! candle's backprop graph) leaks at least one copy of the weights per step, hundreds in all.
//!
//! This file holds one test on purpose: the counter sees every thread, so a second test running
//! beside it would disturb the count.

mod common;

use candle_adafactor::{Adafactor, DataPath};
use candle_core::{DType, Device, Tensor, Var};
use common::configs;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const SHAPES: [&[usize]; 4] = [&[128, 64], &[64], &[64, 16], &[8, 4, 3, 3]];

fn model(dtype: DType) -> Vec<(String, Var)> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, dims)| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|k| ((k * 7 + i * 3) % 19) as f32 / 19.0 - 0.5)
                .collect();
            let t = Tensor::from_vec(v, *dims, &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .expect("tensor");
            (format!("layer{i}"), Var::from_tensor(&t).expect("var"))
        })
        .collect()
}

/// One training step: gradients from a real backward pass, then `backward_step`.
fn step(opt: &mut Adafactor, vars: &[(String, Var)], k: usize) {
    let mut loss = Tensor::new(0f32, &Device::Cpu).expect("zero");
    for (_, v) in vars {
        let x = v.as_tensor().to_dtype(DType::F32).expect("f32");
        let term = x
            .affine(1.0, 0.01 * (k % 5) as f64)
            .and_then(|y| y.sqr())
            .and_then(|y| y.mean_all())
            .expect("term");
        loss = (loss + term).expect("sum");
    }
    candle_nn::Optimizer::backward_step(opt, &loss).expect("step");
}

/// The state round trips a user does now and then.
fn round_trips(opt: &mut Adafactor, vars: &[(String, Var)]) {
    let w: Vec<Tensor> = opt
        .variables()
        .expect("variables")
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    opt.set_weights(&w).expect("set_weights");
    let k: Vec<Tensor> = opt
        .keras_variables()
        .expect("keras_variables")
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    opt.set_keras_weights(&k).expect("set_keras_weights");
    let sd = opt.state_dict().expect("state_dict");
    opt.load_state_dict(&sd).expect("load_state_dict");
    let bytes = opt.to_safetensors_bytes().expect("to bytes");
    opt.load_safetensors_bytes(&bytes).expect("from bytes");
    let refs: Vec<&Var> = vars.iter().map(|(_, v)| v).collect();
    opt.finalize_variable_values(&refs).expect("finalize");
}

#[test]
fn memory_is_flat_over_hundreds_of_steps() {
    let weight_bytes: usize = SHAPES.iter().map(|d| 4 * d.iter().product::<usize>()).sum();
    // A leak of one copy of the weights per step would be 280 copies here.
    let allowance = (4 * weight_bytes).max(256 * 1024) as isize;
    let mut failures = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        for jit in [false, true] {
            for (name, cfg) in configs(jit) {
                let vars = model(dtype);
                let mut opt = Adafactor::new_named(vars.clone(), cfg).expect("optimizer");
                for k in 0..20 {
                    step(&mut opt, &vars, k);
                }
                round_trips(&mut opt, &vars);
                let before = live();
                for k in 20..300 {
                    step(&mut opt, &vars, k);
                    if k % 40 == 0 {
                        round_trips(&mut opt, &vars);
                    }
                }
                let growth = live() - before;
                let path = if jit { "fused" } else { "composed" };
                println!("{name:>14} {dtype:?} {path:>8}: {growth:>10} bytes more after 280 steps");
                assert_eq!(
                    opt.data_path() == DataPath::Fused,
                    jit,
                    "{name} {dtype:?}: wrong data path"
                );
                if growth > allowance {
                    failures.push(format!("{name} {dtype:?} {path}: +{growth} bytes"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "memory grew by more than {allowance} bytes over 280 steps: {failures:?}"
    );
}
