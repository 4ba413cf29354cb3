//! Deterministic stochastic rounding of float32 results into bfloat16 and float16 weights.
//!
//! Rounding to nearest drops every update smaller than half a unit in the last place (ulp) of
//! the weight: a bf16 weight of 1.0 ignores any update below 2^-9, so bf16 training stalls where
//! float32 training goes on. Stochastic rounding rounds up with probability equal to the
//! distance to the lower neighbour in ulps, so the expected stored value is the float32 value
//! and small updates survive on average.
//!
//! The random bits come from a counter-based generator: [`RoundingKey`] mixes (seed, iteration,
//! variable, stream) once per tensor, and [`random_word`] hashes an index with it into 32 bits,
//! which serve two neighbouring elements, 16 bits each ([`random_bits`]): bf16 drops 16 bits of
//! a float32 and float16 13 in its normal range, so 16 bits make the rounding exact there, at
//! half the cost of a word per element. A
//! run is therefore reproducible bit for bit, independent of the thread count, of how work is
//! split, of the instruction set, and of stopping and resuming from a checkpoint (the iteration
//! count is part of the saved state).

use crate::error::{Error, Result};
use half::{bf16, f16};
use serde_json::{Map, Value};

/// How the float32 result of an update is rounded into a bfloat16 or float16 weight (the
/// `weight_rounding` config key; ours, not Keras's). float32 weights are written exactly either
/// way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightRounding {
    /// Round to nearest even, as Keras does (default).
    #[default]
    Nearest,
    /// Round up or down at random, with the probability of each neighbour proportional to its
    /// closeness, from bits keyed by (`weight_rounding_seed`, iteration, variable, element):
    /// unbiased, so updates below half a unit in the last place survive on average.
    Stochastic,
}

impl WeightRounding {
    /// The config spelling: `"nearest"` or `"stochastic"`.
    pub fn as_str(self) -> &'static str {
        match self {
            WeightRounding::Nearest => "nearest",
            WeightRounding::Stochastic => "stochastic",
        }
    }

    /// Parses the config spelling.
    ///
    /// # Errors
    /// Any other string.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "nearest" => Ok(WeightRounding::Nearest),
            "stochastic" => Ok(WeightRounding::Stochastic),
            other => Err(Error::invalid(
                "weight_rounding",
                format!(
                    "`weight_rounding` must be \"nearest\" or \"stochastic\". \
                     Received: weight_rounding={other:?}"
                ),
            )),
        }
    }
}

/// Checks the two rounding keys together: a seed only means something with stochastic
/// rounding, so a seed without it (most likely a forgotten `weight_rounding`) is refused.
///
/// # Errors
/// `weight_rounding_seed` is not 0 while `weight_rounding` is `"nearest"`.
pub fn validate(rounding: WeightRounding, seed: u64) -> Result<()> {
    if rounding == WeightRounding::Nearest && seed != 0 {
        return Err(Error::invalid(
            "weight_rounding_seed",
            format!(
                "`weight_rounding_seed` is only used with weight_rounding=\"stochastic\". \
                 Received: weight_rounding=\"nearest\", weight_rounding_seed={seed}"
            ),
        ));
    }
    Ok(())
}

/// The keys as a Keras config writes them: only those that are not the default.
pub(crate) fn write_keys(rounding: WeightRounding, seed: u64, out: &mut Map<String, Value>) {
    if rounding != WeightRounding::Nearest {
        out.insert("weight_rounding".into(), Value::from(rounding.as_str()));
    }
    if seed != 0 {
        out.insert("weight_rounding_seed".into(), Value::from(seed));
    }
}

/// Reads the keys from a Keras config (absent or null: the defaults).
///
/// # Errors
/// `weight_rounding` not one of its strings; `weight_rounding_seed` not an integer in
/// `0..=2^64 - 1`; the pair refused by [`validate`].
pub(crate) fn read_keys(cfg: &Map<String, Value>) -> Result<(WeightRounding, u64)> {
    let rounding = match cfg.get("weight_rounding") {
        None | Some(Value::Null) => WeightRounding::Nearest,
        Some(Value::String(s)) => WeightRounding::parse(s)?,
        Some(v) => WeightRounding::parse(&v.to_string())?,
    };
    let seed = match cfg.get("weight_rounding_seed") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_u64().ok_or_else(|| {
            Error::invalid(
                "weight_rounding_seed",
                format!(
                    "`weight_rounding_seed` must be an integer from 0 to 2^64 - 1. \
                     Received: weight_rounding_seed={v}"
                ),
            )
        })?,
    };
    validate(rounding, seed)?;
    Ok((rounding, seed))
}

