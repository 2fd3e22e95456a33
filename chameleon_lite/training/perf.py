"""Performance accounting for the CUDA path: MFU, device peaks, the decode speed of light, measured rates.

What lives here is the arithmetic and the measuring tools the GPU benchmarks (``benchmarks/gpu_*.py``) and the
``cuda`` tests share, kept apart so that all of it is checked on CPU (``tests/test_perf.py``):

- :func:`mfu`: model FLOPs utilisation from tokens/s, FLOPs per token (``lit_native.flops_per_token``) and a peak.
- :func:`device_peak_flops` / :func:`device_peak_bandwidth`: dense bf16/fp16 tensor-core peaks and memory
  bandwidth of a few data-centre GPUs, by ``torch.cuda.get_device_name()``, from NVIDIA's datasheets; None for
  a device not in the table (never a guess).
- :func:`measured_matmul_flops` / :func:`measured_copy_bandwidth`: the same two peaks measured in the running
  process (a large matmul; a device-to-device copy), timed between device synchronisations.
- :func:`decode_bytes_per_step` and :func:`speed_of_light_tokens_per_s`: the memory-bandwidth bound of one decode
  step (every weight it needs read once, plus the KV cache).
- :func:`synthetic_packed_batch`: in-memory packed batches in the training batch contract (no shards needed).
- :func:`find_loss_spikes` (and ``python -m chameleon_lite.training.perf spikes metrics.csv``): loss spikes, defined as
  a loss above ``factor`` times the median of the previous ``window`` losses.
- :func:`recipe_decoder_config`: the decoder shape, batch size and sequence length of a ``fit`` recipe.

Nothing here needs a GPU; on a CUDA device the measured functions synchronise around the timed region.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import IGNORE_INDEX
from chameleon_lite.tokenization.vocab import Vocab


# ---------------------------------------------------------------------------------------------- device peaks
@dataclass(frozen=True)
class DeviceSpec:
    """Datasheet figures of one GPU model: dense (no 2:4 sparsity) bf16/fp16 tensor-core FLOP/s and HBM bytes/s."""

    name: str
    bf16_dense_flops: float
    memory_bandwidth: float


# Sources (dense = half the "with sparsity" figure the datasheets print; fp16 equals bf16 on these parts):
# - H100 SXM / PCIe / NVL: NVIDIA H100 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h100/
#   BF16 1,979 / 1,513 / 1,671 TFLOPS with sparsity; memory bandwidth 3.35 / 2.0 / 3.9 TB/s.
# - H200 SXM / NVL: NVIDIA H200 datasheet, https://www.nvidia.com/en-us/data-center/h200/
#   BF16 1,979 / 1,671 TFLOPS with sparsity; 4.8 TB/s both.
# - A100: NVIDIA A100 datasheet, https://www.nvidia.com/en-us/data-center/a100/
#   BF16 312 TFLOPS dense (624 with sparsity); 1,555 GB/s (40GB), 1,935 GB/s (80GB PCIe), 2,039 GB/s (80GB SXM).
# Matched against lower-cased torch.cuda.get_device_name() strings such as "NVIDIA H100 80GB HBM3" (SXM),
# "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe".
# First match wins, so the more specific entries come first.
_DEVICE_TABLE: tuple[tuple[tuple[str, ...], DeviceSpec], ...] = (
    (("h100", "pcie"), DeviceSpec("H100 PCIe", 756.5e12, 2.0e12)),
    (("h100", "nvl"), DeviceSpec("H100 NVL", 835.5e12, 3.9e12)),
    (("h100",), DeviceSpec("H100 SXM", 989.4e12, 3.35e12)),
    (("h200", "nvl"), DeviceSpec("H200 NVL", 835.5e12, 4.8e12)),
    (("h200",), DeviceSpec("H200 SXM", 989.4e12, 4.8e12)),
    (("a100", "80gb", "pcie"), DeviceSpec("A100 80GB PCIe", 312e12, 1.935e12)),
    (("a100", "80gb"), DeviceSpec("A100 80GB SXM", 312e12, 2.039e12)),
    (("a100",), DeviceSpec("A100 40GB", 312e12, 1.555e12)),
)


def device_spec(name: str) -> DeviceSpec | None:
    """The datasheet entry for a device name (``torch.cuda.get_device_name()``), or None when it is not listed."""
    lowered = name.lower()
    for needles, spec in _DEVICE_TABLE:
        if all(n in lowered for n in needles):
            return spec
    return None


def device_peak_flops(name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Dense tensor-core peak FLOP/s of ``name`` for ``bfloat16``/``float16``; None for an unknown device or
    another dtype (the table holds 16-bit figures only)."""
    spec = device_spec(name)
    if spec is None or dtype not in (torch.bfloat16, torch.float16):
        return None
    return spec.bf16_dense_flops


