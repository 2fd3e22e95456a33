"""CPU training efficiency of the shipped recipes: steps/s, tokens/s and achieved FLOP/s against measured peaks.

What it measures, in one run:

1. this machine's matmul peaks: ``perf.measured_matmul_flops("cpu", dtype, n=2048)`` in bf16 and fp32, and the
   precision ``perf.fastest_cpu_precision()`` picks;
2. for each recipe (``--recipes``) under each precision (``--precisions``), and also compiled with ``--compile``
   (modules with a ``compile`` argument only: ``NativeLMModule``): train steps/s, tokens/s, achieved FLOP/s and
   that as a percentage of the bf16 peak, of the fp32 peak and of the peak of the precision the run used.

Each recipe is built with ``run_lightning_cli`` (``run=False``: the recipe's model, data module and Trainer, with
overrides) and fitted with ``trainer.fit`` for ``--warmup + --steps`` optimizer steps, logger, checkpointing,
validation and the recipe's callbacks off. A callback records ``time.perf_counter()`` and the work of the batch
at every ``on_train_batch_end``; the first ``--warmup`` steps are not timed. The data is a shapes world of
``--world-train`` scenes generated into a temporary directory (pre-tokenized for native recipes). Baseline stages
get their ``encoder_init`` / ``init_from`` inputs from one-step runs of the sibling recipes
(``encoder_<size>.yaml`` -> ``stage1_<size>.yaml``, the chain of ``comparison.training.train_baseline``).

Tokens and FLOPs of the timed batches:

- native (``NativeLMModule``): non-padding input tokens; ``lit_native.flops_per_token(config, seq_len)`` each;
- baseline stages (``BaselineVLMModule``): decoder tokens after the ``<image>`` placeholder is expanded into the
  projector's visual tokens; FLOPs from ``comparison.training.baseline_flops`` (decoder, plus ViT at 2N per
  patch token frozen or 6N trained, plus projector at 6N per patch token), as the comparison counts them;
- contrastive encoder (``ContrastiveEncoderModule``): patch tokens plus caption tokens; 6N of the ViT per patch
  token plus 6N of the text tower per text token (the tower's token-embedding table is a lookup and not counted,
  as ``flops_per_token`` leaves out the decoder's input embedding; the projection heads act once per sample).

Run from the repository root (the default recipes are named relative to it), on an otherwise idle machine: other
processes on the cores lower both the peaks and the training rates, by different amounts. When the cores are
shared anyway, ``--threads 1``: with two torch threads on two busy cores each parallel region waits for the
descheduled thread, and training steps were measured 5-20x slower than on one thread (the 2048^3 matmul, one
long region, hardly notices), so the percentages of peak would be meaningless.

    python benchmarks/cpu_train_efficiency.py                       # the four tiny recipes, 32-true and bf16-mixed
    python benchmarks/cpu_train_efficiency.py --steps 6 --warmup 2 --world-train 300 \\
        --recipes configs/native/tiny.yaml configs/baseline/stage2_tiny.yaml --precisions 32-true --out eff.json
    python benchmarks/cpu_train_efficiency.py --compile             # adds compiled runs of the native recipe
    python benchmarks/cpu_train_efficiency.py --threads 1 ...       # on cores shared with other work
    python benchmarks/cpu_train_efficiency.py --tiny                # smoke run: 2 steps, batch 2, a tiny world
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import math
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from chameleon_lite.comparison.training import baseline_flops
from chameleon_lite.model.model_dir import resolve_bundle_path
from chameleon_lite.model.presets import expand_presets
from chameleon_lite.training.lightning_cli import run_lightning_cli
from chameleon_lite.training.lit_native import flops_per_token
from chameleon_lite.training.perf import fastest_cpu_precision, measured_matmul_flops

DEFAULT_RECIPES = ("configs/native/tiny.yaml", "configs/baseline/encoder_tiny.yaml",
                   "configs/baseline/stage1_tiny.yaml", "configs/baseline/stage2_tiny.yaml")
PRECISION_PEAK = {"32-true": "fp32", "bf16-mixed": "bf16", "bf16-true": "bf16"}  # which measured peak a run uses
PEAK_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
KINDS = {  # model class name -> recipe kind
    "NativeLMModule": "native",
    "BaselineVLMModule": "baseline",
    "ContrastiveEncoderModule": "encoder",
}
TINY = {"steps": 1, "warmup": 1, "world_train": 24, "batch_size": 2, "matmul_repeats": 2, "matmul_size": 256}
QUIET = ["--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
         "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false"]


# ---------------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """What the benchmark needs to know about a ``fit`` recipe before building it."""

    path: Path
    kind: str  # "native", "baseline" or "encoder"
    model_class: type
    init_args: dict[str, Any]
    data_args: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        raw = OmegaConf.load(path)
        class_path = str(raw.model.class_path)
        module_name, _, name = class_path.rpartition(".")
        if name not in KINDS:
            raise ValueError(f"{path}: model {class_path} is not one of {sorted(KINDS)}")
        model_class = getattr(importlib.import_module(module_name), name)
        # a decoder block's `preset:` expanded as the recipe loader does (chameleon_lite.model.presets)
        init_args = expand_presets(OmegaConf.to_container(raw.model.get("init_args", {}), resolve=False))
        data_args = OmegaConf.to_container(raw.data.get("init_args", {}), resolve=False)
        return cls(Path(path), KINDS[name], model_class, init_args, data_args)

    @property
    def can_compile(self) -> bool:
        return "compile" in inspect.signature(self.model_class.__init__).parameters

    def sibling(self, prefix: str) -> Path:
        """``configs/baseline/stage2_tiny.yaml`` -> ``configs/baseline/<prefix>_tiny.yaml`` (must exist)."""
        _, sep, size = self.path.stem.partition("_")
        found = self.path.with_name(f"{prefix}_{size}{self.path.suffix}")
        if not sep or not found.is_file():
            raise FileNotFoundError(f"{self.path} needs a {prefix} run first; expected its recipe at {found}")
        return found


# ---------------------------------------------------------------------------------------------- data
@dataclass
class World:
    """A generated shapes world (train split only) and its token shards, made on first use."""

    root: Path
    scenes: int
    tokens: dict[str, Path] = field(default_factory=dict)  # tokenizer bundle -> token shards of the train split
    inputs: dict[tuple[str, int | None], Path] = field(default_factory=dict)  # (recipe, image size) -> exported dir

    def __post_init__(self) -> None:
        from chameleon_lite.world.shapes_world import ShapesWorldSpec, write_shapes_world

        start = time.perf_counter()
        write_shapes_world(ShapesWorldSpec(train=self.scenes, val=0, test=0, seed=0), self.root / "raw",
                           progress=False)
        print(f"[world] {self.scenes} train scenes in {time.perf_counter() - start:.1f} s ({self.root / 'raw'})")

    @property
    def train(self) -> Path:
        return self.root / "raw" / "train"

    def token_shards(self, tokenizer: str) -> Path:
        """The train split pre-tokenized with ``tokenizer`` (a bundle directory)."""
        from chameleon_lite.data.pretokenize import tokenize_shards
        from chameleon_lite.tokenization.bundle import load_bundle
        bundle_dir = resolve_bundle_path(tokenizer)
        key = str(bundle_dir.resolve())
        if key not in self.tokens:
            out = self.root / "tokens" / f"{len(self.tokens)}-{bundle_dir.name}" / "train"
            stats = tokenize_shards(load_bundle(bundle_dir), str(self.train / "*.tar"), out, num_workers=0,
                                    progress=False)
            print(f"[world] {stats.samples} samples tokenized with {bundle_dir} in {stats.seconds:.1f} s")
            self.tokens[key] = out
        return self.tokens[key]


def data_overrides(recipe: Recipe, world: World, image_size: int | None, batch_size: int | None) -> list[str]:
    """Point the recipe's data at ``world`` (no validation data); optionally another image size and batch size."""
    if recipe.kind == "native":
        tokens = world.token_shards(str(recipe.data_args.get("tokenizer", "tokenizers/shapes-64")))
        out = [f"--data.init_args.train_tokens={tokens}", "--data.init_args.val_tokens=null"]
    else:
        pattern = Path(str(recipe.data_args.get("train_shards", "*.tar"))).name  # pairs-*.tar or *.tar
        out = [f"--data.init_args.train_shards={world.train / pattern}", "--data.init_args.val_shards=null"]
        if image_size is not None:  # the recipe's ${data.init_args.image_size} is resolved before overrides apply
            out += [f"--data.init_args.image_size={image_size}", f"--model.init_args.vit.image_size={image_size}"]
    if batch_size is not None:
        out.append(f"--data.init_args.batch_size={batch_size}")
    return out


