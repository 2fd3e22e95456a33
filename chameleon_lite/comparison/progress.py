"""One progress display for a whole comparison, and the headline its command prints last.

``PipelineProgress`` is a single tqdm bar counting the training samples of every fit of ``compare`` (per seed: the
native arm's budget, the baseline's ViT pretraining and its budget); its description names the current stage
("seed 0 · native", "seed 0 · baseline stage 2", "seed 0 · evaluating native", ...) and tqdm shows the elapsed and
remaining time. Lightning's own per-fit bars are off while it runs. Each fit advances it through a small callback
(``SampleProgress``) with the samples of each training batch, counted as ``comparison.training`` counts the
samples it reports:

- native rows pack several documents: the exact samples of each step, from the packer's epoch plans;
- the baseline's encoder and stage rows: one sample per row (exact); with ``qa_per_image`` a row holds every
  question about an image and the stage's count is ``steps * batch * samples_per_row`` (the datamodule's mean),
  spread over the steps: the same expectation the report states.

Each stage's planned count replaces its budgeted share of the total before it trains (a fit's last step may pass
its budget), so the bar ends at exactly its total. Without a bar (``progress=False``) each stage prints one line.

``headline_lines`` is the short summary ``chameleon-lite compare`` and ``demo`` print at the end: the QA table of
the report (per category and overall, both arms, chance line), the native arm's text->image all-correct rate and
the report's path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

__all__ = ["PipelineProgress", "SampleProgress", "pipeline_samples", "headline_lines"]


def pipeline_samples(cfg: Any) -> int:
    """Training samples of a comparison: per seed, ``train_samples`` for each arm that is trained plus the
    baseline's ``encoder_samples`` (an arm loaded from ``model_dir`` trains nothing), plus the stage-3 preference
    pairs of both arms."""
    per_seed = 0 if cfg.native.model_dir else cfg.train_samples
    per_seed += 0 if cfg.baseline.model_dir else cfg.baseline.encoder_samples + cfg.train_samples
    per_seed += 2 * getattr(getattr(cfg, "stage3", None), "pairs", 0)
    return per_seed * len(cfg.seeds)


class SampleProgress(Callback):
    """Advances a ``PipelineProgress`` after each training batch by ``per_step[i]`` for the ``i``-th batch."""

    def __init__(self, bar: PipelineProgress, per_step: Sequence[int]):
        self.bar, self.per_step, self.batches = bar, list(per_step), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.batches < len(self.per_step) and trainer.is_global_zero:
            self.bar.advance(self.per_step[self.batches])
        self.batches += 1


class PipelineProgress:
    """A tqdm bar over a pipeline's training samples (``enabled=False``: no bar, one printed line per stage)."""

    def __init__(self, total: int, *, enabled: bool = True, prefix: str = "[compare]"):
        self.enabled, self.prefix = enabled, prefix
        self._total = float(total)
        self.n = 0
        self.started = time.perf_counter()
        self.bar = None  # drawn at the first stage, with its name

    @property
    def total(self) -> int:
        return int(round(self._total))

    def stage(self, name: str) -> None:
        """Name the current stage: the bar's description, or a printed line without a bar."""
        if self.enabled and self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.n, desc=name, unit="sample", unit_scale=self.total >= 1000,
                            dynamic_ncols=True, smoothing=0.1)
        elif self.bar is not None:
            self.bar.set_description(name)
        else:
            elapsed = time.strftime("%H:%M:%S", time.gmtime(time.perf_counter() - self.started))
            print(f"{self.prefix} {name} (elapsed {elapsed}, {self.n:,}/{self.total:,} training samples)", flush=True)

    def plan(self, budgeted: float, planned: int) -> None:
        """A stage's exact sample count ``planned`` replaces the share ``budgeted`` of the total it was given."""
        self._total += planned - budgeted
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def advance(self, n: int) -> None:
        self.n += int(n)
        if self.bar is not None:
            self.bar.update(int(n))

    def callback(self, per_step: Sequence[int]) -> SampleProgress:
        """The Lightning callback that advances this bar by ``per_step[i]`` after the ``i``-th training batch."""
        return SampleProgress(self, per_step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.enabled = None, False


def spread(samples: int, steps: int) -> list[int]:
    """``samples`` over ``steps`` as evenly as integers allow (cumulative rounding; sums to ``samples``)."""
    return [round((i + 1) * samples / steps) - round(i * samples / steps) for i in range(steps)]


def headline_lines(report: str | Path, metrics: dict[str, Any] | None = None) -> list[str]:
    """The closing summary of a comparison: the report's QA table (both arms per category and overall, with the
    majority-answer chance), the native text->image all-correct rate (beside the VQ ceiling) and the report's path.

    ``metrics``: the comparison's metrics (default: read from ``metrics.json`` beside ``report``; without one,
    only the path).
    """
    from chameleon_lite.comparison.report import _pct, _qa_table

    report = Path(report)
    if metrics is None:
        try:
            metrics = json.loads((report.parent / "metrics.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return [f"report: {report}"]
    seeds = metrics["seeds"]
    lines = []
    if all("qa" in d["per_seed"][0] for d in metrics["arms"].values()):
        lines += [f"Question answering accuracy (seeds {seeds}; counts of seed {seeds[0]}; chance: the majority "
                  "answer):", *_qa_table(metrics)]
    t2i = metrics["arms"].get("native", {}).get("per_seed", [{}])[0].get("text_to_image")
    if t2i and t2i.get("scorer") == "r_precision":
        g, c = t2i["generated"], t2i["vq_reconstruction"]
        lines.append(f"Text->image (native): R-precision {_pct(g['r_precision'])} % of {g['n']} generated images "
                     f"(own caption first of {t2i['r']}; VQ reconstructions {_pct(c['r_precision'])} %)")
    elif t2i:
        ceiling = (metrics.get("vq_ceiling") or {}).get("all_correct", {})
        line = (f"Text->image (native): {_pct(t2i['all_correct'].get('mean'))} % of "
                f"{t2i['all_correct'].get('count', 0)} generated images all correct by the scene parser")
        if ceiling:
            line += f" (VQ reconstruction ceiling {_pct(ceiling.get('mean'))} %)"
        lines.append(line)
    lines.append(f"report: {report}")
    return lines
