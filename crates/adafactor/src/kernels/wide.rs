//! The row loops' vector twins: written once over sixteen float32 lanes ([`simd::Lanes`]) and
//! compiled once per instruction set (AVX2 with F16C, AVX-512, AVX-512 with its bf16
//! conversion). They do the same float32 operations in the same order as the portable loops
//! ([`super::portable`]), whose tails they call, so every version gives the same bits. A
//! transformed gradient (`FX`: loss scale, accumulation, clipvalue) is transformed in the lanes
//! as it is loaded ([`loops`]'s `GradLanes`), in the order and with the operations of
//! [`Grad::at`].

use super::cpu::{prefetch_raw, PREFETCH_BYTES};
use super::grad::{exact_reciprocal, Decay, Grad};
use super::portable::{
    add_scaled, add_sq_scaled, keeps_squares, lane_sum, pass1_rows_with, pass2_rows_with,
    tail_squares, tail_squares_into, tail_weighted_sq, update, update_rows_with, LANES,
};
use super::reduce::CHUNK;
use super::row_args::{Pass1Rows, Pass1Sums, RowUpdate};
use super::simd;
use super::store::{with_store, Store};

/// The loops sixteen lanes at a time, written once for every [`simd::Lanes`]; the tails go to
/// the portable loops.
mod loops {
    use super::simd::{Lanes, Wide};
    use super::{
        exact_reciprocal, lane_sum, prefetch_raw, tail_squares, tail_squares_into,
        tail_weighted_sq, Decay, Grad, Store, CHUNK, LANES, PREFETCH_BYTES,
    };

    /// Asks for the element [`PREFETCH_BYTES`] past element `j` of the stream at `p`, once per
    /// group of lanes. A sweep reads its rows' streams one after another; at this distance
    /// the next lines arrive from the last-level cache or memory before they are read, which
    /// the hardware prefetcher alone does not achieve for a loop that computes between its
    /// loads (t5-small's step took a third less time with it in bfloat16, a tenth less in
    /// float32). The address may lie past the stream's end: a prefetch never faults and
    /// reads nothing the program sees.
    #[inline(always)]
    fn ask_ahead<T>(p: *const T, j: usize) {
        prefetch_raw(
            p.wrapping_add(j + PREFETCH_BYTES / std::mem::size_of::<T>().max(1)),
            1,
        );
    }

    /// A gradient's transform on sixteen lanes: [`Grad::at`] lane by lane, the same float32
    /// results in the same order (divisions, a clamp that keeps NaN).
    #[derive(Clone, Copy)]
    struct GradLanes<V> {
        /// Division by `loss_scale_factor`.
        scale: Option<Divide<V>>,
        /// The accumulator's elements (as many as the gradient's) and the division by `k`.
        acc: Option<(*const f32, Divide<V>)>,
        /// `-clipvalue`, `clipvalue`.
        clip: Option<(V, V)>,
    }

    /// A division of every lane by `d`: by a multiplication with `1 / d` where that is exact
    /// ([`exact_reciprocal`]).
    #[derive(Clone, Copy)]
    enum Divide<V> {
        By(V),
        Times(V),
    }

    impl<V: Lanes> Divide<V> {
        #[inline(always)]
        unsafe fn new(d: f32) -> Self {
            match exact_reciprocal(d) {
                Some(r) => Divide::Times(V::splat(r)),
                None => Divide::By(V::splat(d)),
            }
        }

        #[inline(always)]
        unsafe fn apply(self, x: V) -> V {
            match self {
                Divide::By(d) => x.div(d),
                Divide::Times(r) => x.mul(r),
            }
        }
    }

