//! Which kernel a factored variable runs on, chosen from its shape alone, and what the kernels
//! for shapes other than large matrices share.
//!
//! The row loops ([`super::factored`]) stream whole rows and keep a column accumulator per work
//! unit: at the memory limit for large matrices, and far from it when rows are short (a
//! convolution kernel `[out, in, kh, kw]` factored over its last two axes is hundreds of
//! thousands of `kh x kw` matrices; `n x 1`, `n x 4`) or few (`1 x n`, `4 x n`). Those run on
//! three other kernels:
//! - `kernels/tiny.rs`, rows of at most [`MAX_SHORT_ROW`] elements: the gradient streamed as it
//!   is stored, each tiny matrix (or row) taken in its own layout, work units across the batch
//!   of matrices (or the rows);
//! - `kernels/narrow.rs`, at most [`MAX_FEW_ROWS`] rows: work units across columns, so that each
//!   unit's column statistics are complete and only `n` row sums are combined;
//! - `kernels/single_row.rs`, a single row (`1 x m`): the vector's loops, since with one row
//!   Keras's `v = (r / mean(r)) c` is `c`.
//!
//! All compute the new statistics in one pass over the gradient (the statistics pass), and the
//! update in a second (the write pass) that recomputes the factors `a_i`, `b_j` of
//! `1/sqrt(v_ij)` from the new statistics instead of storing them. Without norm clipping the
//! statistics pass is pass 1 itself (the gradient scale is 1), 20 bytes per float32 parameter
//! plus the statistics; with it, pass 1 only sums squares and the statistics pass runs once the
//! scale is known. Work units are fixed by the shape, never by the number of threads, and their
//! partial sums are added in unit order: results do not depend on the thread count.

use super::after_write::{write_whole, Tail};
use super::element::Element;
use super::grad::{Decay, Grad};
use super::parallel::UNIT_ELEMS;
use super::store::Rounding;
use super::{narrow, single_row, tiny};
use crate::state::Factoring;

/// Longest row the short-row kernel (`kernels/tiny.rs`) takes.
pub const MAX_SHORT_ROW: usize = 16;

/// Most rows per slice the column-split kernel (`kernels/narrow.rs`) takes.
pub const MAX_FEW_ROWS: usize = 64;

/// The kernel of a factored variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The row loops of [`super::factored`] (large matrices).
    Rows,
    /// Batches of at least sixteen matrices of at most `tiny::MAX_MATRIX` elements, in groups
    /// of sixteen.
    Tiny,
    /// Rows of at most [`MAX_SHORT_ROW`] elements, in groups of sixteen rows.
    ShortRows,
    /// At most [`MAX_FEW_ROWS`] rows, split across columns.
    FewRows,
    /// A single row (`1 x m`), on the vector's loops (`kernels/single_row.rs`).
    SingleRow,
}

/// The kernel for a factored variable of this shape.
pub fn kernel(f: Factoring) -> Kernel {
    // Variables factored over other axes than their last two have kernels of their own
    // (`strided.rs`); the choice here is for Keras's layout only.
    if f.is_empty() || f.strided.is_some() {
        Kernel::Rows
    } else if single_row::takes(f) {
        Kernel::SingleRow
    } else if f.n * f.m <= tiny::MAX_MATRIX {
        // Fewer than one group of small matrices is a small tensor: the row loops' per-row
        // costs do not matter there, and its numbers stay as they were.
        if f.lead >= tiny::LANES {
            Kernel::Tiny
        } else {
            Kernel::Rows
        }
    } else if f.m <= MAX_SHORT_ROW {
        Kernel::ShortRows
    } else if f.n <= MAX_FEW_ROWS {
        Kernel::FewRows
    } else {
        Kernel::Rows
    }
}

/// The kernel the fused backend runs for `f`: [`kernel`]'s choice, except that few rows shorter
/// than a work unit stay with the row loops. The column split is for rows so long that the row
/// loops would make few work units (`4 x 4194304`); for short ones (the 64 x 64 matrices of
/// many small tensors) the row loops' lower per-tensor cost wins.
pub fn preferred(f: Factoring) -> Kernel {
    match kernel(f) {
        Kernel::FewRows if f.m < UNIT_ELEMS => Kernel::Rows,
        k => k,
    }
}

