"""Train both arms of a comparison under a matched sample budget, through their ordinary recipes.

Each arm is trained with ``chameleon-lite fit`` recipes (run in-process through ``run_lightning_cli``) with
overrides for the data, the run directory, the seed and the number of steps:

- **native**: ``max_steps`` is the smallest number of steps whose packed rows hold at least ``train_samples``
  samples (counted exactly from the packer's epoch plans: one document is one training sample in one task format,
  except a per-image QA document, which holds each of its questions);
- **baseline**: the ViT is pretrained first (contrastive; its samples are reported but not charged to the budget,
  just as the native arm's VQ tokenizer was trained beforehand), then stage 1 gets ``stage1_fraction`` of the
  budget and stage 2 the rest, in rows of one sample each.

With ``bar`` (a ``comparison.progress.PipelineProgress``) each fit names its stage on that one bar, advances it
by the samples of each training batch (counted as above) and shows no Lightning progress bar of its own.

FLOPs follow ``lit_native.flops_per_token`` (6N per token for trained weights plus attention) for the decoder;
the baseline adds its ViT (2N per patch token when frozen, 6N when trained) and projector (6N per patch token).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chameleon_lite.comparison.evaluate import PeakMemory
from chameleon_lite.comparison.progress import PipelineProgress, spread
from chameleon_lite.training.lightning_cli import run_lightning_cli
from chameleon_lite.training.lit_native import flops_per_token
from chameleon_lite.world.shapes_world import load_world_spec

__all__ = ["ArmTraining", "baseline_flops", "train_native", "train_baseline", "train_preference", "read_loss_curve"]


@dataclass
class ArmTraining:
    """What training one arm cost."""

    model_dir: str
    samples_seen: int
    steps: int
    seconds: float
    tokens: int
    flops: float
    samples_per_s: float
    tokens_per_s: float
    peak_memory_mb: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    stages: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_loss_curve(run_dir: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    """``(step, value)`` rows of a CSVLogger run's ``metrics.csv`` (the newest version)."""
    files = sorted(Path(run_dir).glob("logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    with open(files[-1]) as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def _common(run_dir: Path, seed: int, steps: int, progress: bool) -> list[str]:
    log_every = max(1, min(10, steps // 10))  # short runs still get a loss curve
    return [f"--seed_everything={seed}", f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={run_dir}",
            f"--trainer.log_every_n_steps={log_every}",
            f"--trainer.logger.init_args.save_dir={run_dir}", f"--trainer.enable_progress_bar={str(progress).lower()}",
            "--trainer.enable_model_summary=false",  # no summary table per stage (see lightning_cli.quiet_lightning)
            f"--model.init_args.seed={seed}", f"--data.init_args.seed={seed}"]


def _fit(recipe: str, overrides: list[str], callbacks: list[Any] = ()) -> tuple[Any, float, float]:
    """Run ``fit``; returns the CLI, the wall time and the peak memory (MiB) while it ran."""
    start = time.perf_counter()
    with PeakMemory() as memory:
        cli = run_lightning_cli(["fit", "--config", recipe, *overrides], callbacks=callbacks)
    return cli, time.perf_counter() - start, memory.peak_mb


def _val_every(steps: int) -> str:
    return f"--trainer.val_check_interval={max(1, steps // 2)}"


def _stage(bar: PipelineProgress | None, name: str) -> None:
    if bar is not None:
        bar.stage(name)


def train_native(recipe: str, out: Path, *, tokens: str, tokenizer: str, train_samples: int, seed: int,
                 extra: list[str] = (), progress: bool = True, bar: PipelineProgress | None = None,
                 label: str = "") -> ArmTraining:
    """Train the native arm from ``recipe`` on ``tokens/{train,val}`` until it has seen ``train_samples`` documents.

    ``bar``: the comparison's progress display (stage ``"<label> · native"``; replaces Lightning's bar).
    """
    run_dir = out / "native"
    _stage(bar, f"{label} · native".lstrip(" ·"))
    base = [f"--data.init_args.train_tokens={tokens}/train", f"--data.init_args.val_tokens={tokens}/val",
            f"--data.init_args.tokenizer={tokenizer}", f"--model.init_args.tokenizer={tokenizer}", *extra]
    probe = run_lightning_cli(["--config", recipe, *base, f"--data.init_args.seed={seed}"], run=False)
    dm = probe.datamodule
    dm.setup("fit")
    loader = dm.train_dataloader(rank=0, world_size=1)
    packer = dm._packer("train")
    steps, samples, n_tokens = 0, 0, 0
    per_step: list[int] = []  # samples of each step (the progress bar's increments)
    while samples < train_samples:
        before = samples
        for epoch, row in loader.rows(steps):
            plan = packer.plan(epoch)
            lo, hi = plan.row_starts[row], plan.row_starts[row + 1]
            samples += int(packer.docs.doc_samples[plan.order[lo:hi]].sum())  # a per-image QA document holds several
            n_tokens += int(packer.docs.doc_len[plan.order[lo:hi]].sum())
        per_step.append(samples - before)
        steps += 1
    overrides = [*base, *_common(run_dir, seed, steps, progress and bar is None), _val_every(steps),
                 f"--trainer.callbacks.init_args.out_dir={run_dir / 'model'}"]
    if bar is not None:
        bar.plan(train_samples, samples)
    cli, seconds, peak = _fit(recipe, overrides, [bar.callback(per_step)] if bar is not None else [])
    config = cli.model.config
    return ArmTraining(
        model_dir=str(run_dir / "model"), samples_seen=samples, steps=steps, seconds=seconds, tokens=n_tokens,
        flops=flops_per_token(config, dm.seq_len) * n_tokens, samples_per_s=samples / seconds,
        tokens_per_s=n_tokens / seconds, peak_memory_mb=peak, loss_curve=read_loss_curve(run_dir))


def _vit_params(module: Any) -> tuple[int, int]:
    vlm = module.vlm
    return sum(p.numel() for p in vlm.encoder.parameters()), sum(p.numel() for p in vlm.projector.parameters())


def baseline_flops(module: Any, *, rows: int, tokens: int, seq_len: int) -> float:
    """Training FLOPs of ``rows`` rows of a baseline stage (a ``BaselineVLMModule``), one image per row.

    The decoder costs ``flops_per_token(decoder, seq_len)`` for each of its ``tokens`` (text plus visual tokens,
    after placeholder expansion); every row's image adds its ViT (2N per patch token when the encoder is frozen,
    6N when it is trained) and the projector (6N per patch token).
    """
    vit, proj = _vit_params(module)
    n_patches = module.vlm.encoder.num_patches
    vit_factor = 6.0 if module.trainable["encoder"] else 2.0
    return (flops_per_token(module.config.decoder, seq_len) * tokens
            + (vit_factor * vit + 6.0 * proj) * n_patches * rows)


def train_baseline(encoder_recipe: str, stage1_recipe: str, stage2_recipe: str, out: Path, *, raw: str,
                   tokenizer: str, train_samples: int, stage1_fraction: float, encoder_samples: int, seed: int,
                   extra: dict[str, list[str]] | None = None, progress: bool = True,
                   bar: PipelineProgress | None = None, label: str = "", export_scorer: bool = False) -> ArmTraining:
    """Encoder pretraining, then stage 1 and stage 2 sharing ``train_samples`` (``stage1_fraction`` to stage 1).

    When ``raw`` is a shapes world (it holds ``world.yaml``), every stage reads its images at the world's own
    resolution (``--data.init_args.image_size``), whatever the recipes say, as the native arm's tokenizer does.
    ``bar``: the comparison's progress display (stages ``"<label> · baseline encoder"``, ``... stage 1``,
    ``... stage 2``; replaces Lightning's bars). ``export_scorer``: also write the whole contrastive model of the
    ViT's pretraining to ``out/baseline-encoder/scorer`` (the text->image R-precision judge;
    ``stages["encoder"]["scorer_dir"]``).
    """
    prefix = f"{label} · baseline".lstrip(" ·")
    progress = progress and bar is None
    if not 0.0 <= stage1_fraction < 1.0:
        raise ValueError(f"stage1_fraction={stage1_fraction} must be in [0, 1)")
    extra = extra or {}
    data = [f"--data.init_args.tokenizer={tokenizer}", f"--model.init_args.tokenizer={tokenizer}"]
    if (Path(raw) / "world.yaml").is_file():
        data.append(f"--data.init_args.image_size={load_world_spec(raw).world.image_size}")
    stages: dict[str, Any] = {}
    total_seconds = 0.0

    enc_dir = out / "baseline-encoder"
    _stage(bar, f"{prefix} encoder")
    probe = run_lightning_cli(["--config", encoder_recipe, *data, *extra.get("encoder", [])], run=False)
    enc_batch = probe.datamodule.batch_size
    enc_steps = max(1, math.ceil(encoder_samples / enc_batch))
    if bar is not None:
        bar.plan(encoder_samples, enc_steps * enc_batch)
    callbacks = [bar.callback([enc_batch] * enc_steps)] if bar is not None else []
    if export_scorer:
        from chameleon_lite.training.lit_baseline import ExportContrastiveScorer

        callbacks.append(ExportContrastiveScorer(str(enc_dir / "scorer")))
    cli, seconds, _ = _fit(encoder_recipe, [
        *data, f"--data.init_args.train_shards={raw}/train/pairs-*.tar",
        f"--data.init_args.val_shards={raw}/val/pairs-*.tar", *_common(enc_dir, seed, enc_steps, progress),
        _val_every(enc_steps), f"--trainer.callbacks.init_args.out_dir={enc_dir / 'encoder'}",
        *extra.get("encoder", [])], callbacks)
    total_seconds += seconds
    retrieval = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    stages["encoder"] = {"samples": enc_steps * enc_batch, "steps": enc_steps, "seconds": seconds,
                         "validation": retrieval, "charged_to_budget": False,
                         **({"scorer_dir": str(enc_dir / "scorer")} if export_scorer else {})}

    samples_seen, steps_total, tokens_total, flops_total, peak_total = 0, 0, 0, 0.0, 0.0
    curve: list[tuple[int, float]] = []
    previous = None
    for stage, recipe, share in (("stage1", stage1_recipe, stage1_fraction), ("stage2", stage2_recipe, None)):
        run_dir = out / f"baseline-{stage}"
        _stage(bar, f"{prefix} stage {stage[-1]}")
        shards = [f"--data.init_args.train_shards={raw}/train/*.tar", f"--data.init_args.val_shards={raw}/val/*.tar"]
        probe = run_lightning_cli(["--config", recipe, *data, *shards, *extra.get(stage, [])], run=False)
        batch = probe.datamodule.batch_size
        # rows hold one sample, or every question about an image (qa_per_image): samples per row on average
        per_row = probe.datamodule.samples_per_row if getattr(probe.datamodule, "qa_per_image", False) else 1.0
        budget = train_samples * share if share is not None else train_samples - samples_seen
        steps = max(1, math.ceil(budget / (batch * per_row)))
        n_rows = steps * batch
        n_samples = int(round(n_rows * per_row))  # exact for one sample per row, the expectation otherwise
        if bar is not None:  # the bar's total holds this stage's nominal share of the budget
            bar.plan(train_samples * (share if share is not None else 1.0 - stage1_fraction), n_samples)
        init = ([f"--model.init_args.encoder_init={enc_dir / 'encoder'}"] if stage == "stage1"
                else [f"--model.init_args.init_from={previous}"])
        cli, seconds, peak = _fit(recipe, [
            *data, *shards, *_common(run_dir, seed, steps, progress), _val_every(steps),
            f"--trainer.callbacks.init_args.out_dir={run_dir / 'model'}", *init, *extra.get(stage, [])],
            [bar.callback(spread(n_samples, steps))] if bar is not None else [])
        total_seconds += seconds
        module, dm = cli.model, cli.datamodule
        n_visual = module.vlm.visual_tokens
        train_data = dm.train_data
        groups = [r if isinstance(r, list) else [r] for r in dm.train_rows()]
        row_len = np.mean([2 + sum(len(train_data.prompt[i]) + len(train_data.target[i]) for i in g)
                           for g in groups]) - 1 + n_visual  # expected tokens per row after expansion
        n_tokens = int(round(row_len * n_rows))
        flops = baseline_flops(module, rows=n_rows, tokens=n_tokens, seq_len=int(row_len))
        stage_curve = read_loss_curve(run_dir)
        curve += [(steps_total + s, v) for s, v in stage_curve]
        stages[stage] = {"samples": n_samples, "rows": n_rows, "steps": steps, "seconds": seconds, "tokens": n_tokens,
                         "flops": flops, "validation": {k: float(v) for k, v in cli.trainer.callback_metrics.items()
                                                        if k.startswith("val/")}}
        samples_seen += n_samples
        steps_total += steps
        tokens_total += n_tokens
        flops_total += flops
        peak_total = max(peak_total, peak)
        previous = run_dir / "model"
    train_seconds = stages["stage1"]["seconds"] + stages["stage2"]["seconds"]
    return ArmTraining(
        model_dir=str(previous), samples_seen=samples_seen, steps=steps_total, seconds=total_seconds,
        tokens=tokens_total, flops=flops_total, samples_per_s=samples_seen / train_seconds,
        tokens_per_s=tokens_total / train_seconds, peak_memory_mb=peak_total, loss_curve=curve, stages=stages)


def train_preference(recipe: str, out: Path, arm: str, *, init_from: str, pairs_glob: str, pairs: int, seed: int,
                     extra: list[str] = (), progress: bool = True, bar: PipelineProgress | None = None,
                     label: str = "") -> dict[str, Any]:
    """Stage 3: DPO of the model in ``init_from`` on the pairs in ``pairs_glob`` for one epoch of ``pairs`` pairs
    (``ceil(pairs / batch_size)`` steps, the same for both arms); writes ``out/<arm>-dpo/model``.

    Returns what it cost and the fit's last validation numbers (``val/reward_accuracy``, ``val/margin``).
    """
    run_dir = out / f"{arm}-dpo"
    _stage(bar, f"{label} · {arm} DPO".lstrip(" ·"))
    base = [f"--model.init_args.init_from={init_from}", f"--data.init_args.train_pairs={pairs_glob}", *extra]
    probe = run_lightning_cli(["--config", recipe, *base], run=False)
    batch = probe.datamodule.hparams.batch_size
    steps = max(1, math.ceil(pairs / batch))
    if bar is not None:
        bar.plan(pairs, steps * batch)
    cli, seconds, peak = _fit(recipe, [
        *base, *_common(run_dir, seed, steps, progress and bar is None), f"--trainer.val_check_interval={steps}",
        f"--trainer.callbacks.init_args.out_dir={run_dir / 'model'}"],
        [bar.callback([batch] * steps)] if bar is not None else [])
    n_train = len(cli.datamodule.train)  # fewer than `pairs` when the split has fewer: then several epochs
    full, rest = divmod(steps, math.ceil(n_train / batch))
    seen = full * n_train + min(rest * batch, n_train)
    return {"model_dir": str(run_dir / "model"), "pairs_seen": seen, "steps": steps, "seconds": seconds,
            "peak_memory_mb": peak, "loss_curve": read_loss_curve(run_dir),
            "validation": {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}}
