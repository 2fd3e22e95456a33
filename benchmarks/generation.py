"""Decode speed of the generation engine vs Hugging Face ``ChameleonForConditionalGeneration``, and the cost of CFG.

Both arms run the SAME tiny random decoder (ours is built and seeded here, then exported into HF with
``chameleon_lite.model.hf_port.export_hf_chameleon_state``): batch 1, greedy, ``--new-tokens`` new tokens, fp32, CPU.

Fairness of the text arm:

- ours is ``generate_ids(mode="text")``, which masks image codes and control tokens (all but ``<sep>``) at every
  step; HF gets the very same allowed-token mask as a ``LogitsProcessor`` (and an empty ``vocabulary_map``, so HF
  adds no ``IMGIMG*`` masking of its own). Both sides therefore pay for one masking op per step.
- HF runs with ``min_new_tokens == max_new_tokens`` (``<eos>`` banned); our engine always stops on ``<eos>``, so
  the benchmark checks that our greedy path never emits it (the seed is chosen so; it is reported) and that both
  sides produced the full budget. With identical weights and masks the greedy tokens should then be identical;
  whether they are is printed (a late mismatch can come from a near-tie broken differently by fp32 rounding).

The guidance arm times one image (``mode="image"``: prompt ``<bos> text <boi>``, ``h*w`` codes then ``<eoi>``,
image codes sampled at temperature 1) with ``cfg_scale`` and the default unconditional prompt ``<bos> <boi>``
(a 2-row batch, one forward per step) against the same call without guidance (goal: ratio <= 1.3).

Each arm is warmed up once, the arms of a comparison are timed alternately, and the median of ``--repeats``
runs is reported.

Threads: ``--threads`` sets torch's intra-op threads for the process (both arms). Our engine decodes small models
(``d_model <= 1024``) single-threaded on CPU whatever that setting (``fast_decode.decode_threads``: at these sizes
parallel regions cost more than they save, and on shared cores they stall); transformers uses the setting. When
other jobs load the machine, transformers' 2-thread regions stall and the ratio balloons; ``--threads 1`` gives
the comparison against transformers at its own best single-threaded speed.

    python benchmarks/generation.py --new-tokens 256 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from chameleon_lite.generation.fast_decode import decode_threads
from chameleon_lite.generation.native import generate_ids
from chameleon_lite.generation.sampling import ModalityConstraint, SamplingParams
from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import Decoder
from chameleon_lite.model.hf_port import export_hf_chameleon_state, hf_chameleon_config
from chameleon_lite.tokenization.vocab import Vocab


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, object]]:
    """Warm each arm up once, then time the arms alternately ``repeats`` times (so load from other processes hits
    every arm alike); -> {name: (median seconds, last result)}."""
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in fns}


def build_models(args: argparse.Namespace) -> tuple[Vocab, Decoder, torch.nn.Module]:
    """Our decoder (seeded random weights) and an HF ``ChameleonForConditionalGeneration`` with the same weights."""
    from transformers import ChameleonForConditionalGeneration

    n_special = Vocab(n_text=8, codebook_size=1).n_special
    vocab = Vocab(n_text=args.vocab_size - n_special - args.codebook_size, codebook_size=args.codebook_size)
    config = DecoderConfig(vocab_size=vocab.size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                           max_seq_len=args.prompt_len + args.new_tokens + 8, init_std=args.init_std,
                           attention_backend="sdpa")
    torch.manual_seed(args.seed)
    ours = Decoder(config).eval()
    hf_config = hf_chameleon_config(config, attn_implementation="sdpa", bos_token_id=vocab.bos,
                                    eos_token_id=vocab.eos, pad_token_id=vocab.pad)
    hf = ChameleonForConditionalGeneration(hf_config).eval()
    missing, unexpected = hf.load_state_dict(export_hf_chameleon_state(ours), strict=False)
    if unexpected or any("vqmodel" not in name for name in missing):
        raise RuntimeError(f"weight export mismatch: missing={missing} unexpected={unexpected}")
    return vocab, ours, hf


def text_prompt(vocab: Vocab, length: int, seed: int) -> list[int]:
    """``<bos>`` then ``length - 1`` random text pieces (no sentencepiece specials)."""
    g = torch.Generator().manual_seed(seed)
    return [vocab.bos, *torch.randint(4, vocab.n_text, (length - 1,), generator=g).tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=5120, help="total ids (text + 8 controls + codebook)")
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--init-std", type=float, default=0.1, help="weight std (larger = fewer greedy near-ties)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--grid", type=int, nargs=2, default=(8, 8), metavar=("H", "W"))
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers
    transformers.logging.set_verbosity_error()

    vocab, ours, hf = build_models(args)
    grid = (args.grid[0], args.grid[1])
    prompt = text_prompt(vocab, args.prompt_len, args.seed)
    n_new = args.new_tokens
    greedy = SamplingParams(temperature=0.0, image_temperature=0.0)

    # ------------------------------------------------------------------ text: ours vs HF, same weights and mask
    allowed = ModalityConstraint(vocab, grid, "text").text_allowed  # (V,) what mode="text" lets out of a text row

    def hf_mask(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # scores: (B, V)
        return scores.masked_fill(~allowed, float("-inf"))

    input_ids = torch.tensor([prompt])  # (1, T)

    def run_hf() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n_new,
                              min_new_tokens=n_new, do_sample=False, use_cache=True, logits_processor=[hf_mask],
                              pad_token_id=vocab.pad, eos_token_id=vocab.eos)
        return out[0, input_ids.shape[1]:].tolist()

    def run_ours() -> list[int]:
        return generate_ids(ours, vocab, grid, [prompt], mode="text", max_new_tokens=n_new, sampling=greedy)[0]

    timed = median_seconds({"ours": run_ours, "hf": run_hf}, args.repeats)
    (t_ours, ids_ours), (t_hf, ids_hf) = timed["ours"], timed["hf"]
    tps_ours, tps_hf = len(ids_ours) / t_ours, len(ids_hf) / t_hf
    same = ids_ours == ids_hf
    first_diff = next((i for i, (a, b) in enumerate(zip(ids_ours, ids_hf)) if a != b), None)

    # ------------------------------------------------------------------ image: guidance cost
    h, w = grid
    image_prompt = [*prompt, vocab.boi]
    image_budget = h * w + 1  # codes + <eoi>

    def run_image(cfg_scale: float) -> list[int]:
        uncond = [[vocab.bos, vocab.boi]] if cfg_scale != 1 else None
        return generate_ids(ours, vocab, grid, [image_prompt], mode="image", max_new_tokens=image_budget,
                            seed=args.seed, cfg_scale=cfg_scale, uncond_prompts=uncond)[0]

    timed = median_seconds({"plain": lambda: run_image(1.0), "cfg": lambda: run_image(args.cfg_scale)}, args.repeats)
    (t_plain, img_plain), (t_cfg, img_cfg) = timed["plain"], timed["cfg"]
    for name, ids in (("plain", img_plain), ("cfg", img_cfg)):
        if len(ids) != image_budget or ids[-1] != vocab.eoi or not all(vocab.is_image(t) for t in ids[:-1]):
            raise RuntimeError(f"{name} image is malformed: {len(ids)} ids")

    # ------------------------------------------------------------------ report
    ours_threads = decode_threads(ours) or torch.get_num_threads()
    print(f"config: d_model={args.d_model} layers={args.n_layers} heads={args.n_heads} vocab={vocab.size} "
          f"(text {vocab.n_text}, codebook {vocab.codebook_size}) params={sum(p.numel() for p in ours.parameters())}"
          f" | batch 1, fp32, CPU threads={torch.get_num_threads()} (ours decodes with {ours_threads}), "
          f"prompt {len(prompt)} tokens, seed {args.seed}")
    print(f"tokens: ours {len(ids_ours)} new (eos emitted: {vocab.eos in ids_ours}), HF {len(ids_hf)} new; "
          f"greedy tokens identical: {same}" + ("" if same else f" (first difference at step {first_diff})"))
    print("note: both sides use the text-mode allowed-token mask (HF via a LogitsProcessor); HF bans <eos> through "
          "min_new_tokens, ours would stop on it, so equal lengths mean neither path was cut short.")
    rows = [
        ("text decode, ours", f"{t_ours:.3f} s", f"{tps_ours:.1f} tok/s"),
        ("text decode, transformers", f"{t_hf:.3f} s", f"{tps_hf:.1f} tok/s"),
        ("speed-up ours / transformers", "", f"{tps_ours / tps_hf:.2f}x (goal >= 3)"),
        (f"image {h}x{w}, no CFG", f"{t_plain:.3f} s", f"{t_plain:.3f} s/image"),
        (f"image {h}x{w}, cfg_scale={args.cfg_scale:g}", f"{t_cfg:.3f} s", f"{t_cfg:.3f} s/image"),
        ("CFG cost (cfg / no CFG)", "", f"{t_cfg / t_plain:.2f}x (goal <= 1.3)"),
    ]
    print(f"\nmedian of {args.repeats} alternated runs (after 1 warm-up each) | torch {torch.__version__} | "
          f"transformers {transformers.__version__}")
    for name, seconds, rate in rows:
        print(f"  {name:<32} {seconds:>9} {rate:>24}")


if __name__ == "__main__":
    main()
