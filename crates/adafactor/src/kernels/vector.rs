//! The three passes for an unfactored variable (rank 0 or 1), which keeps its velocity `v`.

use super::after_write::{write_blocks, Tail};
use super::cpu::vectorized_wide;
use super::element::Element;
use super::grad::{decayed_view, probe_unless_finite, Decay, Grad};
use super::parallel::{chunk_units, map_units, parallel_for, split_for, UNIT_ELEMS};
use super::reduce::{sum_sq, CHUNK};
use super::shaped::load_grad;
use super::store::Rounding;

/// What pass 1 learns about an unfactored variable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pass1 {
    /// Sum of `g^2` (for clipnorm and global_clipnorm).
    pub sum_sq_grad: f64,
    /// Sum of `x^2` after weight decay (for RMS(x)).
    pub sum_sq_x: f64,
    /// False when the unscaled gradient holds NaN or infinity (only checked when asked).
    pub finite: bool,
}

fn ranges(len: usize) -> Vec<(usize, usize)> {
    let step = if split_for(len) {
        UNIT_ELEMS
    } else {
        len.max(1)
    };
    (0..len)
        .step_by(step)
        .map(|s| (s, (s + step).min(len)))
        .collect()
}

/// Pass 1: sums of squares of the gradient and of the decayed weight.
pub fn pass1<T: Element>(
    grad: &Grad<'_, T>,
    x: &[T],
    decay: Option<Decay>,
    check_finite: bool,
) -> Pass1 {
    let parallel = parallel_for(x.len());
    let probe_clip = check_finite && grad.transform.clip_value.is_some();
    let outs = map_units(
        ranges(x.len()),
        parallel,
        #[inline(always)]
        |(s, e)| {
            // Blocks of CHUNK through stack buffers: the same sums as over the whole range.
            let (mut gbuf, mut xbuf) = ([0f32; CHUNK], [0f32; CHUNK]);
            let (mut sg, mut sx, mut probe) = (0f64, 0f64, 0f32);
            for b in (s..e).step_by(CHUNK) {
                let n = CHUNK.min(e - b);
                // A plain float32 gradient and an undecayed float32 weight are read in place.
                let gb = load_grad(grad, b, &mut gbuf[..n], probe_clip, &mut probe);
                let xb = decayed_view(&x[b..b + n], decay, &mut xbuf[..n]);
                sg += sum_sq(gb);
                sx += sum_sq(xb);
            }
            if check_finite && !probe_clip {
                probe += probe_unless_finite(grad, (s, e), sg);
            }
            (sg, sx, probe)
        },
    );
    outs.iter().fold(
        Pass1 {
            sum_sq_grad: 0.0,
            sum_sq_x: 0.0,
            finite: true,
        },
        |acc, (g, x, p)| Pass1 {
            sum_sq_grad: acc.sum_sq_grad + g,
            sum_sq_x: acc.sum_sq_x + x,
            finite: acc.finite && *p == 0.0,
        },
    )
}

/// The velocity update of a block, `v_new = b2 v + (1 - b2) ((s g)^2 + eps1)`, leaving
/// `u = s g / sqrt(v_new)` in `u`.
#[inline(always)]
fn velocity_block(
    g: &[f32],
    v_old: &[f32],
    v_new: &mut [f32],
    u: &mut [f32],
    (beta2, epsilon_1, grad_scale): (f32, f32, f32),
) {
    for (((v, g), old), u) in v_new.iter_mut().zip(g).zip(v_old).zip(u) {
        let ge = grad_scale * *g;
        *v = beta2 * old + (1.0 - beta2) * (ge * ge + epsilon_1);
        *u = ge / v.sqrt();
    }
}