def model_inputs(recipe: Recipe, world: World, image_size: int | None) -> list[str]:
    """Overrides naming the trained inputs a baseline stage starts from, made by one-step runs of the siblings."""
    args = recipe.init_args
    out = []
    if args.get("encoder_init"):
        out.append(f"--model.init_args.encoder_init={prerequisite(recipe.sibling('encoder'), world, image_size)}")
    if args.get("init_from"):
        out.append(f"--model.init_args.init_from={prerequisite(recipe.sibling('stage1'), world, image_size)}")
    if args.get("decoder_init"):
        raise ValueError(f"{recipe.path}: decoder_init is not supported by this benchmark")
    return out


def prerequisite(path: Path, world: World, image_size: int | None) -> Path:
    """Train ``path`` (an encoder or stage-1 recipe) for one step at batch 2 and export it; cached per world."""
    from chameleon_lite.training.lit_baseline import ExportBaselineDir, ExportVisionEncoder

    key = (str(path.resolve()), image_size)
    if key not in world.inputs:
        recipe = Recipe.load(path)
        name = f"{path.parent.name}-{path.stem}-{image_size or 'recipe-size'}"
        out, run_dir = world.root / "inputs" / name, world.root / "runs" / f"inputs-{name}"
        start = time.perf_counter()
        cli = run_lightning_cli([
            "--config", str(path), *data_overrides(recipe, world, image_size, batch_size=2),
            *model_inputs(recipe, world, image_size), *QUIET, "--trainer.max_steps=1",
            "--trainer.precision=32-true", f"--trainer.default_root_dir={run_dir}"], run=False)
        export = ExportVisionEncoder(str(out)) if recipe.kind == "encoder" else ExportBaselineDir(str(out))
        cli.trainer.callbacks.append(export)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        print(f"[inputs] {path} (1 step) -> {out} in {time.perf_counter() - start:.1f} s")
        world.inputs[key] = out
    return world.inputs[key]