/// Stochastic rounding in one step: the config's seed and the step's raw call count (Keras
/// `_iterations` before this call, saved in checkpoints), from which each variable's
/// [`RoundingKey`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRounding {
    /// `weight_rounding_seed`.
    pub seed: u64,
    /// The raw call count before this call.
    pub iteration: u64,
}

impl StepRounding {
    /// The key of variable `variable` (its index in build order) for one kind of write.
    pub fn key(&self, variable: usize, stream: RoundingStream) -> RoundingKey {
        RoundingKey::new(self.seed, self.iteration, variable as u64, stream)
    }
}

/// The per-tensor key of the generator: two 32-bit words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundingKey(pub [u32; 2]);

/// Which write of a weight the bits are for, so that two roundings of one weight in one
/// iteration never share bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundingStream {
    /// The Adafactor update (pass 3).
    Update = 1,
    /// The EMA overwrite of the weights.
    EmaOverwrite = 2,
}

/// splitmix64's finaliser: a bijection of `u64` with full avalanche.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 32-bit integer hash with low bias (two multiply-xorshift rounds, "lowbias32"), with a
/// second key word `k` mixed in between the rounds (so that two keys do not give the same
/// words in another order); cheap in SIMD lanes.
#[inline(always)]
pub fn hash32(mut x: u32, k: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= k;
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// The key word mixed between [`hash32`]'s rounds for words `pair`: the key's second word,
/// and the high half of the index (zero below 2^32 words).
#[inline(always)]
pub fn middle_key(key: RoundingKey, pair: u64) -> u32 {
    key.0[1] ^ ((pair >> 32) as u32).wrapping_mul(0x9E37_79B9)
}

impl RoundingKey {
    /// The key of one tensor's rounding in one iteration: `seed` from the config, `iteration`
    /// the raw call count before this call (unique per call, also with gradient accumulation,
    /// whose EMA overwrites may come on consecutive calls), `variable` the variable's index in
    /// build order.
    pub fn new(seed: u64, iteration: u64, variable: u64, stream: RoundingStream) -> RoundingKey {
        let golden = 0x9E37_79B9_7F4A_7C15u64;
        let mut z = mix64(seed.wrapping_add(golden));
        z = mix64(z ^ iteration.wrapping_mul(golden));
        z = mix64(z ^ variable.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        z = mix64(z ^ stream as u64);
        RoundingKey([z as u32, (z >> 32) as u32])
    }
}

/// Word `pair` of the generator under `key`: 32 random bits, the low half for element
/// `2 pair`, the high half for element `2 pair + 1`.
#[inline(always)]
pub fn random_word(key: RoundingKey, pair: u64) -> u32 {
    hash32(pair as u32 ^ key.0[0], middle_key(key, pair))
}

/// The 16 random bits (in the low half) of element `index` under `key`: one half of
/// [`random_word`]`(key, index / 2)`.
#[inline(always)]
pub fn random_bits(key: RoundingKey, index: u64) -> u32 {
    (random_word(key, index >> 1) >> ((index & 1) << 4)) & 0xFFFF
}

/// `x` rounded to bfloat16, up (away from zero) with probability equal to its distance from the
/// lower neighbour in ulps, using the low 16 bits of `r`. Values bfloat16 holds exactly never
/// change; NaN and infinities round as to nearest.
///
/// bfloat16 is the upper half of a float32, so adding 16 random bits below the kept half and
/// truncating is exactly this rounding, subnormals included; a carry moves to the next binade,
/// or from the largest finite value to infinity.
#[inline(always)]
pub fn bf16_stochastic(x: f32, r: u32) -> bf16 {
    let bits = x.to_bits();
    if (bits & 0x7FFF_FFFF) > 0x7F80_0000 {
        return bf16::from_f32(x); // NaN, kept quiet as rounding to nearest keeps it
    }
    bf16::from_bits((bits.wrapping_add(r & 0xFFFF) >> 16) as u16)
}

/// `x` rounded to float16, up (away from zero) with probability equal to its distance from the
/// lower neighbour in ulps, using the low 16 bits of `r`. Values float16 holds exactly never
/// change. NaN, infinities and magnitudes above float16's largest finite value (65504) round as
/// to nearest.
///
/// In float16's normal range 13 mantissa bits are dropped: 13 random bits are added below the
/// kept ones before truncating. Below 2^-14 the spacing is the subnormal quantum 2^-24: the
/// magnitude in quanta is split into its integer part and its fraction, whose first 16 bits are
/// compared with 16 random bits (the chance of rounding up is low by less than 2^-16).
#[inline(always)]
pub fn f16_stochastic(x: f32, r: u32) -> f16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let m = bits & 0x7FFF_FFFF;
    if m > 0x477F_E000 {
        return f16::from_f32(x); // beyond 65504, infinities, NaN
    }
    if m >= 0x3880_0000 {
        // |x| >= 2^-14: float16 normal. The carry of the addition may move to the next binade,
        // which the truncated exponent then holds (65504 itself has no dropped bits).
        let up = (m + (r & 0x1FFF)) >> 13;
        return f16::from_bits(sign | (up - 0x1_C000) as u16);
    }
    let e = m >> 23; // biased float32 exponent, at most 112 here
    if e == 0 {
        // float32 subnormals are below 2^-126, far below half the smallest float16 quantum
        // (2^-25): the chance of rounding up is below 2^-100.
        return f16::from_bits(sign);
    }
    // 24 bits, |x| = mant * 2^(e - 150); in u64, so that shifts by up to 39 are defined.
    let mant = ((m & 0x7F_FFFF) | 0x80_0000) as u64;
    let s = 126 - e; // |x| / 2^-24 = mant / 2^s, with s >= 14
    if s >= 40 {
        // Below 2^-16 quanta: the first 16 fraction bits are zero.
        return f16::from_bits(sign);
    }
    let k = (mant >> s) as u16; // whole quanta (none from s = 24 on)
    let frac = mant & ((1 << s) - 1);
    let first16 = (if s >= 16 {
        frac >> (s - 16)
    } else {
        frac << (16 - s)
    }) as u32;
    let up = ((r & 0xFFFF) < first16) as u16;
    f16::from_bits(sign | (k + up))
}

/// Rounds `src` into `dst` stochastically, element `i` with [`random_bits`]`(key, offset + i)`.
///
/// # Panics
/// When the two slices differ in length (an internal contract of the kernels).
pub fn round_bf16(src: &[f32], dst: &mut [bf16], key: RoundingKey, offset: u64) {
    assert_eq!(src.len(), dst.len(), "round_bf16: slice lengths");
    for (i, (d, &x)) in dst.iter_mut().zip(src).enumerate() {
        *d = bf16_stochastic(x, random_bits(key, offset + i as u64));
    }
}

/// Rounds `src` into `dst` stochastically, element `i` with [`random_bits`]`(key, offset + i)`.
///
/// # Panics
/// When the two slices differ in length (an internal contract of the kernels).
pub fn round_f16(src: &[f32], dst: &mut [f16], key: RoundingKey, offset: u64) {
    assert_eq!(src.len(), dst.len(), "round_f16: slice lengths");
    for (i, (d, &x)) in dst.iter_mut().zip(src).enumerate() {
        *d = f16_stochastic(x, random_bits(key, offset + i as u64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16-bit float format as its bits: nearest rounding and the value of a bit pattern.
    struct Format<T> {
        nearest: fn(f32) -> u16,
        value: fn(u16) -> f64,
        round: fn(f32, u32) -> T,
        bits: fn(T) -> u16,
    }

    const BF16: Format<bf16> = Format {
        nearest: |x| bf16::from_f32(x).to_bits(),
        value: |b| bf16::from_bits(b).to_f64(),
        round: bf16_stochastic,
        bits: |b| b.to_bits(),
    };

    const F16: Format<f16> = Format {
        nearest: |x| f16::from_f32(x).to_bits(),
        value: |b| f16::from_bits(b).to_f64(),
        round: f16_stochastic,
        bits: |b| b.to_bits(),
    };

    /// Rounds `x` with `n` consecutive counters and checks that only its two neighbours come
    /// out (toward and away from zero), the upper one at the rate of its distance in ulps
    /// (within 5 standard errors), so that the mean is the value.
    fn check_unbiased<T>(x: f32, f: &Format<T>) {
        let n = 20_000u64;
        let near = (f.nearest)(x);
        // Sign-magnitude: one less in the magnitude bits is one step toward zero.
        let lo = if (f.value)(near).abs() > (x as f64).abs() {
            near - 1
        } else {
            near
        };
        let (l, h) = ((f.value)(lo), (f.value)(lo + 1));
        let p = (x as f64 - l) / (h - l);
        let key = RoundingKey::new(7, 3, 1, RoundingStream::Update);
        let mut ups = 0u64;
        for i in 0..n {
            let b = (f.bits)((f.round)(x, random_bits(key, i)));
            assert!(
                b == lo || b == lo + 1,
                "{x}: got {}, neighbours {l} and {h}",
                (f.value)(b)
            );
            ups += (b == lo + 1) as u64;
        }
        let rate = ups as f64 / n as f64;
        let se = (p * (1.0 - p) / n as f64).sqrt().max(1.0 / n as f64);
        assert!(
            (rate - p).abs() <= 5.0 * se,
            "{x}: upper neighbour {h} chosen at rate {rate}, expected {p} (se {se})"
        );
    }

    fn values() -> Vec<f32> {
        let mut v = vec![
            1.0 + 2f32.powi(-10),
            1.0 + 3.0 * 2f32.powi(-12),
            -0.3,
            0.1,
            1e-3,
            -7.77e-5,
            3.1e-6,  // float16 subnormal range
            -1.7e-7, // float16 subnormal range, well below one quantum of 2^-24 (about 6e-8)
            2e-8,    // below one float16 quantum
            1e-10,   // below 2^-32: 33 bits below one float16 quantum
            -4e-12,  // below 2^-37
            1e30,
            -2.5e-39, // float32 subnormal
            65000.3,
        ];
        // Values a step of 1e-4 would leave, as in training.
        for k in 1..6 {
            v.push(0.5 - k as f32 * 1.3e-4);
        }
        v
    }

    #[test]
    fn bf16_is_unbiased() {
        for x in values() {
            check_unbiased(x, &BF16);
        }
    }

    #[test]
    fn f16_is_unbiased() {
        for x in values().into_iter().filter(|x| x.abs() <= 65504.0) {
            check_unbiased(x, &F16);
        }
    }

    /// The extreme random words and a few ordinary ones.
    fn edges_and_random(key: RoundingKey) -> impl Iterator<Item = u32> {
        [0, u32::MAX]
            .into_iter()
            .chain((0..6).map(move |i| random_bits(key, i)))
    }

    #[test]
    fn representable_values_never_change() {
        let key = RoundingKey::new(1, 2, 3, RoundingStream::Update);
        for bits in (0..=u16::MAX).step_by(7) {
            let b = bf16::from_bits(bits);
            if !b.is_nan() {
                for r in edges_and_random(key) {
                    assert_eq!(bf16_stochastic(b.to_f32(), r).to_bits(), bits, "bf16 {b}");
                }
            }
            let h = f16::from_bits(bits);
            if !h.is_nan() {
                for r in edges_and_random(key) {
                    assert_eq!(f16_stochastic(h.to_f32(), r).to_bits(), bits, "f16 {h}");
                }
            }
        }
    }

    #[test]
    fn specials_round_as_to_nearest() {
        for x in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e6,
            -70000.0,
            65519.0,
        ] {
            for r in [0, 0xFFFF_FFFF, 0x8000_0000] {
                let b = bf16_stochastic(x, r);
                let h = f16_stochastic(x, r);
                if x.is_nan() {
                    assert!(b.is_nan() && h.is_nan());
                } else {
                    assert_eq!(h, f16::from_f32(x), "{x}");
                    if x.is_infinite() {
                        assert_eq!(b, bf16::from_f32(x));
                    }
                }
            }
        }
        // The largest finite bf16 may round up to infinity only from above it.
        assert_eq!(bf16_stochastic(bf16::MAX.to_f32(), u32::MAX), bf16::MAX);
    }

    #[test]
    fn the_bits_depend_on_every_part_of_the_key() {
        let base = RoundingKey::new(1, 2, 3, RoundingStream::Update);
        let others = [
            RoundingKey::new(2, 2, 3, RoundingStream::Update),
            RoundingKey::new(1, 3, 3, RoundingStream::Update),
            RoundingKey::new(1, 2, 4, RoundingStream::Update),
            RoundingKey::new(1, 2, 3, RoundingStream::EmaOverwrite),
        ];
        for o in others {
            assert_ne!(o, base);
            let same = (0..1000)
                .filter(|&i| random_bits(o, i) == random_bits(base, i))
                .count();
            assert!(same < 5, "{same} equal words out of 1000");
        }
        // Indices beyond 2^32 differ from their low halves.
        assert_ne!(random_bits(base, 5), random_bits(base, 5 + (1 << 32)));
    }

    #[test]
    fn slices_use_the_global_index() {
        let src: Vec<f32> = (0..100).map(|i| 1.0 + i as f32 * 1e-5).collect();
        let key = RoundingKey::new(9, 0, 0, RoundingStream::Update);
        let mut whole = vec![bf16::ZERO; 100];
        round_bf16(&src, &mut whole, key, 0);
        let mut parts = vec![bf16::ZERO; 100];
        let (a, b) = parts.split_at_mut(37);
        round_bf16(&src[..37], a, key, 0);
        round_bf16(&src[37..], b, key, 37);
        assert_eq!(whole, parts);
        let mut h = vec![f16::ZERO; 100];
        round_f16(&src, &mut h, key, 0);
        assert!(h
            .iter()
            .zip(&src)
            .all(|(h, s)| (h.to_f32() - s).abs() < 1e-3));
    }
}
