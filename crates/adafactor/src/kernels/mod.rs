//! Fused slice kernels: one Adafactor update in three streaming passes, no full-size temporary.
//!
//! For a factored variable (`lead` slices of `n x m`):
//! 1. [`factored::pass1`] reads the gradient (and the weight, for RMS(x) after weight decay) once
//!    and accumulates row and column sums of `g^2`. The statistics update is then O(n + m)
//!    ([`factored::prepare`]).
//! 2. [`factored::pass2`] reads the gradient again for RMS(u), with `1/sqrt(v_ij) = a_i * b_j`
//!    from per-row and per-column factors (no per-element square root).
//! 3. [`factored::pass3`] reads gradient and weight once and writes the weight.
//!
//! That is 24 bytes per float32 parameter. Without norm clipping (the default) the gradient scale
//! is known before pass 1, so pass 1 also updates the row statistics as it goes and collects
//! `sum_i g_ij^2 / r_i` per column ([`factored::RowFold`]); RMS(u) then follows from the
//! statistics alone and pass 2 is skipped: 20 bytes per float32 parameter. Rank 0 and 1
//! variables use the same three passes with their velocity ([`vector`]). Reductions run in
//! blocks of at most [`CHUNK`] elements, each summed in float32 lanes and the blocks in `f64`, so
//! the result does not depend on the number of threads.
//!
//! Every kernel takes `&[T]`/`&mut [T]` for `T` in `f32`, `bf16`, `f16` ([`Element`]); statistics
//! are always `f32` and the update is computed in `f32` and rounded once. The factored passes
//! spend their time in per-row loops ([`Element::pass1_rows`], [`Element::pass2_rows`],
//! [`Element::update_rows`]), hand-vectorised for AVX-512 and AVX2 with portable twins that give
//! the same bits; the environment variable `ADAFACTOR_SIMD` (`portable`, `avx2`, `avx512`) caps
//! the instruction set they use.

pub mod elementwise;
pub mod factored;
mod rows;
#[cfg(target_arch = "x86_64")]
mod simd;
pub mod vector;

use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

/// Elements per block of a blocked reduction (f32 partial sums, then f64 across blocks).
pub const CHUNK: usize = 1024;

/// Tensors with fewer elements than this run on the calling thread: many small tensors are
/// parallelised across tensors by the caller, not inside each one.
pub const PARALLEL_THRESHOLD: usize = 1 << 16;

/// Target elements per parallel work unit of one large tensor.
pub const UNIT_ELEMS: usize = 1 << 15;

/// A weight or gradient element type: converted to `f32` for all arithmetic.
pub trait Element: Copy + Send + Sync + 'static {
    /// Converts a slice to `f32` (`out.len() == src.len()`).
    fn load(src: &[Self], out: &mut [f32]);
    /// Rounds a slice of `f32` into this type (`out.len() == src.len()`).
    fn store(src: &[f32], out: &mut [Self]);
    /// The slice itself when this type is `f32` (lets kernels skip a conversion buffer).
    #[inline(always)]
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    /// The mutable slice itself when this type is `f32`.
    #[inline(always)]
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    /// True when the row kernels convert this type in registers, element by element, instead
    /// of through a float32 buffer.
    #[inline(always)]
    fn in_registers() -> bool {
        false
    }
    /// One element to `f32`.
    fn to_f32(self) -> f32;
    /// One `f32` rounded to this type (as [`Element::store`] rounds).
    fn from_f32(v: f32) -> Self;

    /// Pass 1's loop over whole rows of a factored variable: each row's float32 sum of `g^2` is
    /// pushed to `row_sums` and its squares added into `col`; with a fold, each row also adds
    /// `g^2 / r_i` into the fold's accumulator. Returns the sum of `x^2` after the optional
    /// decay. Hand-vectorised for `f32` and `bf16` on CPUs with AVX-512 or AVX2; same
    /// bits every way.
    #[inline(always)]
    fn pass1_rows(rows: factored::Pass1Rows<'_, Self>, sums: factored::Pass1Sums<'_>) -> f64 {
        rows::pass1_rows(rows, sums)
    }

    /// Pass 2's loop over whole rows of one slice of a factored variable:
    /// `sum_k a_k^2 sum_j ((s g_kj) b_j)^2`, `a` the rows' factors, `b` the slice's column
    /// factors (one per element of a row).
    #[inline(always)]
    fn pass2_rows(g: &[Self], b: &[f32], a: &[f32], s: f32) -> f64 {
        rows::pass2_rows(g, b, a, s)
    }

    /// Pass 3's loop over whole rows of a factored variable, the first being row `first_row`:
    /// `x = decay(x) - coef * a_i * (s g_ij) * b_j`, computed in f32 and rounded once.
    #[inline(always)]
    fn update_rows(x: &mut [Self], g: &[Self], first_row: usize, u: &factored::RowUpdate<'_>) {
        rows::update_rows(x, g, first_row, u)
    }
}