def device_peak_bandwidth(name: str) -> float | None:
    """Datasheet memory bandwidth of ``name`` in bytes/s; None for an unknown device."""
    spec = device_spec(name)
    return None if spec is None else spec.memory_bandwidth


def resolve_peak_flops(peak_flops: float | str | None, device: torch.device | str, precision: str) -> float | None:
    """The peak FLOP/s used for MFU: a number as given, or ``"auto"``: the datasheet figure of ``device``.

    Args:
        peak_flops: FLOP/s, ``"auto"`` or None (no MFU).
        device: the training device.
        precision: Lightning's precision string (``"bf16-mixed"``, ``"16-mixed"``, ``"32-true"``, ...).

    Returns None for ``"auto"`` when there is no datasheet figure: a CPU, a GPU missing from the table, or a
    precision other than bf16/fp16 (the table holds 16-bit tensor-core figures only).
    """
    if peak_flops is None or not isinstance(peak_flops, str):
        return peak_flops
    if peak_flops != "auto":
        raise ValueError(f"peak_flops={peak_flops!r} must be a number, 'auto' or None")
    device = torch.device(device)
    if device.type != "cuda":
        return None
    dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
    return device_peak_flops(torch.cuda.get_device_name(device), dtype)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``tokens_per_s * flops_per_token / peak_flops`` (a fraction, not a percentage)."""
    for name, value in (("tokens_per_s", tokens_per_s), ("flops_per_token", flops_per_token),
                        ("peak_flops", peak_flops)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    if peak_flops == 0:
        raise ValueError("peak_flops must be > 0")
    return tokens_per_s * flops_per_token / peak_flops


# ---------------------------------------------------------------------------------------------- measuring
def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(fn: Callable[[], object], device: torch.device | str, repeats: int, warmup: int = 1) -> float:
    """Seconds for ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, synchronised on both ends."""
    if not isinstance(repeats, int) or repeats < 1 or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats!r}, warmup={warmup!r}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def measured_matmul_flops(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int = 8192, repeats: int = 20,
    warmup: int = 3, seed: int = 0,
) -> float:
    """FLOP/s of ``n x n @ n x n`` matmuls (``2 n^3`` FLOPs each) on ``device`` in ``dtype``.

    The practical peak to set beside the datasheet's: ``n = 8192`` in bf16 runs near the tensor-core limit on
    an H100. Use a small ``n`` (and fp32) on CPU.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int")
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)  # (n, n)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)  # (n, n)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = time_repeats(lambda: torch.mm(a, b, out=out), device, repeats, warmup)
    return 2.0 * n**3 * repeats / seconds


