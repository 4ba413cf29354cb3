//! The vector twins of the row loops against the portable loops, bit for bit, on every
//! instruction set this CPU has (each one it lacks is reported as skipped).

use super::cpu::{has_avx2, has_avx512, has_avx512_bf16};
use super::element::Element;
use super::factored::{FoldRows, RowFold};
use super::grad::{Decay, Grad, GradTransform};
use super::portable::{pass1_rows, pass2_rows, update_rows};
use super::row_args::{Pass1Rows, Pass1Sums, RowUpdate};
use super::store::Rounding;
use super::{simd, wide};
use crate::rounding::{random_bits, RoundingKey, RoundingStream};
use half::{bf16, f16};

/// Whether the CPU has an instruction set; says so when a check is skipped for lack of it.
fn available(name: &str, present: bool) -> bool {
    if !present {
        println!("skipped: this CPU lacks {name}, so its vector twins are not checked here");
    }
    present
}

fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

/// Old row statistics (positive) for `count` rows of a test of row length `m`.
fn old_rows(m: usize, count: usize) -> Vec<f32> {
    values(m as u64 + 5, count, 1.0)
        .iter()
        .map(|v| v.abs() + 0.1)
        .collect()
}

/// The row fold the tests run with.
fn fold_of(r_old: &[f32]) -> RowFold<'_> {
    RowFold {
        r_old,
        beta2: 0.3,
        epsilon_1: 1e-30,
    }
}

