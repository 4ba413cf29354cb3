//! The effective gradient as the kernels read it (unscaled, averaged with the accumulator,
//! clamped), and the decoupled weight decay applied on the fly.

use super::element::Element;
use super::reduce::{nonfinite_probe, CHUNK};

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

impl GradTransform {
    /// One element's effective gradient from its stored value `g` and accumulator value `acc`,
    /// in Keras's order (the same operations as [`Grad::load`]); adds `u * 0` of the unscaled
    /// value `u` to `probe`.
    #[inline(always)]
    pub(crate) fn apply(self, g: f32, acc: Option<f32>, probe: &mut f32) -> f32 {
        let mut v = match self.loss_scale {
            Some(l) => g / l,
            None => g,
        };
        *probe += v * 0.0;
        if let (Some(k), Some(a)) = (self.accumulate_steps, acc) {
            v = (v + a) / k;
        }
        if let Some(c) = self.clip_value {
            // `clamp` keeps NaN, as Keras's clip does.
            v = v.clamp(-c, c);
        }
        v
    }
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

    /// Elements `start..end`, the accumulator's with them.
    #[inline(always)]
    pub(crate) fn slice(&self, start: usize, end: usize) -> Grad<'a, T> {
        Grad {
            g: &self.g[start..end],
            acc: self.acc.map(|a| &a[start..end]),
            transform: self.transform,
        }
    }

    /// Element `j` of the effective gradient, as [`Grad::load`] computes it, for the row loops
    /// that transform the gradient as they read it. `FX` false: the stored value (the caller
    /// checked [`Grad::is_plain`]). `FX` true: the transform, adding `u * 0` of the unscaled
    /// value `u` to `probe` (NaN when it is not finite, as [`Grad::load_checked`] probes).
    #[inline(always)]
    pub(crate) fn at<const FX: bool>(&self, j: usize, probe: &mut f32) -> f32 {
        let g = self.g[j].to_f32();
        if !FX {
            return g;
        }
        self.transform.apply(g, self.acc.map(|a| a[j]), probe)
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
            match exact_reciprocal(l) {
                Some(r) => map_into(out, stored.take(), |g| g * r),
                None => map_into(out, stored.take(), |g| g / l),
            }
        }
        let probe = match (check, stored) {
            (false, _) => 0.0,
            (true, Some(g)) => nonfinite_probe(g),
            (true, None) => nonfinite_probe(out),
        };
        if let (Some(k), Some(acc)) = (t.accumulate_steps, self.acc) {
            let acc = &acc[start..end];
            match exact_reciprocal(k) {
                Some(r) => average_into(out, stored.take(), acc, |s| s * r),
                None => average_into(out, stored.take(), acc, |s| s / k),
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

/// `1 / d` when multiplying by it is dividing by `d`, bit for bit: `d` a power of two whose
/// reciprocal is a float32 (loss scales and accumulation steps usually are). `x * 2^-k` and
/// `x / 2^k` are the same real number, so they round to the same float32 (subnormals, zeros,
/// infinities and NaN included); a multiplication costs far less than a division, which would
/// otherwise bound a loop that reads memory.
#[inline(always)]
pub(crate) fn exact_reciprocal(d: f32) -> Option<f32> {
    let r = 1.0 / d;
    // A float32 times a float32 is exact in f64: the product is 1 only for the exact
    // reciprocal, which only a power of two has.
    (r.is_finite() && r as f64 * d as f64 == 1.0).then_some(r)
}

/// `out = f(from + acc)` elementwise, or `out = f(out + acc)` in place without `from`: the
/// accumulation average, as [`map_into`] maps.
#[inline(always)]
fn average_into(out: &mut [f32], from: Option<&[f32]>, acc: &[f32], f: impl Fn(f32) -> f32) {
    match from {
        Some(g) => {
            for ((o, g), a) in out.iter_mut().zip(g).zip(acc) {
                *o = f(*g + *a);
            }
        }
        None => {
            for (o, a) in out.iter_mut().zip(acc) {
                *o = f(*o + *a);
            }
        }
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

/// 0 when elements `s..e` of the gradient pass the finiteness check of
/// [`Grad::load_checked`], NaN otherwise, from the sum of squares `sum_sq_grad` of their
/// effective gradient: NaN and infinities reach that sum (`clipvalue`, which could hide them,
/// must be probed as the gradient is read instead), so only a range whose sum is not finite
/// (non-finite values, or huge squares whose float32 sum overflowed) is looked at again. The
/// passes that sum squares anyway check finiteness this way instead of probing and copying
/// every block as it is read.
pub(crate) fn probe_unless_finite<T: Element>(
    grad: &Grad<'_, T>,
    (s, e): (usize, usize),
    sum_sq_grad: f64,
) -> f32 {
    if sum_sq_grad.is_finite() {
        return 0.0;
    }
    let mut buf = [0f32; CHUNK];
    let mut probe = 0f32;
    for b in (s..e).step_by(CHUNK) {
        let n = CHUNK.min(e - b);
        probe += grad.load_checked(b, &mut buf[..n]);
    }
    probe
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Float32 values of every kind: zeros, subnormals, normals across the exponent range, the
    /// largest finite ones, infinities and NaN, with both signs.
    fn awkward() -> Vec<f32> {
        let mut v = vec![
            0.0,
            f32::MIN_POSITIVE,
            1e-45,
            3e-42,
            f32::MAX,
            3e38,
            1.0,
            0.3,
        ];
        v.extend((-149..128).step_by(3).map(|e| 1.37 * 2f32.powi(e)));
        v.extend([f32::INFINITY, f32::NAN]);
        let neg: Vec<f32> = v.iter().map(|x| -x).collect();
        v.extend(neg);
        v
    }

    /// A block load with a loss scale and an accumulation average divides by multiplying with
    /// the reciprocal where that is exact: the bits are those of the per-element definition
    /// ([`GradTransform::apply`], a division) for powers of two and for other divisors alike.
    #[test]
    fn loads_divide_with_the_bits_of_a_division() {
        let g = awkward();
        let acc: Vec<f32> = g.iter().rev().copied().collect();
        let divisors = [
            1.0,
            2.0,
            128.0,
            0.5,
            3.0,
            0.3,
            0.75,
            2f32.powi(127),
            2f32.powi(-126),
            2f32.powi(-128),
            1e-45,
        ];
        for d in divisors {
            for (loss_scale, accumulate_steps) in
                [(Some(d), None), (None, Some(d)), (Some(d), Some(4.0))]
            {
                let transform = GradTransform {
                    loss_scale,
                    accumulate_steps,
                    clip_value: None,
                };
                let grad = Grad {
                    g: &g[..],
                    acc: Some(&acc[..]),
                    transform,
                };
                let mut out = vec![0f32; g.len()];
                grad.load(0, &mut out);
                for (i, got) in out.iter().enumerate() {
                    let want = transform.apply(g[i], Some(acc[i]), &mut 0.0);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{transform:?}: g {} acc {}",
                        g[i],
                        acc[i]
                    );
                }
            }
        }
        assert_eq!(exact_reciprocal(128.0), Some(1.0 / 128.0));
        assert_eq!(exact_reciprocal(0.3), None);
        assert_eq!(exact_reciprocal(2f32.powi(-128)), None, "1 / d overflows");
    }
}