@functools.cache
def fastest_cpu_precision(n: int = 1024, repeats: int = 4, margin: float = 1.2) -> str:
    """The Lightning precision that trains fastest on this CPU: ``"bf16-mixed"`` when a bf16 matmul measured here
    runs more than ``margin`` times faster than an fp32 one (a CPU with AMX: ~1.9 vs ~0.33 TFLOP/s on 2 cores),
    else ``"32-true"`` (AVX-512 without AMX multiplies bf16 *slower* than fp32: 0.17 vs 0.34 TFLOP/s measured on
    a 2-core Xeon with ``avx512_bf16`` and no AMX). Takes about 0.1 s there.

    A CPU without any bf16 matmul instructions (AVX2 only) emulates them about 100x slower than fp32 (1.4 vs 55
    GFLOP/s at n=256 on a 2-core AMD EPYC), where the ``n`` = 1024 measurement alone would take 13 s: a 256^3
    probe answers ``"32-true"`` first when bf16 is not even a quarter of fp32's speed. Measured once per process
    (the CPU does not change)."""
    probe_bf16 = measured_matmul_flops("cpu", torch.bfloat16, n=256, repeats=1, warmup=1)
    if probe_bf16 < measured_matmul_flops("cpu", torch.float32, n=256, repeats=1, warmup=1) / 4:
        return "32-true"
    bf16 = measured_matmul_flops("cpu", torch.bfloat16, n=n, repeats=repeats, warmup=1)
    fp32 = measured_matmul_flops("cpu", torch.float32, n=n, repeats=repeats, warmup=1)
    return "bf16-mixed" if bf16 > margin * fp32 else "32-true"


def measured_copy_bandwidth(
    device: torch.device | str, nbytes: int = 1 << 30, repeats: int = 20, warmup: int = 3
) -> float:
    """Memory bandwidth in bytes/s from ``dst.copy_(src)`` of ``nbytes`` on ``device``.

    Each copy reads ``nbytes`` and writes ``nbytes``: both count (STREAM's convention, and what a datasheet's
    bandwidth means), so the figure is ``2 * nbytes * repeats / seconds``. Pick ``nbytes`` well above the L2
    cache (50 MB on an H100): the default 1 GiB.
    """
    if not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"nbytes={nbytes!r} must be a positive int")
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_repeats(lambda: dst.copy_(src), device, repeats, warmup)
    return 2.0 * nbytes * repeats / seconds


# ---------------------------------------------------------------------------------------------- decode bound
def non_embedding_parameters(config: DecoderConfig) -> int:
    """Parameters of the blocks and the final norm (what ``Decoder.num_parameters(non_embedding=True)`` counts
    for an untied head): q/k/v/o, the QK-norm weights and biases, the SwiGLU matrices and both RMSNorms per block."""
    d, hd, h, h_kv = config.d_model, config.head_dim, config.n_heads, config.n_kv_heads
    attention = d * hd * (h + 2 * h_kv) + h * hd * d
    qk_norm = 2 * hd * (h + h_kv) if config.qk_norm else 0
    block = attention + qk_norm + 3 * d * config.mlp_hidden + 2 * d
    return config.n_layers * block + d