    impl<V: Lanes> GradLanes<V> {
        /// The lanes of `g`'s transform.
        #[inline(always)]
        unsafe fn of<W>(g: &Grad<'_, W>) -> Self {
            let t = g.transform;
            let acc = match (t.accumulate_steps, g.acc) {
                (Some(k), Some(a)) => {
                    // The lanes read the accumulator where they read the gradient.
                    assert!(
                        a.len() >= g.g.len(),
                        "accumulator shorter than the gradient"
                    );
                    Some((a.as_ptr(), Divide::new(k)))
                }
                _ => None,
            };
            GradLanes {
                scale: t.loss_scale.map(|l| Divide::new(l)),
                acc,
                clip: t.clip_value.map(|c| (V::splat(-c), V::splat(c))),
            }
        }

        /// The effective gradient of elements `j..j + 16` from their stored lanes `g`, adding
        /// `u * 0` of the unscaled lanes `u` to `probe`.
        ///
        /// # Safety
        /// `j + 16` within the gradient's length.
        #[inline(always)]
        unsafe fn apply(&self, g: V, j: usize, probe: &mut V) -> V {
            let mut v = g;
            if let Some(l) = self.scale {
                v = l.apply(v);
            }
            *probe = probe.add(v.mul(V::zero()));
            if let Some((ap, k)) = self.acc {
                ask_ahead(ap, j);
                v = k.apply(v.add(V::load(ap.add(j))));
            }
            if let Some((lo, hi)) = self.clip {
                v = v.clamp(lo, hi);
            }
            v
        }
    }

    /// Sixteen elements of the effective gradient from `j` (`FX`: transformed by `fx`).
    #[inline(always)]
    unsafe fn grad16<V: Lanes, W: Wide<V>, const FX: bool>(
        gp: *const W,
        fx: &GradLanes<V>,
        j: usize,
        probe: &mut V,
    ) -> V {
        let g = W::load16(gp.add(j));
        if FX {
            fx.apply(g, j, probe)
        } else {
            g
        }
    }

    /// `x - x * wd * lr` on every lane, as [`Decay::apply`] rounds it.
    #[inline(always)]
    unsafe fn decayed<V: Lanes>(x: V, wd: V, lr: V) -> V {
        x.sub(x.mul(wd).mul(lr))
    }

    /// The decay's lanes (zero without one).
    #[inline(always)]
    unsafe fn decay_lanes<V: Lanes>(decay: Option<Decay>) -> (V, V) {
        match decay {
            Some(d) => (V::splat(d.weight_decay), V::splat(d.learning_rate)),
            None => (V::zero(), V::zero()),
        }
    }

    /// `DECAY`: `decay` is set; `KEEP`: the squares are kept for a fold; `FX`: the gradient
    /// is transformed, its unscaled values probed into `probe` (fixed per instantiation, as in
    /// [`update`]).
    #[inline(always)]
    pub(super) unsafe fn pass1<
        V: Lanes,
        W: Wide<V>,
        const DECAY: bool,
        const KEEP: bool,
        const FX: bool,
    >(
        g: Grad<'_, W>,
        x: &[W],
        decay: Option<Decay>,
        col: &mut [f32],
        squares: &mut [f32],
        probe: &mut f32,
    ) -> (f32, f64) {
        let len = g.len().min(x.len()).min(col.len());
        let len = if KEEP { len.min(squares.len()) } else { len };
        let (wd, lr) = decay_lanes::<V>(decay);
        let fx = GradLanes::<V>::of(&g);
        let mut plane = V::zero();
        let (gp, xp, cp) = (g.g.as_ptr(), x.as_ptr(), col.as_mut_ptr());
        let ep = squares.as_mut_ptr();
        let (mut total_g, mut total_x) = (0f32, 0f64);
        let mut start = 0;
        while start < len {
            let end = (start + CHUNK).min(len);
            let (mut lanes, mut xlanes) = (V::zero(), V::zero());
            let (mut j, whole) = (start, end - (end - start) % LANES);
            while j < whole {
                ask_ahead(gp, j);
                ask_ahead(xp, j);
                // SAFETY: j + LANES <= end <= len, within all three slices.
                let gv = grad16::<V, W, FX>(gp, &fx, j, &mut plane);
                let e = gv.mul(gv);
                V::load(cp.add(j)).add(e).store(cp.add(j));
                if KEEP {
                    e.store(ep.add(j));
                }
                lanes = lanes.add(e);
                let mut xv = W::load16(xp.add(j));
                if DECAY {
                    xv = decayed(xv, wd, lr);
                }
                xlanes = xlanes.add(xv.mul(xv));
                j += LANES;
            }
            let rem = tail_squares_into::<W, FX>(g, col, squares, j..end, probe);
            let xrem = match decay {
                None => tail_squares(&x[j..end], |v| v),
                Some(d) => tail_squares(&x[j..end], |v| d.apply(v)),
            };
            total_g += rem + lane_sum(&lanes.to_array());
            total_x += (xrem + lane_sum(&xlanes.to_array())) as f64;
            start = end;
        }
        if FX {
            *probe += lane_sum(&plane.to_array());
        }
        (total_g, total_x)
    }

