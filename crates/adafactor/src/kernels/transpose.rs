//! Sixteen rows to lane-major and back: the batch-of-tiny-matrices kernel (`tiny.rs`) runs each
//! step of a matrix on sixteen matrices at once, with element `e` of matrix `l` at `[e][l]`.
//!
//! Pure data movement (the bits cannot change). On AVX2 without AVX-512, eight rows at a
//! time: four values per row in 128-bit halves (12 shuffles per sixteen rows), five and more
//! in 8 x 8 tiles (24 shuffles each; five to seven columns past the last whole tile in one more
//! tile of overlapping reads and writes, fewer in the plain loop), two and three in
//! one-register permutes and blends. On
//! AVX-512, from eight values per row on, in
//! 16 x 16 register tiles (64 shuffles and 16 masked loads and stores per tile, instead of a
//! scalar load and store per element); four values per row (the statistics of 4 x 4
//! matrices, rows of four columns) in 16 shuffles of four registers with plain loads and
//! stores; two, three, five, six and seven values per row (the statistics of 3 x 3 matrices,
//! rows of three columns) in two-register permutes from plain loads, `per * ceil(per / 2)` of
//! them. Masked loads of a few values per row, from memory, made a batch slower than the plain
//! loops that partial groups and the other CPUs use.

/// One lane-major row: the same element of sixteen matrices.
pub(crate) type Lanes = [f32; 16];

