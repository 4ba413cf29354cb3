//! The roofline of one optimizer call: a kernel that moves exactly the bytes a configuration
//! must move, with trivial arithmetic, timed in the same run as the real step.
//!
//! A fused Adafactor call cannot do with fewer memory passes than these (per element, with `E`
//! the weight and gradient element size, 4 for float32 and 2 for 16-bit; EMA averages and
//! accumulators are float32):
//!
//! | pass | reads | writes | when |
//! | --- | --- | --- | --- |
//! | 1: statistics, norms, RMS(x) | g, x (+ acc when averaging) | | every update call |
//! | 2: RMS(u) after norm clipping | g (+ acc) | | `clipnorm` or `global_clipnorm` |
//! | 3: the update | g, x (+ acc; + EMA average) | x (+ acc zeroed; + EMA average) | every update call |
//! | accumulate | g, acc (+ x and EMA average) | acc (+ EMA average) | calls that only accumulate |
//!
//! Pass 2 exists because the clipping scale of every gradient is known only after pass 1 has
//! seen all of them. Without norm clipping a float32 update call moves 20 bytes per parameter.
//! `clipvalue`, `loss_scale_factor` and weight decay add arithmetic, not bytes.
//!
//! The second-moment statistics (float32) come on top, per statistic rather than per
//! parameter: an update call reads and writes them in pass 1 and reads them in pass 3 (12
//! bytes), and reads them once more in pass 2 (16 bytes). For a large matrix they are a
//! rounding error; for a vector (one statistic per element), an `n x 1` or `1 x n` matrix or a
//! batch of tiny matrices they are as large as the weight, and the ideal counts them.
//!
//! The kernel runs on separate buffers of the same tensor sizes, over rayon with the same
//! threads, pass 3 in the reverse order of pass 1 as the fused step does. Its words are moved as
//! integers (xor), so the time is that of the memory traffic and the loop overhead alone.

use rayon::prelude::*;
use std::time::Instant;

/// Elements per parallel job: large enough that scheduling is noise, small enough to balance.
const JOB: usize = 1 << 15;

/// Which passes and buffers a configuration needs.
#[derive(Debug, Clone, Copy)]
pub struct Traffic {
    /// Weight and gradient element size in bytes (4 or 2).
    pub elem_bytes: usize,
    /// `clipnorm` or `global_clipnorm`: the extra read of every gradient (pass 2).
    pub norm_pass: bool,
    /// `use_ema`: the float32 average is read and written on every call.
    pub ema: bool,
    /// `gradient_accumulation_steps`: every call but each k-th only accumulates.
    pub accumulation: Option<u64>,
}

/// Bytes of float32 statistics per statistic on an update call: read and written in pass 1,
/// read in pass 3, and read in pass 2 when there is one.
pub fn stat_bytes(norm_pass: bool) -> usize {
    if norm_pass {
        16
    } else {
        12
    }
}

impl Traffic {
    /// Bytes per parameter moved by call number `raw` (0-based), as the table above counts.
    pub fn bytes_per_param(&self, raw: u64) -> usize {
        let e = self.elem_bytes;
        let ema = if self.ema { 8 } else { 0 };
        match self.accumulation {
            Some(k) if !(raw + 1).is_multiple_of(k) => e + 8 + if self.ema { e + 8 } else { 0 },
            Some(_) => {
                let acc_reads = if self.norm_pass { 3 } else { 2 };
                5 * e + 4 * acc_reads + 4 + self.norm_pass as usize * e + ema
            }
            None => 5 * e + self.norm_pass as usize * e + ema,
        }
    }

    /// Mean bytes per parameter over one accumulation cycle (or one call), with `stats`
    /// statistics per parameter.
    pub fn mean_bytes_per_param(&self, stats: f64) -> f64 {
        let k = self.accumulation.unwrap_or(1).max(1);
        let per_call = (0..k).map(|r| self.bytes_per_param(r)).sum::<usize>() as f64 / k as f64;
        per_call + stats * stat_bytes(self.norm_pass) as f64 / k as f64
    }
}

/// One contiguous piece of one tensor: `(tensor, start, end)`.
type Job = (usize, usize, usize);

/// Buffers of the same sizes as the benchmarked tensors.
pub struct Ideal {
    traffic: Traffic,
    /// Weights and gradients as raw words (u32 for float32, u16 for 16-bit, stored widened
    /// only in type: a 16-bit run uses the `*_16` vectors).
    x32: Vec<Vec<u32>>,
    g32: Vec<Vec<u32>>,
    x16: Vec<Vec<u16>>,
    g16: Vec<Vec<u16>>,
    ema: Vec<Vec<u32>>,
    acc: Vec<Vec<u32>>,
    /// The float32 statistics, one buffer per tensor.
    stats: Vec<Vec<u32>>,
    jobs: Vec<Job>,
    /// The statistics that go with each of `jobs`.
    stat_jobs: Vec<Job>,
}

