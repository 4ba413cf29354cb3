//! Helpers shared by the integration tests (each test file includes this module).

#![allow(dead_code)] // each test file uses only some of them

use candle_core::{DType, Tensor};
use half::{bf16, f16};

/// FORMAT.md's tolerance for values recorded from Keras: `|a - b| <= 1e-6 + 1e-5 * |b|`.
pub fn close(got: f32, want: f64) -> bool {
    (got as f64 - want).abs() <= 1e-6 + 1e-5 * want.abs()
}

/// Every element of a tensor as its raw bits, in its own dtype.
pub fn tensor_bits(t: &Tensor) -> Vec<u64> {
    let flat = t.flatten_all().expect("flatten");
    match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()
            .expect("f32")
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()
            .expect("f64")
            .iter()
            .map(|x| x.to_bits())
            .collect(),
        DType::F16 => flat
            .to_vec1::<f16>()
            .expect("f16")
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::BF16 => flat
            .to_vec1::<bf16>()
            .expect("bf16")
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()
            .expect("i64")
            .iter()
            .map(|x| *x as u64)
            .collect(),
        DType::U32 => flat
            .to_vec1::<u32>()
            .expect("u32")
            .iter()
            .map(|x| *x as u64)
            .collect(),
        DType::U8 => flat
            .to_vec1::<u8>()
            .expect("u8")
            .iter()
            .map(|x| *x as u64)
            .collect(),
        other => panic!("no bit view for dtype {other:?}"),
    }
}
