//! Helpers shared by the integration tests (each test file includes this module).

#![allow(dead_code)] // each test file uses only some of them

pub mod harness;

use candle_adafactor::{
    Adafactor, AdafactorConfig, DataPath, LearningRateSchedule, WeightRounding,
};
use candle_core::{DType, Tensor};
use half::{bf16, f16};

/// Both data paths, as `jit_compile`: the fused kernels (`true`) and composed candle ops.
pub const PATHS: [bool; 2] = [true, false];

/// The path a step with contiguous CPU tensors takes under `jit_compile = jit`.
pub fn expected_path(jit: bool) -> DataPath {
    if jit {
        DataPath::Fused
    } else {
        DataPath::Composed
    }
}

/// Fails when the last step did not take the path `jit_compile = jit` asks for (a fused run that
/// quietly went composed).
pub fn assert_path(opt: &Adafactor, jit: bool, what: &str) {
    assert_eq!(opt.data_path(), expected_path(jit), "{what}: data path");
}

/// FORMAT.md's tolerance for values recorded from Keras (shared with every adapter's suite).
#[allow(unused_imports)] // each test file uses only some helpers
pub use adafactor_conformance::close;

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

/// Keras defaults at learning rate 0.1, on the fused (`jit = true`) or the composed path.
pub fn base(jit: bool) -> AdafactorConfig {
    AdafactorConfig {
        learning_rate: 0.1.into(),
        jit_compile: jit,
        ..Default::default()
    }
}

/// The configurations the atomicity and memory tests run under: every pipeline stage that
/// keeps state, each alone, and all together (`everything`).
pub fn configs(jit: bool) -> Vec<(&'static str, AdafactorConfig)> {
    let b = base(jit);
    vec![
        ("plain", b.clone()),
        (
            "ema",
            AdafactorConfig {
                use_ema: true,
                ema_momentum: 0.9,
                ema_overwrite_frequency: Some(2),
                ..b.clone()
            },
        ),
        (
            "accumulation2",
            AdafactorConfig {
                gradient_accumulation_steps: Some(2),
                ..b.clone()
            },
        ),
        (
            "accumulation3",
            AdafactorConfig {
                gradient_accumulation_steps: Some(3),
                ..b.clone()
            },
        ),
        (
            "weight_decay",
            AdafactorConfig {
                weight_decay: Some(0.1),
                ..b.clone()
            },
        ),
        (
            "global_clipnorm",
            AdafactorConfig {
                global_clipnorm: Some(0.5),
                ..b.clone()
            },
        ),
        (
            "clipnorm",
            AdafactorConfig {
                clipnorm: Some(0.5),
                ..b.clone()
            },
        ),
        (
            "clipvalue",
            AdafactorConfig {
                clipvalue: Some(0.25),
                ..b.clone()
            },
        ),
        (
            "loss_scale",
            AdafactorConfig {
                loss_scale_factor: Some(4.0),
                ..b.clone()
            },
        ),
        (
            "stochastic_rounding",
            AdafactorConfig {
                weight_rounding: WeightRounding::Stochastic,
                weight_rounding_seed: 3,
                use_ema: true,
                ema_momentum: 0.9,
                ema_overwrite_frequency: Some(2),
                ..b.clone()
            },
        ),
        (
            "everything",
            AdafactorConfig {
                learning_rate: LearningRateSchedule::cosine_decay(0.1, 10.0, 0.1, None, 0.0)
                    .expect("schedule")
                    .into(),
                weight_decay: Some(0.05),
                global_clipnorm: Some(1.0),
                use_ema: true,
                ema_momentum: 0.8,
                ema_overwrite_frequency: Some(3),
                gradient_accumulation_steps: Some(2),
                loss_scale_factor: Some(2.0),
                ..b
            },
        ),
    ]
}

/// A chart written by a training example, decoded.
pub struct ChartPixels {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    rgb: Vec<[u8; 3]>,
}

impl ChartPixels {
    /// Decodes the RGB PNG at `path` (panics when it is not one: these are tests).
    pub fn read(path: &std::path::Path) -> Self {
        let decoder = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(path).expect("the chart exists"),
        ));
        let mut reader = decoder.read_info().expect("a PNG");
        let mut pixels = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut pixels).expect("one frame");
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let rgb = pixels.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect();
        ChartPixels {
            width: info.width,
            height: info.height,
            rgb,
        }
    }

    /// Dark grey-scale pixels: axes and text.
    pub fn dark(&self) -> usize {
        self.rgb
            .iter()
            .filter(|p| p[0] < 80 && p[0] == p[1] && p[1] == p[2])
            .count()
    }

    /// Pixels of exactly this colour (a run's lines and legend).
    pub fn of_colour(&self, colour: [u8; 3]) -> usize {
        self.rgb.iter().filter(|p| **p == colour).count()
    }
}