fn filled<T: Copy + Send + Sync>(lens: &[usize], v: T) -> Vec<Vec<T>> {
    lens.par_iter().map(|&n| vec![v; n]).collect()
}

/// `JOB`-sized pieces of buffers of `lens` elements.
fn jobs_of(lens: &[usize]) -> Vec<Job> {
    lens.iter()
        .enumerate()
        .flat_map(|(t, &n)| (0..n).step_by(JOB).map(move |s| (t, s, (s + JOB).min(n))))
        .collect()
}

/// The statistics each job moves: its tensor's statistics in proportion to the job's share of
/// the tensor, so that they stream in the same jobs as the weights.
fn stat_jobs(jobs: &[Job], lens: &[usize], stat_lens: &[usize]) -> Vec<Job> {
    let at = |t: usize, i: usize| i * stat_lens[t] / lens[t].max(1);
    jobs.iter()
        .map(|&(t, s, e)| (t, at(t, s), at(t, e)))
        .collect()
}

impl Ideal {
    /// Buffers for tensors of `lens` elements with `stat_lens` statistics each (first-touched
    /// on the worker threads).
    pub fn new(lens: &[usize], stat_lens: &[usize], traffic: Traffic) -> Ideal {
        let wide = traffic.elem_bytes == 4;
        let none = |on: bool| {
            if on {
                lens.to_vec()
            } else {
                vec![0; lens.len()]
            }
        };
        let jobs = jobs_of(lens);
        Ideal {
            x32: filled(&none(wide), 0x3c00_0001),
            g32: filled(&none(wide), 0x3a00_0003),
            x16: filled(&none(!wide), 0x3c01),
            g16: filled(&none(!wide), 0x3a03),
            ema: filled(&none(traffic.ema), 7),
            acc: filled(&none(traffic.accumulation.is_some()), 5),
            stats: filled(stat_lens, 9),
            traffic,
            stat_jobs: stat_jobs(&jobs, lens, stat_lens),
            jobs,
        }
    }

    /// One call's passes, as the fused step makes call number `raw`; returns a checksum so
    /// that nothing is optimised away.
    pub fn call(&mut self, raw: u64) -> u64 {
        let t = self.traffic;
        let update = match t.accumulation {
            Some(k) => (raw + 1).is_multiple_of(k),
            None => true,
        };
        if !update {
            return self.accumulate();
        }
        let averaging = t.accumulation.is_some();
        let s1 = self.read_pass(averaging, true);
        let s2 = if t.norm_pass {
            self.read_pass(averaging, false)
        } else {
            0
        };
        let bit = ((s1 ^ s2) & 1) as u32;
        self.write_pass(bit, averaging)
    }

    /// Pass 1 (gradient and weight; statistics read and written) or pass 2 (gradient only;
    /// statistics read), plus the accumulator when the call averages with it.
    fn read_pass(&mut self, averaging: bool, pass1: bool) -> u64 {
        let Ideal {
            traffic,
            x32,
            g32,
            x16,
            g16,
            acc,
            stats,
            jobs,
            stat_jobs,
            ..
        } = self;
        let (x32, g32, x16, g16, acc) = (&*x32, &*g32, &*x16, &*g16, &*acc);
        let wide = traffic.elem_bytes == 4;
        let work: Vec<_> = jobs.iter().zip(pieces(stats, stat_jobs, true)).collect();
        let sum = |(&(t, s, e), stat): (&Job, Option<&mut [u32]>)| -> u64 {
            let mut h = if wide {
                xor_words(&g32[t][s..e], pass1.then(|| &x32[t][s..e]))
            } else {
                xor_words(&g16[t][s..e], pass1.then(|| &x16[t][s..e]))
            };
            if averaging {
                h ^= xor_words(&acc[t][s..e], None);
            }
            if let Some(stat) = stat {
                if pass1 {
                    h ^= flip_words(stat);
                } else {
                    h ^= xor_words(stat, None);
                }
            }
            h
        };
        work.into_par_iter().map(sum).reduce(|| 0, |a, b| a ^ b)
    }