type Pass1Fn<T> = fn(Pass1Rows<'_, T>, Pass1Sums<'_>) -> f64;
type UpdateFn<T> = fn(&mut [T], Grad<'_, T>, usize, &RowUpdate<'_>);
type Pass2Fn<T> = fn(Grad<'_, T>, &[f32], &[f32], f32) -> f64;

/// An element type with vector twins on every instruction set.
trait Twinned:
    simd::Wide<simd::Avx2> + simd::Wide<simd::Avx512<false>> + simd::Wide<simd::Avx512<true>>
{
}

impl Twinned for f32 {}
impl Twinned for bf16 {}
impl Twinned for f16 {}

/// Every version of the row loops, on rows of every remainder length and longer than a
/// block, several rows (across slices), with and without decay and fold: the same bits as
/// the portable loops.
fn twins_agree<T: Twinned>(from: impl Fn(&[f32]) -> Vec<T>) {
    for (pass1_v, pass2_v, update_v) in vector_versions::<T>() {
        versions_agree(&from, pass1_v, pass2_v, update_v);
    }
}

/// The vector twins of every instruction set this CPU has.
fn vector_versions<T: Twinned>() -> Vec<(Pass1Fn<T>, Pass2Fn<T>, UpdateFn<T>)> {
    let mut versions: Vec<(Pass1Fn<T>, Pass2Fn<T>, UpdateFn<T>)> = Vec::new();
    if available("AVX2 and F16C", has_avx2()) {
        // SAFETY (both): only called when the CPU has AVX2.
        versions.push((
            |rows, sums| unsafe { wide::avx2::pass1_rows(rows, sums) },
            |g, b, a, s| unsafe { wide::avx2::pass2_rows(g, b, a, s) },
            |x, g, first, u| unsafe { wide::avx2::update_rows(x, g, first, u) },
        ));
    }
    if available("AVX-512 (F, BW)", has_avx512()) {
        // SAFETY (both): only called when the CPU has AVX-512 F and BW.
        versions.push((
            |rows, sums| unsafe { wide::avx512::pass1_rows(rows, sums) },
            |g, b, a, s| unsafe { wide::avx512::pass2_rows(g, b, a, s) },
            |x, g, first, u| unsafe { wide::avx512::update_rows(x, g, first, u) },
        ));
    }
    if available("AVX-512 BF16", has_avx512_bf16()) {
        // SAFETY (both): only called when the CPU has AVX-512 F, BW, DQ and BF16.
        versions.push((
            |rows, sums| unsafe { wide::avx512_bf16::pass1_rows(rows, sums) },
            |g, b, a, s| unsafe { wide::avx512_bf16::pass2_rows(g, b, a, s) },
            |x, g, first, u| unsafe { wide::avx512_bf16::update_rows(x, g, first, u) },
        ));
    }
    versions
}

fn versions_agree<T: Element>(
    from: &impl Fn(&[f32]) -> Vec<T>,
    pass1_v: Pass1Fn<T>,
    pass2_v: Pass2Fn<T>,
    update_v: UpdateFn<T>,
) {
    let decays = [
        None,
        Some(Decay {
            weight_decay: 0.1,
            learning_rate: 0.01,
        }),
    ];
    let (n, rows, first) = (2, 3, 1);
    for m in (0..40).chain([1023, 1024, 1025, 2100]) {
        for decay in decays {
            let len = rows * m;
            let g = from(&values(m as u64, len, 2.0));
            let x = from(&values(m as u64 + 99, len, 0.2));
            let col0 = values(m as u64 + 3, m, 1.0);
            let r_old = values(m as u64 + 5, first + rows, 1.0);
            let r_old: Vec<f32> = r_old.iter().map(|v| v.abs() + 0.1).collect();
            let fold = RowFold {
                r_old: &r_old,
                beta2: 0.3,
                epsilon_1: 1e-30,
            };
            for folded in [false, true] {
                let (mut col_p, mut col_v) = (col0.clone(), col0.clone());
                let (mut w_p, mut w_v) = (col0.clone(), col0.clone());
                let (mut rows_p, mut rows_v) = (Vec::new(), Vec::new());
                let rows_in = Pass1Rows {
                    g: Grad::plain(&g),
                    x: &x,
                    m,
                    decay,
                };
                // The portable run gets no scratch (it allocates its own).
                let (mut sq_p, mut sq_v) = (Vec::new(), vec![0f32; 2 * m]);
                let (mut probe_p, mut probe_v) = (0f32, 0f32);
                let sums = |col, w, squares, row_sums, probe| Pass1Sums {
                    col,
                    fold: folded.then_some(FoldRows {
                        fold,
                        first_row: first,
                        w,
                        squares,
                    }),
                    row_sums,
                    probe,
                };
                let sums_p = sums(&mut col_p, &mut w_p, &mut sq_p, &mut rows_p, &mut probe_p);
                let sx_p = pass1_rows(rows_in, sums_p);
                let sums_v = sums(&mut col_v, &mut w_v, &mut sq_v, &mut rows_v, &mut probe_v);
                let sx_v = pass1_v(rows_in, sums_v);
                assert_eq!(sx_p.to_bits(), sx_v.to_bits(), "m {m}");
                assert_eq!(rows_p, rows_v, "m {m}");
                assert_eq!(bits(&col_p), bits(&col_v), "m {m}");
                assert_eq!(bits(&w_p), bits(&w_v), "m {m}");
            }

            let col_factor = values(m as u64 + 7, 3 * m, 4.0);
            let row_factor = values(m as u64 + 11, first + rows, 2.0);
            let key = RoundingKey::new(3, 4, m as u64, RoundingStream::Update);
            for (s, rounding) in [
                (1.0, Rounding::Nearest),
                (0.9, Rounding::Nearest),
                (1.0, Rounding::Stochastic(key)),
                (0.9, Rounding::Stochastic(key)),
            ] {
                let (b, a) = (&col_factor[..m], &row_factor[..rows]);
                let sum_p = pass2_rows(Grad::plain(&g), b, a, s);
                let sum_v = pass2_v(Grad::plain(&g), b, a, s);
                assert_eq!(sum_p.to_bits(), sum_v.to_bits(), "m {m}, scale {s}");
                let u = RowUpdate {
                    col_factor: &col_factor,
                    row_factor: &row_factor,
                    n,
                    m,
                    coef: 0.013,
                    grad_scale: s,
                    decay,
                    rounding,
                };
                let (mut x_p, mut x_v) = (x.clone(), x.clone());
                update_rows(&mut x_p, Grad::plain(&g), first, &u);
                update_v(&mut x_v, Grad::plain(&g), first, &u);
                let (x_p, x_v): (Vec<f32>, Vec<f32>) = (
                    x_p.iter().map(|v| v.to_f32()).collect(),
                    x_v.iter().map(|v| v.to_f32()).collect(),
                );
                assert_eq!(bits(&x_p), bits(&x_v), "m {m}, scale {s}, {rounding:?}");
            }
        }
    }
}

fn as_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|x| bf16::from_f32(*x)).collect()
}