def decode_bytes_per_step(
    config: DecoderConfig, batch: int, context_len: int, dtype_bytes: int, kv_dtype_bytes: int | None = None
) -> int:
    """Bytes one decode step (one new token for each of ``batch`` rows) must read from memory at least.

    Weights: every non-embedding parameter once, the output head's ``vocab_size`` rows (the logical vocabulary:
    the rows a step needs to score every token; padding rows are never needed), and one embedding row per new
    token (the lookup). KV cache: keys and values of ``context_len`` tokens (the new one included) for every layer
    and row. Activations are left out (they stay in caches at these sizes). With a tied head the lookup rows are
    part of the head and still counted (``batch * d_model`` elements, negligible).
    """
    for name, value in (("batch", batch), ("context_len", context_len), ("dtype_bytes", dtype_bytes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    kv_bytes = dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes
    if not isinstance(kv_bytes, int) or kv_bytes < 1:
        raise ValueError(f"kv_dtype_bytes={kv_dtype_bytes!r} must be a positive int")
    weights = non_embedding_parameters(config) + config.vocab_size * config.d_model + batch * config.d_model
    kv = 2 * config.n_layers * batch * config.n_kv_heads * config.head_dim * context_len
    return weights * dtype_bytes + kv * kv_bytes


def speed_of_light_tokens_per_s(bytes_per_step: float, bandwidth_bytes_per_s: float, batch: int) -> float:
    """Upper bound on decode tokens/s when each step is limited by reading ``bytes_per_step`` at the given
    bandwidth: ``batch * bandwidth / bytes_per_step``."""
    if not bytes_per_step > 0 or not bandwidth_bytes_per_s > 0:
        raise ValueError(f"need bytes_per_step > 0 and bandwidth > 0, got {bytes_per_step}, {bandwidth_bytes_per_s}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} must be a positive int")
    return batch * bandwidth_bytes_per_s / bytes_per_step


# ---------------------------------------------------------------------------------------------- synthetic data
def synthetic_packed_batch(
    vocab: Vocab,
    batch_size: int,
    seq_len: int,
    *,
    image_tokens: int = 64,
    text_len: tuple[int, int] = (8, 64),
    alphabet: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Rows packed with documents ``text <boi> codes <eoi>``, in the training batch contract, with no padding.

    Every row is filled to ``seq_len``: the last document is cut at the row end (its final position predicts
    nothing). ``document_ids`` count the documents of each row from 0, ``position_ids`` restart per document,
    ``targets[t] = input_ids[t + 1]`` inside a document and ``-100`` at document ends, ``weights`` are 1 on
    counted targets. ``alphabet`` draws text pieces and image codes from only the first ``alphabet`` of each,
    so a model can learn the stream (its loss falls towards ``ln(alphabet)``); None draws from all of them.
    """
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
    lo, hi = text_len
    if not 1 <= lo <= hi or image_tokens < 1:
        raise ValueError(f"need 1 <= text_len[0] <= text_len[1] and image_tokens >= 1, got {text_len}, {image_tokens}")
    first_text = 4  # after sentencepiece's unk/bos/eos/pad
    n_text, n_codes = vocab.n_text - first_text, vocab.codebook_size
    if alphabet is not None:
        if alphabet < 1:
            raise ValueError(f"alphabet={alphabet} must be >= 1")
        n_text, n_codes = min(n_text, alphabet), min(n_codes, alphabet)
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.empty(batch_size, seq_len, dtype=torch.long)
    document_ids = torch.empty(batch_size, seq_len, dtype=torch.long)
    position_ids = torch.empty(batch_size, seq_len, dtype=torch.long)
    for row in range(batch_size):
        t, doc = 0, 0
        while t < seq_len:
            n = int(torch.randint(lo, hi + 1, (1,), generator=g))
            text = first_text + torch.randint(0, n_text, (n,), generator=g)
            codes = vocab.image_offset + torch.randint(0, n_codes, (image_tokens,), generator=g)
            document = torch.cat([text, torch.tensor([vocab.boi]), codes, torch.tensor([vocab.eoi])])
            length = min(len(document), seq_len - t)
            input_ids[row, t : t + length] = document[:length]
            document_ids[row, t : t + length] = doc
            position_ids[row, t : t + length] = torch.arange(length)
            t, doc = t + length, doc + 1
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    same_document = document_ids[:, 1:] == document_ids[:, :-1]  # (B, T - 1)
    targets[:, :-1] = torch.where(same_document, input_ids[:, 1:], IGNORE_INDEX)
    counted = targets != IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "targets": targets,
        "weights": counted.float(),
        "target_is_image": vocab.is_image(targets) & counted,
        "position_ids": position_ids,
        "document_ids": document_ids,
    }


# ---------------------------------------------------------------------------------------------- loss spikes
@dataclass(frozen=True)
class LossSpike:
    """One spike: the ``index`` (or logged step) of a loss above ``factor`` times the trailing ``median``."""

    step: int
    loss: float
    median: float


def find_loss_spikes(
    losses: Sequence[float], *, window: int = 50, factor: float = 2.0, min_history: int = 10,
    steps: Sequence[int] | None = None,
) -> list[LossSpike]:
    """Losses above ``factor`` x the median of the previous ``window`` losses (once ``min_history`` precede).

    A non-finite loss is always a spike. ``steps`` names each loss (default: its index). A steadily falling loss
    has no spikes; a single jump to twice the recent level is one.
    """
    if window < 1 or min_history < 1 or not factor > 1:
        raise ValueError(f"need window >= 1, min_history >= 1 and factor > 1, got {window}, {min_history}, {factor}")
    if steps is not None and len(steps) != len(losses):
        raise ValueError(f"steps has {len(steps)} entries, losses has {len(losses)}")
    spikes = []
    for i, loss in enumerate(losses):
        history = [x for x in losses[max(0, i - window) : i] if math.isfinite(x)]
        step = i if steps is None else int(steps[i])
        if not math.isfinite(loss):
            spikes.append(LossSpike(step, float(loss), statistics.median(history) if history else math.nan))
        elif len(history) >= min_history and loss > factor * (median := statistics.median(history)):
            spikes.append(LossSpike(step, float(loss), median))
    return spikes


def read_metric_csv(path: str | Path, metric: str = "train/loss") -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one metric from a Lightning ``CSVLogger`` ``metrics.csv`` (rows without it skipped)."""
    steps, values = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or metric not in reader.fieldnames or "step" not in reader.fieldnames:
            raise ValueError(f"{path} has no 'step' and {metric!r} columns (columns: {reader.fieldnames})")
        for row in reader:
            if row[metric] not in ("", None):
                steps.append(int(float(row["step"])))
                values.append(float(row[metric]))
    return steps, values


# ---------------------------------------------------------------------------------------------- recipes
def recipe_decoder_config(path: str | Path, vocab_size: int) -> tuple[DecoderConfig, int, int]:
    """``(DecoderConfig, batch_size, seq_len)`` of a native ``fit`` recipe (``configs/native/*.yaml``), with
    its ``${...}`` interpolations resolved, a decoder preset expanded (``chameleon_lite.model.presets``) and
    ``vocab_size`` filled in."""
    from omegaconf import OmegaConf

    from chameleon_lite.model.presets import expand_presets
    recipe = OmegaConf.load(path)
    try:
        model = expand_presets(OmegaConf.to_container(recipe.model.init_args.model, resolve=True))
        data = OmegaConf.to_container(recipe.data.init_args, resolve=True)
    except Exception as error:  # omegaconf raises its own key errors
        raise ValueError(f"{path} is not a native recipe (model.init_args.model / data.init_args): {error}") from error
    return DecoderConfig(vocab_size=vocab_size, **model), int(data["batch_size"]), int(data["seq_len"])


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m chameleon_lite.training.perf spikes runs/<run>/logs/version_0/metrics.csv``: list the loss spikes."""
    parser = argparse.ArgumentParser(prog="python -m chameleon_lite.training.perf", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    spikes = sub.add_parser("spikes", help="loss spikes in a CSVLogger metrics.csv")
    spikes.add_argument("metrics_csv")
    spikes.add_argument("--metric", default="train/loss")
    spikes.add_argument("--window", type=int, default=50)
    spikes.add_argument("--factor", type=float, default=2.0)
    args = parser.parse_args(argv)
    steps, values = read_metric_csv(args.metrics_csv, args.metric)
    found = find_loss_spikes(values, window=args.window, factor=args.factor, steps=steps)
    last = f", last {values[-1]:.4f} at step {steps[-1]}" if values else ""
    print(f"{len(values)} values of {args.metric}{last}; {len(found)} spikes (> {args.factor:g} x median of the "
          f"previous {args.window})")
    for spike in found:
        print(f"  step {spike.step}: {spike.loss:.4f} (median {spike.median:.4f})")


if __name__ == "__main__":
    main()


def benchmark_device(parser: argparse.ArgumentParser, device: str, tiny: bool) -> torch.device:
    """The device a GPU benchmark runs on; ``parser.error`` without CUDA, or on CPU outside the ``--tiny`` smoke run."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available on this machine: this benchmark measures the GPU path. For a smoke run "
                     "of the script on CPU use --device cpu --tiny")
    if dev.type == "cpu" and not tiny:
        parser.error("on CPU only the smoke run is supported (--device cpu --tiny); the figures are for a GPU")
    return dev
