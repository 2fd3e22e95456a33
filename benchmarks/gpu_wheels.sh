#!/usr/bin/env bash
# Download, into .whl/ at the repo root, the wheels a GPU machine without internet needs on top of its own image
# to run `import chameleon_lite`, `pytest -m cuda` (tests/test_cuda.py), benchmarks/gpu_train_throughput.py,
# benchmarks/gpu_generation.py and `chameleon-lite fit` (LightningCLI, which needs jsonargparse[signatures]).
#
# The GPU image (CPython 3.12.3, x86-64 manylinux) already has torch 2.11.0+cu130, triton 3.6.0, lightning /
# pytorch-lightning 2.6.6, transformers 5.17.0, einops, safetensors 0.8.0, sentencepiece 0.2.2, numpy 2.5.2,
# pillow, tqdm, pyyaml, matplotlib, pytest (and what those require: typing-extensions, sympy, packaging, ...).
# What is left is the closure of pyproject.toml's dependencies over the wheels' Requires-Dist lines, pinned to
# the versions installed in this machine's /tmp/venv (where the test suite passes):
#
#   jsonargparse 4.53.0         pyproject (jsonargparse[signatures]); LightningCLI
#     docstring-parser 0.18.0   jsonargparse[signatures]
#     typeshed-client 2.14.0    jsonargparse[signatures]   (needs typing-extensions: in the image)
#   omegaconf 2.4.0             pyproject; LightningCLI parser_mode="omegaconf", structured configs
#                               (2.4 vendors antlr4, so no antlr4-python3-runtime wheel)
#   webdataset 1.0.2            pyproject; shard I/O
#     braceexpand 0.1.7         webdataset
#   vector-quantize-pytorch 1.32.0   pyproject; VQ tokenizer
#     einx 0.4.3                vector-quantize-pytorch   (needs sympy, numpy: in the image)
#       frozendict 2.5.1        einx
#     loguru 0.7.3              vector-quantize-pytorch
#     torch-einops-utils 0.2.0  vector-quantize-pytorch   (needs einops>=0.8.1: the image's einops, version unknown)
#
# All of these are pure-Python py3-none-any wheels (about 1.6 MiB together).
#
# xformers (opt-in, --xformers): the newest release on PyPI, 0.0.35, is one 3.2 MiB wheel
# (xformers-0.0.35-py39-none-manylinux_2_28_x86_64.whl) that declares `Requires-Dist: torch>=2.10`; no release
# pins torch==2.11.0. Its cpp_lib.json says its C++/CUDA extension was built with torch 2.10.0+cu128 (CUDA 12.8),
# and xformers/_C.so links libcudart.so.12, while the image's torch 2.11.0 is a CUDA 13.0 build. So on the GPU
# machine _C.so will most likely fail to load: xformers then logs "WARNING[XFORMERS]: xFormers can't load C++/CUDA
# extensions" and memory_efficient_attention can only dispatch to PyTorch's own flash / cutlass kernels (its
# "-pt" operators). Not tried on a GPU. Without --xformers, `attention_backend="auto"` picks SDPA on CUDA, and the
# GPU run measures the SDPA and flex attention backends; the xformers tests and variants are skipped.
#
# Usage (from anywhere; the repo root is found from this file's location):
#   benchmarks/gpu_wheels.sh              # the required wheels only
#   benchmarks/gpu_wheels.sh --xformers   # also xformers 0.0.35
# On the GPU machine (Python 3.12, no internet), from the repo root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD   # repo root too: chameleon_lite is not installed there
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$REPO_ROOT/.whl"          # gitignored; travels with the working tree (64 MiB limit for everything carried)
PYTHON="${PYTHON:-python3}"      # any python with pip; the target interpreter is set by the flags below

WITH_XFORMERS=0
for arg in "$@"; do
  case "$arg" in
    --xformers) WITH_XFORMERS=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
    *) echo "unknown argument: $arg (expected --xformers)" >&2; exit 2 ;;
  esac
done

# Exact pins, one version per package.
PACKAGES=(
  jsonargparse==4.53.0
  docstring-parser==0.18.0
  typeshed-client==2.14.0
  omegaconf==2.4.0
  webdataset==1.0.2
  braceexpand==0.1.7
  vector-quantize-pytorch==1.32.0
  einx==0.4.3
  frozendict==2.5.1
  loguru==0.7.3
  torch-einops-utils==0.2.0
)
if [[ "$WITH_XFORMERS" == 1 ]]; then
  PACKAGES+=(xformers==0.0.35)
fi

# .whl/ must hold exactly this set (one version each, nothing stale): remove the wheels a previous run left.
mkdir -p "$DEST"
rm -f "$DEST"/*.whl

# Wheels for the GPU machine, not for this one: CPython 3.12, x86-64 manylinux, binary only, no dependency
# resolution (the closure is the list above; benchmarks/check_wheels.py verifies it).
"$PYTHON" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check -q \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${PACKAGES[@]}"

ls -l "$DEST"
echo "total: $(du -cb "$DEST"/*.whl | tail -1 | cut -f1) bytes in $(ls "$DEST"/*.whl | wc -l) wheels"

# Every Requires-Dist satisfied by a wheel here or by the GPU image; one wheel per package; nothing left over.
# Needs `packaging` (+ `tomli` on Python 3.10); CHECK_PYTHON picks another interpreter for it.
"${CHECK_PYTHON:-$PYTHON}" "$REPO_ROOT/benchmarks/check_wheels.py" --wheel-dir "$DEST"
