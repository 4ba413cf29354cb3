//! The row loops' vector twins: written once over sixteen float32 lanes ([`simd::Lanes`]) and
//! compiled once per instruction set (AVX2 with F16C, AVX-512, AVX-512 with its bf16
//! conversion). They do the same float32 operations in the same order as the portable loops
//! ([`super::portable`]), whose tails they call, so every version gives the same bits.

use super::grad::Decay;
use super::portable::{
    add_scaled, lane_sum, pass1_rows_with, pass2_rows_with, tail_squares, tail_squares_into,
    tail_weighted_sq, update, update_rows_with, LANES,
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
        lane_sum, tail_squares, tail_squares_into, tail_weighted_sq, Decay, Store, CHUNK, LANES,
    };

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

    /// `DECAY`: `decay` is set; `KEEP`: the squares are kept for a fold (fixed per
    /// instantiation, as in [`update`]).
    #[inline(always)]
    pub(super) unsafe fn pass1<V: Lanes, W: Wide<V>, const DECAY: bool, const KEEP: bool>(
        g: &[W],
        x: &[W],
        decay: Option<Decay>,
        col: &mut [f32],
        squares: &mut [f32],
    ) -> (f32, f64) {
        let len = g.len().min(x.len()).min(col.len());
        let len = if KEEP { len.min(squares.len()) } else { len };
        let (wd, lr) = decay_lanes::<V>(decay);
        let (gp, xp, cp) = (g.as_ptr(), x.as_ptr(), col.as_mut_ptr());
        let ep = squares.as_mut_ptr();
        let (mut total_g, mut total_x) = (0f32, 0f64);
        let mut start = 0;
        while start < len {
            let end = (start + CHUNK).min(len);
            let (mut lanes, mut xlanes) = (V::zero(), V::zero());
            let mut j = start;
            while j + LANES <= end {
                // SAFETY: j + LANES <= len, within all three slices.
                let gv = W::load16(gp.add(j));
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
            let rem = tail_squares_into(g, col, squares, j..end);
            let xrem = match decay {
                None => tail_squares(&x[j..end], |v| v),
                Some(d) => tail_squares(&x[j..end], |v| d.apply(v)),
            };
            total_g += rem + lane_sum(&lanes.to_array());
            total_x += (xrem + lane_sum(&xlanes.to_array())) as f64;
            start = end;
        }
        (total_g, total_x)
    }

    #[inline(always)]
    pub(super) unsafe fn add_scaled<V: Lanes>(e: &[f32], scale: f32, w: &mut [f32]) {
        let len = e.len().min(w.len());
        let vs = V::splat(scale);
        let (ep, wp) = (e.as_ptr(), w.as_mut_ptr());
        let mut j = 0;
        while j + LANES <= len {
            // SAFETY: j + LANES <= len, within both slices.
            V::load(wp.add(j))
                .add(V::load(ep.add(j)).mul(vs))
                .store(wp.add(j));
            j += LANES;
        }
        super::add_scaled(&e[j..len], scale, &mut w[j..len]);
    }

    /// `SCALED`: `s != 1` (as in [`update`]).
    #[inline(always)]
    pub(super) unsafe fn weighted_sq<V: Lanes, W: Wide<V>, const SCALED: bool>(
        g: &[W],
        b: &[f32],
        s: f32,
    ) -> f64 {
        let len = g.len().min(b.len());
        let vs = V::splat(s);
        let (gp, bp) = (g.as_ptr(), b.as_ptr());
        let mut total = 0f64;
        let mut start = 0;
        while start < len {
            let end = (start + CHUNK).min(len);
            let mut lanes = V::zero();
            let mut j = start;
            while j + LANES <= end {
                // SAFETY: j + LANES <= len, within both slices.
                let mut gs = W::load16(gp.add(j));
                if SCALED {
                    gs = vs.mul(gs);
                }
                let u = gs.mul(V::load(bp.add(j)));
                lanes = lanes.add(u.mul(u));
                j += LANES;
            }
            let rem = tail_weighted_sq(&g[j..end], &b[j..end], s);
            total += (rem + lane_sum(&lanes.to_array())) as f64;
            start = end;
        }
        total
    }

    /// `DECAY`: `decay_by` is set; `SCALED`: `s != 1` (without norm clipping, the default,
    /// `s * g` is `g`); `store` rounds, `x[0]` being element `base` of the variable. Fixed per
    /// instantiation, so the loop has no branch but its own.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn update<
        V: Lanes,
        W: Wide<V>,
        S: Store,
        const DECAY: bool,
        const SCALED: bool,
    >(
        x: &mut [W],
        g: &[W],
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
        let (xp, gp, bp) = (x.as_mut_ptr(), g.as_ptr(), b.as_ptr());
        let mut j = 0;
        while j + LANES <= len {
            // SAFETY: j + LANES <= len, within all three slices.
            let mut xv = W::load16(xp.add(j));
            if DECAY {
                xv = decayed(xv, wd, lr);
            }
            let mut gs = W::load16(gp.add(j));
            if SCALED {
                gs = vs.mul(gs);
            }
            let v = xv.sub(vca.mul(gs).mul(V::load(bp.add(j))));
            match store.key() {
                None => W::store16(xp.add(j), v),
                Some(k) => W::store16_stochastic(xp.add(j), v, V::random_bits(k, base + j as u64)),
            }
            j += LANES;
        }
        let tail = (&mut x[j..len], &g[j..len], &b[j..len]);
        super::update(
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
        loops, pass1_rows_with, pass2_rows_with, update_rows_with, with_store, Pass1Rows,
        Pass1Sums, RowUpdate, Store,
    };

    #[inline(always)]
    pub(super) unsafe fn pass1_rows<V: Lanes, W: Wide<V>>(
        rows: Pass1Rows<'_, W>,
        sums: Pass1Sums<'_>,
    ) -> f64 {
        match (rows.decay.is_some(), sums.fold.is_some()) {
            (false, false) => pass1_rows_as::<V, W, false, false>(rows, sums),
            (true, false) => pass1_rows_as::<V, W, true, false>(rows, sums),
            (false, true) => pass1_rows_as::<V, W, false, true>(rows, sums),
            (true, true) => pass1_rows_as::<V, W, true, true>(rows, sums),
        }
    }

    /// `DECAY`: the rows have a decay; `KEEP`: the sweep keeps the squares for a fold.
    #[inline(always)]
    unsafe fn pass1_rows_as<V: Lanes, W: Wide<V>, const DECAY: bool, const KEEP: bool>(
        rows: Pass1Rows<'_, W>,
        sums: Pass1Sums<'_>,
    ) -> f64 {
        let decay = rows.decay;
        // SAFETY (both closures): the caller has the instruction set of `V`. Inlined, so that
        // they are compiled with it.
        pass1_rows_with(
            rows,
            sums,
            #[inline(always)]
            |g, x, c, e| unsafe { loops::pass1::<V, W, DECAY, KEEP>(g, x, decay, c, e) },
            #[inline(always)]
            |e, s, w| unsafe { loops::add_scaled::<V>(e, s, w) },
        )
    }

    #[inline(always)]
    pub(super) unsafe fn pass2_rows<V: Lanes, W: Wide<V>>(
        g: &[W],
        b: &[f32],
        a: &[f32],
        s: f32,
    ) -> f64 {
        // SAFETY (both closures): the caller has the instruction set of `V`. Inlined, so that
        // they are compiled with it.
        if s != 1.0 {
            pass2_rows_with(
                g,
                b,
                a,
                #[inline(always)]
                |g| unsafe { loops::weighted_sq::<V, W, true>(g, b, s) },
            )
        } else {
            pass2_rows_with(
                g,
                b,
                a,
                #[inline(always)]
                |g| unsafe { loops::weighted_sq::<V, W, false>(g, b, s) },
            )
        }
    }

    #[inline(always)]
    pub(super) unsafe fn update_rows<V: Lanes, W: Wide<V>>(
        x: &mut [W],
        g: &[W],
        first_row: usize,
        u: &RowUpdate<'_>,
    ) {
        with_store!(u.rounding.for_type::<W>(), st => {
            match (u.decay.is_some(), u.grad_scale != 1.0) {
                (false, false) => update_rows_as::<V, W, _, false, false>(x, g, first_row, u, st),
                (true, false) => update_rows_as::<V, W, _, true, false>(x, g, first_row, u, st),
                (false, true) => update_rows_as::<V, W, _, false, true>(x, g, first_row, u, st),
                (true, true) => update_rows_as::<V, W, _, true, true>(x, g, first_row, u, st),
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
    >(
        x: &mut [W],
        g: &[W],
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
                loops::update::<V, W, S, DECAY, SCALED>(
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
            use super::{wide_rows, Pass1Rows, Pass1Sums, RowUpdate};

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
                g: &[W],
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
                g: &[W],
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