/// Overrides the row loops of [`Element`] with their AVX-512 or AVX2 twins when the CPU has
/// them.
macro_rules! wide_rows {
    () => {
        #[inline(always)]
        fn pass1_rows(rows: factored::Pass1Rows<'_, Self>, sums: factored::Pass1Sums<'_>) -> f64 {
            by_simd!(pass1_rows(rows, sums))
        }

        #[inline(always)]
        fn pass2_rows(g: &[Self], b: &[f32], a: &[f32], s: f32) -> f64 {
            by_simd!(pass2_rows(g, b, a, s))
        }

        #[inline(always)]
        fn update_rows(x: &mut [Self], g: &[Self], first_row: usize, u: &factored::RowUpdate<'_>) {
            by_simd!(update_rows(x, g, first_row, u))
        }
    };
}

/// Calls the version of a row loop that [`rows::simd`] picked.
macro_rules! by_simd {
    ($f:ident($($arg:expr),*)) => {
        // SAFETY (each arm): `rows::simd()` only picks an instruction set the CPU has.
        match rows::simd() {
            #[cfg(target_arch = "x86_64")]
            rows::Simd::Avx512Bf16 => unsafe { rows::avx512_bf16::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            rows::Simd::Avx512 => unsafe { rows::avx512::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            rows::Simd::Avx2 => unsafe { rows::avx2::$f($($arg),*) },
            _ => rows::$f($($arg),*),
        }
    };
}

impl Element for f32 {
    #[inline(always)]
    fn load(src: &[f32], out: &mut [f32]) {
        out.copy_from_slice(src);
    }
    #[inline(always)]
    fn store(src: &[f32], out: &mut [f32]) {
        out.copy_from_slice(src);
    }
    #[inline(always)]
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    #[inline(always)]
    fn as_f32_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
    #[inline(always)]
    fn in_registers() -> bool {
        true
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> f32 {
        v
    }

    wide_rows!();
}

impl Element for bf16 {
    #[inline(always)]
    fn load(src: &[bf16], out: &mut [f32]) {
        // A bf16 is the top half of an f32.
        for (o, v) in out.iter_mut().zip(src) {
            *o = f32::from_bits((v.to_bits() as u32) << 16);
        }
    }
    #[inline(always)]
    fn store(src: &[f32], out: &mut [bf16]) {
        for (o, v) in out.iter_mut().zip(src) {
            *o = Self::from_f32(*v);
        }
    }
    #[inline(always)]
    fn in_registers() -> bool {
        true
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // A bf16 is the top half of an f32.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> bf16 {
        bf16::from_bits(f32_to_bf16_bits(v))
    }

    wide_rows!();
}

/// `half::bf16::from_f32`, bit for bit (round to nearest even, NaN kept quiet), written without
/// branches so that it vectorises.
#[inline(always)]
fn f32_to_bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    // Signed compare (the masked value fits in i31): vectorises without unsigned compares.
    let nan = ((x & 0x7FFF_FFFF) as i32) > 0x7F80_0000;
    let round = ((x & 0x8000) != 0) & ((x & 0x17FFF) != 0);
    let rounded = (x >> 16) + round as u32;
    let quiet = (x >> 16) | 0x0040;
    (if nan { quiet } else { rounded }) as u16
}

impl Element for f16 {
    #[inline(always)]
    fn load(src: &[f16], out: &mut [f32]) {
        src.convert_to_f32_slice(out);
    }
    #[inline(always)]
    fn store(src: &[f32], out: &mut [f16]) {
        out.convert_from_f32_slice(src);
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    /// Only with the vector twins: one at a time, `half`'s conversions are far slower than
    /// its slice conversions.
    #[inline(always)]
    fn in_registers() -> bool {
        rows::simd() >= rows::Simd::Avx2
    }
    #[inline(always)]
    fn from_f32(v: f32) -> f16 {
        f16::from_f32(v)
    }

    wide_rows!();
}

/// How a stored gradient element becomes the effective gradient, in Keras's order: unscale by
/// `loss_scale_factor`, average with the accumulator, clamp by `clipvalue`. Norm clipping is a
/// scale applied by the passes themselves.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GradTransform {
    /// `g / loss_scale_factor`.
    pub loss_scale: Option<f32>,
    /// `(g + acc) / k` on the update call of gradient accumulation (needs `acc`).
    pub accumulate_steps: Option<f32>,
    /// Clamp to `[-v, v]`.
    pub clip_value: Option<f32>,
}

/// The gradient of one variable as the kernels read it.
#[derive(Debug, Clone, Copy)]
pub struct Grad<'a, T> {
    /// The stored gradient.
    pub g: &'a [T],
    /// The accumulator, read on the update call of gradient accumulation.
    pub acc: Option<&'a [f32]>,
    /// The element transform.
    pub transform: GradTransform,
}

impl<'a, T: Element> Grad<'a, T> {
    /// A plain gradient with no transform.
    pub fn plain(g: &'a [T]) -> Self {
        Grad {
            g,
            acc: None,
            transform: GradTransform::default(),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.g.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.g.is_empty()
    }

    /// True when the effective gradient is the stored one (no transform, no accumulator).
    #[inline(always)]
    pub fn is_plain(&self) -> bool {
        self.acc.is_none() && self.transform == GradTransform::default()
    }

    /// The effective gradient of elements `start..start + buf.len()`: the stored slice itself
    /// for a plain `f32` gradient, else converted into `buf`.
    #[inline(always)]
    pub fn view<'b>(&'b self, start: usize, buf: &'b mut [f32]) -> &'b [f32] {
        if self.is_plain() {
            if let Some(g) = T::as_f32(&self.g[start..start + buf.len()]) {
                return g;
            }
        }
        self.load(start, buf);
        buf
    }

    /// Writes the effective gradient of elements `start..start + out.len()` into `out`.
    #[inline(always)]
    pub fn load(&self, start: usize, out: &mut [f32]) {
        self.load_impl(start, out, false);
    }

    /// [`Grad::load`], also returning 0 when the unscaled gradient is finite and NaN when it
    /// holds NaN or infinity (checked before accumulation and clamping, which could hide it).
    #[inline(always)]
    pub fn load_checked(&self, start: usize, out: &mut [f32]) -> f32 {
        self.load_impl(start, out, true)
    }

    #[inline(always)]
    fn load_impl(&self, start: usize, out: &mut [f32], check: bool) -> f32 {
        let end = start + out.len();
        let t = self.transform;
        // Until a step writes `out`, a float32 gradient is read where it is stored: the first
        // step reads it there, so it is not copied first.
        let mut stored = T::as_f32(&self.g[start..end]);
        if stored.is_none() {
            T::load(&self.g[start..end], out);
        }
        if let Some(l) = t.loss_scale {
            map_into(out, stored.take(), |g| g / l);
        }
        let probe = match (check, stored) {
            (false, _) => 0.0,
            (true, Some(g)) => nonfinite_probe(g),
            (true, None) => nonfinite_probe(out),
        };
        if let (Some(k), Some(acc)) = (t.accumulate_steps, self.acc) {
            let acc = &acc[start..end];
            match stored.take() {
                Some(g) => {
                    for ((o, g), a) in out.iter_mut().zip(g).zip(acc) {
                        *o = (*g + *a) / k;
                    }
                }
                None => {
                    for (o, a) in out.iter_mut().zip(acc) {
                        *o = (*o + *a) / k;
                    }
                }
            }
        }
        if let Some(v) = t.clip_value {
            // `clamp` keeps NaN, as Keras's clip does.
            map_into(out, stored.take(), |g| g.clamp(-v, v));
        }
        if let Some(g) = stored {
            out.copy_from_slice(g);
        }
        probe
    }
}

/// `out = f(from)` elementwise, or `out = f(out)` in place without `from`.
#[inline(always)]
fn map_into(out: &mut [f32], from: Option<&[f32]>, f: impl Fn(f32) -> f32) {
    match from {
        Some(g) => out.iter_mut().zip(g).for_each(|(o, g)| *o = f(*g)),
        None => out.iter_mut().for_each(|o| *o = f(*o)),
    }
}

/// Decoupled weight decay `x - x * wd * lr`, applied on the fly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decay {
    /// `weight_decay`.
    pub weight_decay: f32,
    /// The raw learning rate.
    pub learning_rate: f32,
}

impl Decay {
    /// The decayed value, rounded as Keras rounds it.
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        x - x * self.weight_decay * self.learning_rate
    }
}