    /// Pass 3, in the reverse order of pass 1: reads the gradient and the weight, writes the
    /// weight; reads and writes the EMA average; reads the accumulator and zeroes it.
    fn write_pass(&mut self, bit: u32, averaging: bool) -> u64 {
        let Ideal {
            traffic,
            x32,
            g32,
            x16,
            g16,
            ema,
            acc,
            stats,
            jobs,
            stat_jobs,
        } = self;
        let wide = traffic.elem_bytes == 4;
        let with_ema = traffic.ema;
        let stats = &*stats;
        // Split every buffer into the jobs' disjoint pieces, in reverse order.
        let x32 = pieces(x32, jobs, wide);
        let x16 = pieces(x16, jobs, !wide);
        let ema = pieces(ema, jobs, with_ema);
        let acc = pieces(acc, jobs, averaging);
        let work: Vec<_> = jobs
            .iter()
            .zip(stat_jobs.iter())
            .zip(x32)
            .zip(x16)
            .zip(ema)
            .zip(acc)
            .rev()
            .collect();
        work.into_par_iter()
            .map(|((((((t, s, e), &(_, ss, se)), x32), x16), ema), acc)| {
                let mut h = xor_words(&stats[*t][ss..se], None) as u32;
                let a_bits = match acc {
                    Some(a) => {
                        let v = a.iter().fold(0, |p, q| p ^ q);
                        a.fill(0);
                        v
                    }
                    None => 0,
                };
                if let Some(x) = x32 {
                    h ^= write_words(x, &g32[*t][*s..*e], bit);
                }
                if let Some(x) = x16 {
                    h ^= write_words(x, &g16[*t][*s..*e], bit as u16);
                }
                if let Some(m) = ema {
                    for v in m.iter_mut() {
                        *v ^= bit;
                    }
                }
                (h ^ a_bits) as u64
            })
            .reduce(|| 0, |a, b| a ^ b)
    }

    /// A call that only accumulates: reads the gradient and the accumulator, writes the
    /// accumulator; with EMA also reads the weight and reads and writes the average.
    fn accumulate(&mut self) -> u64 {
        let Ideal {
            traffic,
            x32,
            g32,
            x16,
            g16,
            ema,
            acc,
            jobs,
            ..
        } = self;
        let wide = traffic.elem_bytes == 4;
        let with_ema = traffic.ema;
        let accs = pieces(acc, jobs, true);
        let emas = pieces(ema, jobs, with_ema);
        let work: Vec<_> = jobs.iter().zip(accs).zip(emas).collect();
        let (x32, x16) = (&*x32, &*x16);
        work.into_par_iter()
            .map(|(((t, s, e), acc), ema)| {
                let mut h = 0u32;
                if let Some(a) = acc {
                    if wide {
                        for (ai, gi) in a.iter_mut().zip(&g32[*t][*s..*e]) {
                            *ai ^= gi;
                        }
                    } else {
                        for (ai, gi) in a.iter_mut().zip(&g16[*t][*s..*e]) {
                            *ai ^= *gi as u32;
                        }
                    }
                }
                if let Some(m) = ema {
                    if wide {
                        for (mi, xi) in m.iter_mut().zip(&x32[*t][*s..*e]) {
                            *mi ^= xi;
                            h ^= *mi;
                        }
                    } else {
                        for (mi, xi) in m.iter_mut().zip(&x16[*t][*s..*e]) {
                            *mi ^= *xi as u32;
                            h ^= *mi;
                        }
                    }
                }
                h as u64
            })
            .reduce(|| 0, |a, b| a ^ b)
    }

