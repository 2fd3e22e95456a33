#!/usr/bin/env bash
# Issue 9's measurements on one GPU machine, in a few commands that each end well inside 10 minutes.
#
# Written for a machine without internet whose python3 already has a CUDA build of torch (the device tool's image:
# torch 2.11 + cu130, lightning, transformers). The packages it lacks travel as wheels in .whl/ (made here with
# benchmarks/gpu_wheels.sh) and are installed into /tmp/site; the repository itself is put on PYTHONPATH, so
# nothing is pip-installed into the image. Every part writes its log (and CSVs) under $OUT (default: gpu-out/).
#
#   bash benchmarks/gpu_session.sh check tests generate   # ~5 min: environment, `pytest -m cuda`, decode speed
#   bash benchmarks/gpu_session.sh train                  # ~6 min: gpu_train_throughput.py, every variant
#   bash benchmarks/gpu_session.sh stability              # ~9 min: small recipe, bf16-mixed, shapes world, spikes
#
# Parts: check | tests | train | train-ckpt | generate | stability | fsdp. Environment knobs: STEPS (stability,
# default 3000), MAX_TIME (stability and fsdp wall-clock cap, default 00:00:07:00), SCENES (default 2500), PYTHON
# (default python3).
set -uo pipefail

OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
CLI=("$PY" -m chameleon_lite.cli)

run() {  # run NAME CMD...: tee the output to $OUT/NAME.log, report the exit status, keep going
    local name=$1
    shift
    echo "=== $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    return 0
}

make_tokens() {  # a shapes world of $SCENES training scenes, tokenized with the shipped bundle, under /tmp
    local scenes=${SCENES:-2500}
    [ -d /tmp/gpu-data/tokens/val ] && return 0
    "${CLI[@]}" data shapes --out /tmp/gpu-data/shapes --train "$scenes" --val 200 --test 100 &&
        "${CLI[@]}" tokenize --tokenizer tokenizers/shapes-64 --shards "/tmp/gpu-data/shapes/train/*.tar" \
            --out /tmp/gpu-data/tokens/train --num-workers 8 &&
        "${CLI[@]}" tokenize --tokenizer tokenizers/shapes-64 --shards "/tmp/gpu-data/shapes/val/*.tar" \
            --out /tmp/gpu-data/tokens/val --num-workers 8
}

fit_small() {  # fit_small RECIPE ROOT: the recipe on /tmp/gpu-data, every step logged, capped by MAX_TIME
    local recipe=$1 root=$2
    "${CLI[@]}" fit --config "$recipe" \
        --data.init_args.train_tokens /tmp/gpu-data/tokens/train --data.init_args.val_tokens /tmp/gpu-data/tokens/val \
        --trainer.max_steps "${STEPS:-3000}" --trainer.max_time "${MAX_TIME:-00:00:07:00}" \
        --trainer.log_every_n_steps 1 --trainer.enable_progress_bar false
    local rc=$? csv
    csv=$(ls -t "$root"/logs/version_*/metrics.csv 2>/dev/null | head -1)
    if [ -n "$csv" ]; then
        cp "$csv" "$OUT/$(basename "$root")-metrics.csv"
        "${CLI[0]}" -m chameleon_lite.training.perf spikes "$csv"
    fi
    return $rc
}

for part in "$@"; do
    case $part in
    check)
        run check bash -c 'nvidia-smi; "$0" -c "
import torch, lightning, chameleon_lite
from chameleon_lite.model.attention import flex_attention_available, xformers_available
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))
print(\"lightning\", lightning.__version__, \"| flex\", flex_attention_available(), \"| xformers\", xformers_available())
"' "$PY" ;;
    tests) run tests "$PY" -m pytest -m cuda -q -s -p no:cacheprovider tests/test_cuda.py tests/test_model.py ;;
    train) run train "$PY" benchmarks/gpu_train_throughput.py ;;
    train-ckpt) run train-ckpt "$PY" benchmarks/gpu_train_throughput.py --gradient-checkpointing \
        --variants compile-sdpa-masks compile-flex-masks ;;
    generate) run generate "$PY" benchmarks/gpu_generation.py --compile --vs-transformers ;;
    stability) run stability bash -c "$(declare -f make_tokens fit_small); CLI=(${CLI[*]}); OUT='$OUT';
        make_tokens && fit_small configs/native/small.yaml runs/native-small" ;;
    fsdp) run fsdp bash -c "$(declare -f make_tokens fit_small); CLI=(${CLI[*]}); OUT='$OUT'; STEPS=${STEPS:-200};
        make_tokens && fit_small configs/native/small-fsdp.yaml runs/native-small-fsdp" ;;
    *) echo "unknown part '$part' (check | tests | train | train-ckpt | generate | stability | fsdp)"; exit 2 ;;
    esac
done