/// The weight values of `x` after the optional decay: the slice itself for undecayed `f32`,
/// else converted (and decayed) into `buf`.
#[inline(always)]
pub(crate) fn decayed_view<'b, T: Element>(
    x: &'b [T],
    decay: Option<Decay>,
    buf: &'b mut [f32],
) -> &'b [f32] {
    if decay.is_none() {
        if let Some(v) = T::as_f32(x) {
            return v;
        }
    }
    T::load(x, buf);
    decay_in_place(decay, buf);
    buf
}

/// Applies an optional decay to a buffer in place.
#[inline(always)]
pub(crate) fn decay_in_place(decay: Option<Decay>, x: &mut [f32]) {
    if let Some(d) = decay {
        x.iter_mut().for_each(|v| *v = d.apply(*v));
    }
}

/// Sum of squares of a buffer, blocked: f32 lanes within the buffer, returned as f64.
#[inline(always)]
pub(crate) fn sum_sq(x: &[f32]) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(CHUNK) {
        let mut lanes = [0f32; 8];
        let mut it = block.chunks_exact(8);
        for c in &mut it {
            for l in 0..8 {
                lanes[l] += c[l] * c[l];
            }
        }
        let mut s: f32 = it.remainder().iter().map(|v| v * v).sum();
        s += lanes.iter().sum::<f32>();
        total += s as f64;
    }
    total
}

