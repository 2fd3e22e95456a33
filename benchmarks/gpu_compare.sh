#!/usr/bin/env bash
# Issue 21 on one GPU machine: the demo's comparison (configs/compare/gpu.yaml) with a budget many times the CPU
# demo's. Written for the device tool's machine (python3 with a CUDA torch, no internet; the packages it lacks
# travel as wheels in .whl/, made here with benchmarks/gpu_wheels.sh, and the repository goes on PYTHONPATH).
#
#   bash benchmarks/gpu_compare.sh data probe        # world + tokens on the CPU cores, then one seed at PROBE samples
#   SAMPLES=2000000 SEEDS='[0,1,2]' bash benchmarks/gpu_compare.sh full      # the comparison itself
#   bash benchmarks/gpu_compare.sh data probe full   # everything in one command
#
# Parts:
#   data   the demo world (chameleon-lite data shapes --demo-world) with SCENES training scenes (default 6000),
#          500 validation and 1000 test scenes, generated and pre-tokenized with every CPU core, under WORK
#   probe  configs/compare/gpu.yaml with one seed at PROBE samples per arm (default 100000, the CPU demo's budget),
#          full evaluation: checks the whole pipeline on CUDA and measures each arm's samples/s and the evaluation's
#          seconds; prints the largest budget for SEEDS that fits FIT_SECONDS (default 330) of training and
#          evaluation
#   full   configs/compare/gpu.yaml at SAMPLES per arm (default: the probe's suggestion if a probe ran, else the
#          config's train_samples) and SEEDS (default [0,1,2])
# Measured on one H200 (2026-11-30, docs/gpu-compare/README.md): data 112 s for 6,000 scenes (24,000 took 285 s:
# pre-tokenizing is bound by its main process), `full` at 400,000 samples and one seed 133 s.
# What comes back under $OUT (at most 8 files): session.log (every part's output), probe-report.md,
# probe-metrics.json, and the full run's report.md, metrics.json and plots.
set -uo pipefail

OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
WORK="${WORK:-/tmp/gpu-compare}"
LOG="$OUT/session.log"

if compgen -G ".whl/*.whl" >/dev/null && [ ! -d /tmp/site/omegaconf ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
fi
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" || export PYTHONPATH="$PWD"
CLI=("$PY" -m chameleon_lite.cli)
DATA=(--set "data.raw=$WORK/data" --set "data.tokens=$WORK/tokens")
WORKERS="${WORKERS:-$(nproc)}"
CONFIG="${CONFIG:-configs/compare/gpu.yaml}"   # a CPU rehearsal points this at a copy with accelerator=cpu

run() {  # run NAME CMD...: append the output to session.log, report the exit status and seconds
    local name=$1 start=$SECONDS
    shift
    echo "=== $name: $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    return "$rc"
}

data() {
    "${CLI[@]}" data shapes --demo-world --out "$WORK/data" --train "${SCENES:-6000}" --val 500 --test 1000 \
        --num-workers "$WORKERS" &&
    for split in train val; do
        "${CLI[@]}" tokenize --tokenizer tokenizers/shapes-32 --shards "$WORK/data/$split/*.tar" \
            --out "$WORK/tokens/$split" --num-workers "$WORKERS" --batch-size 4096 || return 1
    done
}

rates() {  # from the probe's metrics.json: seconds per sample of each arm, evaluation seconds, suggested budget
    "$PY" - "$WORK/probe/metrics.json" "${FIT_SECONDS:-330}" "${SEEDS:-[0,1,2]}" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
fit, seeds = float(sys.argv[2]), json.loads(sys.argv[3])
runs = {arm: m["arms"][arm]["per_seed"][0]["training"] for arm in ("native", "baseline")}
samples = m["budget"]["train_samples"]
train = {arm: t["seconds"] for arm, t in runs.items()}
evaluation = m["seconds"] - sum(train.values())
enc = runs["baseline"]["stages"]["encoder"]["seconds"]
per_sample = (train["native"] + train["baseline"] - enc) / samples   # setup included: an upper bound
print(f"probe: {samples} samples/arm; native {train['native']:.1f} s, baseline {train['baseline']:.1f} s "
      f"(encoder {enc:.1f} s), evaluation + report {evaluation:.1f} s, total {m['seconds']:.1f} s")
for arm in ("native", "baseline"):
    acc = m["arms"][arm]["per_seed"][0]["qa"]["overall"]["accuracy"]
    print(f"  {arm}: QA {100 * acc:.1f} %, {runs[arm]['samples_per_s']:.0f} samples/s, {runs[arm]['tokens_per_s']:.0f} tokens/s")
t2i = m["arms"]["native"]["per_seed"][0].get("text_to_image", {}).get("all_correct", {}).get("mean")
print(f"  native text->image all correct: {t2i}")
budget = (fit / len(seeds) - evaluation - enc) / per_sample
print(f"SUGGESTED_SAMPLES={int(max(budget, samples, 100000) // 100000 * 100000)}  (seeds {seeds}, {fit:.0f} s)")
EOF
}

for part in "$@"; do
    case $part in
    data) run data data || exit 1 ;;
    probe)
        rm -rf "$WORK/probe"
        run probe "${CLI[@]}" compare --config "$CONFIG" --out "$WORK/probe" "${DATA[@]}" \
            --set "train_samples=${PROBE:-100000}" --set "seeds=[0]" --no-progress || exit 1
        cp "$WORK/probe/report.md" "$OUT/probe-report.md"
        cp "$WORK/probe/metrics.json" "$OUT/probe-metrics.json"
        run rates rates ;;
    full)
        budget=()  # SAMPLES, else the probe's suggestion when a probe ran, else the config's train_samples
        samples="${SAMPLES:-}"
        [ -z "$samples" ] && [ -f "$WORK/probe/metrics.json" ] &&
            samples="$(rates | sed -n 's/^SUGGESTED_SAMPLES=\([0-9]*\).*/\1/p')"
        [ -n "$samples" ] && budget=(--set "train_samples=$samples")
        rm -rf "$WORK/full"
        run full "${CLI[@]}" compare --config "$CONFIG" --out "$WORK/full" "${DATA[@]}" "${budget[@]}" \
            --set "seeds=${SEEDS:-[0,1,2]}" --no-progress
        for f in report.md metrics.json accuracy_per_category.png generated_images.png loss_curves.png; do
            cp "$WORK/full/$f" "$OUT/" 2>/dev/null
        done ;;
    *) echo "unknown part '$part' (data | probe | full)"; exit 2 ;;
    esac
done
