//! The collective contract on a group of threads: sums in rank order and identical on every rank,
//! bytes delivered intact, misuse answered by an error on every rank (never a hang), and the
//! bucket and partition helpers' properties.

use adafactor::collective::{
    all_reduce_sum_bucketed, buckets, check_same_on_all_ranks, partition_by_bytes, Collective,
    Fingerprint, ThreadCollective, ThreadGroup,
};
use proptest::prelude::*;
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Longest a test waits for its ranks; a rank still running then is a hang, and fails the test.
const HANG: Duration = Duration::from_secs(60);

/// Runs `f` on each rank in its own thread and returns the results by rank; panics (fails the
/// test) if the ranks do not all finish within [`HANG`].
fn run_ranks<T, F>(ranks: Vec<ThreadCollective>, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(ThreadCollective) -> T + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let n = ranks.len();
    let (tx, rx) = mpsc::channel();
    for c in ranks {
        let (f, tx) = (Arc::clone(&f), tx.clone());
        std::thread::spawn(move || {
            let rank = c.rank();
            let out = f(c);
            let _ = tx.send((rank, out));
        });
    }
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let (rank, v) = rx
            .recv_timeout(HANG)
            .unwrap_or_else(|_| panic!("a rank hung (or panicked) for more than {HANG:?}"));
        out[rank] = Some(v);
    }
    out.into_iter()
        .map(|v| v.expect("every rank reports"))
        .collect()
}

/// Deterministic values whose sum depends on the order of addition (large and small magnitudes).
fn contribution(rank: usize, len: usize) -> Vec<f32> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (rank as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1);
    (0..len)
        .map(|i| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let unit = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let scale = [1e-3f32, 1.0, 3e4, 1e8][(i + rank) % 4];
            unit * scale
        })
        .collect()
}

