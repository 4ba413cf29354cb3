//! What this CPU offers the kernels: the instruction set the row loops use (capped by
//! `ADAFACTOR_SIMD`), code compiled for AVX2 where that is allowed, and the prefetch hint.

/// The instruction sets the row loops can run on, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Simd {
    /// The portable loops.
    Portable,
    /// The [`avx2`] twins.
    Avx2,
    /// The [`avx512`] twins.
    Avx512,
    /// The [`avx512_bf16`] twins.
    Avx512Bf16,
}

/// The instruction set the row loops use: the best this CPU has, capped by the environment
/// variable `ADAFACTOR_SIMD` (`portable`, `avx2` or `avx512`; other values are ignored) to
/// compare the versions. Read once per process; every version gives the same bits.
#[inline(always)]
pub(crate) fn simd() -> Simd {
    static CHOSEN: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let best = if has_avx512_bf16() {
            Simd::Avx512Bf16
        } else if has_avx512() {
            Simd::Avx512
        } else if has_avx2() {
            Simd::Avx2
        } else {
            Simd::Portable
        };
        let cap = match std::env::var("ADAFACTOR_SIMD").as_deref() {
            Ok("portable") => Simd::Portable,
            Ok("avx2") => Simd::Avx2,
            Ok("avx512") => Simd::Avx512Bf16,
            _ => Simd::Avx512Bf16,
        };
        best.min(cap)
    })
}

/// True when this CPU runs the AVX-512 twins.
#[inline(always)]
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when this CPU runs the AVX-512 twins with the bf16 conversion instruction (and DQ's
/// class test that finds the subnormals it would flush).
#[inline(always)]
pub(crate) fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx512()
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when this CPU has AVX-512 VL and DQ (with F and BW, what [`vectorized_wide`] compiles
/// for).
#[inline(always)]
fn has_avx512_vl_dq() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when this CPU runs the AVX2 twins (AVX2 and F16C; the standard library checks once).
#[inline(always)]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Asks the CPU to start loading `s` into cache: a hint, nothing on other architectures.
#[inline(always)]
pub(crate) fn prefetch<T>(s: &[T]) {
    prefetch_raw(s.as_ptr(), s.len());
}

/// [`prefetch`] of the `len` elements at `p`, for buffers that other threads hold mutably (a
/// prefetch reads nothing, so no reference to them is made).
#[inline(always)]
pub(crate) fn prefetch_raw<T>(p: *const T, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let (p, bytes) = (p as *const i8, len * std::mem::size_of::<T>());
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch never faults; the address lies within the caller's buffer.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    p.wrapping_add(off),
                )
            };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// Asks for the first [`PREFETCH_BYTES`] (at most) of the `len` elements at `p`: a buffer the
/// caller reaches next, started early (a prefetch reads nothing, so `p` may be any address).
#[inline(always)]
pub(crate) fn prefetch_head<T>(p: *const T, len: usize) {
    prefetch_raw(p, len.min(PREFETCH_BYTES / std::mem::size_of::<T>().max(1)));
}

/// How far ahead the streaming passes ask for the data they will read: the hardware
/// prefetcher alone leaves passes that compute between short runs short of the bandwidth.
pub(crate) const PREFETCH_BYTES: usize = 4096;

/// How far ahead a pass asks when it computes more per byte than the others (the short-row
/// statistics pass: a transpose, each row's new statistic, weighted sums): at
/// [`PREFETCH_BYTES`] its loads still waited (BENCHMARKS.md, 2026-12-05 09:10 UTC).
pub(crate) const FAR_PREFETCH_BYTES: usize = 8192;

/// Asks for elements `start + ahead .. start + ahead + len` of `v` (clipped to it), `ahead`
/// being [`PREFETCH_BYTES`] of `v`'s elements.
#[inline(always)]
pub(crate) fn prefetch_ahead<T>(v: &[T], start: usize, len: usize) {
    prefetch_ahead_by(v, start, len, PREFETCH_BYTES);
}

/// [`prefetch_ahead`], `bytes` ahead.
#[inline(always)]
pub(crate) fn prefetch_ahead_by<T>(v: &[T], start: usize, len: usize, bytes: usize) {
    prefetch_ahead_raw(v.as_ptr(), v.len(), start, len, bytes);
}

/// [`prefetch_ahead_by`] in the buffer of `buf_len` elements at `p`, for a buffer that another
/// borrow holds meanwhile (a prefetch reads nothing, so no reference to it is made).
#[inline(always)]
pub(crate) fn prefetch_ahead_raw<T>(
    p: *const T,
    buf_len: usize,
    start: usize,
    len: usize,
    bytes: usize,
) {
    let ahead = bytes / std::mem::size_of::<T>().max(1);
    let from = (start + ahead).min(buf_len);
    prefetch_raw(p.wrapping_add(from), len.min(buf_len - from));
}

/// Runs `f` compiled for AVX2 when the row loops may use it ([`simd`]), else for
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
        if simd() >= Simd::Avx2 {
            // SAFETY: the CPU supports AVX2 (`simd` checked it).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// [`vectorized`], but compiled for AVX-512 where the row loops may use it: for the loops that
/// are written as sixteen-lane steps (batches of tiny matrices, few rows), which then take one
/// instruction per step. Not for every loop: the short-row loops run slower at that width.
#[inline(always)]
pub(crate) fn vectorized_wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if simd() >= Simd::Avx512 && has_avx512_vl_dq() {
            // SAFETY: the CPU supports AVX-512 F and BW (`simd` checked them), VL and DQ
            // (checked here), AVX2 and F16C (every AVX-512 CPU has them).
            return unsafe { avx512(f) };
        }
    }
    vectorized(f)
}
