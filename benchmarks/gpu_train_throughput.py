"""Training tokens/s and MFU of the decoder on one GPU: eager vs torch.compile, SDPA vs xformers vs flex, packing masks.

NOT YET RUN ON A GPU: written on a CPU-only machine; only the ``--device cpu --tiny`` smoke run has been executed.
See benchmarks/README.md ("CUDA (issue 9)") for what is still to be measured.

Model: the decoder shape of a native recipe (default ``configs/native/small.yaml``: d_model 768, 16 layers, 12 heads,
4 kv heads, seq_len 2048, batch 32), vocabulary from the recipe's tokenizer bundle. Data: synthetic packed rows
(``perf.synthetic_packed_batch``: text + 8x8-image documents back to back, no padding), a few distinct batches cycled.

Each variant builds the same seeded decoder and times a plain training step: bf16 autocast forward, next-token loss
with z-loss, backward, gradient clipping at 1.0, fused AdamW; ``--warmup`` untimed steps first (compilation happens
there), then ``--steps`` timed ones between two device synchronisations (no host sync inside). Variants:

- ``eager`` / ``compile``: ``Decoder.compile()`` in place, as ``NativeLMModule(compile=True)``.
- ``sdpa`` / ``xformers`` / ``flex``: ``DecoderConfig.attention_backend`` (xformers only on CUDA with xformers
  installed; flex only on CUDA, since PyTorch has no flex backward on CPU).
- ``masks`` / ``nomask``: with ``document_ids`` (attention stays inside each packed document: SDPA gets a boolean
  ``(B, 1, T, T)`` mask, xformers a block-diagonal bias, flex a document-causal block mask) or without (plain causal
  over the whole row: SDPA may use its flash kernel). The difference is what the packing masks cost. There is no
  ``flex-nomask``: without documents the flex backend makes the same SDPA call as ``sdpa-nomask``.

MFU = tokens/s x ``lit_native.flops_per_token(config, seq_len)`` / peak, against two peaks: the datasheet's dense
bf16 figure for the device (``perf.device_peak_flops``) and a large bf16 matmul measured in the same run
(``perf.measured_matmul_flops``). Tokens are all ``B x T`` positions (the rows have no padding). Attention FLOPs are
counted for the full causal context ``T`` even with document masks (the usual convention; the masked kernels skip
some of that work). The Lightning module's own overhead per step is measured by ``benchmarks/train_throughput.py``.

    python benchmarks/gpu_train_throughput.py                                      # every variant, small recipe
    python benchmarks/gpu_train_throughput.py --variants compile-xformers-masks eager-sdpa-masks --steps 50
    python benchmarks/gpu_train_throughput.py --device cpu --tiny                  # smoke run of the script on CPU
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import time
from dataclasses import dataclass, replace

import torch

from chameleon_lite.model.attention import flex_attention_available, xformers_available
from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import Decoder, next_token_loss
from chameleon_lite.model.model_dir import resolve_bundle_path
from chameleon_lite.tokenization.bundle import load_bundle
from chameleon_lite.training.lit_native import decoder_param_groups, flops_per_token
from chameleon_lite.training.perf import (
    benchmark_device,
    device_peak_flops,
    measured_matmul_flops,
    mfu,
    non_embedding_parameters,
    recipe_decoder_config,
    synchronize,
    synthetic_packed_batch,
)

GOAL_MFU = 0.40  # issue 9, with the best switches


@dataclass(frozen=True)
class Variant:
    """One combination of switches."""

    compile: bool
    backend: str  # "sdpa" | "xformers" | "flex"
    masks: bool  # pass document_ids

    @property
    def name(self) -> str:
        return f"{'compile' if self.compile else 'eager'}-{self.backend}-{'masks' if self.masks else 'nomask'}"


@dataclass
class Result:
    variant: Variant
    tokens_per_s: float = math.nan
    ms_per_step: float = math.nan
    peak_memory_gib: float = math.nan
    first_loss: float = math.nan
    last_loss: float = math.nan
    error: str | None = None


def all_variants(device: torch.device) -> list[Variant]:
    cuda = device.type == "cuda"
    backends = ["sdpa"] + (["xformers"] if cuda and xformers_available() else [])
    backends += ["flex"] if cuda and flex_attention_available() else []
    return [Variant(c, b, m) for c, b, m in itertools.product((False, True), backends, (True, False))
            if m or b != "flex"]


def run_variant(variant: Variant, config: DecoderConfig, batches: list[dict], steps: int, warmup: int,
                device: torch.device, seed: int) -> Result:
    """Time ``steps`` training steps of a fresh seeded decoder after ``warmup`` untimed ones."""
    result = Result(variant)
    if variant.compile:
        torch._dynamo.reset()  # every compiled variant starts from a clean cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    decoder = Decoder(replace(config, attention_backend=variant.backend)).to(device).train()
    decoder.attention_backend(device)  # resolve (and log) outside the compiled forward
    if variant.compile:
        decoder.compile()
    optimizer = torch.optim.AdamW(decoder_param_groups(decoder, 0.1), lr=3e-4, betas=(0.9, 0.95),
                                  fused=True if device.type == "cuda" else None)
    bf16 = device.type == "cuda"
    losses: list[torch.Tensor] = []

    def train_step(i: int) -> None:
        batch = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = decoder(batch["input_ids"], position_ids=batch["position_ids"],
                             document_ids=batch["document_ids"] if variant.masks else None)  # (B, T, V_padded)
            loss = next_token_loss(logits, batch["targets"], batch["weights"], config.z_loss_weight)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    for i in range(warmup):
        train_step(i)
    synchronize(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        train_step(i)
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens = sum(batches[i % len(batches)]["input_ids"].numel() for i in range(warmup, warmup + steps))
    values = torch.stack(losses).float().tolist()
    result.tokens_per_s, result.ms_per_step = tokens / seconds, 1e3 * seconds / steps
    result.first_loss, result.last_loss = values[0], values[-1]
    if device.type == "cuda":
        result.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    if not all(math.isfinite(v) for v in values):
        result.error = f"non-finite loss {values}"
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--recipe", default="configs/native/small.yaml", help="native fit recipe giving the shape")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (only with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny recipe, batch 2 x 128, 3 steps after 2")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's")
    parser.add_argument("--seq-len", type=int, help="default: the recipe's")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--variants", nargs="+", default=["all"],
                        help="names like eager-sdpa-masks, compile-xformers-nomask; 'all' (default)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in backward")
    parser.add_argument("--matmul-n", type=int, default=8192, help="size of the measured bf16 matmul")
    parser.add_argument("--n-batches", type=int, default=4, help="distinct synthetic batches, cycled")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = benchmark_device(parser, args.device, args.tiny)
    if args.tiny:
        args.recipe = "configs/native/tiny.yaml" if args.recipe == parser.get_default("recipe") else args.recipe
        args.batch_size, args.seq_len = args.batch_size or 2, args.seq_len or 128
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 2)  # compile: 2nd call recompiles once
        args.matmul_n = min(args.matmul_n, 256)
    if args.steps < 1 or args.warmup < 1:
        parser.error("need --steps >= 1 and --warmup >= 1")

    from omegaconf import OmegaConf

    bundle_path = resolve_bundle_path(OmegaConf.load(args.recipe).data.init_args.tokenizer)
    vocab = load_bundle(bundle_path, load_image_tokenizer=False).vocab
    config, batch_size, seq_len = recipe_decoder_config(args.recipe, vocab.size)
    batch_size, seq_len = args.batch_size or batch_size, args.seq_len or seq_len
    config = replace(config, max_seq_len=max(seq_len, config.max_seq_len),
                     gradient_checkpointing=args.gradient_checkpointing)
    batches = [{k: v.to(device) for k, v in synthetic_packed_batch(vocab, batch_size, seq_len, seed=s).items()}
               for s in range(args.n_batches)]

    available = {v.name: v for v in all_variants(device)}
    if args.variants == ["all"]:
        variants = list(available.values())
    else:
        unknown = [n for n in args.variants if n not in available]
        if unknown:
            parser.error(f"unknown or unavailable variants {unknown}; available here: {sorted(available)}")
        variants = [available[n] for n in args.variants]

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    spec_peak = device_peak_flops(name, dtype) if device.type == "cuda" else None
    matmul_peak = measured_matmul_flops(device, dtype, n=args.matmul_n, repeats=5 if args.tiny else 20)
    fpt = flops_per_token(config, seq_len)
    n_params = non_embedding_parameters(config) + config.d_model * config.padded_vocab_size
    xformers_version = "not installed"
    if xformers_available():
        import xformers

        xformers_version = xformers.__version__
    print(f"device: {name} | torch {torch.__version__} | xformers {xformers_version} | "
          f"{'bf16 autocast' if dtype == torch.bfloat16 else 'fp32'} | {time.strftime('%Y-%m-%d')}")
    print(f"model: shape of {args.recipe}: d_model {config.d_model}, {config.n_layers} layers, {config.n_heads} heads "
          f"({config.n_kv_heads} kv), mlp {config.mlp_hidden}, vocab {config.vocab_size} (padded "
          f"{config.padded_vocab_size}), gradient checkpointing {config.gradient_checkpointing}")
    print(f"N (non-embedding + head) = {n_params / 1e6:.1f}M; FLOPs/token at T={seq_len}: {fpt / 1e9:.3f} G "
          f"(6N + 12 L H Q T)")
    print(f"batch {batch_size} x {seq_len} = {batch_size * seq_len:,} tokens/step; {args.steps} timed steps after "
          f"{args.warmup} untimed, per variant")
    spec_text = f"{spec_peak / 1e12:.1f} TFLOP/s" if spec_peak else "n/a (device not in perf's table)"
    ratio = f" ({matmul_peak / spec_peak:.0%} of the datasheet)" if spec_peak else ""
    print(f"peak: datasheet {spec_text}; measured {args.matmul_n}^3 {str(dtype).removeprefix('torch.')} matmul "
          f"{matmul_peak / 1e12:.3f} TFLOP/s{ratio}\n")

    results = []
    for variant in variants:
        try:
            result = run_variant(variant, config, batches, args.steps, args.warmup, device, args.seed)
        except Exception as error:  # one failing switch must not hide the others' figures
            result = Result(variant, error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
        results.append(result)
        line = (f"  {variant.name:<26} {_fmt(result.tokens_per_s, ',.0f'):>12} tok/s "
                f"{_fmt(result.ms_per_step, '.1f'):>9} ms/step")
        print(line + (f"   FAILED {result.error}" if result.error else ""), flush=True)

    header = (f"{'variant':<26} {'tokens/s':>12} {'ms/step':>9} {'MFU datasheet':>14} {'MFU matmul':>11} "
              f"{'peak GiB':>9} {'loss first->last':>17}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        ok = r.error is None
        mfu_spec = mfu(r.tokens_per_s, fpt, spec_peak) if ok and spec_peak else None
        mfu_matmul = mfu(r.tokens_per_s, fpt, matmul_peak) if ok else None
        losses = f"{r.first_loss:.3f}->{r.last_loss:.3f}" if ok else "FAILED"
        print(f"{r.variant.name:<26} {_fmt(r.tokens_per_s, ',.0f'):>12} {_fmt(r.ms_per_step, '.1f'):>9} "
              f"{_fmt(mfu_spec, '.1%'):>14} {_fmt(mfu_matmul, '.1%'):>11} {_fmt(r.peak_memory_gib, '.2f'):>9} "
              f"{losses:>17}")
    good = [r for r in results if r.error is None]
    if good:
        best = max(good, key=lambda r: r.tokens_per_s)
        best_mfu = mfu(best.tokens_per_s, fpt, spec_peak) if spec_peak else None
        verdict = "" if best_mfu is None else (" -> goal met" if best_mfu >= GOAL_MFU else " -> goal NOT met")
        print(f"\nbest: {best.variant.name}, MFU {_fmt(best_mfu, '.1%')} of the datasheet peak "
              f"(goal >= {GOAL_MFU:.0%}){verdict}")
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"failed: {r.variant.name}: {r.error}")


if __name__ == "__main__":
    main()