/// Passes 1 and 2 in one sweep, when the gradient scale is 1 (no norm clipping): the sums of
/// [`pass1`], the new velocity into `v_new` and `sum(u^2)` as [`pass2`] computes them (the same
/// blocks, so the same bits), reading the gradient once instead of twice.
#[allow(clippy::too_many_arguments)]
pub fn pass1_fold<T: Element>(
    grad: &Grad<'_, T>,
    x: &[T],
    decay: Option<Decay>,
    check_finite: bool,
    v_old: &[f32],
    v_new: &mut [f32],
    beta2: f32,
    epsilon_1: f32,
) -> (Pass1, f64) {
    let len = v_new.len();
    let parallel = parallel_for(len);
    let units = chunk_units(v_new);
    let probe_clip = check_finite && grad.transform.clip_value.is_some();
    let outs = map_units(
        units,
        parallel,
        #[inline(always)]
        |(s, vs)| {
            let (mut gbuf, mut xbuf, mut ubuf) = ([0f32; CHUNK], [0f32; CHUNK], [0f32; CHUNK]);
            let (mut sg, mut sx, mut su, mut probe) = (0f64, 0f64, 0f64, 0f32);
            for (k, vb) in vs.chunks_mut(CHUNK).enumerate() {
                let b = s + k * CHUNK;
                let n = vb.len();
                let gb = load_grad(grad, b, &mut gbuf[..n], probe_clip, &mut probe);
                let xb = decayed_view(&x[b..b + n], decay, &mut xbuf[..n]);
                // Four loops over a block in the first-level cache, each of which the compiler
                // vectorises (one loop doing all four does not).
                sg += sum_sq(gb);
                sx += sum_sq(xb);
                let ub = &mut ubuf[..n];
                velocity_block(gb, &v_old[b..b + n], vb, ub, (beta2, epsilon_1, 1.0));
                su += sum_sq(ub);
            }
            if check_finite && !probe_clip {
                probe += probe_unless_finite(grad, (s, s + vs.len()), sg);
            }
            (sg, sx, su, probe)
        },
    );
    let mut p = Pass1 {
        sum_sq_grad: 0.0,
        sum_sq_x: 0.0,
        finite: true,
    };
    let mut sum_u2 = 0f64;
    for (g, x, u, probe) in outs {
        p.sum_sq_grad += g;
        p.sum_sq_x += x;
        p.finite &= probe == 0.0;
        sum_u2 += u;
    }
    (p, sum_u2)
}

/// Pass 2: `v_new = b2 v + (1 - b2) ((s g)^2 + eps1)` and returns `sum(u^2)`, `u = s g / sqrt(v_new)`.
pub fn pass2<T: Element>(
    grad: &Grad<'_, T>,
    v_old: &[f32],
    v_new: &mut [f32],
    beta2: f32,
    epsilon_1: f32,
    grad_scale: f32,
) -> f64 {
    velocity_pass::<T, false>(grad, v_old, v_new, (beta2, epsilon_1, grad_scale)).0
}

/// [`pass2`], also returning the sum of `g^2` of the effective gradient (as [`pass1`] sums it):
/// `(sum(u^2), sum(g^2))`, for a single row's row statistic.
pub(crate) fn pass2_with_sum_sq<T: Element>(
    grad: &Grad<'_, T>,
    v_old: &[f32],
    v_new: &mut [f32],
    (beta2, epsilon_1, grad_scale): (f32, f32, f32),
) -> (f64, f64) {
    velocity_pass::<T, true>(grad, v_old, v_new, (beta2, epsilon_1, grad_scale))
}

/// The velocity sweep of [`pass2`]: `(sum(u^2), sum(g^2))`, the second only when `SUM_G`.
fn velocity_pass<T: Element, const SUM_G: bool>(
    grad: &Grad<'_, T>,
    v_old: &[f32],
    v_new: &mut [f32],
    scalars: (f32, f32, f32),
) -> (f64, f64) {
    let len = v_new.len();
    let outs = map_units(
        chunk_units(v_new),
        parallel_for(len),
        #[inline(always)]
        |(start, vs)| {
            let (mut gbuf, mut ubuf) = ([0f32; CHUNK], [0f32; CHUNK]);
            let (mut total, mut sg) = (0f64, 0f64);
            let mut probe = 0f32;
            for (k, vb) in vs.chunks_mut(CHUNK).enumerate() {
                let b = start + k * CHUNK;
                let n = vb.len();
                let gb = load_grad(grad, b, &mut gbuf[..n], false, &mut probe);
                if SUM_G {
                    sg += sum_sq(gb);
                }
                let ub = &mut ubuf[..n];
                velocity_block(gb, &v_old[b..b + n], vb, ub, scalars);
                total += sum_sq(ub);
            }
            (total, sg)
        },
    );
    outs.iter()
        .fold((0f64, 0f64), |(u, g), (pu, pg)| (u + pu, g + pg))
}

