#!/usr/bin/env bash
# Runs the optimizer-step benchmark side by side in one go: our bench (fused and composed paths,
# float32, plus fused bfloat16 and float16 on t5-small) on the sets t5-small, tiny and many-small,
# set by set next to the peer implementations (bench/peers.py, on t5small and tiny); prints a
# summary table in Markdown.
#
# Usage: bench/run_all.sh            (from anywhere; runs in the repository root)
# Environment:
#   PEERS_PY   Python with the peers installed (default /work/venv-peers/bin/python); set up with
#              python3 -m venv /work/venv-peers && /work/venv-peers/bin/pip install \
#                tensorflow-cpu==2.21.0 keras==3.15.1 jax optax torch
#   OUT_DIR    where raw logs and summary.tsv go (default target/bench-run)
#   ROUNDS     how many times the whole sequence runs (default 2); the summary keeps, for each
#              row, the round with the lowest median (other processes only ever slow a run down)
#   QUICK=1    fewer steps and one round (a smoke run of the script itself)
# Needs /usr/bin/time (Debian package `time`) for peak RSS.
set -euo pipefail

cd "$(dirname "$0")/.."
PEERS_PY=${PEERS_PY:-/work/venv-peers/bin/python}
OUT_DIR=${OUT_DIR:-target/bench-run}
mkdir -p "$OUT_DIR"
TSV="$OUT_DIR/summary.tsv"
TIME=/usr/bin/time
if [[ ! -x $TIME ]]; then
    echo "run_all.sh: $TIME is missing (apt-get install time)" >&2
    exit 1
fi

if [[ ${QUICK:-0} == 1 ]]; then
    T5_STEPS=3; TINY_STEPS=5; MANY_STEPS=2; PEER_T5_STEPS=3; PEER_TINY_STEPS=5
    ROUNDS=${ROUNDS:-1}
else
    ROUNDS=${ROUNDS:-2}
    T5_STEPS=20; TINY_STEPS=50; MANY_STEPS=10; PEER_T5_STEPS=20; PEER_TINY_STEPS=50
fi

echo "== machine"
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "nproc: $(nproc)"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "memory: $(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
echo "rustc: $(rustc --version)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

echo "== build"
cargo build --release --example bench -p candle-adafactor
BENCH=target/release/examples/bench

printf 'impl\tset\tdtype\tparams\ttensors\tmedian_ms\tmin_ms\ttriad_gbps\tpeak_rss_mib\tnote\n' >"$TSV"

# ours SET PATH DTYPE STEPS WARMUP
ours() {
    local set=$1 path=$2 dtype=$3 steps=$4 warmup=$5
    local log="$OUT_DIR/ours-$set-$path-$dtype-r$round.log"
    echo "== ours: --set $set --path $path --dtype $dtype --steps $steps --warmup $warmup"
    if ! $TIME -f 'maxrss_kb=%M' "$BENCH" --set "$set" --path "$path" --dtype "$dtype" \
        --steps "$steps" --warmup "$warmup" >"$log" 2>&1; then
        cat "$log"
        printf 'ours-%s\t%s\t%s\t-\t-\t-\t-\t-\t-\tfailed (see %s)\n' "$path" "$set" "$dtype" "$log" >>"$TSV"
        return
    fi
    grep -v '^maxrss_kb=' "$log"
    local last note="" rss
    last=$(grep '^bench ' "$log" | tail -1)
    rss=$(sed -n 's/^maxrss_kb=//p' "$log" | tail -1)
    if [[ $path == fused ]] && grep -q '^data_path=Composed' "$log"; then
        note="pending: fused kernels not landed (ran composed ops)"
    fi
    awk -v impl="ours-$path" -v rss="$rss" -v note="$note" '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.1f\t%s\n", impl, f["set"], f["dtype"], f["params"],
            f["tensors"], f["median_ms"], f["min_ms"], f["triad_gbps"], rss / 1024, note
    }' <<<"$last" >>"$TSV"
}