/// The inputs of the statistics update `r = b2 r + (1 - b2) mean_j((s g)^2 + eps1)`, `c` likewise
/// (Shazeer & Stern 2018, arXiv:1804.04235, Algorithm 4).
#[derive(Debug, Clone, Copy)]
pub struct StatArgs<'a> {
    /// Row statistics before the update (`lead * n`).
    pub r_old: &'a [f32],
    /// Column statistics before the update (`lead * m`).
    pub c_old: &'a [f32],
    /// `beta2_t`.
    pub beta2: f32,
    /// `epsilon_1`.
    pub epsilon_1: f32,
    /// The norm-clipping scale `s` of the gradient.
    pub scale: f32,
}

/// The new statistics of a factored variable and what the write pass needs besides them.
#[derive(Debug, Clone, PartialEq)]
pub struct Statistics {
    /// New row statistics (`lead * n`).
    pub r: Vec<f32>,
    /// New column statistics (`lead * m`).
    pub c: Vec<f32>,
    /// `mean(r)` per slice, where the write pass does not recompute it (empty otherwise).
    pub row_mean: Vec<f32>,
    /// `sum(u^2)`, `u_ij = (s g_ij) a_i b_j`, for RMS(u).
    pub sum_sq_update: f64,
}

/// The sums pass 1 reports for every variable.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sums {
    /// Sum of `g^2` of the effective gradient.
    pub sum_sq_grad: f64,
    /// Sum of `x^2` of the weight after weight decay.
    pub sum_sq_x: f64,
    /// 0 when the unscaled gradient is finite (or was not checked), NaN otherwise.
    pub probe: f32,
}

impl Sums {
    /// Adds another unit's sums (in unit order).
    pub(crate) fn add(&mut self, o: &Sums) {
        self.sum_sq_grad += o.sum_sq_grad;
        self.sum_sq_x += o.sum_sq_x;
        self.probe += o.probe;
    }
}

/// What the statistics pass reads besides the gradient: with `x`, it is pass 1 too (the sum of
/// `x^2` after the optional decay, and finiteness when `check`).
#[derive(Debug, Clone, Copy)]
pub struct Reads<'a, T> {
    /// The weight, when the statistics pass is pass 1.
    pub x: Option<&'a [T]>,
    /// The optional weight decay (RMS(x) is of the decayed weight).
    pub decay: Option<Decay>,
    /// Whether to check that the unscaled gradient is finite.
    pub check: bool,
}

/// Buffers for the new statistics, every element of which the statistics pass writes (from
/// a [`super::Spare`], or fresh).
#[derive(Debug)]
pub struct Fresh {
    /// For `r` (`lead * n` elements).
    pub r: Vec<f32>,
    /// For `c` (`lead * m` elements).
    pub c: Vec<f32>,
}

impl Fresh {
    /// Zeroed buffers for a variable of this shape.
    pub fn zeroed(f: Factoring) -> Self {
        Fresh {
            r: vec![0.0; f.lead * f.n],
            c: vec![0.0; f.lead * f.m],
        }
    }
}

/// The statistics pass of a variable whose [`kernel`] is not [`Kernel::Rows`], into `out`.
pub fn statistics<T: Element>(
    grad: &Grad<'_, T>,
    reads: Reads<'_, T>,
    f: Factoring,
    args: StatArgs<'_>,
    out: Fresh,
) -> (Statistics, Sums) {
    debug_assert!(out.r.len() == f.lead * f.n && out.c.len() == f.lead * f.m);
    match kernel(f) {
        Kernel::SingleRow => single_row::statistics(grad, reads, args, out),
        Kernel::FewRows => narrow::statistics(grad, reads, f, args, out),
        _ => tiny::statistics(grad, reads, f, args, out),
    }
}

/// The write pass: `x = decay(x) - coef * (s g_ij) a_i b_j`, each 16-bit weight stored with
/// `rounding`.
#[allow(clippy::too_many_arguments)]
pub fn write<T: Element>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    st: &Statistics,
    f: Factoring,
    coef: f32,
    scale: f32,
    decay: Option<Decay>,
    rounding: Rounding,
) {
    let tail = Tail::default();
    write_then(x, grad, st, f, coef, scale, decay, rounding, tail);
}

/// [`write()`], then the [`Tail`] (EMA, overwrite, accumulator zeroing): block by block where the
/// kernel writes in blocks (a single row), else over the whole tensor.
#[allow(clippy::too_many_arguments)]
pub fn write_then<T: Element>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    st: &Statistics,
    f: Factoring,
    coef: f32,
    scale: f32,
    decay: Option<Decay>,
    rounding: Rounding,
    tail: Tail<'_>,
) {
    let w = WriteArgs {
        coef,
        scale,
        decay,
        rounding: rounding.for_type::<T>(),
    };
    match kernel(f) {
        Kernel::SingleRow => {
            single_row::write_then(x, grad, st, coef, scale, decay, rounding, tail)
        }
        Kernel::FewRows => write_whole(x, grad, tail, |x, g| narrow::write(x, g, st, f, w)),
        _ => write_whole(x, grad, tail, |x, g| tiny::write(x, g, st, f, w)),
    }
}

