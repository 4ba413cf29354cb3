#!/usr/bin/env bash
# Runs the optimizer-step benchmark side by side in one go: our bench (fused and composed paths,
# float32, plus fused bfloat16 and float16 on t5-small) set by set next to the peer
# implementations (bench/peers.py: Keras 3 under XLA and without, optax under jax.jit, torch),
# then t5-small under each configuration of CONFIG_LIST (each against its own ideal), then single
# tensors of awkward shapes; prints summary tables in Markdown.
#
# Usage: bench/run_all.sh            (from anywhere; runs in the repository root)
# Environment:
#   PEERS_PY   Python with the peers installed. Default: target/peers-venv/bin/python, created
#              on first use with the pinned versions below (a few minutes and about 4 GB of
#              downloads, mostly torch; needs python3 with venv and PyPI).
#   PEERS=0    skip the peers (ours only; nothing is installed)
#   PEER_NAMES the peers to run (default "keras-tf keras-tf-nojit optax torch torch-foreach")
#   SETS       the parameter sets, in order (default "t5-small t5-base resnet50 tiny many-small")
#   SHAPES     the single-tensor shapes (default: the list below; SHAPES= for none)
#   OUT_DIR    where raw logs and summary.tsv go (default target/bench-run)
#   ROUNDS     how many times the whole sequence runs (default 2); the summary keeps, for each
#              row, the round with the lowest median (other processes only ever slow a run down)
#   CONFIGS=0  skip the configuration rows (t5-small, fused, float32 and bfloat16, with each
#              CONFIG_LIST entry: Keras config keys over the defaults, each against its own ideal)
#   QUICK=1    fewer steps and one round (a smoke run of the script itself)
# Needs /usr/bin/time (Debian package `time`) for the peers' peak RSS.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-target/bench-run}
mkdir -p "$OUT_DIR"
TSV="$OUT_DIR/summary.tsv"
TIME=/usr/bin/time
SETS=${SETS:-t5-small t5-base resnet50 tiny many-small}
SHAPES=${SHAPES-4096x4096 16x16x256x256 64x262144 16777216 4194304x4 1048576x4x4 16777216x1 1x16777216 4x4194304}
PEERS=${PEERS:-1}
PEER_NAMES=${PEER_NAMES:-keras-tf keras-tf-nojit optax torch torch-foreach}
CONFIGS=${CONFIGS:-1}
# Each configuration alone, then all together (Keras allows one of clipnorm, global_clipnorm and
# clipvalue); stochastic rounding (ours) changes nothing for float32 weights and is measured on
# the bfloat16 row.
CONFIG_LIST=(
    '{"clipnorm": 1.0}'
    '{"global_clipnorm": 1.0}'
    '{"clipvalue": 0.01}'
    '{"loss_scale_factor": 128.0}'
    '{"weight_decay": 0.01}'
    '{"use_ema": true}'
    '{"use_ema": true, "ema_overwrite_frequency": 1}'
    '{"gradient_accumulation_steps": 2}'
    '{"weight_rounding": "stochastic"}'
    '{"global_clipnorm": 1.0, "loss_scale_factor": 128.0, "weight_decay": 0.01, "use_ema": true, "ema_overwrite_frequency": 1, "gradient_accumulation_steps": 2}'
)
# The versions BENCHMARKS.md was measured with.
PEER_PACKAGES="tensorflow-cpu==2.21.0 keras==3.15.1 jax==0.10.2 jaxlib==0.10.2 optax==0.2.8 torch==2.15.0"

if [[ ! -x $TIME ]]; then
    echo "run_all.sh: $TIME is missing (apt-get install time)" >&2
    exit 1
fi

if [[ $PEERS == 1 && -z ${PEERS_PY:-} ]]; then
    PEERS_PY=target/peers-venv/bin/python
    if [[ ! -x $PEERS_PY ]] || ! "$PEERS_PY" -c 'import keras, optax, torch' 2>/dev/null; then
        echo "== creating the peers' Python environment in target/peers-venv"
        echo "   ($PEER_PACKAGES; a few minutes, about 4 GB of downloads; PEERS=0 skips the peers)"
        start=$(date +%s)
        python3 -m venv target/peers-venv
        target/peers-venv/bin/pip install --quiet --disable-pip-version-check $PEER_PACKAGES
        echo "   done in $(($(date +%s) - start)) s"
    fi