/// Pass 3: `x = decay(x) - coef * s g / sqrt(v_new)`, `coef = alpha / max(1, RMS(u)/d)`,
/// rounded into the weight by `rounding`.
pub fn pass3<T: Element>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    v_new: &[f32],
    coef: f32,
    grad_scale: f32,
    decay: Option<Decay>,
    rounding: Rounding,
) {
    let tail = Tail::default();
    pass3_then(x, grad, v_new, coef, grad_scale, decay, rounding, tail);
}

/// [`pass3`], each block followed by its [`Tail`] (EMA, overwrite, accumulator zeroing) while
/// it is in cache.
#[allow(clippy::too_many_arguments)]
pub fn pass3_then<T: Element>(
    x: &mut [T],
    grad: &Grad<'_, T>,
    v_new: &[f32],
    coef: f32,
    grad_scale: f32,
    decay: Option<Decay>,
    rounding: Rounding,
    tail: Tail<'_>,
) {
    let parallel = parallel_for(x.len());
    let chunk = if parallel { UNIT_ELEMS } else { x.len() };
    // Compiled for the widest vectors (the closure that `write_blocks` runs is not inlined
    // into its AVX2 frame, which left these loops at the baseline's four lanes).
    let body = |start: usize, xs: &mut [T], grad: &Grad<'_, T>| {
        vectorized_wide(
            #[inline(always)]
            || {
                let (mut gbuf, mut xbuf) = ([0f32; CHUNK], [0f32; CHUNK]);
                let mut probe = 0f32;
                for (k, xblock) in xs.chunks_mut(CHUNK).enumerate() {
                    let b = k * CHUNK;
                    let n = xblock.len();
                    let gb = load_grad(grad, b, &mut gbuf[..n], false, &mut probe);
                    let vb = &v_new[start + b..start + b + n];
                    match T::as_f32_mut(xblock) {
                        // A float32 weight is updated where it is stored.
                        Some(xf) => update_block(xf, gb, vb, coef, grad_scale, decay),
                        None => {
                            let xb = &mut xbuf[..n];
                            T::load(xblock, xb);
                            update_block(xb, gb, vb, coef, grad_scale, decay);
                            rounding.store_slice(xb, xblock, (start + b) as u64);
                        }
                    }
                }
            },
        )
    };
    write_blocks(x, grad, 1, chunk, parallel, tail, body);
}