fn as_f16(v: &[f32]) -> Vec<f16> {
    v.iter().map(|x| f16::from_f32(*x)).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn vector_twins_match_portable_loops_f32() {
    twins_agree::<f32>(<[f32]>::to_vec);
}

#[test]
fn vector_twins_match_portable_loops_bf16() {
    twins_agree::<bf16>(as_bf16);
}

#[test]
fn vector_twins_match_portable_loops_f16() {
    twins_agree::<f16>(as_f16);
}

/// Loads every 16-bit pattern sixteen at a time through `V` and rounds a range of float32
/// values back: both conversions match `half` bit for bit (NaNs by their bits too).
fn conversions_match_half<V: simd::Lanes, T: simd::Wide<V>>(probes: &[f32]) {
    let all: Vec<T> = (0..=u16::MAX)
        .map(|b| {
            let mut v = [T::from_f32(0.0)];
            // SAFETY: a 16-bit element type has exactly 2 bytes and every pattern is a value.
            unsafe {
                std::ptr::copy_nonoverlapping(&b as *const u16 as *const T, v.as_mut_ptr(), 1)
            };
            v[0]
        })
        .collect();
    for chunk in all.chunks(16) {
        let mut out = [0f32; 16];
        // SAFETY: the caller checked the instruction set; sixteen elements on each side.
        unsafe { T::load16(chunk.as_ptr()).store(out.as_mut_ptr()) };
        for (e, o) in chunk.iter().zip(out) {
            assert_eq!(o.to_bits(), e.to_f32().to_bits());
        }
    }
    for chunk in probes.chunks(16).filter(|c| c.len() == 16) {
        let mut out = [T::from_f32(0.0); 16];
        // SAFETY: as above.
        unsafe { T::store16(out.as_mut_ptr(), V::load(chunk.as_ptr())) };
        for (p, o) in chunk.iter().zip(out) {
            let want = T::from_f32(*p);
            // SAFETY: both are 2-byte values read as their bits.
            let bits = |v: T| unsafe { std::mem::transmute_copy::<T, u16>(&v) };
            assert_eq!(bits(o), bits(want), "{p:e}");
        }
    }
}

#[test]
fn vector_f16_conversions_match_half() {
    // Around every f16 rounding boundary, from f16 subnormals to overflow, and NaNs.
    let mut probes = vec![f32::NAN, -f32::NAN, f32::INFINITY, 65504.0, 65520.0, 1e-40];
    probes.push(f32::from_bits(0x7FC0_1234));
    probes.push(f32::from_bits(0x7F80_0001));
    probes.push(f32::from_bits(0xFFBF_FFFF));
    let mut x = 0x3000_0000u32;
    while x < 0x4800_0000 {
        for d in [0u32, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x3000] {
            probes.push(f32::from_bits(x + d));
            probes.push(-f32::from_bits(x + d));
        }
        x += 0x0003_2000;
    }
    if available("AVX2 and F16C", has_avx2()) {
        conversions_match_half::<simd::Avx2, f16>(&probes);
    }
    if available("AVX-512 (F, BW)", has_avx512()) {
        conversions_match_half::<simd::Avx512<false>, f16>(&probes);
    }
}

#[test]
fn vector_bf16_conversions_match_half() {
    let probes = super::element::tests::bf16_rounding_probes();
    if available("AVX2 and F16C", has_avx2()) {
        conversions_match_half::<simd::Avx2, bf16>(&probes);
    }
    if available("AVX-512 (F, BW)", has_avx512()) {
        conversions_match_half::<simd::Avx512<false>, bf16>(&probes);
    }
    if available("AVX-512 BF16", has_avx512_bf16()) {
        conversions_match_half::<simd::Avx512<true>, bf16>(&probes);
    }
}

/// The vector generator and stochastic stores against the scalar ones, lane for lane: indices
/// whose low halves wrap inside a group included, and values across every rounding case
/// (float16 subnormals, overflow and NaN included).
fn stochastic_stores_match<V: simd::Lanes, T: simd::Wide<V>>(probes: &[f32]) {
    let key = RoundingKey::new(11, 12, 13, RoundingStream::Update);
    let bases = [
        0u64,
        5,
        (1 << 32) - 7,
        (1 << 33) - 20,
        (1 << 33) - 7,
        (1 << 33) + 3,
    ];
    for base in bases.into_iter().chain([u64::MAX - 40, u64::MAX - 15]) {
        // SAFETY: the caller checked the instruction set.
        let lanes = unsafe { V::bits_array(V::random_bits(key, base)) };
        for (l, r) in lanes.iter().enumerate() {
            assert_eq!(*r, random_bits(key, base + l as u64), "index {base} + {l}");
        }
        // Two groups at once, from this index and from its neighbours (odd and even).
        for start in [base, base + 1, base + 2]
            .into_iter()
            .filter(|s| *s <= u64::MAX - 32)
        {
            // SAFETY: as above.
            let (a, b) = unsafe { V::random_bits32(key, start) };
            let (a, b) = unsafe { (V::bits_array(a), V::bits_array(b)) };
            for (l, r) in a.iter().chain(&b).enumerate() {
                assert_eq!(
                    *r,
                    random_bits(key, start + l as u64),
                    "index {start} + {l}"
                );
            }
        }
    }
    for (k, chunk) in probes.chunks(16).filter(|c| c.len() == 16).enumerate() {
        let index = 16 * k as u64;
        let mut out = [T::from_f32(0.0); 16];
        // SAFETY: as above; sixteen elements on each side.
        unsafe {
            let r = V::random_bits(key, index);
            T::store16_stochastic(out.as_mut_ptr(), V::load(chunk.as_ptr()), r)
        };
        for (l, (p, o)) in chunk.iter().zip(out).enumerate() {
            let want = T::from_f32_stochastic(*p, random_bits(key, index + l as u64));
            // SAFETY: both are 2-byte values read as their bits.
            let bits = |v: T| unsafe { std::mem::transmute_copy::<T, u16>(&v) };
            assert_eq!(bits(o), bits(want), "{p:e}");
        }
    }
}

#[test]
fn vector_stochastic_rounding_matches_scalar() {
    let mut probes = super::element::tests::bf16_rounding_probes();
    let mut x = 0x3000_0000u32;
    while x < 0x4800_0000 {
        for d in [0u32, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x3000, 0x1234] {
            probes.push(f32::from_bits(x + d));
            probes.push(-f32::from_bits(x + d));
        }
        x += 0x0003_2000;
    }
    // Runs of ordinary values, so that whole groups take the float16 vector path too.
    probes.extend(values(1, 4096, 3.0));
    // Float16's subnormal range and below it, densely, each value four times (other random
    // bits), so that rounding up and down both show at every quantum scale.
    for _ in 0..4 {
        for x in (0x2C00_0000u32..0x3880_4000).step_by(0x1_3579) {
            probes.push(f32::from_bits(x));
            probes.push(-f32::from_bits(x));
        }
    }
    if available("AVX2 and F16C", has_avx2()) {
        stochastic_stores_match::<simd::Avx2, bf16>(&probes);
        stochastic_stores_match::<simd::Avx2, f16>(&probes);
    }
    if available("AVX-512 (F, BW)", has_avx512()) {
        stochastic_stores_match::<simd::Avx512<false>, bf16>(&probes);
        stochastic_stores_match::<simd::Avx512<false>, f16>(&probes);
    }
    if available("AVX-512 BF16", has_avx512_bf16()) {
        stochastic_stores_match::<simd::Avx512<true>, bf16>(&probes);
    }
}

/// Gradient (or accumulator) values with NaN, infinities, huge values (whose squares, or whose
/// unscaled values, overflow), signed zeros and subnormals among ordinary ones.
fn special_values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        3e38,
        -3e38,
        0.0,
        -0.0,
        1e-40,
        0.005,
        -0.02,
        2e19,
    ];
    let mut v = values(seed, n, scale);
    for (i, x) in v.iter_mut().enumerate() {
        // Specials in some stretches only, so that some rows are all ordinary.
        if i % 5 == 3 && (i / 37) % 3 == 0 {
            *x = specials[(i / 5) % specials.len()];
        }
    }
    v
}