/// `x * 0` summed: 0 when every element is finite, NaN otherwise.
#[inline(always)]
pub(crate) fn nonfinite_probe(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            lanes[l] += c[l] * 0.0;
        }
    }
    it.remainder().iter().map(|v| v * 0.0).sum::<f32>() + lanes.iter().sum::<f32>()
}

/// Asks the CPU to start loading `s` into cache: a hint, nothing on other architectures.
#[inline(always)]
pub(crate) fn prefetch<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = s.as_ptr() as *const i8;
        let mut off = 0;
        while off < std::mem::size_of_val(s) {
            // SAFETY: a prefetch never faults, and the address lies within `s`.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.add(off))
            };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

/// Runs `f` compiled for AVX2 when the row loops may use it ([`rows::simd`]), else for
/// the baseline: the 16-bit conversions need it to vectorise. The kernels' lanes are written out
/// explicitly and floating-point operations are never contracted or reordered, so both versions
/// give the same bits.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if rows::simd() >= rows::Simd::Avx2 {
            // SAFETY: the CPU supports AVX2 (`rows::simd` checked it).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Runs `f(start, chunk)` over `dst` in chunks of [`UNIT_ELEMS`] elements in parallel when the
/// tensor is large, else over the whole slice at once (nothing for an empty slice).
pub(crate) fn for_chunks<A: Send>(dst: &mut [A], f: impl Fn(usize, &mut [A]) + Sync + Send) {
    if parallel_for(dst.len()) {
        dst.par_chunks_mut(UNIT_ELEMS)
            .enumerate()
            .for_each(|(i, c)| {
                vectorized(
                    #[inline(always)]
                    || f(i * UNIT_ELEMS, c),
                )
            });
    } else if !dst.is_empty() {
        vectorized(
            #[inline(always)]
            || f(0, dst),
        );
    }
}