    /// Times calls `0..warmup + steps` (the same call sequence as the benchmarked step) and
    /// returns the times of the last `steps`, in milliseconds.
    pub fn time(&mut self, warmup: usize, steps: usize) -> Vec<f64> {
        let mut times = Vec::with_capacity(steps);
        let mut check = 0;
        for raw in 0..(warmup + steps) as u64 {
            let t = Instant::now();
            check ^= self.call(raw);
            if raw as usize >= warmup {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        std::hint::black_box(check);
        times
    }
}

/// How far ahead every stream is asked for, as the step's loops ask (`PREFETCH_BYTES` in the
/// kernels): without it the step, which asks, could beat its own roofline.
const AHEAD_BYTES: usize = 4096;
/// Bytes per block between two asks.
const BLOCK_BYTES: usize = 1024;

/// Asks the CPU for the block of `v` that starts `AHEAD_BYTES` after element `at` (clipped to
/// `v`): a hint, nothing on other architectures.
#[inline(always)]
fn ask<T>(v: &[T], at: usize) {
    let size = std::mem::size_of::<T>().max(1);
    let from = (at + AHEAD_BYTES / size).min(v.len());
    let to = (from + BLOCK_BYTES / size).min(v.len());
    #[cfg(target_arch = "x86_64")]
    for i in (from..to).step_by(64 / size) {
        // SAFETY: a prefetch never faults; the address lies within `v`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                v.as_ptr().add(i) as *const i8
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (from, to);
}

/// The blocks of `BLOCK_BYTES` of a buffer of `len` elements of `T`.
fn blocks<T>(len: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let n = BLOCK_BYTES / std::mem::size_of::<T>().max(1);
    (0..len).step_by(n).map(move |at| at..(at + n).min(len))
}

/// The xor of every word of `a` (and of `b`), in blocks whose loops the compiler vectorises,
/// each block asking for the one `AHEAD_BYTES` further on.
fn xor_words<T>(a: &[T], b: Option<&[T]>) -> u64
where
    T: Copy + Default + std::ops::BitXor<Output = T> + Into<u64>,
{
    let mut h = T::default();
    for r in blocks::<T>(a.len()) {
        ask(a, r.start);
        match b {
            Some(b) => {
                ask(b, r.start);
                h = a[r.clone()]
                    .iter()
                    .zip(&b[r])
                    .fold(h, |h, (&p, &q)| h ^ p ^ q);
            }
            None => h = a[r].iter().fold(h, |h, &p| h ^ p),
        }
    }
    h.into()
}

/// Flips the low bit of every word of `a` (a read and a write of each) and returns the xor of
/// the results.
fn flip_words(a: &mut [u32]) -> u64 {
    let mut h = 0u32;
    for r in blocks::<u32>(a.len()) {
        ask(a, r.start);
        for v in a[r].iter_mut() {
            *v ^= 1;
            h ^= *v;
        }
    }
    h as u64
}

/// `x ^= g & bit` over blocks, asking ahead for both; returns the xor of the new words.
fn write_words<T>(x: &mut [T], g: &[T], bit: T) -> u32
where
    T: Copy + std::ops::BitXor<Output = T> + std::ops::BitAnd<Output = T> + Into<u32>,
{
    let mut h = 0u32;
    for r in blocks::<T>(x.len()) {
        ask(x, r.start);
        ask(g, r.start);
        for (xi, gi) in x[r.clone()].iter_mut().zip(&g[r]) {
            *xi = *xi ^ (*gi & bit);
            h ^= (*xi).into();
        }
    }
    h
}

/// The disjoint pieces of `bufs` that `jobs` cover, in job order (`None` for every job when the
/// buffers are not used).
fn pieces<'a, T>(bufs: &'a mut [Vec<T>], jobs: &[Job], used: bool) -> Vec<Option<&'a mut [T]>> {
    if !used {
        return jobs.iter().map(|_| None).collect();
    }
    let mut rest: Vec<&'a mut [T]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    let mut out = Vec::with_capacity(jobs.len());
    for &(t, s, e) in jobs {
        // Jobs of one tensor come in order and tile it, so each takes the front of what is left.
        let buf = std::mem::take(&mut rest[t]);
        let (head, tail) = buf.split_at_mut(e - s);
        rest[t] = tail;
        out.push(Some(head));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts() {
        let f32_default = Traffic {
            elem_bytes: 4,
            norm_pass: false,
            ema: false,
            accumulation: None,
        };
        assert_eq!(f32_default.bytes_per_param(0), 20);
        let clip = Traffic {
            norm_pass: true,
            ..f32_default
        };
        assert_eq!(clip.bytes_per_param(0), 24);
        let ema16 = Traffic {
            elem_bytes: 2,
            ema: true,
            ..f32_default
        };
        assert_eq!(ema16.bytes_per_param(0), 18);
        let acc = Traffic {
            accumulation: Some(2),
            ..f32_default
        };
        assert_eq!(acc.bytes_per_param(0), 12);
        assert_eq!(acc.bytes_per_param(1), 20 + 8 + 4);
        // A vector has one statistic per element; statistics move on update calls only.
        assert_eq!(f32_default.mean_bytes_per_param(1.0), 32.0);
        assert_eq!(clip.mean_bytes_per_param(1.0), 40.0);
        assert_eq!(acc.mean_bytes_per_param(1.0), (12.0 + 32.0 + 12.0) / 2.0);
    }

    #[test]
    fn every_statistic_is_touched() {
        let traffic = Traffic {
            elem_bytes: 4,
            norm_pass: false,
            ema: false,
            accumulation: None,
        };
        let mut ideal = Ideal::new(&[3, 70_000], &[2, 70_000], traffic);
        ideal.call(0);
        // Pass 1 writes every statistic once.
        assert!(ideal.stats.iter().flatten().all(|&v| v == 9 ^ 1));
    }
}
