#!/usr/bin/env bash
# Fashion-MNIST end to end (issue 17), the run recorded in docs/fashion-mnist/: data, tokenizer, tokens, comparison.
# Needs Debian's offline copy of the data set: apt-get install dataset-fashion-mnist (31 MB, no download at run time).
# Run from the repository root: bash benchmarks/fashion_mnist.sh [TRAIN_IMAGES] [TEST_IMAGES]
# Measured on a 2-core CPU beside other jobs: tokenizer 12.8 min, tokens 6.5 min, comparison 17.1 min.
set -euo pipefail
TRAIN=${1:-20000}
TEST=${2:-2000}
SRC=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
if [ ! -d "$SRC" ]; then
  echo "no Fashion-MNIST in $SRC: apt-get install dataset-fashion-mnist (or set FASHION_MNIST=DIR)" >&2
  exit 1
fi
chameleon-lite data fashion-mnist --src "$SRC" --out runs/fmnist-folder --train "$TRAIN" --test "$TEST"
chameleon-lite data import --images runs/fmnist-folder --captions runs/fmnist-folder/captions.jsonl \
  --qa runs/fmnist-folder/qa.jsonl --test 0 --out data/fmnist
time chameleon-lite fit --config configs/tokenizer/fashion-32.yaml
for split in train val; do
  chameleon-lite tokenize --tokenizer runs/tokenizers/fashion-32 --shards "data/fmnist/$split/*.tar" \
    --out "data/fmnist-tokens/$split"
done
time chameleon-lite compare --config configs/compare/fashion.yaml --out runs/compare-fashion