    /// `w += g^2 * scale`, the row's gradient read again (the same bits as [`add_scaled`] of
    /// the squares [`pass1`] keeps with `KEEP`).
    #[inline(always)]
    pub(super) unsafe fn add_sq_scaled<V: Lanes, W: Wide<V>, const FX: bool>(
        g: Grad<'_, W>,
        scale: f32,
        w: &mut [f32],
    ) {
        let len = g.len().min(w.len());
        let vs = V::splat(scale);
        let fx = GradLanes::<V>::of(&g);
        // The sweep has probed these values already.
        let mut plane = V::zero();
        let (gp, wp) = (g.g.as_ptr(), w.as_mut_ptr());
        let (mut j, whole) = (0, len - len % LANES);
        while j < whole {
            // SAFETY: j + LANES <= whole <= len, within both slices.
            let gv = grad16::<V, W, FX>(gp, &fx, j, &mut plane);
            V::load(wp.add(j)).add(gv.mul(gv).mul(vs)).store(wp.add(j));
            j += LANES;
        }
        super::add_sq_scaled::<W, FX>(g.slice(j, len), scale, &mut w[j..len]);
    }

    #[inline(always)]
    pub(super) unsafe fn add_scaled<V: Lanes>(e: &[f32], scale: f32, w: &mut [f32]) {
        let len = e.len().min(w.len());
        let vs = V::splat(scale);
        let (ep, wp) = (e.as_ptr(), w.as_mut_ptr());
        let (mut j, whole) = (0, len - len % LANES);
        while j < whole {
            // SAFETY: j + LANES <= whole <= len, within both slices.
            V::load(wp.add(j))
                .add(V::load(ep.add(j)).mul(vs))
                .store(wp.add(j));
            j += LANES;
        }
        super::add_scaled(&e[j..len], scale, &mut w[j..len]);
    }

    /// `SCALED`: `s != 1`; `FX`: the gradient is transformed (as in [`update`]).
    #[inline(always)]
    pub(super) unsafe fn weighted_sq<V: Lanes, W: Wide<V>, const SCALED: bool, const FX: bool>(
        g: Grad<'_, W>,
        b: &[f32],
        s: f32,
    ) -> f64 {
        let len = g.len().min(b.len());
        let vs = V::splat(s);
        let fx = GradLanes::<V>::of(&g);
        let mut plane = V::zero();
        let (gp, bp) = (g.g.as_ptr(), b.as_ptr());
        let mut total = 0f64;
        let mut start = 0;
        while start < len {
            let end = (start + CHUNK).min(len);
            let mut lanes = V::zero();
            let (mut j, whole) = (start, end - (end - start) % LANES);
            while j < whole {
                ask_ahead(gp, j);
                // SAFETY: j + LANES <= end <= len, within both slices.
                let mut gs = grad16::<V, W, FX>(gp, &fx, j, &mut plane);
                if SCALED {
                    gs = vs.mul(gs);
                }
                let u = gs.mul(V::load(bp.add(j)));
                lanes = lanes.add(u.mul(u));
                j += LANES;
            }
            let rem = tail_weighted_sq::<W, FX>(g.slice(j, end), &b[j..end], s);
            total += (rem + lane_sum(&lanes.to_array())) as f64;
            start = end;
        }
        total
    }