# peer NAME SET STEPS
peer() {
    local name=$1 set=$2 steps=$3
    local log="$OUT_DIR/peer-$name-$set-r$round.log" ourset=$2
    [[ $set == t5small ]] && ourset=t5-small
    echo "== peer: $name --set $set --steps $steps"
    if [[ ! -x $PEERS_PY ]] || ! $TIME -f 'maxrss_kb=%M' "$PEERS_PY" bench/peers.py "$name" \
        --set "$set" --steps "$steps" >"$log" 2>&1; then
        tail -3 "$log" 2>/dev/null || true
        printf '%s\t%s\tf32\t-\t-\t-\t-\t-\t-\tnot run (peer missing or failed)\n' "$name" "$ourset" >>"$TSV"
        return
    fi
    local line rss
    line=$(grep -P "^\Q$name\E\t" "$log" | tail -1)
    rss=$(sed -n 's/^maxrss_kb=//p' "$log" | tail -1)
    echo "$line"
    awk -F'\t' -v set="$ourset" -v rss="$rss" '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        printf "%s\t%s\tf32\t%s\t-\t%s\t%s\t-\t%.1f\t\n", $1, set, f["params"], f["median_ms"],
            f["min_ms"], rss / 1024
    }' <<<"$line" >>"$TSV"
}

for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round of $ROUNDS (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    # Set by set, ours next to the peers, so that both see the same machine.
    ours t5-small fused f32 "$T5_STEPS" 3
    ours t5-small composed f32 "$((T5_STEPS / 2))" 2
    ours t5-small fused bf16 "$T5_STEPS" 3
    ours t5-small fused f16 "$T5_STEPS" 3
    for name in keras-tf keras-tf-nojit optax torch torch-foreach; do
        peer "$name" t5small "$PEER_T5_STEPS"
    done
    ours tiny fused f32 "$TINY_STEPS" 5
    ours tiny composed f32 "$TINY_STEPS" 5
    for name in keras-tf keras-tf-nojit optax torch torch-foreach; do
        peer "$name" tiny "$PEER_TINY_STEPS"
    done
    ours many-small fused f32 "$MANY_STEPS" 2
    ours many-small composed f32 "$MANY_STEPS" 2
done

echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

# Summary: for each row the round with the lowest median; every floor uses the best triad
# bandwidth of the whole run (noise only lowers a triad measurement) and 24 bytes per parameter;
# floor/median = floor_ms / median_ms; "vs fused" = median / ours-fused float32 median, same set.
echo
echo "== summary (raw rows: $TSV)"
awk -F'\t' '
    NR == 1 { next }
    {
        if ($8 != "-" && $8 + 0 > best) best = $8 + 0
        if ($8 != "-" && (worst == 0 || $8 + 0 < worst)) worst = $8 + 0
        if ($4 != "-") params[$2] = $4
        key = $1 SUBSEP $2 SUBSEP $3
        if (!(key in row)) { order[++n] = key; row[key] = $0; next }
        split(row[key], old, "\t")
        if ($6 != "-" && (old[6] == "-" || $6 + 0 < old[6] + 0)) row[key] = $0
    }
    END {
        printf "triad bandwidth: best %.2f GB/s, worst %.2f GB/s over the runs ", best, worst
        printf "(3 x 256 MiB float32 arrays, 12 bytes/element)\n\n"
        for (k = 1; k <= n; k++) {
            split(row[order[k]], c, "\t")
            if (c[1] == "ours-fused" && c[3] == "f32" && c[6] != "-") fused[c[2]] = c[6] + 0
        }
        printf "| impl | set | dtype | median ms | min ms | vs fused | floor ms | floor/median | peak RSS MiB | note |\n"
        printf "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n"
        for (k = 1; k <= n; k++) {
            split(row[order[k]], c, "\t")
            floor = "-"; frac = "-"; ratio = "-"
            if (best > 0 && (c[2] in params)) {
                fl = 24 * params[c[2]] / (best * 1e9) * 1e3; floor = sprintf("%.2f", fl)
                if (c[6] != "-" && c[6] + 0 > 0) frac = sprintf("%.2f", fl / c[6])
            }
            if (c[6] != "-" && (c[2] in fused) && fused[c[2]] > 0)
                ratio = sprintf("%.2fx", c[6] / fused[c[2]])
            printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", c[1], c[2], c[3], c[6],
                c[7], ratio, floor, frac, c[9], c[10]
        }
    }' "$TSV"