/// NaN compares as NaN: the compiler may order the operands of an addition or multiplication
/// either way, which picks which of two NaNs' payloads survives.
fn canonical(v: f32) -> u32 {
    if v.is_nan() {
        0x7FC0_0000
    } else {
        v.to_bits()
    }
}

fn same_f64(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// The gradient transforms (loss scale, accumulation, clipvalue; each alone, all together),
/// applied in the row loops as they read the gradient: every version (portable and vector
/// twins, every element type) gives the bits of the float32 loops on the effective gradient
/// loaded by [`Grad::load`] (the buffered path), and the same finiteness probe as
/// [`Grad::load_checked`], on values with NaN, infinities and huge values and rows of every
/// remainder length.
fn transforms_agree<T: Twinned>(from: impl Fn(&[f32]) -> Vec<T>) {
    let mut versions: Vec<(Pass1Fn<T>, Pass2Fn<T>, UpdateFn<T>)> = vec![(
        |rows, sums| pass1_rows(rows, sums),
        |g, b, a, s| pass2_rows(g, b, a, s),
        |x, g, first, u| update_rows(x, g, first, u),
    )];
    versions.extend(vector_versions::<T>());
    let none = GradTransform::default();
    let transforms = [
        (
            GradTransform {
                loss_scale: Some(128.0),
                ..none
            },
            false,
        ),
        (
            GradTransform {
                loss_scale: Some(0.3),
                ..none
            },
            false,
        ),
        (
            GradTransform {
                accumulate_steps: Some(2.0),
                ..none
            },
            true,
        ),
        (
            GradTransform {
                accumulate_steps: Some(3.0),
                ..none
            },
            true,
        ),
        // Powers of two whose reciprocals are subnormal or overflow.
        (
            GradTransform {
                loss_scale: Some(2f32.powi(127)),
                accumulate_steps: Some(2f32.powi(-127)),
                ..none
            },
            true,
        ),
        (
            GradTransform {
                loss_scale: Some(2f32.powi(-128)),
                ..none
            },
            false,
        ),
        // Accumulation steps without an accumulator (not the update call): no averaging.
        (
            GradTransform {
                accumulate_steps: Some(2.0),
                ..none
            },
            false,
        ),
        (
            GradTransform {
                clip_value: Some(0.01),
                ..none
            },
            false,
        ),
        (
            GradTransform {
                clip_value: Some(0.0),
                ..none
            },
            false,
        ),
        (
            GradTransform {
                loss_scale: Some(0.75),
                accumulate_steps: Some(3.0),
                clip_value: Some(0.05),
            },
            true,
        ),
    ];
    let decay = Some(Decay {
        weight_decay: 0.1,
        learning_rate: 0.01,
    });
    let key = RoundingKey::new(3, 4, 5, RoundingStream::Update);
    let (n, rows, first) = (2, 3, 1);
    for m in (0..34).chain([1023, 1025, 2100]) {
        let len = rows * m;
        for special in [false, true] {
            let make = |seed: u64, scale: f32| {
                if special {
                    special_values(seed, len, scale)
                } else {
                    values(seed, len, scale)
                }
            };
            let g = from(&make(m as u64 + 1, 2.0));
            let acc = make(m as u64 + 2, 1.0);
            let x = from(&values(m as u64 + 99, len, 0.2));
            let xl: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            let col0 = values(m as u64 + 3, m, 1.0);
            let r_old = old_rows(m, first + rows);
            let fold = fold_of(&r_old);
            let col_factor = values(m as u64 + 7, 3 * m, 4.0);
            let row_factor = values(m as u64 + 11, first + rows, 2.0);
            for (transform, with_acc) in transforms {
                let grad = Grad {
                    g: &g,
                    acc: with_acc.then_some(&acc[..]),
                    transform,
                };
                // The buffered path: the effective gradient loaded, then the float32 loops.
                let mut gl = vec![0f32; len];
                let probe_ref = grad.load_checked(0, &mut gl);
                let plain = Grad::plain(&gl[..]);
                let what = format!("m {m}, {transform:?}, acc {with_acc}, special {special}");
                for folded in [false, true] {
                    for decay in [None, decay] {
                        let run = |pass1_t: Option<Pass1Fn<T>>|
                         -> (f64, Vec<f64>, Vec<u32>, Vec<u32>, f32) {
                            let (mut col, mut w) = (col0.clone(), col0.clone());
                            let (mut row_sums, mut sq) = (Vec::new(), vec![0f32; 2 * m]);
                            let mut probe = 0f32;
                            let sums = Pass1Sums {
                                col: &mut col,
                                fold: folded.then_some(FoldRows {
                                    fold,
                                    first_row: first,
                                    w: &mut w,
                                    squares: &mut sq,
                                }),
                                row_sums: &mut row_sums,
                                probe: &mut probe,
                            };
                            let sx = match pass1_t {
                                Some(p) => p(
                                    Pass1Rows {
                                        g: grad,
                                        x: &x,
                                        m,
                                        decay,
                                    },
                                    sums,
                                ),
                                None => pass1_rows::<f32>(
                                    Pass1Rows {
                                        g: plain,
                                        x: &xl,
                                        m,
                                        decay,
                                    },
                                    sums,
                                ),
                            };
                            let c = |v: &[f32]| v.iter().map(|x| canonical(*x)).collect();
                            (sx, row_sums, c(&col), c(&w), probe)
                        };
                        let want = run(None);
                        for (pass1_v, _, _) in &versions {
                            let got = run(Some(*pass1_v));
                            assert!(same_f64(got.0, want.0), "{what}: sum x^2");
                            assert_eq!(got.1.len(), want.1.len(), "{what}");
                            for (a, b) in got.1.iter().zip(&want.1) {
                                assert!(same_f64(*a, *b), "{what}: row sums {a} vs {b}");
                            }
                            assert_eq!(got.2, want.2, "{what}: column sums");
                            assert_eq!(got.3, want.3, "{what}: fold sums");
                            assert_eq!(got.4 == 0.0, probe_ref == 0.0, "{what}: probe");
                        }
                    }
                }
                let (b, a) = (&col_factor[..m], &row_factor[..rows]);
                for s in [1.0f32, 0.9] {
                    let want = pass2_rows(plain, b, a, s);
                    for (_, pass2_v, _) in &versions {
                        let got = pass2_v(grad, b, a, s);
                        assert!(same_f64(got, want), "{what}, scale {s}: {got} vs {want}");
                    }
                    for rounding in [Rounding::Nearest, Rounding::Stochastic(key)] {
                        let u = RowUpdate {
                            col_factor: &col_factor,
                            row_factor: &row_factor,
                            n,
                            m,
                            coef: 0.013,
                            grad_scale: s,
                            decay,
                            rounding,
                        };
                        // The buffered path: float32 rows updated, then rounded into `T`.
                        let mut xr = xl.clone();
                        update_rows(&mut xr, plain, first, &u);
                        let mut want = x.clone();
                        rounding.store_slice(&xr, &mut want, (first * m) as u64);
                        let want: Vec<u32> = want.iter().map(|v| canonical(v.to_f32())).collect();
                        for (_, _, update_v) in &versions {
                            let mut got = x.clone();
                            update_v(&mut got, grad, first, &u);
                            let got: Vec<u32> = got.iter().map(|v| canonical(v.to_f32())).collect();
                            assert_eq!(got, want, "{what}, scale {s}, {rounding:?}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn gradient_transforms_in_the_row_loops_f32() {
    transforms_agree::<f32>(<[f32]>::to_vec);
}

#[test]
fn gradient_transforms_in_the_row_loops_bf16() {
    transforms_agree::<bf16>(as_bf16);
}

#[test]
fn gradient_transforms_in_the_row_loops_f16() {
    transforms_agree::<f16>(as_f16);
}

/// The row fold's accumulator is `w_j += (g_ij^2) (1 / r_i)` in row order, in float32, with
/// `1 / r_i` from each row's sum of squares: the bits of that definition, whether the fold
/// keeps the rows' squares (short rows) or reads the gradient again (rows longer than
/// [`super::portable::KEEP_SQUARES_UP_TO`]), on the portable loops and on the vector twins
/// this CPU has, plain and with a transformed gradient.
#[test]
fn the_row_fold_adds_squares_in_row_order_short_or_long_rows() {
    use super::dispatch::RowLoops;
    let (rows, first) = (3, 2);
    for m in [1000usize, 2048, 2049, 4096] {
        assert_eq!(
            super::portable::keeps_squares(m),
            m <= super::portable::KEEP_SQUARES_UP_TO
        );
        let len = rows * m;
        let g = values(m as u64 + 1, len, 2.0);
        let x = values(m as u64 + 2, len, 0.2);
        let w0 = values(m as u64 + 3, m, 1.0);
        let r_old = old_rows(m, first + rows);
        let fold = fold_of(&r_old);
        let scaled = GradTransform {
            loss_scale: Some(128.0),
            clip_value: Some(0.4),
            ..GradTransform::default()
        };
        for transform in [GradTransform::default(), scaled] {
            let grad = Grad {
                g: &g,
                acc: None,
                transform,
            };
            let mut effective = vec![0f32; len];
            grad.load(0, &mut effective);
            let run = |pass1: Pass1Fn<f32>| {
                let (mut col, mut w, mut row_sums, mut probe) =
                    (vec![0f32; m], w0.clone(), Vec::new(), 0f32);
                let mut squares = vec![0f32; 2 * m];
                let rows_in = Pass1Rows {
                    g: grad,
                    x: &x,
                    m,
                    decay: None,
                };
                let sums = Pass1Sums {
                    col: &mut col,
                    fold: Some(FoldRows {
                        fold,
                        first_row: first,
                        w: &mut w,
                        squares: &mut squares,
                    }),
                    row_sums: &mut row_sums,
                    probe: &mut probe,
                };
                pass1(rows_in, sums);
                (w, row_sums)
            };
            let mut want = w0.clone();
            let (w, row_sums) = run(pass1_rows::<f32>);
            for (i, sum) in row_sums.iter().enumerate() {
                let inv = fold.inv_r(first + i, *sum, m) as f32;
                for (wv, gv) in want.iter_mut().zip(&effective[i * m..(i + 1) * m]) {
                    let e = gv * gv;
                    *wv += e * inv;
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&w), bits(&want), "portable, m = {m}, {transform:?}");
            let (w, _) = run(<f32 as RowLoops>::pass1_rows);
            assert_eq!(bits(&w), bits(&want), "dispatched, m = {m}, {transform:?}");
        }
    }
}

#[test]
fn the_sum_of_squares_twin_matches_the_portable_lanes() {
    use super::reduce::{avx2, portable_block_sum_sq, CHUNK};
    if !available("AVX2", has_avx2()) {
        return;
    }
    // Whole lanes, a remainder, shorter than one set of lanes, empty, a whole block; values
    // of mixed sizes so that the order of the additions shows in the bits.
    for (seed, len) in [
        (1u64, 1024usize),
        (2, 1000),
        (3, 31),
        (4, 0),
        (5, 33),
        (6, 96),
    ] {
        let mut v = values(seed, len, 2.0);
        for (i, x) in v.iter_mut().enumerate() {
            *x *= 2f32.powi((i * 7 % 23) as i32 - 11);
        }
        let want = portable_block_sum_sq(&v);
        // SAFETY: the CPU has AVX2 (checked above).
        let got = unsafe { avx2::block_sum_sq(&v) };
        assert_eq!(got.to_bits(), want.to_bits(), "length {len}");
        // The portable lanes add in halves, not in order: a plain running sum differs.
        if len == CHUNK {
            let running = v.iter().fold(0f32, |s, x| s + x * x);
            assert_ne!(
                running.to_bits(),
                want.to_bits(),
                "a running sum gave the same bits"
            );
        }
    }
}