# ---------------------------------------------------------------------------------------------- work per batch
def native_work(module: Any, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    ids = batch["input_ids"]  # (B, T) packed rows, padding at the end
    return {"rows": ids.shape[0], "seq_len": ids.shape[1], "tokens": int((ids != module.vocab.pad).sum())}


def baseline_work(module: Any, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    ids = batch["input_ids"]  # (B, T) <bos> <image> prompt target, right padded, before placeholder expansion
    vocab = module.vocab
    placeholders = int((ids == vocab.image_placeholder).sum())  # one per image
    text = int((ids != vocab.pad).sum()) - placeholders
    images = batch["images"].shape[0]  # (n_images, C, H, W)
    n_patches = module.vlm.encoder.num_patches
    return {"rows": ids.shape[0], "images": images, "tokens": text + placeholders * module.vlm.visual_tokens,
            "patch_tokens": images * n_patches}


def encoder_work(module: Any, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    images = batch["images"].shape[0]  # (B, C, H, W)
    patch_tokens = images * module.model.vision.num_patches
    text_tokens = int(batch["text_lengths"].sum())  # (B,) caption + <eos>, padding excluded
    return {"rows": images, "patch_tokens": patch_tokens, "text_tokens": text_tokens,
            "tokens": patch_tokens + text_tokens}


def contrastive_flops(module: Any, *, patch_tokens: int, text_tokens: int) -> float:
    """Training FLOPs of the contrastive encoder: 6N of the ViT per patch token, 6N of the text tower (without its
    token-embedding table, a lookup) per text token."""
    model = module.model
    vit = sum(p.numel() for p in model.vision.parameters())
    text = sum(p.numel() for p in model.text.parameters()) - model.text.embed_tokens.weight.numel()
    return 6.0 * vit * patch_tokens + 6.0 * text * text_tokens


def total_flops(kind: str, module: Any, work: list[dict[str, int]]) -> float:
    """FLOPs of the batches in ``work`` (the accounting of the module docstring)."""
    if kind == "native":
        return sum(flops_per_token(module.config, w["seq_len"]) * w["tokens"] for w in work)
    if kind == "baseline":
        rows, tokens = sum(w["images"] for w in work), sum(w["tokens"] for w in work)
        return baseline_flops(module, rows=rows, tokens=tokens, seq_len=max(1, int(tokens / rows)))
    return contrastive_flops(module, patch_tokens=sum(w["patch_tokens"] for w in work),
                             text_tokens=sum(w["text_tokens"] for w in work))


WORK: dict[str, Callable[[Any, dict[str, torch.Tensor]], dict[str, int]]] = {
    "native": native_work, "baseline": baseline_work, "encoder": encoder_work}


class StepClock(L.Callback):
    """``time.perf_counter()`` and the work of the batch at the end of every training batch."""

    def __init__(self, work: Callable[[Any, dict[str, torch.Tensor]], dict[str, int]]) -> None:
        self.work_of = work
        self.times: list[float] = []
        self.work: list[dict[str, int]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.times.append(time.perf_counter())
        self.work.append(self.work_of(pl_module, batch))


# ---------------------------------------------------------------------------------------------- one run
def time_recipe(recipe: Recipe, precision: str, compile: bool, *, world: World, steps: int, warmup: int,
                image_size: int | None, batch_size: int | None, peaks: dict[str, float]) -> dict[str, Any]:
    """Fit ``recipe`` for ``warmup + steps`` steps and return its rates over the last ``steps``."""
    run_dir = world.root / "runs" / f"{recipe.path.stem}-{precision}{'-compile' if compile else ''}"
    overrides = [*data_overrides(recipe, world, image_size, batch_size), *model_inputs(recipe, world, image_size),
                 *QUIET, f"--trainer.max_steps={warmup + steps}", f"--trainer.precision={precision}",
                 f"--trainer.default_root_dir={run_dir}"]
    if compile:
        overrides.append("--model.init_args.compile=true")
    start = time.perf_counter()
    cli = run_lightning_cli(["--config", str(recipe.path), *overrides], run=False)
    if cli.trainer.accumulate_grad_batches != 1:
        raise ValueError(f"{recipe.path}: gradient accumulation is not supported (one batch per step is assumed)")
    clock = StepClock(WORK[recipe.kind])
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wall = time.perf_counter() - start
    if len(clock.times) != warmup + steps:
        raise RuntimeError(f"{recipe.path}: {len(clock.times)} training batches ran, expected {warmup + steps}")
    seconds = clock.times[-1] - clock.times[warmup - 1]  # from the end of the last warm-up step
    timed = clock.work[warmup:]
    tokens = sum(w["tokens"] for w in timed)
    rows = sum(w["rows"] for w in timed)
    flops = total_flops(recipe.kind, cli.model, timed)
    flops_per_s = flops / seconds
    result = {
        "recipe": str(recipe.path), "kind": recipe.kind, "precision": precision, "compile": compile,
        "steps": steps, "warmup": warmup, "batch_size": cli.datamodule.batch_size, "seconds": seconds,
        "wall_seconds": wall, "step_seconds": [b - a for a, b in zip(clock.times[warmup - 1 :], clock.times[warmup:])],
        "rows": rows, "tokens": tokens, "flops": flops, "steps_per_s": steps / seconds,
        "samples_per_s": rows / seconds, "tokens_per_s": tokens / seconds, "flops_per_s": flops_per_s,
        "flops_per_token": flops / tokens,
    }
    for name, peak in peaks.items():
        result[f"pct_{name}_peak"] = 100.0 * flops_per_s / peak
    result["pct_precision_peak"] = result[f"pct_{PRECISION_PEAK[precision]}_peak"]
    return result


# ---------------------------------------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                            "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and "cpu" not in info:
            info["cpu"] = value.strip()
        if key.strip() == "flags" and "flags" not in info:
            flags = set(value.split())
            info["flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return info


def table(runs: list[dict[str, Any]]) -> str:
    head = ("| recipe | precision | compile | batch | steps/s | tokens/s | GFLOP/token | GFLOP/s | % bf16 peak "
            "| % fp32 peak | % own peak |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        lines.append(
            f"| {r['recipe']} | {r['precision']} | {'yes' if r['compile'] else 'no'} | {r['batch_size']} "
            f"| {r['steps_per_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['flops_per_token'] / 1e9:.4f} "
            f"| {r['flops_per_s'] / 1e9:.1f} | {r['pct_bf16_peak']:.1f} | {r['pct_fp32_peak']:.1f} "
            f"| {r['pct_precision_peak']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), help="fit recipes to time")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"], choices=sorted(PRECISION_PEAK))
    parser.add_argument("--compile", action="store_true",
                        help="also time each run compiled (recipes whose module takes a `compile` argument)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps at the start of each run")
    parser.add_argument("--world-train", type=int, default=300, help="train scenes of the generated shapes world")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side for baseline/encoder recipes (default: the recipe's); native recipes read "
                             "images at their tokenizer's size")
    parser.add_argument("--batch-size", type=int, default=None, help="override every recipe's batch size")
    parser.add_argument("--matmul-repeats", type=int, default=10, help="timed n^3 matmuls per peak")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the peak matmuls (default 2048)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's). On cores shared with other work, 1 thread "
                             "avoids OpenMP threads waiting on each other (steps measured up to 20x slower)")
    parser.add_argument("--out", type=Path, default=None, help="write every number to this JSON file")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the world and runs here (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"smoke run: {TINY['warmup']}+{TINY['steps']} steps at batch {TINY['batch_size']} on "
                             f"{TINY['world_train']} scenes, {TINY['matmul_repeats']} {TINY['matmul_size']}^3 "
                             "matmuls per peak")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup, args.world_train = TINY["steps"], TINY["warmup"], TINY["world_train"]
        args.batch_size, args.matmul_repeats = TINY["batch_size"], TINY["matmul_repeats"]
        args.matmul_size = TINY["matmul_size"]  # bf16 emulated on an AVX2-only CPU: 2048^3 takes minutes
    if args.steps < 1 or args.warmup < 1:
        parser.error("need --steps >= 1 and --warmup >= 1 (the clock starts at the end of the last warm-up step)")
    if args.world_train < 1 or args.matmul_repeats < 1 or any(
            v is not None and v < 1 for v in (args.batch_size, args.threads)):
        parser.error("need --world-train, --matmul-repeats, --batch-size and --threads >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; prints the peaks and the table and returns every number (what ``--out`` writes)."""
    args = parse_args(argv)
    recipes = [Recipe.load(path) for path in args.recipes]  # fail on a bad recipe before measuring anything
    # main() is also called in-process (the test): the thread count and log levels are put back at the end
    threads = torch.get_num_threads()
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for logger in loggers:
        logger.setLevel(logging.WARNING)  # no "Seed set to", "GPU available" lines per run
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            return _run(args, recipes)
    finally:
        torch.set_num_threads(threads)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _run(args: argparse.Namespace, recipes: list[Recipe]) -> dict[str, Any]:
    info = machine()
    info["load_average_start"] = os.getloadavg()
    print(f"torch {info['torch']}, {info['threads']} threads, {info.get('cpu', platform.processor())} "
          f"({' '.join(info.get('flags', []))}); load average {info['load_average_start'][0]:.2f}")
    n = args.matmul_size
    peaks = {name: measured_matmul_flops("cpu", dtype, n=n, repeats=args.matmul_repeats)
             for name, dtype in PEAK_DTYPES.items()}
    fastest = fastest_cpu_precision()
    print(f"measured {n}^3 matmul peaks: bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.1f} "
          f"GFLOP/s (bf16/fp32 {peaks['bf16'] / peaks['fp32']:.2f}); fastest_cpu_precision() -> {fastest}")

    runs = []
    with tempfile.TemporaryDirectory(prefix="cpu-train-efficiency-") as tmp:
        root = args.workdir or Path(tmp)
        world = World(root, args.world_train)
        for recipe in recipes:
            variants = [False, True] if args.compile and recipe.can_compile else [False]
            for precision in args.precisions:
                for compile in variants:
                    run = time_recipe(recipe, precision, compile, world=world, steps=args.steps, warmup=args.warmup,
                                      image_size=args.image_size, batch_size=args.batch_size, peaks=peaks)
                    print(f"[run] {run['recipe']} {precision}{' compiled' if compile else ''}: "
                          f"{run['steps_per_s']:.3f} steps/s, {run['tokens_per_s']:,.0f} tokens/s, "
                          f"{run['flops_per_s'] / 1e9:.1f} GFLOP/s ({run['wall_seconds']:.1f} s with setup)")
                    runs.append(run)
            if args.compile and not recipe.can_compile:
                print(f"[run] {recipe.path}: {recipe.model_class.__name__} has no compile argument; eager only")
    info["load_average_end"] = os.getloadavg()

    print()
    print(f"{args.warmup} warm-up + {args.steps} timed steps per run; tokens: native = non-padding packed tokens, "
          "baseline = text + visual decoder tokens, encoder = patch + caption tokens")
    print(table(runs))
    result = {"machine": info, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "peak_flops": peaks, "fastest_cpu_precision": fastest, "runs": runs}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    bad = [r["recipe"] for r in runs if not all(math.isfinite(r[k]) for k in ("steps_per_s", "flops_per_s"))]
    if bad:
        raise RuntimeError(f"non-finite rates for {bad}")
    return result


if __name__ == "__main__":
    main()