/// [`for_chunks`] whose chunks each return a partial sum; the sum of the partials, in chunk
/// order.
pub(crate) fn sum_chunks<A: Send>(
    dst: &mut [A],
    f: impl Fn(usize, &mut [A]) -> f64 + Sync + Send,
) -> f64 {
    if parallel_for(dst.len()) {
        let parts: Vec<f64> = dst
            .par_chunks_mut(UNIT_ELEMS)
            .enumerate()
            .map(|(i, c)| {
                vectorized(
                    #[inline(always)]
                    || f(i * UNIT_ELEMS, c),
                )
            })
            .collect();
        parts.iter().sum()
    } else if !dst.is_empty() {
        vectorized(
            #[inline(always)]
            || f(0, dst),
        )
    } else {
        0.0
    }
}

/// Runs `f` over work units, in parallel when `parallel`, keeping the units' order in the
/// results (so reductions are deterministic).
pub(crate) fn map_units<U: Send, R: Send>(
    units: Vec<U>,
    parallel: bool,
    f: impl Fn(U) -> R + Sync + Send,
) -> Vec<R> {
    if parallel && units.len() > 1 {
        units
            .into_par_iter()
            .map(|u| {
                vectorized(
                    #[inline(always)]
                    || f(u),
                )
            })
            .collect()
    } else {
        units
            .into_iter()
            .map(|u| {
                vectorized(
                    #[inline(always)]
                    || f(u),
                )
            })
            .collect()
    }
}

/// Rows per work unit for `rows` rows of `m` elements: about [`UNIT_ELEMS`] elements, and at
/// most four units per thread so column partial sums stay small.
pub(crate) fn rows_per_unit(rows: usize, m: usize) -> usize {
    let by_size = (UNIT_ELEMS / m.max(1)).max(1);
    let max_units = 4 * rayon::current_num_threads().max(1);
    by_size.max(rows.div_ceil(max_units)).max(1)
}

/// Whether a tensor of `len` elements is split across threads.
pub(crate) fn parallel_for(len: usize) -> bool {
    len >= PARALLEL_THRESHOLD && rayon::current_num_threads() > 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values that exercise every bf16 rounding case: ties to even, just above and below a tie,
    /// around every exponent, NaNs, infinities and the extremes.
    pub(crate) fn bf16_rounding_probes() -> Vec<f32> {
        let mut probes: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1e-40,
            3.3895314e38,
        ];
        // Every rounding case: ties to even, just above and below a tie, around every exponent.
        let mut x = 0x0001_0000u32;
        while x < 0x7F80_0000 {
            for d in [0u32, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x18000] {
                probes.push(f32::from_bits(x + d));
                probes.push(-f32::from_bits(x + d));
            }
            x = x.wrapping_mul(3) / 2 + 0x1_0000;
        }
        probes.push(f32::from_bits(0x7FC0_1234));
        probes.push(f32::from_bits(0x7F80_0001));
        probes
    }

    #[test]
    fn bf16_conversion_matches_half_bit_for_bit() {
        let probes = bf16_rounding_probes();
        let mut ours = vec![bf16::ZERO; probes.len()];
        bf16::store(&probes, &mut ours);
        for (p, o) in probes.iter().zip(&ours) {
            assert_eq!(
                o.to_bits(),
                bf16::from_f32(*p).to_bits(),
                "{p:e} ({:#x})",
                p.to_bits()
            );
        }
        let mut back = vec![0f32; ours.len()];
        bf16::load(&ours, &mut back);
        for (o, b) in ours.iter().zip(&back) {
            assert_eq!(o.to_f32().to_bits(), b.to_bits());
        }
    }
}