/// `dst[e][l] = src[l * per + e]` for `e < per`: up to sixteen rows of `per` values stored one
/// after the other (`src.len() / per` of them), lane-major, with `pad` in the lanes past the
/// last row.
#[inline(always)]
pub(crate) fn to_lanes(src: &[f32], per: usize, pad: f32, dst: &mut [Lanes]) {
    let rows = src.len() / per;
    debug_assert!(rows * per == src.len() && rows <= 16 && dst.len() >= per);
    #[cfg(target_arch = "x86_64")]
    if rows == 16 && per >= 2 && super::cpu::simd() >= super::cpu::Simd::Avx512 {
        // SAFETY: the CPU has AVX-512 F (`simd` checked it); `src` holds `16 * per` values.
        unsafe { avx512::to_lanes_group(src, per, dst) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if rows == 16 && avx2::takes(per) && super::cpu::simd() >= super::cpu::Simd::Avx2 {
        // SAFETY: the CPU has AVX2 (`simd` checked it); `src` holds `16 * per` values.
        unsafe { avx2::to_lanes(src, per, dst) };
        return;
    }
    if rows < 16 {
        for d in dst[..per].iter_mut() {
            *d = [pad; 16];
        }
    }
    for (l, vals) in src.chunks_exact(per).enumerate() {
        for (d, v) in dst[..per].iter_mut().zip(vals) {
            d[l] = *v;
        }
    }
}

/// `dst[l * per + e] = src[e][l]` for `e < per` and the first `dst.len() / per` (at most
/// sixteen) lanes: the inverse of [`to_lanes`].
#[inline(always)]
pub(crate) fn from_lanes(src: &[Lanes], per: usize, dst: &mut [f32]) {
    let rows = dst.len() / per;
    debug_assert!(rows * per == dst.len() && rows <= 16 && src.len() >= per);
    #[cfg(target_arch = "x86_64")]
    if rows == 16 && per >= 2 && super::cpu::simd() >= super::cpu::Simd::Avx512 {
        // SAFETY: the CPU has AVX-512 F (`simd` checked it); `dst` holds `16 * per` values.
        unsafe {
            match per {
                2 => avx512::from_lanes_small::<2>(src, dst),
                3 => avx512::from_lanes_small::<3>(src, dst),
                4 => avx512::from_lanes4(src, dst),
                5 => avx512::from_lanes_small::<5>(src, dst),
                6 => avx512::from_lanes_small::<6>(src, dst),
                7 => avx512::from_lanes_small::<7>(src, dst),
                _ => avx512::from_lanes(src, per, dst),
            }
        };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if rows == 16 && avx2::takes(per) && super::cpu::simd() >= super::cpu::Simd::Avx2 {
        // SAFETY: the CPU has AVX2 (`simd` checked it); `dst` holds `16 * per` values.
        unsafe { avx2::from_lanes(src, per, dst) };
        return;
    }
    for (l, vals) in dst.chunks_exact_mut(per).enumerate() {
        for (v, s) in vals.iter_mut().zip(&src[..per]) {
            *v = s[l];
        }
    }
}

/// [`to_lanes`] of consecutive groups of sixteen rows of `per` values (the last group may be
/// partial, padded with `pad`): group `t` into `dst[t * per..(t + 1) * per]`. One instruction-set
/// dispatch for the whole run, not one per group.
#[inline(always)]
pub(crate) fn to_lanes_groups(src: &[f32], per: usize, pad: f32, dst: &mut [Lanes]) {
    let whole = src.len() / (16 * per) * (16 * per);
    let (head, tail) = src.split_at(whole);
    let (dst_head, dst_tail) = dst.split_at_mut(whole / 16);
    #[cfg(target_arch = "x86_64")]
    let done = if per >= 2 && !head.is_empty() && super::cpu::simd() >= super::cpu::Simd::Avx512 {
        // SAFETY: the CPU has AVX-512 F (`simd` checked it); `head` is whole groups, and
        // `dst_head` holds `per` rows for each.
        unsafe { avx512::to_lanes_groups(head, per, dst_head) };
        true
    } else if avx2::takes(per) && !head.is_empty() && super::cpu::simd() >= super::cpu::Simd::Avx2 {
        for (s, d) in head
            .chunks_exact(16 * per)
            .zip(dst_head.chunks_exact_mut(per))
        {
            // SAFETY: the CPU has AVX2 (`simd` checked it); `s` is one whole group and `d`
            // holds its `per` rows.
            unsafe { avx2::to_lanes(s, per, d) };
        }
        true
    } else {
        false
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = false;
    if !done {
        for (s, d) in head
            .chunks_exact(16 * per)
            .zip(dst_head.chunks_exact_mut(per))
        {
            to_lanes(s, per, pad, d);
        }
    }
    if !tail.is_empty() {
        to_lanes(tail, per, pad, dst_tail);
    }
}

/// Where the narrow transposes' permutes (`per` values per row, `width` rows in `per`
/// registers of `width` lanes, value `i` of the rows in lane `i % width` of register
/// `i / width`) take lane `q` of output register `o` from: `(input register, lane)`.
/// - `to_lanes`: lane `q` of output `o` is value `o` of row `q`, `i = q * per + o`.
/// - else (lane-major rows back): lane `q` of output `o` is value `i = width * o + q`, value
///   `i % per` of row `i / per`, so lane `i / per` of input `i % per`.
///
/// Both instruction sets build their tables from this.
#[cfg(target_arch = "x86_64")]
const fn source(to_lanes: bool, per: usize, o: usize, q: usize, width: usize) -> (usize, usize) {
    if to_lanes {
        let i = q * per + o;
        (i / width, i % width)
    } else {
        let i = width * o + q;
        (i % per, i / per)
    }
}

/// The transposes on AVX2 (no AVX-512), eight rows (half a group) at a time: two and three
/// values per row in one-register permutes and blends, four in 128-bit halves, five and more
/// in 8 x 8 register tiles (see `PART_TILE` for the columns past the last
/// whole tile).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Lanes;
    use std::arch::x86_64::*;

    /// Whether these transposes take rows of `per` values: from two on.
    #[inline(always)]
    pub(super) fn takes(per: usize) -> bool {
        per >= 2
    }

    /// Fewest columns past the last whole 8 x 8 tile that go through one more tile, eight
    /// values read from each row (the next row's first values, dropped; the group's last row
    /// read masked) and written back in ascending rows (each row's write then overwrites the
    /// values the row before it spilled; the last row written in two overlapping halves).
    /// Fewer columns stay in the plain loop. Permutes instead of the tile, gathering each
    /// output from five to seven registers, made a batch of `7 x 1` matrices twice as slow.
    const PART_TILE: usize = 5;

    /// The first `n` of eight lanes set.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn first(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// One step of a narrow transpose: the lanes `mask` (all bits set) of an output taken
    /// from one input register, lane `q` from its lane `idx[q]`.
    #[derive(Clone, Copy)]
    struct Pick {
        idx: [i32; 8],
        mask: [i32; 8],
    }

    /// Widest row the permutes take.
    pub(super) const SMALL: usize = 3;

    type Picks = [[[Pick; SMALL]; SMALL]; SMALL + 1];

    /// The permutes of every row width from 2 to [`SMALL`], for eight rows (one half of a
    /// group, `8 * per` values in `per` registers): `[per][o][p]` gathers output register `o`
    /// from input register `p`, lane by lane, as [`super::source`] says.
    const fn picks(to_lanes: bool) -> Picks {
        let none = Pick {
            idx: [0; 8],
            mask: [0; 8],
        };
        let mut t = [[[none; SMALL]; SMALL]; SMALL + 1];
        let mut per = 2;
        while per <= SMALL {
            let mut o = 0;
            while o < per {
                let mut q = 0;
                while q < 8 {
                    let (p, idx) = super::source(to_lanes, per, o, q, 8);
                    t[per][o][p].idx[q] = idx as i32;
                    t[per][o][p].mask[q] = -1;
                    q += 1;
                }
                o += 1;
            }
            per += 1;
        }
        t
    }

    /// The permutes of [`to_lanes`] for narrow rows.
    const TO_PICKS: Picks = picks(true);
    /// The permutes of [`from_lanes`] for narrow rows.
    const FROM_PICKS: Picks = picks(false);

    /// The inputs, `(register, lane)`, that the tables pick lane `q` of output `o` from.
    #[cfg(test)]
    pub(super) fn picked(to_lanes: bool, per: usize, o: usize, q: usize) -> Vec<(usize, usize)> {
        let table = if to_lanes { &TO_PICKS } else { &FROM_PICKS };
        let picks = table[per][o].iter().enumerate().take(per);
        picks
            .filter(|(_, pick)| pick.mask[q] != 0)
            .map(|(r, pick)| (r, pick.idx[q] as usize))
            .collect()
    }

    /// `PER` registers to `PER` registers, each output gathered from the inputs by
    /// `picks[o]`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn permute<const PER: usize>(
        z: &[__m256; PER],
        picks: &[[Pick; SMALL]; SMALL],
    ) -> [__m256; PER] {
        let mut out = [_mm256_setzero_ps(); PER];
        for (o, pr) in out.iter_mut().zip(picks) {
            for (zp, pick) in z.iter().zip(pr) {
                if pick.mask == [0; 8] {
                    continue;
                }
                // SAFETY: `idx` and `mask` are eight i32 each.
                let (idx, mask) = unsafe {
                    (
                        _mm256_loadu_si256(pick.idx.as_ptr().cast()),
                        _mm256_loadu_si256(pick.mask.as_ptr().cast()),
                    )
                };
                let v = _mm256_permutevar8x32_ps(*zp, idx);
                *o = _mm256_blendv_ps(*o, v, _mm256_castsi256_ps(mask));
            }
        }
        out
    }

    /// [`super::to_lanes`] of `PER` (2 or 3) values per row, one half of the group at a time:
    /// `PER` plain loads, then the permutes.
    ///
    /// # Safety
    /// The CPU must have AVX2; `src.len() == 16 * PER`, `dst.len() >= PER`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn to_lanes_small<const PER: usize>(src: &[f32], dst: &mut [Lanes]) {
        for h in 0..2 {
            let mut z = [_mm256_setzero_ps(); PER];
            for (r, v) in z.iter_mut().enumerate() {
                // SAFETY: `src` holds `16 * PER` floats.
                *v = unsafe { _mm256_loadu_ps(src.as_ptr().add(8 * (PER * h + r))) };
            }
            let out = permute::<PER>(&z, &TO_PICKS[PER]);
            for (d, v) in dst[..PER].iter_mut().zip(out) {
                // SAFETY: lanes `8h..8h + 8` of `d` (sixteen floats).
                unsafe { _mm256_storeu_ps(d.as_mut_ptr().add(8 * h), v) };
            }
        }
    }

    /// [`super::from_lanes`] of `PER` (2 or 3) values per row: the inverse permutes.
    ///
    /// # Safety
    /// The CPU must have AVX2; `dst.len() == 16 * PER`, `src.len() >= PER`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn from_lanes_small<const PER: usize>(src: &[Lanes], dst: &mut [f32]) {
        for h in 0..2 {
            let mut z = [_mm256_setzero_ps(); PER];
            for (v, s) in z.iter_mut().zip(&src[..PER]) {
                // SAFETY: lanes `8h..8h + 8` of `s` (sixteen floats).
                *v = unsafe { _mm256_loadu_ps(s.as_ptr().add(8 * h)) };
            }
            let out = permute::<PER>(&z, &FROM_PICKS[PER]);
            for (r, v) in out.into_iter().enumerate() {
                // SAFETY: `dst` holds `16 * PER` floats.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(8 * (PER * h + r)), v) };
            }
        }
    }

    /// Transposes eight rows of eight values in registers: `out[j]` element `i` is `r[i]`
    /// element `j`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn tile(r: [__m256; 8]) -> [__m256; 8] {
        // Rows 2p, 2p + 1 interleaved, within each 128-bit half.
        let mut t = [_mm256_setzero_ps(); 8];
        for p in 0..4 {
            t[2 * p] = _mm256_unpacklo_ps(r[2 * p], r[2 * p + 1]);
            t[2 * p + 1] = _mm256_unpackhi_ps(r[2 * p], r[2 * p + 1]);
        }
        // Rows 4p..4p + 4 of one column per register, within each half.
        let mut s = [_mm256_setzero_ps(); 8];
        for p in 0..2 {
            let (a, b, c, d) = (t[4 * p], t[4 * p + 1], t[4 * p + 2], t[4 * p + 3]);
            s[4 * p] = _mm256_shuffle_ps::<0x44>(a, c);
            s[4 * p + 1] = _mm256_shuffle_ps::<0xEE>(a, c);
            s[4 * p + 2] = _mm256_shuffle_ps::<0x44>(b, d);
            s[4 * p + 3] = _mm256_shuffle_ps::<0xEE>(b, d);
        }
        // The low halves make columns 0..4, the high halves columns 4..8.
        let mut out = [_mm256_setzero_ps(); 8];
        for c in 0..4 {
            out[c] = _mm256_permute2f128_ps::<0x20>(s[c], s[4 + c]);
            out[4 + c] = _mm256_permute2f128_ps::<0x31>(s[c], s[4 + c]);
        }
        out
    }

    /// A 4 x 4 transpose within each 128-bit half of four registers: element `i` of half `h`
    /// of output `j` is element `j` of half `h` of input `i` (its own inverse).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn within(s: [__m256; 4]) -> [__m256; 4] {
        let t0 = _mm256_castps_pd(_mm256_unpacklo_ps(s[0], s[1]));
        let t1 = _mm256_castps_pd(_mm256_unpackhi_ps(s[0], s[1]));
        let t2 = _mm256_castps_pd(_mm256_unpacklo_ps(s[2], s[3]));
        let t3 = _mm256_castps_pd(_mm256_unpackhi_ps(s[2], s[3]));
        [
            _mm256_castpd_ps(_mm256_unpacklo_pd(t0, t2)),
            _mm256_castpd_ps(_mm256_unpackhi_pd(t0, t2)),
            _mm256_castpd_ps(_mm256_unpacklo_pd(t1, t3)),
            _mm256_castpd_ps(_mm256_unpackhi_pd(t1, t3)),
        ]
    }

    /// [`super::to_lanes`] of one whole group of sixteen rows.
    ///
    /// # Safety
    /// The CPU must have AVX2; `takes(per)`, `src.len() == 16 * per`, `dst.len() >= per`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn to_lanes(src: &[f32], per: usize, dst: &mut [Lanes]) {
        debug_assert!(takes(per) && src.len() == 16 * per && dst.len() >= per);
        // SAFETY (every arm): the caller's contract.
        unsafe {
            match per {
                2 => return to_lanes_small::<2>(src, dst),
                3 => return to_lanes_small::<3>(src, dst),
                _ => {}
            }
        }
        let p = src.as_ptr();
        for h in 0..2 {
            let row = |i: usize| 8 * h + i;
            if per == 4 {
                // Rows i and i + 4 of the half in one register, then the values within.
                let mut z = [_mm256_setzero_ps(); 4];
                for (i, v) in z.iter_mut().enumerate() {
                    // SAFETY: rows `8h + i` and `8h + 4 + i` (< 16) hold four values each.
                    *v = unsafe { _mm256_loadu2_m128(p.add(row(i + 4) * 4), p.add(row(i) * 4)) };
                }
                for (d, v) in dst[..4].iter_mut().zip(within(z)) {
                    // SAFETY: lanes `8h..8h + 8` of `d` (sixteen floats).
                    unsafe { _mm256_storeu_ps(d.as_mut_ptr().add(8 * h), v) };
                }
                continue;
            }
            let mut e0 = 0;
            while e0 + 8 <= per {
                let mut r = [_mm256_setzero_ps(); 8];
                for (i, v) in r.iter_mut().enumerate() {
                    // SAFETY: values `e0..e0 + 8` of row `8h + i` lie within `src`.
                    *v = unsafe { _mm256_loadu_ps(p.add(row(i) * per + e0)) };
                }
                for (d, v) in dst[e0..e0 + 8].iter_mut().zip(tile(r)) {
                    // SAFETY: lanes `8h..8h + 8` of `d` (sixteen floats).
                    unsafe { _mm256_storeu_ps(d.as_mut_ptr().add(8 * h), v) };
                }
                e0 += 8;
            }
            let part = per - e0;
            if part >= PART_TILE {
                let mut r = [_mm256_setzero_ps(); 8];
                for (i, v) in r.iter_mut().enumerate() {
                    let at = row(i) * per + e0;
                    // SAFETY: a row before the last has at least `8 - part` (< `per`) values
                    // after its own; the last row's load is masked to its `part` values.
                    *v = unsafe {
                        if row(i) == 15 {
                            _mm256_maskload_ps(p.add(at), first(part))
                        } else {
                            _mm256_loadu_ps(p.add(at))
                        }
                    };
                }
                for (d, v) in dst[e0..per].iter_mut().zip(tile(r)) {
                    // SAFETY: lanes `8h..8h + 8` of `d` (sixteen floats).
                    unsafe { _mm256_storeu_ps(d.as_mut_ptr().add(8 * h), v) };
                }
                e0 = per;
            }
            for (e, d) in dst[..per].iter_mut().enumerate().skip(e0) {
                for i in 0..8 {
                    d[row(i)] = src[row(i) * per + e];
                }
            }
        }
    }

    /// [`super::from_lanes`] of one whole group: the steps of [`to_lanes`] in reverse.
    ///
    /// # Safety
    /// The CPU must have AVX2; `takes(per)`, `dst.len() == 16 * per`, `src.len() >= per`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn from_lanes(src: &[Lanes], per: usize, dst: &mut [f32]) {
        debug_assert!(takes(per) && dst.len() == 16 * per && src.len() >= per);
        // SAFETY (every arm): the caller's contract.
        unsafe {
            match per {
                2 => return from_lanes_small::<2>(src, dst),
                3 => return from_lanes_small::<3>(src, dst),
                _ => {}
            }
        }
        let p = dst.as_mut_ptr();
        for h in 0..2 {
            let row = |i: usize| 8 * h + i;
            if per == 4 {
                let mut r = [_mm256_setzero_ps(); 4];
                for (v, s) in r.iter_mut().zip(&src[..4]) {
                    // SAFETY: lanes `8h..8h + 8` of `s` (sixteen floats).
                    *v = unsafe { _mm256_loadu_ps(s.as_ptr().add(8 * h)) };
                }
                for (i, v) in within(r).into_iter().enumerate() {
                    // SAFETY: rows `8h + i` and `8h + 4 + i` (< 16) hold four values each.
                    unsafe { _mm256_storeu2_m128(p.add(row(i + 4) * 4), p.add(row(i) * 4), v) };
                }
                continue;
            }
            // The columns past the last whole tile first: their eight-value writes spill into
            // the next row's first values, which the next row and the whole tiles write after.
            let whole = per / 8 * 8;
            let part = per - whole;
            if part >= PART_TILE {
                let mut r = [_mm256_setzero_ps(); 8];
                for (v, s) in r.iter_mut().zip(&src[whole..per]) {
                    // SAFETY: lanes `8h..8h + 8` of `s` (sixteen floats).
                    *v = unsafe { _mm256_loadu_ps(s.as_ptr().add(8 * h)) };
                }
                for (i, v) in tile(r).into_iter().enumerate() {
                    let at = row(i) * per + whole;
                    // SAFETY: a row before the last has at least `8 - part` (< `per`) values
                    // after its own; the last row writes its `part` values as the first four
                    // and the last four (`part > 4`), nothing past them.
                    unsafe {
                        if row(i) == 15 {
                            let tail = _mm256_add_epi32(
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                _mm256_set1_epi32(part as i32 - 4),
                            );
                            let hi = _mm256_permutevar8x32_ps(v, tail);
                            _mm_storeu_ps(p.add(at), _mm256_castps256_ps128(v));
                            _mm_storeu_ps(p.add(at + part - 4), _mm256_castps256_ps128(hi));
                        } else {
                            _mm256_storeu_ps(p.add(at), v);
                        }
                    }
                }
            }
            let mut e0 = 0;
            while e0 + 8 <= per {
                let mut r = [_mm256_setzero_ps(); 8];
                for (v, s) in r.iter_mut().zip(&src[e0..e0 + 8]) {
                    // SAFETY: lanes `8h..8h + 8` of `s` (sixteen floats).
                    *v = unsafe { _mm256_loadu_ps(s.as_ptr().add(8 * h)) };
                }
                for (i, v) in tile(r).into_iter().enumerate() {
                    // SAFETY: values `e0..e0 + 8` of row `8h + i` lie within `dst`.
                    unsafe { _mm256_storeu_ps(p.add(row(i) * per + e0), v) };
                }
                e0 += 8;
            }
            if part >= PART_TILE {
                continue;
            }
            for (e, s) in src[..per].iter().enumerate().skip(e0) {
                for i in 0..8 {
                    // SAFETY: value `e` of row `8h + i` lies within `dst`.
                    unsafe { *p.add(row(i) * per + e) = s[row(i)] };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Lanes;
    use std::arch::x86_64::*;

    /// Transposes sixteen rows of sixteen values in registers: `out[j]` lane `i` is `r[i]`
    /// lane `j`. Unpacks within 128-bit lanes, then moves the 128-bit lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn tile(r: [__m512; 16]) -> [__m512; 16] {
        // Lane q of t[2p], t[2p + 1]: rows 2p and 2p + 1 interleaved, columns 4q, 4q + 1 and
        // 4q + 2, 4q + 3.
        let mut t = [_mm512_setzero_ps(); 16];
        for p in 0..8 {
            t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
            t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
        }
        // Lane q of s[4p + c]: rows 4p..4p + 4 of column 4q + c.
        let mut s = [_mm512_setzero_ps(); 16];
        for p in 0..4 {
            let (a, b) = (_mm512_castps_pd(t[4 * p]), _mm512_castps_pd(t[4 * p + 1]));
            let (c, e) = (
                _mm512_castps_pd(t[4 * p + 2]),
                _mm512_castps_pd(t[4 * p + 3]),
            );
            s[4 * p] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
            s[4 * p + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
            s[4 * p + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
            s[4 * p + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
        }
        // Column 4q + c gathers lane q of s[c], s[4 + c], s[8 + c], s[12 + c].
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let even_lo = _mm512_shuffle_f32x4::<0x88>(s[c], s[4 + c]);
            let odd_lo = _mm512_shuffle_f32x4::<0xDD>(s[c], s[4 + c]);
            let even_hi = _mm512_shuffle_f32x4::<0x88>(s[8 + c], s[12 + c]);
            let odd_hi = _mm512_shuffle_f32x4::<0xDD>(s[8 + c], s[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(even_lo, even_hi);
            out[8 + c] = _mm512_shuffle_f32x4::<0xDD>(even_lo, even_hi);
            out[4 + c] = _mm512_shuffle_f32x4::<0x88>(odd_lo, odd_hi);
            out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(odd_lo, odd_hi);
        }
        out
    }

    /// Moves the 128-bit lanes of four registers: lane `q` of output `c` is lane `c` of input
    /// `q` (a 4 x 4 transpose of 128-bit blocks; its own inverse).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn blocks(z: [__m512; 4]) -> [__m512; 4] {
        // Lanes 0, 2 of z0 then of z1; lanes 1, 3 likewise; the same for z2, z3.
        let even01 = _mm512_shuffle_f32x4::<0x88>(z[0], z[1]);
        let odd01 = _mm512_shuffle_f32x4::<0xDD>(z[0], z[1]);
        let even23 = _mm512_shuffle_f32x4::<0x88>(z[2], z[3]);
        let odd23 = _mm512_shuffle_f32x4::<0xDD>(z[2], z[3]);
        [
            _mm512_shuffle_f32x4::<0x88>(even01, even23),
            _mm512_shuffle_f32x4::<0x88>(odd01, odd23),
            _mm512_shuffle_f32x4::<0xDD>(even01, even23),
            _mm512_shuffle_f32x4::<0xDD>(odd01, odd23),
        ]
    }

    /// A 4 x 4 transpose within each 128-bit lane of four registers: element `i` of lane `q`
    /// of output `j` is element `j` of lane `q` of input `i` (its own inverse).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn within(s: [__m512; 4]) -> [__m512; 4] {
        let t0 = _mm512_castps_pd(_mm512_unpacklo_ps(s[0], s[1]));
        let t1 = _mm512_castps_pd(_mm512_unpackhi_ps(s[0], s[1]));
        let t2 = _mm512_castps_pd(_mm512_unpacklo_ps(s[2], s[3]));
        let t3 = _mm512_castps_pd(_mm512_unpackhi_ps(s[2], s[3]));
        [
            _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2)),
            _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3)),
        ]
    }

    /// [`super::to_lanes`] of four values per row: four plain loads, then the 128-bit lanes
    /// (matrix `4q + c` to lane `q` of register `c`), then the values within them.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `src.len() == 64`, `dst.len() >= 4`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn to_lanes4(src: &[f32], dst: &mut [Lanes]) {
        let mut z = [_mm512_setzero_ps(); 4];
        for (q, v) in z.iter_mut().enumerate() {
            // SAFETY: `src` holds 64 floats.
            *v = unsafe { _mm512_loadu_ps(src.as_ptr().add(16 * q)) };
        }
        let out = within(blocks(z));
        for (d, v) in dst[..4].iter_mut().zip(out) {
            // SAFETY: `d` is sixteen floats.
            unsafe { _mm512_storeu_ps(d.as_mut_ptr(), v) };
        }
    }

    /// [`super::from_lanes`] of four values per row: the steps of [`to_lanes4`] in reverse.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `dst.len() == 64`, `src.len() >= 4`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn from_lanes4(src: &[Lanes], dst: &mut [f32]) {
        let mut r = [_mm512_setzero_ps(); 4];
        for (v, s) in r.iter_mut().zip(&src[..4]) {
            // SAFETY: `s` is sixteen floats.
            *v = unsafe { _mm512_loadu_ps(s.as_ptr()) };
        }
        let z = blocks(within(r));
        for (q, v) in z.into_iter().enumerate() {
            // SAFETY: `dst` holds 64 floats.
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(16 * q), v) };
        }
    }

    /// One step of a small transpose: the lanes `mask` of an output taken from a pair of input
    /// registers, lane `q` from lane `idx[q]` of the pair (16 and up: the second register).
    #[derive(Clone, Copy)]
    struct Pick {
        idx: [i32; 16],
        mask: u16,
    }

    /// Widest row the permutes take, and the most register pairs of a row.
    pub(super) const SMALL: usize = 7;
    const PAIRS: usize = SMALL.div_ceil(2);

    type Picks = [[[Pick; PAIRS]; SMALL]; SMALL + 1];

    /// The permutes of every row width from 2 to [`SMALL`]: `[per][o][p]` gathers output
    /// register `o` from the input pair `p`, lane by lane, as [`super::source`] says (for
    /// [`to_lanes_small`] and [`from_lanes_small`]).
    const fn picks(to_lanes: bool) -> Picks {
        let mut t = [[[Pick {
            idx: [0; 16],
            mask: 0,
        }; PAIRS]; SMALL]; SMALL + 1];
        let mut per = 2;
        while per <= SMALL {
            let mut o = 0;
            while o < per {
                let mut q = 0;
                while q < 16 {
                    // Register `r` of the inputs is register `r % 2` of pair `r / 2`.
                    let (r, lane) = super::source(to_lanes, per, o, q, 16);
                    let (p, idx) = (r / 2, lane + 16 * (r % 2));
                    t[per][o][p].idx[q] = idx as i32;
                    t[per][o][p].mask |= 1 << q;
                    q += 1;
                }
                o += 1;
            }
            per += 1;
        }
        t
    }

    /// The permutes of [`to_lanes_small`].
    const TO_PICKS: Picks = picks(true);
    /// The permutes of [`from_lanes_small`].
    const FROM_PICKS: Picks = picks(false);

    /// The inputs, `(register, lane)`, that the tables pick lane `q` of output `o` from, as
    /// `permutex2var` reads a pair (a row of odd width pairs its last register with itself).
    #[cfg(test)]
    pub(super) fn picked(to_lanes: bool, per: usize, o: usize, q: usize) -> Vec<(usize, usize)> {
        let table = if to_lanes { &TO_PICKS } else { &FROM_PICKS };
        let pairs = table[per][o].iter().enumerate().take(per.div_ceil(2));
        pairs
            .filter(|(_, pick)| pick.mask & (1 << q) != 0)
            .map(|(p, pick)| {
                let idx = pick.idx[q] as usize;
                let r = if idx < 16 {
                    2 * p
                } else {
                    (2 * p + 1).min(per - 1)
                };
                (r, idx % 16)
            })
            .collect()
    }

    /// `PER` registers to `PER` registers, each output gathered from the input pairs by
    /// `picks[r]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn permute<const PER: usize>(
        z: &[__m512; PER],
        picks: &[[Pick; PAIRS]; SMALL],
    ) -> [__m512; PER] {
        let mut out = [_mm512_setzero_ps(); PER];
        for (o, pr) in out.iter_mut().zip(picks) {
            for (p, pick) in pr.iter().enumerate().take(PER.div_ceil(2)) {
                if pick.mask == 0 {
                    continue;
                }
                let (a, b) = (z[2 * p], z[(2 * p + 1).min(PER - 1)]);
                // SAFETY: `idx` is sixteen i32.
                let idx = unsafe { _mm512_loadu_si512(pick.idx.as_ptr().cast()) };
                let v = _mm512_permutex2var_ps(a, idx, b);
                *o = _mm512_mask_blend_ps(pick.mask, *o, v);
            }
        }
        out
    }

    /// [`super::to_lanes`] of `PER` (2, 3, 5, 6 or 7) values per row: `PER` plain loads, then
    /// two-register permutes.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `src.len() == 16 * PER`, `dst.len() >= PER`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn to_lanes_small<const PER: usize>(src: &[f32], dst: &mut [Lanes]) {
        let mut z = [_mm512_setzero_ps(); PER];
        for (r, v) in z.iter_mut().enumerate() {
            // SAFETY: `src` holds `16 * PER` floats.
            *v = unsafe { _mm512_loadu_ps(src.as_ptr().add(16 * r)) };
        }
        let out = permute::<PER>(&z, &TO_PICKS[PER]);
        for (d, v) in dst[..PER].iter_mut().zip(out) {
            // SAFETY: `d` is sixteen floats.
            unsafe { _mm512_storeu_ps(d.as_mut_ptr(), v) };
        }
    }

    /// [`super::from_lanes`] of `PER` (2, 3, 5, 6 or 7) values per row: the inverse permutes.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `dst.len() == 16 * PER`, `src.len() >= PER`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn from_lanes_small<const PER: usize>(src: &[Lanes], dst: &mut [f32]) {
        let mut z = [_mm512_setzero_ps(); PER];
        for (v, s) in z.iter_mut().zip(&src[..PER]) {
            // SAFETY: `s` is sixteen floats.
            *v = unsafe { _mm512_loadu_ps(s.as_ptr()) };
        }
        let out = permute::<PER>(&z, &FROM_PICKS[PER]);
        for (r, v) in out.into_iter().enumerate() {
            // SAFETY: `dst` holds `16 * PER` floats.
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(16 * r), v) };
        }
    }

    /// [`super::to_lanes`] of whole groups of sixteen rows, one after the other.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `src.len()` is a multiple of `16 * per`, and `dst` holds
    /// `per` rows for each group.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn to_lanes_groups(src: &[f32], per: usize, dst: &mut [Lanes]) {
        for (s, d) in src.chunks_exact(16 * per).zip(dst.chunks_exact_mut(per)) {
            // SAFETY: `s` holds `16 * per` floats and `d` `per` rows.
            unsafe { to_lanes_group(s, per, d) }
        }
    }

    /// [`super::to_lanes`] of one whole group: the transpose for its width.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `src.len() == 16 * per`, `dst.len() >= per`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn to_lanes_group(src: &[f32], per: usize, dst: &mut [Lanes]) {
        // SAFETY (every arm): the caller's contract.
        unsafe {
            match per {
                2 => to_lanes_small::<2>(src, dst),
                3 => to_lanes_small::<3>(src, dst),
                4 => to_lanes4(src, dst),
                5 => to_lanes_small::<5>(src, dst),
                6 => to_lanes_small::<6>(src, dst),
                7 => to_lanes_small::<7>(src, dst),
                _ => to_lanes(src, per, dst),
            }
        }
    }

    /// The mask of the first `n` (at most 16) lanes.
    #[inline(always)]
    fn first(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// [`super::to_lanes`] in tiles of sixteen columns.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `src.len() == 16 * per`, `dst.len() >= per`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn to_lanes(src: &[f32], per: usize, dst: &mut [Lanes]) {
        let mut e0 = 0;
        while e0 < per {
            let w = (per - e0).min(16);
            let mask = first(w);
            let mut r = [_mm512_setzero_ps(); 16];
            for (l, v) in r.iter_mut().enumerate() {
                // SAFETY: the masked lanes `l * per + e0 .. + w` lie within `src`; masked-off
                // lanes are not read.
                *v = unsafe { _mm512_maskz_loadu_ps(mask, src.as_ptr().add(l * per + e0)) };
            }
            let out = tile(r);
            for (d, v) in dst[e0..e0 + w].iter_mut().zip(out) {
                // SAFETY: `d` is sixteen floats.
                unsafe { _mm512_storeu_ps(d.as_mut_ptr(), v) };
            }
            e0 += 16;
        }
    }

    /// [`super::from_lanes`] in tiles of sixteen columns.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `dst.len() == 16 * per`, `src.len() >= per`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn from_lanes(src: &[Lanes], per: usize, dst: &mut [f32]) {
        let mut e0 = 0;
        while e0 < per {
            let w = (per - e0).min(16);
            let mask = first(w);
            let mut r = [_mm512_setzero_ps(); 16];
            for (v, s) in r.iter_mut().zip(&src[e0..e0 + w]) {
                // SAFETY: `s` is sixteen floats.
                *v = unsafe { _mm512_loadu_ps(s.as_ptr()) };
            }
            let out = tile(r);
            for (l, v) in out.into_iter().enumerate() {
                // SAFETY: the masked lanes `l * per + e0 .. + w` lie within `dst`; masked-off
                // lanes are not written.
                unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr().add(l * per + e0), mask, v) };
            }
            e0 += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both directions against the definition, for every width up to four tiles, at whatever
    /// instruction set this CPU runs (the plain loops are the definition itself).
    #[test]
    fn transposes_move_every_value_to_its_place() {
        for per in 1..=64 {
            let src: Vec<f32> = (0..16 * per).map(|i| i as f32 + 0.5).collect();
            let mut lanes = vec![[f32::NAN; 16]; per + 1];
            to_lanes(&src, per, f32::NAN, &mut lanes);
            for e in 0..per {
                for l in 0..16 {
                    assert_eq!(lanes[e][l], src[l * per + e], "per {per}: [{e}][{l}]");
                }
            }
            assert!(
                lanes[per].iter().all(|v| v.is_nan()),
                "per {per}: wrote past"
            );
            // Written inside a larger buffer: a value written past the end shows.
            let mut back = vec![f32::NAN; 16 * per + 8];
            from_lanes(&lanes, per, &mut back[..16 * per]);
            assert_eq!(back[..16 * per], src[..], "per {per}: round trip");
            assert!(
                back[16 * per..].iter().all(|v| v.is_nan()),
                "per {per}: wrote past the rows"
            );
            // Five rows: the lanes past them padded, and only five rows written back.
            let part = &src[..5 * per];
            to_lanes(part, per, -1.0, &mut lanes);
            for e in 0..per {
                for l in 0..16 {
                    let want = if l < 5 { part[l * per + e] } else { -1.0 };
                    assert_eq!(lanes[e][l], want, "per {per}, five rows: [{e}][{l}]");
                }
            }
            let mut back = vec![f32::NAN; 5 * per];
            from_lanes(&lanes, per, &mut back);
            assert_eq!(back, part, "per {per}: five rows' round trip");
        }
    }

    /// The permute tables of both instruction sets, read as their instructions read them, move
    /// every value to its place: any x86 CPU checks both (the AVX-512 ones included).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn permute_tables_transpose() {
        type Picked = fn(bool, usize, usize, usize) -> Vec<(usize, usize)>;
        let sets: [(&str, usize, usize, Picked); 2] = [
            ("avx2", 8, avx2::SMALL, avx2::picked),
            ("avx512", 16, avx512::SMALL, avx512::picked),
        ];
        for (name, width, small, picked) in sets {
            for per in 2..=small {
                for to_lanes in [true, false] {
                    // The value (its index in the rows) in lane `l` of input register `r`.
                    let value = |(r, l): (usize, usize)| {
                        if to_lanes {
                            width * r + l
                        } else {
                            l * per + r
                        }
                    };
                    for o in 0..per {
                        for q in 0..width {
                            let got: Vec<usize> =
                                picked(to_lanes, per, o, q).into_iter().map(value).collect();
                            let want = if to_lanes { q * per + o } else { width * o + q };
                            let what = format!("{name}, per {per}, to_lanes {to_lanes}");
                            assert_eq!(got, [want], "{what}: output {o}, lane {q}");
                        }
                    }
                }
            }
        }
    }

    /// Runs of groups, whole and with a partial last group, against the definition.
    #[test]
    fn groups_move_every_value_to_its_place() {
        for per in 1..=20 {
            for rows in [16usize, 48, 53] {
                let src: Vec<f32> = (0..rows * per).map(|i| i as f32 + 0.25).collect();
                let groups = rows.div_ceil(16);
                let mut lanes = vec![[f32::NAN; 16]; groups * per + 1];
                to_lanes_groups(&src, per, -2.0, &mut lanes);
                for t in 0..groups {
                    for e in 0..per {
                        for (l, got) in lanes[t * per + e].iter().enumerate() {
                            let row = 16 * t + l;
                            let want = if row < rows { src[row * per + e] } else { -2.0 };
                            assert_eq!(*got, want, "per {per}, rows {rows}");
                        }
                    }
                }
                assert!(lanes[groups * per].iter().all(|v| v.is_nan()), "wrote past");
            }
        }
    }
}