/// `x = decay(x) - coef * ((s g) / sqrt(v_new))` over a block.
#[inline(always)]
fn update_block(x: &mut [f32], g: &[f32], v: &[f32], coef: f32, s: f32, decay: Option<Decay>) {
    match decay {
        None => {
            for ((x, g), v) in x.iter_mut().zip(g).zip(v) {
                *x -= coef * ((s * g) / v.sqrt());
            }
        }
        Some(d) => {
            for ((x, g), v) in x.iter_mut().zip(g).zip(v) {
                *x = d.apply(*x) - coef * ((s * g) / v.sqrt());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large vector's sums (pass 1, and the folded sweep's) have the same bits on 1, 2 and 3
    /// threads: the work units come from the length alone. The blocks' values span forty binary
    /// orders of magnitude, so that adding the units' partial sums in another grouping rounds
    /// differently.
    #[test]
    fn sums_have_the_same_bits_on_any_thread_count() {
        let len = 40 * UNIT_ELEMS + 3;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        // One scale per block of the reduction, so that the blocks' sums differ by up to 2^80.
        let g: Vec<f32> = (0..len)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                unit * 2f32.powi(((i / CHUNK) * 7919 % 41) as i32 - 20)
            })
            .collect();
        let x: Vec<f32> = g.iter().map(|v| v * 3.0 + 1e-3).collect();
        let v_old = vec![1e-3f32; len];
        let grad = Grad::plain(&g[..]);
        let runs: Vec<Vec<u64>> = [1, 2, 3]
            .iter()
            .map(|&threads| {
                super::super::parallel::on_threads(threads, || {
                    let p = pass1(&grad, &x, None, true);
                    let mut v_new = vec![0f32; len];
                    let (f, u2) = pass1_fold(&grad, &x, None, true, &v_old, &mut v_new, 0.5, 1e-30);
                    let u = pass2(&grad, &v_old, &mut v_new, 0.5, 1e-30, 0.75);
                    vec![p.sum_sq_grad, p.sum_sq_x, f.sum_sq_grad, f.sum_sq_x, u2, u]
                        .into_iter()
                        .map(f64::to_bits)
                        .collect()
                })
            })
            .collect();
        assert_eq!(runs[1], runs[0], "2 threads differ from 1");
        assert_eq!(runs[2], runs[0], "3 threads differ from 1");
    }

    /// The folded sweep gives the bits of pass 1 followed by pass 2, in one thread or several.
    #[test]
    fn the_fold_gives_the_bits_of_passes_1_and_2() {
        for len in [0usize, 1, 1000, 1025, 3 * UNIT_ELEMS + 7] {
            let g: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
                .collect();
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 104729 % 997) as f32) * 1e-2)
                .collect();
            let v_old: Vec<f32> = (0..len).map(|i| 1e-4 * (1 + i % 13) as f32).collect();
            let grad = Grad::plain(&g[..]);
            let decay = Some(Decay {
                weight_decay: 0.1,
                learning_rate: 0.01,
            });
            let p1 = pass1(&grad, &x, decay, true);
            let mut v_want = vec![0f32; len];
            let u_want = pass2(&grad, &v_old, &mut v_want, 0.8, 1e-30, 1.0);
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("a thread pool");
                let mut v_new = vec![0f32; len];
                let (p, u) = pool
                    .install(|| pass1_fold(&grad, &x, decay, true, &v_old, &mut v_new, 0.8, 1e-30));
                assert_eq!(p, p1, "len {len}, {threads} threads");
                assert_eq!(
                    u.to_bits(),
                    u_want.to_bits(),
                    "len {len}, {threads} threads"
                );
                assert_eq!(v_new, v_want);
            }
        }
    }

    /// Keras's own Adafactor test on a vector (`adafactor_test.py`, `test_single_step_1d`):
    /// x = [1, 2, 3, 4], g = [1, 6, 7, 2], learning rate 0.5, first step (beta2 = 0, rho = 0.5).
    #[test]
    fn first_step_matches_keras() {
        let g = [1f32, 6.0, 7.0, 2.0];
        let mut x = [1f32, 2.0, 3.0, 4.0];
        let grad = Grad::plain(&g[..]);
        let p1 = pass1(&grad, &x, None, true);
        assert!(p1.finite);
        assert_eq!(p1.sum_sq_grad, 90.0);
        assert_eq!(p1.sum_sq_x, 30.0);
        let mut v = [0f32; 4];
        let sum_u2 = pass2(&grad, &[0.0; 4], &mut v, 0.0, 1e-30, 1.0);
        // v = g^2 + eps1, so u = g / |g| and RMS(u) = 1: no update clipping.
        assert_eq!(v, [1.0, 36.0, 49.0, 4.0]);
        assert_eq!(sum_u2, 4.0);
        let alpha = (30f32 / 4.0).sqrt() * 0.5;
        pass3(&mut x, &grad, &v, alpha, 1.0, None, Rounding::Nearest);
        for (got, want) in x
            .iter()
            .zip([-0.36930645f32, 0.63069355, 1.6306936, 2.6306934])
        {
            assert!((got - want).abs() < 1e-6, "{got} vs Keras {want}");
        }
    }
}