fi

if [[ ${QUICK:-0} == 1 ]]; then
    ROUNDS=${ROUNDS:-1}
    LARGE_STEPS=3; TINY_STEPS=5; PEER_LARGE_STEPS=3; PEER_TINY_STEPS=5
else
    ROUNDS=${ROUNDS:-2}
    LARGE_STEPS=20; TINY_STEPS=50; PEER_LARGE_STEPS=20; PEER_TINY_STEPS=50
fi

echo "== machine"
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "nproc: $(nproc)"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "memory: $(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
echo "rustc: $(rustc --version)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
[[ $PEERS == 1 ]] && "$PEERS_PY" -c 'import tensorflow as tf, keras, jax, optax, torch; print("peers: tensorflow", tf.__version__, "keras", keras.__version__, "jax", jax.__version__, "optax", optax.__version__, "torch", torch.__version__)' 2>/dev/null || true

echo "== build"
cargo build --release --example bench -p candle-adafactor
BENCH=target/release/examples/bench

printf 'impl\tset\tdtype\tparams\ttensors\tmedian_ms\tmin_ms\ttriad_gbps\tpeak_rss_mib\tideal_ms\tnote\n' >"$TSV"

# ours SET PATH DTYPE STEPS WARMUP [--shape | --set] [CONFIG_JSON] [EXTRA_OPTIONS]
ours() {
    local set=$1 path=$2 dtype=$3 steps=$4 warmup=$5 flag=${6:---set} config=${7:-} extra=${8:-}
    local label="" tag=""
    if [[ -n $config$extra ]]; then
        label="$set${config:+ $config}${extra:+ $extra}"
        tag="-$(printf '%s%s' "$config" "$extra" | cksum | cut -d' ' -f1)"
    fi
    local log="$OUT_DIR/ours-$set$tag-$path-$dtype-r$round.log"
    echo "== ours: $flag $set --path $path --dtype $dtype --steps $steps --warmup $warmup${config:+ --config '$config'}${extra:+ $extra}"
    # shellcheck disable=SC2086 # EXTRA_OPTIONS are words
    if ! "$BENCH" "$flag" "$set" --path "$path" --dtype "$dtype" --steps "$steps" \
        --warmup "$warmup" --triad-mib 64 ${config:+--config "$config"} $extra >"$log" 2>&1; then
        cat "$log"
        printf 'ours-%s\t%s\t%s\t-\t-\t-\t-\t-\t-\t-\tfailed (see %s)\n' "$path" "${label:-$set}" "$dtype" "$log" >>"$TSV"
        return
    fi
    cat "$log"
    local last note=""
    last=$(grep '^bench ' "$log" | tail -1)
    if [[ $path == fused ]] && grep -q '^data_path=Composed' "$log"; then
        note="ran composed ops"
    fi
    awk -v impl="ours-$path" -v note="$note" -v label="$label" '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        name = label != "" ? label : f["set"]
        printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", impl, name, f["dtype"], f["params"],
            f["tensors"], f["median_ms"], f["min_ms"], f["triad_gbps"], f["peak_rss_mib"],
            f["ideal_ms"], note
    }' <<<"$last" >>"$TSV"
}

# peer NAME SET STEPS
peer() {
    local name=$1 ourset=$2 steps=$3
    local set=${ourset//-/}
    local log="$OUT_DIR/peer-$name-$set-r$round.log"
    echo "== peer: $name --set $set --steps $steps"
    if [[ $PEERS != 1 ]] || ! $TIME -f 'maxrss_kb=%M' "$PEERS_PY" bench/peers.py "$name" \
        --set "$set" --steps "$steps" >"$log" 2>&1; then
        tail -3 "$log" 2>/dev/null || true
        printf '%s\t%s\tf32\t-\t-\t-\t-\t-\t-\t-\tnot run (peer skipped or failed)\n' "$name" "$ourset" >>"$TSV"
        return
    fi
    local line rss
    line=$(grep -P "^\Q$name\E\t" "$log" | tail -1)
    rss=$(sed -n 's/^maxrss_kb=//p' "$log" | tail -1)
    echo "$line"
    awk -F'\t' -v set="$ourset" -v rss="$rss" '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        printf "%s\t%s\tf32\t%s\t-\t%s\t%s\t-\t%.1f\t-\t\n", $1, set, f["params"], f["median_ms"],
            f["min_ms"], rss / 1024
    }' <<<"$line" >>"$TSV"
}