fn rank_order_sum(n: usize, len: usize) -> Vec<f32> {
    let mut sum = contribution(0, len);
    for r in 1..n {
        for (s, x) in sum.iter_mut().zip(contribution(r, len)) {
            *s += x;
        }
    }
    sum
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn f32_sums_are_the_rank_order_sum_on_every_rank() {
    const LEN: usize = 1027;
    for n in 1..=4 {
        let results = run_ranks(ThreadGroup::new(n).unwrap(), |mut c| {
            let mut v = contribution(c.rank(), LEN);
            c.all_reduce_sum_f32(&mut v).map(|()| v)
        });
        let expected = bits(&rank_order_sum(n, LEN));
        for (rank, r) in results.into_iter().enumerate() {
            assert_eq!(bits(&r.unwrap()), expected, "n={n} rank {rank}");
        }
    }
    // The order matters for these values, so the check above can fail: reversed order differs.
    let forward = rank_order_sum(4, LEN);
    let mut backward = contribution(3, LEN);
    for r in (0..3).rev() {
        for (s, x) in backward.iter_mut().zip(contribution(r, LEN)) {
            *s += x;
        }
    }
    assert_ne!(bits(&forward), bits(&backward));
}

#[test]
fn f64_sums_max_and_flags_agree_on_every_rank() {
    for n in 1..=4 {
        let results = run_ranks(ThreadGroup::new(n).unwrap(), |mut c| {
            let r = c.rank();
            let mut f = vec![0.1f64 * (r as f64 + 1.0), -(r as f64), 1e300];
            c.all_reduce_sum_f64(&mut f)?;
            let mut m = vec![r as u64, 10 - r as u64];
            c.all_reduce_max_u64(&mut m)?;
            let any_last = c.any(r + 1 == c.world_size())?;
            let any_none = c.any(false)?;
            let total = c.sum_f64(r as f64 + 0.5)?;
            c.barrier()?;
            adafactor::Result::Ok((f, m, any_last, any_none, total))
        });
        let mut want_f = [0.1f64, -0.0, 1e300];
        for r in 1..n {
            want_f[0] += 0.1 * (r as f64 + 1.0);
            want_f[1] += -(r as f64);
            want_f[2] += 1e300;
        }
        let want_total = (0..n).fold(0.5, |s, r| if r == 0 { s } else { s + r as f64 + 0.5 });
        for r in results {
            let (f, m, any_last, any_none, total) = r.unwrap();
            assert_eq!(
                f.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want_f.map(f64::to_bits)
            );
            assert_eq!(m, vec![n as u64 - 1, 10]);
            assert!(any_last && !any_none);
            assert_eq!(total.to_bits(), want_total.to_bits());
        }
    }
}

#[test]
fn broadcast_and_all_gather_deliver_the_bytes() {
    for n in 1..=4 {
        let results = run_ranks(ThreadGroup::new(n).unwrap(), |mut c| {
            let r = c.rank();
            let mut received = Vec::new();
            for root in 0..c.world_size() {
                let mut b = if r == root {
                    vec![root as u8; 3 + root * 1000]
                } else {
                    vec![9; r]
                };
                c.broadcast_bytes(root, &mut b)?;
                received.push(b);
            }
            let gathered = c.all_gather_bytes(&vec![r as u8 + 1; r * 7])?;
            adafactor::Result::Ok((received, gathered))
        });
        for r in results {
            let (received, gathered) = r.unwrap();
            for (root, b) in received.iter().enumerate() {
                assert_eq!(b, &vec![root as u8; 3 + root * 1000]);
            }
            for (src, b) in gathered.iter().enumerate() {
                assert_eq!(b, &vec![src as u8 + 1; src * 7]);
            }
        }
    }
}

#[test]
fn mismatched_lengths_fail_on_every_rank_naming_them() {
    for n in 2..=4 {
        let results = run_ranks(ThreadGroup::new(n).unwrap(), |mut c| {
            let mut v = vec![1.0f32; if c.rank() == 1 { 5 } else { 4 }];
            let first = c.all_reduce_sum_f32(&mut v);
            // The group is still usable after a mismatch every rank saw.
            let mut w = vec![1.0f32; 2];
            let second = c.all_reduce_sum_f32(&mut w).map(|()| w);
            (first, second)
        });
        for (first, second) in results {
            let msg = first.unwrap_err().to_string();
            assert!(
                msg.contains("4 values") && msg.contains("5 values") && msg.contains("rank 1"),
                "{msg}"
            );
            assert_eq!(second.unwrap(), vec![n as f32; 2]);
        }
    }
}

#[test]
fn different_operations_or_roots_fail_on_every_rank() {
    let results = run_ranks(ThreadGroup::new(3).unwrap(), |mut c| {
        let a = if c.rank() == 2 {
            c.barrier()
        } else {
            c.all_reduce_sum_f64(&mut [1.0])
        };
        let mut b = vec![1u8];
        let root = if c.rank() == 0 { 0 } else { 1 };
        let b = c.broadcast_bytes(root, &mut b);
        let mut d = vec![1u8];
        let d = c.broadcast_bytes(7, &mut d);
        (a, b, d)
    });
    for (a, b, d) in results {
        let a = a.unwrap_err().to_string();
        assert!(
            a.contains("barrier") && a.contains("all_reduce_sum_f64"),
            "{a}"
        );
        let b = b.unwrap_err().to_string();
        assert!(b.contains("root 0") && b.contains("root 1"), "{b}");
        let d = d.unwrap_err().to_string();
        assert!(d.contains("root 7") && d.contains("group of 3"), "{d}");
    }
}

#[test]
fn a_config_mismatch_is_an_error_on_every_rank_naming_the_first_rank_that_differs() {
    for n in 1..=4 {
        let results = run_ranks(ThreadGroup::new(n).unwrap(), move |mut c| {
            let same = {
                let mut f = Fingerprint::new();
                f.add(br#"{"learning_rate": 0.001}"#)
                    .add_variable("w", &[3, 4], "f32");
                f
            };
            let ok = check_same_on_all_ranks(&mut c, "config and variables", same);
            let mut differs = Fingerprint::new();
            differs.add(br#"{"learning_rate": 0.001}"#);
            // Ranks 2 and 3 describe a different shape: rank 2 is the first to differ.
            let shape: &[usize] = if c.rank() >= 2 { &[4, 3] } else { &[3, 4] };
            differs.add_variable("w", shape, "f32");
            let bad = check_same_on_all_ranks(&mut c, "config and variables", differs);
            (ok, bad)
        });
        for (ok, bad) in results {
            ok.unwrap();
            if n <= 2 {
                bad.unwrap();
            } else {
                let msg = bad.unwrap_err().to_string();
                assert!(msg.contains("rank 2 has fingerprint"), "{msg}");
                assert!(msg.contains("config and variables"), "{msg}");
            }
        }
    }
}

#[test]
fn fingerprints_separate_parts_and_variables() {
    let fp = |parts: &[&[u8]]| {
        let mut f = Fingerprint::new();
        parts.iter().for_each(|p| {
            f.add(p);
        });
        f.value()
    };
    assert_ne!(fp(&[b"ab", b"c"]), fp(&[b"a", b"bc"]));
    assert_eq!(fp(&[b"ab", b"c"]), fp(&[b"ab", b"c"]));
    // FNV-1a 64 of nothing is its offset basis; of the 8 zero bytes of an empty part's length:
    assert_eq!(Fingerprint::new().value(), 0xcbf2_9ce4_8422_2325);
    let mut a = Fingerprint::new();
    a.add_variable("w", &[2, 3], "f32");
    let mut b = Fingerprint::new();
    b.add_variable("w", &[2, 3], "bf16");
    let mut c = Fingerprint::new();
    c.add_variable("w", &[3, 2], "f32");
    assert!(a != b && a != c && b != c);
}

#[test]
fn a_rank_that_leaves_fails_the_others_instead_of_hanging() {
    let results = run_ranks(ThreadGroup::new(3).unwrap(), |mut c| {
        if c.rank() == 1 {
            drop(c);
            return Ok(());
        }
        let mut v = [1.0f32; 3];
        c.all_reduce_sum_f32(&mut v)
    });
    for (rank, r) in results.into_iter().enumerate() {
        if rank != 1 {
            let msg = r.unwrap_err().to_string();
            assert!(msg.contains("rank 1 left the group"), "{msg}");
        }
    }
}

#[test]
fn a_rank_that_does_not_come_times_out_on_the_others() {
    let group = ThreadGroup::with_timeout(3, Duration::from_millis(200)).unwrap();
    // Outside the group: rank 2 stays alive (its handle too) until the others have their verdict.
    let verdicts = Arc::new(std::sync::Barrier::new(3));
    let results = run_ranks(group, move |mut c| {
        if c.rank() == 2 {
            verdicts.wait();
            return None;
        }
        let outcome = c.barrier();
        verdicts.wait();
        Some(outcome)
    });
    for r in results.into_iter().take(2) {
        let msg = r.unwrap().unwrap_err().to_string();
        assert!(msg.contains("did not join") && msg.contains("[2]"), "{msg}");
    }
}

#[test]
fn bucketed_sums_equal_per_tensor_sums() {
    let lens = [5usize, 0, 300, 7, 1, 1000, 2];
    for n in 1..=3 {
        let results = run_ranks(ThreadGroup::new(n).unwrap(), move |mut c| {
            let r = c.rank();
            let mut per: Vec<Vec<f32>> = lens.iter().map(|&l| contribution(r + l, l)).collect();
            let mut bucketed = per.clone();
            for v in per.iter_mut() {
                c.all_reduce_sum_f32(v)?;
            }
            let mut views: Vec<&mut [f32]> =
                bucketed.iter_mut().map(|v| v.as_mut_slice()).collect();
            all_reduce_sum_bucketed(&mut c, &mut views, 64 * 4)?;
            adafactor::Result::Ok((per, bucketed))
        });
        for r in results {
            let (per, bucketed) = r.unwrap();
            for (a, b) in per.iter().zip(&bucketed) {
                assert_eq!(bits(a), bits(b));
            }
        }
    }
}

#[test]
fn bucketed_sums_with_different_layouts_fail_on_every_rank() {
    let results = run_ranks(ThreadGroup::new(3).unwrap(), |mut c| {
        // Rank 1 has one gradient more: it would make one all-reduce more than the others.
        let mut grads = vec![vec![1.0f32; 100]; if c.rank() == 1 { 3 } else { 2 }];
        let before = grads.clone();
        let mut views: Vec<&mut [f32]> = grads.iter_mut().map(|v| v.as_mut_slice()).collect();
        let outcome = all_reduce_sum_bucketed(&mut c, &mut views, 400);
        (outcome, grads == before)
    });
    for (outcome, untouched) in results {
        let msg = outcome.unwrap_err().to_string();
        assert!(
            msg.contains("gradient lengths and bucket size") && msg.contains("rank 1"),
            "{msg}"
        );
        assert!(untouched);
    }
}

#[test]
fn zero_sizes_are_errors() {
    assert!(ThreadGroup::new(0)
        .unwrap_err()
        .to_string()
        .contains("got 0"));
    assert!(buckets(&[1], 4, 0).is_err());
    assert!(buckets(&[1], 0, 4).is_err());
    assert!(partition_by_bytes(&[1], 0).is_err());
}

proptest! {
    #[test]
    fn buckets_cover_every_tensor_once_in_order_and_fit(
        lens in proptest::collection::vec(0usize..5000, 0..60),
        bucket_bytes in 1usize..40_000,
    ) {
        let bs = buckets(&lens, 4, bucket_bytes).unwrap();
        let mut next = 0;
        for b in &bs {
            prop_assert_eq!(b.tensors.start, next);
            prop_assert!(b.tensors.end > b.tensors.start);
            next = b.tensors.end;
            let elements: usize = lens[b.tensors.clone()].iter().sum();
            prop_assert_eq!(b.elements, elements);
            // Over the limit only as a single tensor too big for any bucket.
            prop_assert!(elements * 4 <= bucket_bytes || b.tensors.len() == 1);
        }
        prop_assert_eq!(next, lens.len());
        // Greedy: adding the next bucket's first tensor would have overflowed.
        for w in bs.windows(2) {
            prop_assert!((w[0].elements + lens[w[1].tensors.start]) * 4 > bucket_bytes);
        }
        prop_assert_eq!(buckets(&lens, 4, bucket_bytes).unwrap(), bs);
    }

    #[test]
    fn partition_is_deterministic_complete_and_balanced(
        bytes in proptest::collection::vec(0usize..1_000_000, 0..80),
        ranks in 1usize..9,
    ) {
        let owner = partition_by_bytes(&bytes, ranks).unwrap();
        prop_assert_eq!(owner.len(), bytes.len());
        prop_assert!(owner.iter().all(|&r| r < ranks));
        let mut load = vec![0usize; ranks];
        for (i, &r) in owner.iter().enumerate() {
            load[r] += bytes[i];
        }
        let largest = bytes.iter().copied().max().unwrap_or(0);
        let (max, min) = (*load.iter().max().unwrap(), *load.iter().min().unwrap());
        prop_assert!(max - min <= largest, "loads {:?}, largest {}", load, largest);
        prop_assert_eq!(partition_by_bytes(&bytes, ranks).unwrap(), owner);
    }
}

#[test]
fn partition_of_equal_variables_is_round_robin() {
    assert_eq!(
        partition_by_bytes(&[8; 6], 3).unwrap(),
        vec![0, 1, 2, 0, 1, 2]
    );
    assert_eq!(
        partition_by_bytes(&[1, 10, 3, 3], 2).unwrap(),
        vec![1, 0, 1, 1]
    );
}
