"""PNG plots for the comparison report: accuracy per question category, loss curves, generated-image grids.

Notable choices:

- matplotlib is imported inside each function (it is only needed when a report is written), and figures are
  drawn with the object-oriented API on an Agg canvas (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``),
  never through ``pyplot``: no global backend switch, no figure registry to leak, safe in headless workers.
- Every function validates its input first (ValueError naming the problem), creates the parent folder,
  writes one PNG and returns its path.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["image_grid_with_captions", "plot_accuracy_per_category", "plot_loss_curves"]

_DPI = 120
_ACCURACY_TOLERANCE = 1e-6


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=_DPI, bbox_inches="tight")
    return path


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_score(arm: str, category: str, score: Any) -> None:
    where = f"results_by_arm[{arm!r}][{category!r}]"
    if not isinstance(score, Mapping) or not {"correct", "total", "accuracy"} <= set(score):
        raise ValueError(f"{where} must be a dict with 'correct', 'total' and 'accuracy', got {score!r}")
    correct, total, acc = score["correct"], score["total"], score["accuracy"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (correct, total)):
        raise ValueError(f"{where}: 'correct' and 'total' must be ints, got {correct!r}, {total!r}")
    if total < 1 or not 0 <= correct <= total:
        raise ValueError(f"{where}: need total >= 1 and 0 <= correct <= total, got {correct}/{total}")
    if not _is_number(acc) or abs(acc - correct / total) > _ACCURACY_TOLERANCE:
        raise ValueError(f"{where}: accuracy {acc!r} is not correct/total = {correct / total:.6f}")


def plot_accuracy_per_category(
    results_by_arm: Mapping[str, Mapping[str, Mapping[str, Any]]],
    chance: Mapping[str, float | None],
    path: str | Path,
    title: str = "Accuracy per question category",
) -> Path:
    """Grouped bars: one group per category, one bar per arm, ``correct/total`` above each bar, and a dashed
    chance line (e.g. majority-answer accuracy) across each category's group.

    ``results_by_arm``: ``{arm: {category: {"correct", "total", "accuracy"}}}`` (``accuracy_by_category``'s
    output per arm); an arm may lack a category (no bar). ``chance``: ``{category: level in [0, 1] or None}``;
    categories without an entry get no line. Categories appear in order of first appearance.
    """
    if not isinstance(results_by_arm, Mapping) or not results_by_arm:
        raise ValueError("plot_accuracy_per_category: results_by_arm must be a non-empty dict of arms")
    categories: list[str] = []
    for arm, scores in results_by_arm.items():
        if not isinstance(scores, Mapping) or not scores:
            raise ValueError(f"plot_accuracy_per_category: arm {arm!r} has no category scores")
        for category, score in scores.items():
            _check_score(arm, category, score)
            if category not in categories:
                categories.append(category)
    unknown = sorted(set(chance) - set(categories))
    if unknown:
        raise ValueError(f"plot_accuracy_per_category: chance given for categories without results: {unknown}")
    for category, level in chance.items():
        if level is not None and (not _is_number(level) or not 0 <= level <= 1):
            raise ValueError(f"plot_accuracy_per_category: chance[{category!r}] must lie in [0, 1], got {level!r}")

    arms = list(results_by_arm)
    group_width = 0.8
    bar_width = group_width / len(arms)
    figure = _new_figure(max(6.0, 1.1 * len(categories) * max(1, len(arms) / 2)), 4.2)
    ax = figure.add_subplot(1, 1, 1)
    many = len(arms) * len(categories) > 14
    for a, arm in enumerate(arms):
        xs, heights, labels = [], [], []
        for c, category in enumerate(categories):
            score = results_by_arm[arm].get(category)
            if score is None:
                continue
            xs.append(c - group_width / 2 + (a + 0.5) * bar_width)
            heights.append(score["accuracy"])
            labels.append(f"{score['correct']}/{score['total']}")
        bars = ax.bar(xs, heights, width=bar_width * 0.95, label=arm)
        ax.bar_label(bars, labels=labels, fontsize=6 if many else 7, rotation=90 if many else 0, padding=2)
    drawn_chance = False
    for c, category in enumerate(categories):
        level = chance.get(category)
        if level is None:
            continue
        ax.hlines(
            level,
            c - group_width / 2,
            c + group_width / 2,
            colors="black",
            linestyles="--",
            linewidth=1.2,
            label=None if drawn_chance else "chance",
        )
        drawn_chance = True
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=20 if len(categories) > 5 else 0)
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right", ncol=len(arms) + 1)
    ax.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def plot_loss_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str = "Training loss",
    log_y: bool = False,
    ylabel: str = "loss",
) -> Path:
    """One line per run: ``{name: [(step, loss), ...]}`` (points drawn in the order given). ``log_y``: log scale."""
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("plot_loss_curves: curves must be a non-empty dict of name -> [(step, loss), ...]")
    figure = _new_figure(6.4, 4.0)
    ax = figure.add_subplot(1, 1, 1)
    for name, points in curves.items():
        points = list(points)
        if not points:
            raise ValueError(f"plot_loss_curves: curve {name!r} is empty")
        for point in points:
            if len(point) != 2 or not all(_is_number(v) for v in point):
                raise ValueError(f"plot_loss_curves: curve {name!r} has a point {point!r}, expected (step, loss)")
            if log_y and point[1] <= 0:
                raise ValueError(f"plot_loss_curves: curve {name!r} has loss {point[1]} <= 0 on a log scale")
        steps, losses = zip(*points)
        ax.plot(steps, losses, label=name, marker="o" if len(points) == 1 else None, linewidth=1.3)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(figure, path)


def image_grid_with_captions(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    verdicts: Sequence[str],
    path: str | Path,
    columns: int = 4,
    passed: Sequence[bool] | None = None,
) -> Path:
    """Grid of generated images, each with its prompt above and the parser's verdict below.

    ``passed`` (optional, one bool per image) colours the verdict green/red; otherwise it is black.
    """
    n = len(images)
    if n == 0:
        raise ValueError("image_grid_with_captions: no images")
    if len(captions) != n or len(verdicts) != n or (passed is not None and len(passed) != n):
        raise ValueError(
            f"image_grid_with_captions: {n} images but {len(captions)} captions, {len(verdicts)} verdicts"
            + ("" if passed is None else f", {len(passed)} pass flags")
        )
    if columns < 1:
        raise ValueError(f"image_grid_with_captions: columns must be >= 1, got {columns}")
    for i, (image, caption, verdict) in enumerate(zip(images, captions, verdicts)):
        if not isinstance(image, Image.Image):
            raise ValueError(f"image_grid_with_captions: item {i} is a {type(image).__name__}, expected a PIL image")
        if not isinstance(caption, str) or not isinstance(verdict, str):
            raise ValueError(f"image_grid_with_captions: caption and verdict {i} must be strings")
    import numpy as np

    columns = min(columns, n)
    rows = math.ceil(n / columns)
    cell = 2.6
    figure = _new_figure(columns * cell, rows * (cell + 1.1))
    for i, (image, caption, verdict) in enumerate(zip(images, captions, verdicts)):
        ax = figure.add_subplot(rows, columns, i + 1)
        ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("\n".join(textwrap.wrap(caption, 34)[:5]), fontsize=6.5)
        color = "black" if passed is None else ("tab:green" if passed[i] else "tab:red")
        ax.set_xlabel("\n".join(textwrap.wrap(verdict, 34)[:3]), fontsize=7, color=color)
    figure.tight_layout()
    return _save(figure, path)
