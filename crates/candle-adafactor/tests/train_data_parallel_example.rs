//! Tests of the `train_data_parallel` example (`examples/train_data_parallel.rs`, and through
//! the same code the MPI crate's `train_mpi`), on its own code with a tiny GPT on threads: ranks
//! agree, both modes agree, one rank is the single-process run, and the `result` line.

#[allow(dead_code)]
#[path = "../examples/train/data.rs"]
mod data;
#[allow(dead_code)]
#[path = "../examples/train/data_parallel.rs"]
mod data_parallel;
#[allow(dead_code)]
#[path = "../examples/train/model.rs"]
mod model;
#[allow(dead_code)]
#[path = "../examples/common/options.rs"]
mod options;
#[allow(dead_code)]
#[path = "../examples/common/rng.rs"]
mod rng;
#[allow(dead_code)]
#[path = "../examples/train/training.rs"]
mod training;

use adafactor::collective::ThreadGroup;
use candle_adafactor::Mode;
use data::corpus::CORPUS;
use data::Corpus;
use data_parallel::{train_rank, RankResult};
use training::{train_run, RunSpec, TrainConfig, PRESETS};

fn small_corpus() -> Corpus {
    Corpus::from_text(&CORPUS[..40_000]).expect("the corpus splits")
}

fn spec(name: &str) -> RunSpec {
    RunSpec::parse(name, &PRESETS).expect("a preset name parses")
}

/// Every rank's result of a run on `ranks` threads.
fn run_ranks(
    corpus: &Corpus,
    spec: &RunSpec,
    cfg: &TrainConfig,
    ranks: usize,
    mode: Mode,
) -> candle_core::Result<Vec<RankResult>> {
    let comms = ThreadGroup::new(ranks).map_err(candle_core::Error::wrap)?;
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || train_rank(corpus, spec, cfg, Box::new(comm), mode, &mut |_| {}))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no rank panics"))
            .collect()
    })
}

#[test]
fn ranks_and_modes_end_on_the_same_weights_and_sharding_splits_the_state() {
    let corpus = small_corpus();
    let cfg = TrainConfig::tiny(corpus.tokenizer.vocab_size(), 8);
    let spec = spec("adafactor");
    let replicated = run_ranks(&corpus, &spec, &cfg, 2, Mode::Replicated).expect("trains");
    let sharded = run_ranks(&corpus, &spec, &cfg, 2, Mode::Sharded).expect("trains");
    let first = replicated[0].run.val_loss;
    assert!(first.is_finite() && first < replicated[0].run.val_curve[0].1);
    for r in replicated.iter().chain(&sharded) {
        assert_eq!(r.run.val_loss.to_bits(), first.to_bits(), "rank {}", r.rank);
        assert_eq!(r.run.sample, replicated[0].run.sample, "rank {}", r.rank);
        assert_eq!(r.ranks, 2);
    }
    // Each rank trains on its own half of every batch.
    assert_ne!(
        replicated[0].run.train_loss.to_bits(),
        replicated[1].run.train_loss.to_bits()
    );
    let whole = replicated[0].run.state_bytes;
    let most = sharded.iter().map(|r| r.run.state_bytes).max().unwrap_or(0);
    assert!(most < whole, "sharded {most} vs replicated {whole}");
    let line = sharded[0].result_line(whole, most);
    assert!(
        line.starts_with("result optimizer=adafactor val_loss="),
        "{line}"
    );
    assert!(
        line.ends_with(&format!(
            " state_bytes={whole} params={} tokens_per_s={:.0} seconds={:.2} ranks=2 \
             mode=sharded state_bytes_per_rank={most}",
            sharded[0].run.params, sharded[0].run.tokens_per_s, sharded[0].run.seconds
        )),
        "{line}"
    );
}

#[test]
fn one_rank_is_the_single_process_run_bit_for_bit() {
    let corpus = small_corpus();
    let cfg = TrainConfig::tiny(corpus.tokenizer.vocab_size(), 8);
    let spec = spec("adafactor");
    let alone = train_run(&corpus, &spec, &cfg, &mut |_| {}).expect("trains");
    for mode in [Mode::Replicated, Mode::Sharded] {
        let one = run_ranks(&corpus, &spec, &cfg, 1, mode).expect("trains");
        assert_eq!(one[0].run.val_curve, alone.val_curve, "{}", mode.name());
        assert_eq!(one[0].run.train_curve, alone.train_curve, "{}", mode.name());
        assert_eq!(one[0].run.state_bytes, alone.state_bytes);
    }
}

#[test]
fn adamw_and_more_ranks_than_sequences_are_errors_that_say_so() {
    let corpus = small_corpus();
    let cfg = TrainConfig::tiny(corpus.tokenizer.vocab_size(), 8);
    let err = run_ranks(&corpus, &spec("adamw"), &cfg, 1, Mode::Replicated)
        .expect_err("AdamW is not data-parallel here");
    assert!(
        err.to_string().contains("`adamw` is not an Adafactor run"),
        "{err}"
    );
    let small = TrainConfig {
        batch_size: 2,
        ..cfg
    };
    let err = run_ranks(&corpus, &spec("adafactor"), &small, 3, Mode::Replicated)
        .expect_err("3 ranks cannot share 2 sequences");
    assert!(err.to_string().contains("batch of 2 sequences"), "{err}");
}