    /// `DECAY`: `decay_by` is set; `SCALED`: `s != 1` (without norm clipping, the default,
    /// `s * g` is `g`); `FX`: the gradient is transformed; `store` rounds, `x[0]` being element
    /// `base` of the variable. Fixed per instantiation, so the loop has no branch but its own
    /// (and, with `FX`, the transform's).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn update<
        V: Lanes,
        W: Wide<V>,
        S: Store,
        const DECAY: bool,
        const SCALED: bool,
        const FX: bool,
    >(
        x: &mut [W],
        g: Grad<'_, W>,
        b: &[f32],
        ca: f32,
        s: f32,
        decay_by: Option<Decay>,
        store: S,
        base: u64,
    ) {
        let len = x.len().min(g.len()).min(b.len());
        let (wd, lr) = decay_lanes::<V>(decay_by);
        let (vca, vs) = (V::splat(ca), V::splat(s));
        let fx = GradLanes::<V>::of(&g);
        let mut plane = V::zero();
        let (xp, gp, bp) = (x.as_mut_ptr(), g.g.as_ptr(), b.as_ptr());
        // One group of sixteen at `j`, stored with the random bits `r` when rounding
        // stochastically (a macro, not a closure: a closure would not get the instruction set
        // this function is compiled for). SAFETY (of every use): j + LANES <= len, within all
        // three slices.
        macro_rules! group {
            ($j:expr, $r:expr) => {{
                let j = $j;
                ask_ahead(gp, j);
                ask_ahead(xp as *const W, j);
                let mut xv = W::load16(xp.add(j));
                if DECAY {
                    xv = decayed(xv, wd, lr);
                }
                let mut gs = grad16::<V, W, FX>(gp, &fx, j, &mut plane);
                if SCALED {
                    gs = vs.mul(gs);
                }
                let v = xv.sub(vca.mul(gs).mul(V::load(bp.add(j))));
                match $r {
                    None => W::store16(xp.add(j), v),
                    Some(r) => W::store16_stochastic(xp.add(j), v, r),
                }
            }};
        }
        let mut j = 0;
        if let Some(k) = store.key() {
            // Two groups per generator call: AVX-512 makes the bits of both at once.
            while j + 2 * LANES <= len {
                let (r0, r1) = V::random_bits32(k, base + j as u64);
                group!(j, Some(r0));
                group!(j + LANES, Some(r1));
                j += 2 * LANES;
            }
        }
        let whole = len - len % LANES;
        while j < whole {
            // A match, not `Option::map`: the closure would not get this instruction set.
            #[allow(clippy::manual_map)]
            let r = match store.key() {
                Some(k) => Some(V::random_bits(k, base + j as u64)),
                None => None,
            };
            group!(j, r);
            j += LANES;
        }
        let tail = (&mut x[j..len], g.slice(j, len), &b[j..len]);
        super::update::<W, S, FX>(
            tail.0,
            tail.1,
            tail.2,
            ca,
            s,
            decay_by,
            store,
            base + j as u64,
        );
    }
}

mod wide_rows {
    use super::simd::{Lanes, Wide};
    use super::{
        keeps_squares, loops, pass1_rows_with, pass2_rows_with, update_rows_with, with_store, Grad,
        Pass1Rows, Pass1Sums, RowUpdate, Store,
    };

