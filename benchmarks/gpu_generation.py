"""Decode speed on one GPU: tokens/s at batch 1 and 16, seconds per image (CFG on/off), fraction of the speed of light.

NOT YET RUN ON A GPU: written on a CPU-only machine; only the ``--device cpu --tiny`` smoke run has been executed.
See benchmarks/README.md ("CUDA (issue 9)") for what is still to be measured.

Model: the decoder shape of a native recipe (default ``configs/native/small.yaml``) with seeded random weights in
bf16 (decode speed does not depend on the weights' values; the image arm always writes exactly ``h*w`` codes and
``<eoi>``), vocabulary and image grid from the recipe's tokenizer bundle. For each batch size (``--batch-sizes``,
default 1 and 16), after a prefill of ``--prompt-len`` tokens, ``--new-tokens`` decode steps of:

- ``fast step``: the engine's decode step (``fast_decode.DecodeStep``: ``Decoder.forward`` on one token per row,
  eager, the cache carrying the weight copies), feeding the argmax back on the device (no sampling, no host sync
  inside the timed loop);
- ``static step``: the same forward on a static cache (the slot of the new token is a tensor; attention reads the
  whole preallocated cache under a mask), checked first against the fast step's logits; eager, and on CUDA with
  ``--compile`` also captured as CUDA graphs (``static_decode.CUDAGraphDecodeStep``);
- ``engine``: ``generate_ids(mode="image")`` end to end (packed prefill, constraint, sampling, host checks), ``B``
  images, with ``cfg_scale`` 1 and ``--cfg-scale`` (guidance doubles the rows): tokens/s and seconds per image;
  on CUDA also with ``decode_step="cuda_graph"`` (the static step captured once per call and replayed).

Speed of light: ``perf.decode_bytes_per_step(config, B, mean context, 2)`` (every non-embedding weight, the head's
``vocab_size`` rows, one embedding row per token, the KV cache of the mean context) at the copy bandwidth measured
in the same run (``perf.measured_copy_bandwidth``, read + write bytes) and at the datasheet's. The engine's image
steps compute only the image-code columns of the head, so their bound is slightly pessimistic. Goal (issue 9):
>= 25% of the bound at batch 1.

``--vs-transformers`` also runs the tiny-config text-decode comparison of ``benchmarks/generation.py`` (ours vs
``transformers``' Chameleon, same weights, greedy, fp32) on this device.

    python benchmarks/gpu_generation.py --compile                      # small recipe, batch 1 and 16
    python benchmarks/gpu_generation.py --compile --vs-transformers
    python benchmarks/gpu_generation.py --device cpu --tiny            # smoke run of the script on CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from chameleon_lite.generation.fast_decode import DecodeStep
from chameleon_lite.generation.native import generate_ids
from chameleon_lite.generation.static_decode import CUDAGraphDecodeStep
from chameleon_lite.model.attention import KVCache
from chameleon_lite.model.decoder import Decoder
from chameleon_lite.model.model_dir import resolve_bundle_path
from chameleon_lite.tokenization.bundle import load_bundle
from chameleon_lite.training.perf import (
    benchmark_device,
    decode_bytes_per_step,
    device_peak_bandwidth,
    measured_copy_bandwidth,
    recipe_decoder_config,
    speed_of_light_tokens_per_s,
    synchronize,
)

GOAL_FRACTION = 0.25  # of the speed of light at batch 1 (issue 9)


# ---------------------------------------------------------------------------------------------- timing
def prefill(decoder: Decoder, batch: int, prompt_len: int, max_len: int, vocab_size: int, seed: int) -> KVCache:
    """A cache of ``max_len`` slots holding ``batch`` random text prompts of ``prompt_len`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (batch, prompt_len), generator=g).to(decoder.embed_tokens.weight.device)
    cache = decoder.new_cache(batch, max_len, prepare_weights=True)
    with torch.inference_mode():
        decoder(ids, cache=cache)
    return cache


def clone_cache(cache: KVCache) -> KVCache:
    copy = KVCache(cache.k.shape[0], cache.batch_size, cache.k.shape[2], cache.k.shape[4], cache.max_len,
                   device=cache.k.device, dtype=cache.k.dtype)
    copy.k.copy_(cache.k)
    copy.v.copy_(cache.v)
    copy.document_ids.copy_(cache.document_ids)
    copy.length = cache.length
    copy.weights = cache.weights  # the weight copies are read only
    return copy


def rewind(cache: KVCache, length: int) -> None:
    """Forget the decoded tokens: back to ``length`` cached tokens (the prompt)."""
    cache.length = length
    if cache.slot is not None:
        cache.slot.fill_(length)


def decode_loop(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokens: torch.Tensor,
                positions: torch.Tensor, n: int, mark_cudagraph_steps: bool = False) -> list[torch.Tensor]:
    """``n`` greedy steps feeding the argmax back on the device; returns each step's logits argmax."""
    positions = positions.clone()
    out = []
    for _ in range(n):
        if mark_cudagraph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(tokens, positions)  # (B, V)
        tokens = logits.argmax(-1)  # (B,)
        out.append(tokens)
        positions += 1
    return out


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls (after one warm-up call), synchronised around each."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_logits(decoder: Decoder, cache: KVCache, first: torch.Tensor, positions: torch.Tensor,
                     n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The eager step's logits over ``n`` greedy steps (on a copy of ``cache``) and the tokens it was fed."""
    with torch.inference_mode():
        fast = DecodeStep(decoder, clone_cache(cache))
        tokens, positions = first, positions.clone()
        fed, logits = [], []
        for _ in range(n):
            fed.append(tokens)
            logits.append(fast(tokens, positions))  # (B, V)
            tokens, positions = logits[-1].argmax(-1), positions + 1
    return fed, logits


def static_disagreement(static: Callable, cache: KVCache, fed: list[torch.Tensor], reference: list[torch.Tensor],
                        positions: torch.Tensor, prompt_len: int) -> float:
    """Largest relative L2 difference between a static step's logits and ``reference`` when fed the same tokens
    from the prompt on."""
    worst = 0.0
    with torch.inference_mode():
        rewind(cache, prompt_len)
        positions = positions.clone()
        for tokens, expected in zip(fed, reference):
            got = static(tokens, positions)  # (B, V)
            worst = max(worst, float((got - expected).double().norm() / expected.double().norm()))
            positions += 1
    return worst


# ---------------------------------------------------------------------------------------------- transformers
def vs_transformers(device: torch.device, new_tokens: int, repeats: int) -> None:
    """benchmarks/generation.py's text comparison (tiny config, batch 1, greedy, fp32, same mask) on ``device``."""
    try:
        import transformers
    except ImportError:
        print("vs transformers: skipped (transformers is not installed; pip install -e '.[dev]')")
        return
    spec = importlib.util.spec_from_file_location("bench_generation", Path(__file__).with_name("generation.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from chameleon_lite.generation.sampling import ModalityConstraint, SamplingParams

    transformers.logging.set_verbosity_error()
    args = argparse.Namespace(d_model=256, n_layers=4, n_heads=8, vocab_size=5120, codebook_size=1024, init_std=0.1,
                              prompt_len=16, new_tokens=new_tokens, seed=0)  # generation.py's defaults
    vocab, ours, hf = bench.build_models(args)
    ours, hf = ours.to(device), hf.to(device)
    grid = (8, 8)
    prompt = bench.text_prompt(vocab, args.prompt_len, args.seed)
    allowed = ModalityConstraint(vocab, grid, "text").text_allowed.to(device)  # (V,)
    input_ids = torch.tensor([prompt], device=device)  # (1, T)

    def hf_mask(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(~allowed, float("-inf"))

    def run_hf() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, use_cache=True, logits_processor=[hf_mask],
                              pad_token_id=vocab.pad, eos_token_id=vocab.eos)
        return out[0, input_ids.shape[1] :].tolist()

    greedy = SamplingParams(temperature=0.0, image_temperature=0.0)

    def run_ours() -> list[int]:
        return generate_ids(ours, vocab, grid, [prompt], mode="text", max_new_tokens=new_tokens, sampling=greedy)[0]

    result = bench.median_seconds({"ours": run_ours, "hf": run_hf}, repeats)
    (t_ours, ids_ours), (t_hf, ids_hf) = result["ours"], result["hf"]
    print(f"vs transformers {transformers.__version__} (d_model 256, 4 layers, fp32, batch 1, {new_tokens} new, "
          f"greedy): ours {len(ids_ours) / t_ours:,.1f} tok/s, transformers {len(ids_hf) / t_hf:,.1f} tok/s, "
          f"ratio {(len(ids_ours) / t_ours) / (len(ids_hf) / t_hf):.2f}x; same tokens: {ids_ours == ids_hf} "
          f"({len(ids_ours)} vs {len(ids_hf)} tokens)")


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--recipe", default="configs/native/small.yaml", help="native fit recipe giving the shape")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (only with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny recipe, short prompts, few steps")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256, help="decode steps per timed run (step arms)")
    parser.add_argument("--compile", action="store_true", help="add the CUDA-graphed static step (CUDA only)")
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per arm (median)")
    parser.add_argument("--copy-bytes", type=int, default=1 << 30, help="bytes of the measured device copy")
    parser.add_argument("--vs-transformers", action="store_true", help="also the tiny-config transformers ratio")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = benchmark_device(parser, args.device, args.tiny)
    if args.tiny:
        args.recipe = "configs/native/tiny.yaml" if args.recipe == parser.get_default("recipe") else args.recipe
        args.batch_sizes = [b for b in args.batch_sizes if b <= 4] or [1]
        args.prompt_len, args.new_tokens = min(args.prompt_len, 16), min(args.new_tokens, 16)
        args.repeats, args.copy_bytes = min(args.repeats, 2), min(args.copy_bytes, 1 << 24)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the engine decodes small models (fast_decode.decode_threads); shared cores stall

    from omegaconf import OmegaConf

    bundle = load_bundle(resolve_bundle_path(OmegaConf.load(args.recipe).data.init_args.tokenizer),
                         load_image_tokenizer=False)
    vocab, grid = bundle.vocab, tuple(bundle.image_grid)
    config, _, _ = recipe_decoder_config(args.recipe, vocab.size)
    config = replace(config, attention_backend="sdpa")  # decode attention always goes through SDPA
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    decoder = Decoder(config).to(device=device, dtype=dtype).eval()
    dtype_bytes = torch.finfo(dtype).bits // 8

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    bandwidth = measured_copy_bandwidth(device, args.copy_bytes, repeats=20 if device.type == "cuda" else 3)
    spec_bandwidth = device_peak_bandwidth(name) if device.type == "cuda" else None
    n_weights = sum(p.numel() for p in decoder.parameters())
    print(f"device: {name} | torch {torch.__version__} | {str(dtype).removeprefix('torch.')} weights and KV cache | "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"model: shape of {args.recipe}: d_model {config.d_model}, {config.n_layers} layers, {config.n_heads} heads "
          f"({config.n_kv_heads} kv), vocab {config.vocab_size}, {n_weights / 1e6:.1f}M parameters "
          f"({n_weights * dtype_bytes / 2**20:.0f} MiB); image grid {grid[0]}x{grid[1]}")
    spec_text = f"{spec_bandwidth / 1e12:.2f} TB/s" if spec_bandwidth else "n/a"
    print(f"memory bandwidth: measured copy {bandwidth / 1e12:.3f} TB/s ({args.copy_bytes / 2**20:.0f} MiB, read + "
          f"write); datasheet {spec_text}")
    print(f"decode: prompt {args.prompt_len} tokens, {args.new_tokens} steps per run, median of {args.repeats}")
    if device.type == "cpu":
        print("note: CPU smoke run; the weights fit in the CPU caches, so the DRAM-bandwidth bound means nothing here")
    print()

    rows: list[tuple] = []  # (batch, arm, tokens/s, ms/step, bound, datasheet bound, error)
    max_len = args.prompt_len + args.new_tokens
    mean_context = args.prompt_len + (args.new_tokens + 1) // 2
    image_budget = bundle.image_tokens - 1  # codes (and <eol>s) then <eoi>
    prompt = [vocab.bos, *range(10, 10 + max(1, args.prompt_len - 2)), vocab.boi]  # text then <boi>
    for B in args.batch_sizes:
        bound_bytes = decode_bytes_per_step(config, B, mean_context, dtype_bytes)
        bound = speed_of_light_tokens_per_s(bound_bytes, bandwidth, B)
        spec_bound = speed_of_light_tokens_per_s(bound_bytes, spec_bandwidth, B) if spec_bandwidth else None

        def add(arm: str, seconds: float | None, tokens: int, steps: int, error: str | None = None) -> None:
            rate = tokens / seconds if seconds else math.nan
            ms = 1e3 * seconds / steps if seconds else math.nan
            rows.append((B, arm, rate, ms, bound, spec_bound, error))
            print(f"  batch {B:>2} {arm:<30} " + (f"FAILED {error}" if error else f"{rate:>10,.0f} tok/s"), flush=True)

        # ---- the decode step alone: the eager step (the engine's), the static step eager / CUDA-graphed
        cache = prefill(decoder, B, args.prompt_len, max_len, vocab.n_text, args.seed)
        first = torch.full((B,), vocab.bos, device=device)
        positions = torch.full((B,), args.prompt_len, device=device)
        n_tokens = B * args.new_tokens

        fast_cache = clone_cache(cache)
        fast = DecodeStep(decoder, fast_cache)

        def fast_run() -> None:
            rewind(fast_cache, args.prompt_len)
            with torch.inference_mode():
                decode_loop(fast, first, positions, args.new_tokens)

        add("fast step (eager)", timed(fast_run, device, args.repeats), n_tokens, args.new_tokens)

        n_check = min(8, args.new_tokens)
        fed, reference = reference_logits(decoder, cache, first, positions, n_check)
        tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4  # static vs dynamic shapes, different rounding
        arms = [("static step (eager)", lambda c: DecodeStep(decoder, c, static=True))]
        if args.compile and device.type == "cuda":
            arms.append(("static step (CUDA graphs)", lambda c: CUDAGraphDecodeStep(decoder, c)))
        for label, make in arms:
            try:
                static_cache = clone_cache(cache)
                with torch.inference_mode():
                    static = make(static_cache)
                worst = static_disagreement(static, static_cache, fed, reference, positions, args.prompt_len)
                print(f"  batch {B:>2} {label} vs the eager step's logits over {n_check} steps: max relative "
                      f"difference {worst:.1e} (tolerance {tolerance:g})")
                if not worst < tolerance:
                    add(label, None, 0, 1, f"disagrees with the eager step ({worst:.1e}); not timed")
                    continue

                def static_run(static=static, static_cache=static_cache) -> None:
                    rewind(static_cache, args.prompt_len)
                    with torch.inference_mode():
                        decode_loop(static, first, positions, args.new_tokens)

                add(label, timed(static_run, device, args.repeats), n_tokens, args.new_tokens)
            except Exception as error:  # report, keep the other figures
                add(label, None, 0, 1, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")

        # ---- the engine end to end: B images without and with guidance
        def images(cfg_scale: float, decode_step: str) -> None:
            out = generate_ids(decoder, vocab, grid, [prompt] * B, mode="image", max_new_tokens=image_budget,
                               seed=args.seed, cfg_scale=cfg_scale, use_eol=bundle.use_eol, decode_step=decode_step)
            if any(len(ids) != image_budget or ids[-1] != vocab.eoi for ids in out):
                raise RuntimeError("the engine wrote a malformed image")

        # the engine's default step, and on CUDA its graphed step (decode_step="cuda_graph": captured per call)
        for decode_step in ["fast"] + (["cuda_graph"] if device.type == "cuda" else []):
            suffix = "" if decode_step == "fast" else ", graphs"
            try:
                plain = timed(lambda: images(1.0, decode_step), device, args.repeats)
                guided = timed(lambda: images(args.cfg_scale, decode_step), device, args.repeats)
            except Exception as error:  # keep the other arms' figures
                add(f"engine image{suffix}", None, 0, 0, f"{type(error).__name__}: {error}")
                continue
            add(f"engine image, no CFG{suffix}", plain, B * image_budget, image_budget)
            add(f"engine image, cfg {args.cfg_scale:g}{suffix}", guided, B * image_budget, image_budget)
            print(f"  batch {B:>2} seconds per image{suffix}: {plain / B:.4f} (no CFG), {guided / B:.4f} (cfg "
                  f"{args.cfg_scale:g}); CFG cost {guided / plain:.2f}x")

    header = (f"{'batch':>5}  {'arm':<30} {'tokens/s':>11} {'ms/step':>8} {'bound tok/s':>12} {'of bound':>9} "
              f"{'of datasheet bound':>19}")
    print("\n" + header + "\n" + "-" * len(header))
    for B, arm, rate, ms, bound, spec_bound, error in rows:
        if error:
            print(f"{B:>5}  {arm:<30} FAILED {error}")
            continue
        spec = f"{rate / spec_bound:.1%}" if spec_bound else "n/a"
        print(f"{B:>5}  {arm:<30} {rate:>11,.0f} {ms:>8.3f} {bound:>12,.0f} {rate / bound:>9.1%} {spec:>19}")
    batch1 = [r for r in rows if r[0] == 1 and not r[6] and math.isfinite(r[2])]
    if batch1:
        best = max(batch1, key=lambda r: r[2])
        verdict = "goal met" if best[2] / best[4] >= GOAL_FRACTION else "goal NOT met"
        if device.type == "cpu":
            verdict = "no verdict on a CPU smoke run"
        print(f"\nbatch 1 best: {best[1]}, {best[2] / best[4]:.1%} of the measured-bandwidth bound "
              f"(goal >= {GOAL_FRACTION:.0%}): {verdict}")
    if args.vs_transformers:
        print()
        vs_transformers(device, 32 if args.tiny else 256, 1 if args.tiny else 3)


if __name__ == "__main__":
    main()