/// The write pass's scalars.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteArgs {
    pub coef: f32,
    pub scale: f32,
    pub decay: Option<Decay>,
    /// How the weights are stored ([`Rounding::store_slice`]).
    pub rounding: Rounding,
}

/// `x = decay(x) - coef * ((s g) f)` over a block, `f` the block's factors `a_i b_j` in the
/// weight's layout.
#[inline(always)]
pub(crate) fn update_block(xb: &mut [f32], g: &[f32], fac: &[f32], w: WriteArgs) {
    let (coef, s) = (w.coef, w.scale);
    match w.decay {
        None => {
            for ((x, g), f) in xb.iter_mut().zip(g).zip(fac) {
                *x -= coef * ((s * g) * f);
            }
        }
        Some(d) => {
            for ((x, g), f) in xb.iter_mut().zip(g).zip(fac) {
                *x = d.apply(*x) - coef * ((s * g) * f);
            }
        }
    }
}

/// `acc += part`, elementwise (a unit's partial sums, added in unit order).
pub(crate) fn add_into(acc: &mut [f64], part: &[f64]) {
    acc.iter_mut().zip(part).for_each(|(a, b)| *a += b);
}

/// The effective gradient of elements `start..start + buf.len()` (probed for finiteness when
/// `check`): the stored slice itself for a plain float32 gradient.
#[inline(always)]
pub(crate) fn load_grad<'b, T: Element>(
    grad: &'b Grad<'_, T>,
    start: usize,
    buf: &'b mut [f32],
    check: bool,
    probe: &mut f32,
) -> &'b [f32] {
    if check {
        *probe += grad.load_checked(start, buf);
        buf
    } else {
        grad.view(start, buf)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::factored;

    /// Deterministic values in `[lo, lo + span)`.
    pub(crate) fn values(seed: u64, n: usize, lo: f32, span: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                lo + span * ((s >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    }

    /// Keras's factoring of a `lead x n x m` tensor (its last two axes).
    pub(crate) fn batch(lead: usize, n: usize, m: usize) -> Factoring {
        Factoring {
            lead,
            n,
            m,
            strided: None,
        }
    }

    /// The statistics update of `r_old`, `c_old` with `beta2 = 0.5`, `epsilon_1 = 1e-30` and
    /// no gradient scale.
    pub(crate) fn half_decay<'a>(r_old: &'a [f32], c_old: &'a [f32]) -> StatArgs<'a> {
        StatArgs {
            r_old,
            c_old,
            beta2: 0.5,
            epsilon_1: 1e-30,
            scale: 1.0,
        }
    }

    /// A weight and old row and column statistics for `f`, from seeds `seed` to `seed + 2`.
    fn step_inputs(f: Factoring, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        (
            values(seed, f.len(), -0.5, 1.0),
            values(seed + 1, f.lead * f.n, 0.1, 1.0),
            values(seed + 2, f.lead * f.m, 0.1, 1.0),
        )
    }

    /// Pass 1's reads of the weight `x`, without weight decay.
    pub(crate) fn pass1_reads<T>(x: &[T], check: bool) -> Reads<'_, T> {
        Reads {
            x: Some(x),
            decay: None,
            check,
        }
    }

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * a.abs().max(b.abs()) + 1e-30
    }

    /// Shapes of every family: batches of tiny matrices, short rows, few rows.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1000, 3, 3),
        (37, 1, 1),
        (21, 4, 4),
        (17, 7, 7),
        (40, 2, 5),
        (16, 1, 40),
        (19, 40, 1),
        (1, 1000, 1),
        (1, 301, 4),
        (3, 100, 5),
        (2, 33, 16),
        (1, 1, 5000),
        (1, 4, 3000),
        (2, 3, 700),
        (1, 64, 100),
        // Few rows over several work units (of one block of columns each for 40 rows, of
        // several for 3 and 6), the last one partial.
        (2, 40, 2500),
        (1, 3, 20000),
        (2, 6, 9000),
        (3, 17, 9000),
        (1, 2, 170),
        // Separable convolution kernels, each with its own unrolled loops.
        (35, 3, 1),
        (33, 1, 3),
        (20, 5, 1),
        (18, 1, 5),
        (40, 7, 1),
        (17, 1, 7),
    ];

    /// Each shaped kernel against the row loops of [`factored`] on the same step: new
    /// statistics, sums, RMS(u) and weights, with and without a gradient scale and weight decay.
    #[test]
    fn shaped_kernels_agree_with_the_row_loops() {
        for (case, &(lead, n, m)) in SHAPES.iter().enumerate() {
            let f = batch(lead, n, m);
            assert_ne!(kernel(f), Kernel::Rows, "{f:?}");
            let len = f.len();
            let g = values(case as u64 * 7 + 1, len, -1.0, 2.0);
            let (x0, r_old, c_old) = step_inputs(f, case as u64 * 7 + 2);
            for (scale, decay) in [
                (1.0f32, None),
                (
                    0.25,
                    Some(Decay {
                        weight_decay: 0.1,
                        learning_rate: 0.01,
                    }),
                ),
            ] {
                let grad = Grad::plain(&g[..]);
                let (b2, eps, coef) = (0.9f32, 1e-30f32, 0.01f32);
                let p1 = factored::pass1(&grad, &x0, decay, f, true, None);
                let prep = factored::prepare(&p1, &r_old, &c_old, f, b2, eps, scale);
                let su2 = factored::pass2(&grad, &prep, f, scale);
                let mut want = x0.clone();
                factored::pass3(
                    &mut want,
                    &grad,
                    &prep,
                    f,
                    coef,
                    scale,
                    decay,
                    Rounding::Nearest,
                );
                let args = StatArgs {
                    r_old: &r_old,
                    c_old: &c_old,
                    beta2: b2,
                    epsilon_1: eps,
                    scale,
                };
                let reads = Reads {
                    x: Some(&x0[..]),
                    decay,
                    check: true,
                };
                let (st, sums) = statistics(&grad, reads, f, args, Fresh::zeroed(f));
                let what = format!("{f:?} scale {scale}");
                assert_eq!(sums.probe, 0.0, "{what}");
                assert!(close(sums.sum_sq_grad, p1.sum_sq_grad, 1e-6), "{what}");
                assert!(close(sums.sum_sq_x, p1.sum_sq_x, 1e-6), "{what}");
                assert!(
                    close(st.sum_sq_update, su2, 1e-5),
                    "{what}: {} vs {su2}",
                    st.sum_sq_update
                );
                for (a, b) in st.r.iter().zip(&prep.r).chain(st.c.iter().zip(&prep.c)) {
                    assert!(close(*a as f64, *b as f64, 1e-6), "{what}: {a} vs {b}");
                }
                let mut got = x0.clone();
                write(
                    &mut got,
                    &grad,
                    &st,
                    f,
                    coef,
                    scale,
                    decay,
                    Rounding::Nearest,
                );
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 + 1e-5 * b.abs(),
                        "{what}: x[{i}] {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Squares that are finite but whose float32 sums overflow (rows of `1.5e19`, whose squares
    /// are 2.25e38) keep the finite statistics of f64 sums in every shaped kernel, as in the
    /// row loops: the float32 fast paths hand such blocks to their f64 code.
    #[test]
    fn huge_finite_squares_keep_finite_statistics() {
        for &(lead, n, m) in &[
            (1, 300, 4),
            (1, 5000, 2),
            (40, 4, 4),
            // A batch of short-row matrices, several per work unit.
            (64, 8, 16),
            (2, 100, 3),
            (1, 4, 3000),
            (1, 1, 3000),
        ] {
            let f = batch(lead, n, m);
            let len = f.len();
            let mut g = values(31, len, -1.0, 2.0);
            // Two whole rows near the start and a few scattered values.
            for i in (m.min(len)..(3 * m).min(len)).chain((0..len).step_by(997)) {
                g[i] = 1.5e19;
            }
            let (x0, r_old, c_old) = step_inputs(f, 32);
            let grad = Grad::plain(&g[..]);
            let (b2, eps) = (0.9f32, 1e-30f32);
            let p1 = factored::pass1(&grad, &x0, None, f, true, None);
            let prep = factored::prepare(&p1, &r_old, &c_old, f, b2, eps, 1.0);
            let args = StatArgs {
                r_old: &r_old,
                c_old: &c_old,
                beta2: b2,
                epsilon_1: eps,
                scale: 1.0,
            };
            let reads = Reads {
                x: Some(&x0[..]),
                decay: None,
                check: true,
            };
            let (st, sums) = statistics(&grad, reads, f, args, Fresh::zeroed(f));
            let what = format!("{f:?}");
            assert_eq!(sums.probe, 0.0, "{what}: a finite gradient");
            assert!(sums.sum_sq_grad.is_finite(), "{what}");
            assert!(close(sums.sum_sq_grad, p1.sum_sq_grad, 1e-6), "{what}");
            for (a, b) in st.r.iter().zip(&prep.r).chain(st.c.iter().zip(&prep.c)) {
                assert!(a.is_finite(), "{what}: {a}");
                assert!(close(*a as f64, *b as f64, 1e-6), "{what}: {a} vs {b}");
            }
        }
    }

    /// The statistics pass flags a gradient exactly when checking every value as it is read
    /// would ([`Grad::load_checked`] over the whole tensor): a NaN or an infinity in any unit,
    /// under a loss scale whose division overflows, and under `clipvalue` (which clamps an
    /// infinity to a finite value, so that it never reaches the sums); huge finite values whose
    /// float32 squares overflow are not flagged.
    #[test]
    fn the_statistics_pass_flags_exactly_the_non_finite_gradients() {
        use crate::kernels::GradTransform;
        for &(lead, n, m) in &[
            (40000, 1, 1),
            (9000, 3, 3),
            (5000, 4, 4),
            (1, 70000, 1),
            (1, 40000, 4),
            (3, 9000, 3),
            (1, 4, 30000),
            (1, 1, 70000),
        ] {
            let f = batch(lead, n, m);
            let len = f.len();
            let (x0, r_old, c_old) = step_inputs(f, 42);
            let corruptions: [(usize, f32); 6] = [
                (len - 1, f32::NAN),
                (len / 2 + 7, f32::INFINITY),
                (3, f32::NEG_INFINITY),
                (len / 3, 1.5e19),
                (len / 3, 3e38),
                (0, 0.0),
            ];
            let transforms = [
                GradTransform::default(),
                GradTransform {
                    loss_scale: Some(0.5),
                    ..GradTransform::default()
                },
                GradTransform {
                    clip_value: Some(0.25),
                    ..GradTransform::default()
                },
            ];
            for (at, value) in corruptions {
                let mut g = values(41, len, -1.0, 2.0);
                g[at] = value;
                for transform in transforms {
                    let grad = Grad {
                        g: &g[..],
                        acc: None,
                        transform,
                    };
                    let mut all = vec![0f32; len];
                    let want = grad.load_checked(0, &mut all).is_nan();
                    let (args, reads) = (half_decay(&r_old, &c_old), pass1_reads(&x0, true));
                    let (_, sums) = statistics(&grad, reads, f, args, Fresh::zeroed(f));
                    assert_eq!(
                        sums.probe.is_nan(),
                        want,
                        "{f:?}: {value} at {at}, {transform:?}, probe {}",
                        sums.probe
                    );
                    if value.is_nan() || value.is_infinite() {
                        assert!(want, "{value} must be flagged");
                    }
                }
            }
        }
    }

    /// The same bits with one thread and with three, on shapes large enough to run in parallel.
    #[test]
    fn shaped_kernels_do_not_depend_on_the_thread_count() {
        for &(lead, n, m) in &[
            (8000, 3, 3),
            (70000, 1, 1),
            (1, 70000, 1),
            (1, 30000, 4),
            (1, 2, 40000),
            (1, 1, 100000),
            (3, 50, 1000),
        ] {
            let f = batch(lead, n, m);
            let len = f.len();
            let g = values(11, len, -1.0, 2.0);
            let (x0, r_old, c_old) = step_inputs(f, 12);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("a thread pool");
                pool.install(|| {
                    let grad = Grad::plain(&g[..]);
                    let (args, reads) = (half_decay(&r_old, &c_old), pass1_reads(&x0, false));
                    let (st, sums) = statistics(&grad, reads, f, args, Fresh::zeroed(f));
                    let mut x = x0.clone();
                    write(&mut x, &grad, &st, f, 0.01, 1.0, None, Rounding::Nearest);
                    let bits: Vec<u32> =
                        st.r.iter()
                            .chain(&st.c)
                            .chain(&x)
                            .map(|v| v.to_bits())
                            .collect();
                    (
                        bits,
                        st.sum_sq_update.to_bits(),
                        sums.sum_sq_grad.to_bits(),
                        sums.sum_sq_x.to_bits(),
                    )
                })
            };
            assert!(run(1) == run(3), "{f:?}: one thread and three differ");
        }
    }
}