    #[inline(always)]
    pub(super) unsafe fn pass1_rows<V: Lanes, W: Wide<V>>(
        rows: Pass1Rows<'_, W>,
        sums: Pass1Sums<'_>,
    ) -> f64 {
        let fx = !rows.g.is_plain();
        let keep = sums.fold.is_some() && keeps_squares(rows.m);
        match (rows.decay.is_some(), keep, fx) {
            (false, false, false) => pass1_rows_as::<V, W, false, false, false>(rows, sums),
            (true, false, false) => pass1_rows_as::<V, W, true, false, false>(rows, sums),
            (false, true, false) => pass1_rows_as::<V, W, false, true, false>(rows, sums),
            (true, true, false) => pass1_rows_as::<V, W, true, true, false>(rows, sums),
            (false, false, true) => pass1_rows_as::<V, W, false, false, true>(rows, sums),
            (true, false, true) => pass1_rows_as::<V, W, true, false, true>(rows, sums),
            (false, true, true) => pass1_rows_as::<V, W, false, true, true>(rows, sums),
            (true, true, true) => pass1_rows_as::<V, W, true, true, true>(rows, sums),
        }
    }

    /// `DECAY`: the rows have a decay; `KEEP`: the sweep keeps the squares for a fold; `FX`:
    /// the gradient is transformed.
    #[inline(always)]
    unsafe fn pass1_rows_as<
        V: Lanes,
        W: Wide<V>,
        const DECAY: bool,
        const KEEP: bool,
        const FX: bool,
    >(
        rows: Pass1Rows<'_, W>,
        sums: Pass1Sums<'_>,
    ) -> f64 {
        let decay = rows.decay;
        // SAFETY (both closures): the caller has the instruction set of `V`. Inlined, so that
        // they are compiled with it.
        pass1_rows_with(
            rows,
            sums,
            false,
            #[inline(always)]
            |g, x, c, e, p| unsafe { loops::pass1::<V, W, DECAY, KEEP, FX>(g, x, decay, c, e, p) },
            #[inline(always)]
            |e, s, w| unsafe { loops::add_scaled::<V>(e, s, w) },
            #[inline(always)]
            |g, s, w| unsafe { loops::add_sq_scaled::<V, W, FX>(g, s, w) },
        )
    }

    #[inline(always)]
    pub(super) unsafe fn pass2_rows<V: Lanes, W: Wide<V>>(
        g: Grad<'_, W>,
        b: &[f32],
        a: &[f32],
        s: f32,
    ) -> f64 {
        match (s != 1.0, !g.is_plain()) {
            (false, false) => pass2_rows_as::<V, W, false, false>(g, b, a, s),
            (true, false) => pass2_rows_as::<V, W, true, false>(g, b, a, s),
            (false, true) => pass2_rows_as::<V, W, false, true>(g, b, a, s),
            (true, true) => pass2_rows_as::<V, W, true, true>(g, b, a, s),
        }
    }

    /// `SCALED`: `s != 1`; `FX`: the gradient is transformed.
    #[inline(always)]
    unsafe fn pass2_rows_as<V: Lanes, W: Wide<V>, const SCALED: bool, const FX: bool>(
        g: Grad<'_, W>,
        b: &[f32],
        a: &[f32],
        s: f32,
    ) -> f64 {
        // SAFETY: the caller has the instruction set of `V`. Inlined, so that it is compiled
        // with it.
        pass2_rows_with(
            g,
            b,
            a,
            false,
            #[inline(always)]
            |g| unsafe { loops::weighted_sq::<V, W, SCALED, FX>(g, b, s) },
        )
    }