for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round of $ROUNDS (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    # Set by set, ours next to the peers, so that both see the same machine.
    for set in $SETS; do
        steps=$LARGE_STEPS; peer_steps=$PEER_LARGE_STEPS; warmup=3
        [[ $set == tiny ]] && { steps=$TINY_STEPS; peer_steps=$PEER_TINY_STEPS; warmup=5; }
        [[ $set == many-small || $set == t5-base ]] && steps=$((steps / 2))
        ours "$set" fused f32 "$steps" "$warmup"
        if [[ $set == resnet50 ]]; then
            # Convolutions factored over (in, out), as Keras factors them in its own layout.
            ours "$set" fused f32 "$steps" "$warmup" --set "" "--factor-convolutions on"
        fi
        ours "$set" composed f32 "$(((steps + 1) / 2))" 2
        if [[ $set == t5-small || $set == t5-base ]]; then
            ours "$set" fused bf16 "$steps" "$warmup"
            ours "$set" fused f16 "$steps" "$warmup"
        fi
        [[ $set == many-small ]] && continue
        for name in $PEER_NAMES; do
            peer "$name" "$set" "$peer_steps"
        done
    done
    if [[ $CONFIGS == 1 ]]; then
        for config in "${CONFIG_LIST[@]}"; do
            for dtype in f32 bf16; do
                ours t5-small fused "$dtype" "$LARGE_STEPS" 3 --set "$config"
            done
        done
    fi
    for shape in $SHAPES; do
        ours "$shape" fused f32 "$((LARGE_STEPS / 2))" 2 --shape
        ours "$shape" composed f32 "$((LARGE_STEPS / 4 + 1))" 1 --shape
    done
done

echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

# Summary: for each row the round with the lowest median. "vs fused" = median / our fused
# float32 median on the same set; "vs ideal" = median / the roofline kernel's median for that
# configuration (bench/ideal.rs: the bytes the configuration must move, same call sequence).
echo
echo "== summary (raw rows: $TSV)"
awk -F'\t' '
    NR == 1 { next }
    {
        if ($8 != "-" && $8 + 0 > best) best = $8 + 0
        if ($8 != "-" && (worst == 0 || $8 + 0 < worst)) worst = $8 + 0
        key = $1 SUBSEP $2 SUBSEP $3
        if (!(key in row)) { order[++n] = key; row[key] = $0; next }
        split(row[key], old, "\t")
        if ($6 != "-" && (old[6] == "-" || $6 + 0 < old[6] + 0)) row[key] = $0
    }
    END {
        printf "triad bandwidth: best %.2f GB/s, worst %.2f GB/s over the runs ", best, worst
        printf "(3 x 64 MiB float32 arrays, 12 bytes/element)\n\n"
        for (k = 1; k <= n; k++) {
            split(row[order[k]], c, "\t")
            if (c[1] == "ours-fused" && c[3] == "f32" && c[6] != "-") fused[c[2]] = c[6] + 0
        }
        printf "| impl | set or shape | dtype | median ms | min ms | vs fused | ideal ms | vs ideal | peak RSS MiB | note |\n"
        printf "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n"
        for (k = 1; k <= n; k++) {
            split(row[order[k]], c, "\t")
            ratio = "-"; vsideal = "-"
            if (c[6] != "-" && (c[2] in fused) && fused[c[2]] > 0)
                ratio = sprintf("%.2fx", c[6] / fused[c[2]])
            if (c[6] != "-" && c[10] != "-" && c[10] + 0 > 0)
                vsideal = sprintf("%.2fx", c[6] / c[10])
            printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", c[1], c[2], c[3], c[6],
                c[7], ratio, c[10], vsideal, c[9], c[11]
        }
    }' "$TSV"