    #[inline(always)]
    pub(super) unsafe fn update_rows<V: Lanes, W: Wide<V>>(
        x: &mut [W],
        g: Grad<'_, W>,
        first_row: usize,
        u: &RowUpdate<'_>,
    ) {
        let fx = !g.is_plain();
        with_store!(u.rounding.for_type::<W>(), st => {
            match (u.decay.is_some(), u.grad_scale != 1.0, fx) {
                (false, false, false) => {
                    update_rows_as::<V, W, _, false, false, false>(x, g, first_row, u, st)
                }
                (true, false, false) => {
                    update_rows_as::<V, W, _, true, false, false>(x, g, first_row, u, st)
                }
                (false, true, false) => {
                    update_rows_as::<V, W, _, false, true, false>(x, g, first_row, u, st)
                }
                (true, true, false) => {
                    update_rows_as::<V, W, _, true, true, false>(x, g, first_row, u, st)
                }
                (false, false, true) => {
                    update_rows_as::<V, W, _, false, false, true>(x, g, first_row, u, st)
                }
                (true, false, true) => {
                    update_rows_as::<V, W, _, true, false, true>(x, g, first_row, u, st)
                }
                (false, true, true) => {
                    update_rows_as::<V, W, _, false, true, true>(x, g, first_row, u, st)
                }
                (true, true, true) => {
                    update_rows_as::<V, W, _, true, true, true>(x, g, first_row, u, st)
                }
            }
        })
    }

    #[inline(always)]
    unsafe fn update_rows_as<
        V: Lanes,
        W: Wide<V>,
        S: Store,
        const DECAY: bool,
        const SCALED: bool,
        const FX: bool,
    >(
        x: &mut [W],
        g: Grad<'_, W>,
        first_row: usize,
        u: &RowUpdate<'_>,
        st: S,
    ) {
        // SAFETY: the caller has the instruction set of `V`. Inlined, so that it is compiled
        // with it.
        update_rows_with(
            x,
            g,
            first_row,
            u,
            #[inline(always)]
            |x, g, b, ca, base| unsafe {
                loops::update::<V, W, S, DECAY, SCALED, FX>(
                    x,
                    g,
                    b,
                    ca,
                    u.grad_scale,
                    u.decay,
                    st,
                    base,
                )
            },
        )
    }
}

/// The row loops compiled for one instruction set, with the portable loops' signatures.
macro_rules! twins {
    ($(#[$doc:meta])* $name:ident, $lanes:ty, $features:literal) => {
        $(#[$doc])*
        pub(crate) mod $name {
            use super::simd::Wide;
            use super::{wide_rows, Grad, Pass1Rows, Pass1Sums, RowUpdate};

            /// [`super::pass1_rows`].
            ///
            /// # Safety
            /// The CPU must have the instruction set.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn pass1_rows<W: Wide<$lanes>>(
                rows: Pass1Rows<'_, W>,
                sums: Pass1Sums<'_>,
            ) -> f64 {
                wide_rows::pass1_rows::<$lanes, W>(rows, sums)
            }

            /// [`super::pass2_rows`].
            ///
            /// # Safety
            /// The CPU must have the instruction set.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn pass2_rows<W: Wide<$lanes>>(
                g: Grad<'_, W>,
                b: &[f32],
                a: &[f32],
                s: f32,
            ) -> f64 {
                wide_rows::pass2_rows::<$lanes, W>(g, b, a, s)
            }

            /// [`super::update_rows`].
            ///
            /// # Safety
            /// The CPU must have the instruction set.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn update_rows<W: Wide<$lanes>>(
                x: &mut [W],
                g: Grad<'_, W>,
                first_row: usize,
                u: &RowUpdate<'_>,
            ) {
                wide_rows::update_rows::<$lanes, W>(x, g, first_row, u)
            }
        }
    };
}

twins!(
    /// The row loops on AVX2 and F16C (two registers per sixteen lanes).
    avx2,
    super::simd::Avx2,
    "avx2,f16c"
);
twins!(
    /// The row loops on AVX-512 (one register per sixteen lanes).
    avx512,
    super::simd::Avx512<false>,
    "avx512f,avx512bw"
);
twins!(
    /// The row loops on AVX-512 with its bf16 conversion.
    avx512_bf16,
    super::simd::Avx512<true>,
    "avx512f,avx512bw,avx512dq,avx512bf16"
);
