"""``chameleon-lite learning-curve``: the comparison at several sample budgets, one curve per arm.

::

    curve = learning_curve("configs/compare/demo.yaml", "runs/curve", [3750, 7500, 15000, 30000])
    curve["points"][0]["arms"]["native"]["qa_overall"]        # mean over the seeds, in [0, 1]

Runs ``compare`` once per budget, smallest first, with ``train_samples=<budget>`` appended to the dotlist
overrides, into ``OUT/samples-<budget>/`` (each a complete comparison: ``metrics.json``, ``report.md``, plots,
checkpoints). From every budget's per-arm seed summary it collects the overall QA accuracy, the accuracy and the
majority-answer chance line per category, the POPE yes-rate, the text->image "all correct" fraction (native only;
the baseline generates no images) and the training time, and writes

- ``OUT/curve.json``: every collected number (means, and standard deviations over the seeds), the budgets, the
  config path and the overrides;
- ``OUT/curve.md``: one row per budget, per arm the overall and per-category accuracies and the text->image
  all-correct fraction, then a row of chance lines; a second table with training time and POPE yes-rate;
- ``OUT/learning_curve.png``: one panel per QA category plus overall plus text->image all-correct, training
  samples on a log2 axis, one line per arm, the chance line dashed.

``curve.json`` and ``curve.md`` are rewritten after every budget, so a partial curve survives an interruption.
Resuming: a budget whose directory already holds a finished ``metrics.json`` (``compare`` writes it last) is read
back instead of retrained; one made with a different configuration is refused rather than mixed into the curve.

``OUT/manifest.json`` (kind ``learning_curve``) lists ``curve.json``, ``curve.md``, ``learning_curve.png`` and the
``samples-<budget>`` folders (issue 14): a rerun replaces them, and any of these names that ``OUT`` holds but the
manifest does not list is refused with ``FileExistsError`` before anything is trained (as is a budget folder that
``compare`` would refuse).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from chameleon_lite.comparison.config import load_compare_config
from chameleon_lite.comparison.report import CATEGORY_ORDER, check_compare_out
from chameleon_lite.safe_io import check_listed, record_files

__all__ = ["MIN_BUDGETS", "check_budgets", "check_overrides", "learning_curve", "plot_learning_curve",
           "write_curve_markdown"]

MIN_BUDGETS = 4
"""A curve needs at least this many budgets."""

_TAG = "[learning-curve]"
_CHANCE_TOLERANCE = 1e-9


def check_budgets(budgets: Sequence[int]) -> list[int]:
    """The budgets in ascending order; ValueError naming the problem unless there are at least ``MIN_BUDGETS``
    distinct positive integers."""
    budgets = list(budgets)
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, int):
            raise ValueError(f"budgets must be integers (training samples), got {b!r}")
    if len(budgets) < MIN_BUDGETS:
        raise ValueError(f"a learning curve needs at least {MIN_BUDGETS} budgets, got {len(budgets)}: {budgets}")
    bad = [b for b in budgets if b < 1]
    if bad:
        raise ValueError(f"budgets must be positive numbers of training samples, got {bad}")
    repeated = sorted({b for b in budgets if budgets.count(b) > 1})
    if repeated:
        raise ValueError(f"budgets must be distinct, got {repeated} more than once in {budgets}")
    return sorted(budgets)


def check_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides as a list; ValueError if one sets ``train_samples`` (the curve sets it per budget)."""
    overrides = list(overrides)
    for entry in overrides:
        if entry.split("=", 1)[0].strip().lstrip("+~") == "train_samples":
            raise ValueError(f"override {entry!r}: the learning curve sets train_samples itself, once per budget")
    return overrides


# ---------------------------------------------------------------------------------------- collecting


def _mean(summary: dict[str, Any], key: str) -> float | None:
    entry = summary.get(key)
    return None if entry is None else entry["mean"]


def _std(summary: dict[str, Any], key: str) -> float | None:
    entry = summary.get(key)
    return None if entry is None else entry["std"]


def _categories(summary: dict[str, Any], prefix: str, suffix: str) -> list[str]:
    return [k[len(prefix):-len(suffix)] for k in summary if k.startswith(prefix) and k.endswith(suffix)]


def _arm_point(summary: dict[str, Any]) -> dict[str, Any]:
    """The curve's numbers for one arm at one budget, from its seed summary (``metrics["arms"][arm]["summary"]``)."""
    cats = _categories(summary, "qa.by_category.", ".accuracy")
    chance_cats = _categories(summary, "qa.chance.", ".chance")
    keys = {"qa_overall": "qa.overall.accuracy", "pope_yes_rate": "qa.pope.all.yes_rate",
            "t2i_all_correct": "text_to_image.all_correct.mean", "train_seconds": "training.seconds",
            "samples_seen": "training.samples_seen"}
    point: dict[str, Any] = {name: _mean(summary, key) for name, key in keys.items()}
    point["qa_by_category"] = {c: _mean(summary, f"qa.by_category.{c}.accuracy") for c in cats}
    point["qa_total"] = _mean(summary, "qa.overall.total")
    point["chance_by_category"] = {c: _mean(summary, f"qa.chance.{c}.chance") for c in chance_cats}
    # the overall chance line: always answering each category's majority answer
    weighted = [(point["chance_by_category"][c], _mean(summary, f"qa.chance.{c}.evaluated_total"))
                for c in chance_cats]
    weighted = [(p, n) for p, n in weighted if p is not None and n]
    total = sum(n for _, n in weighted)
    point["chance_overall"] = sum(p * n for p, n in weighted) / total if total else None
    point["std"] = {name: _std(summary, key) for name, key in keys.items()}
    point["std"]["qa_by_category"] = {c: _std(summary, f"qa.by_category.{c}.accuracy") for c in cats}
    entry = summary.get("qa.overall.accuracy")
    point["n_seeds"] = entry["n"] if entry else 0
    return point


def _budget_point(metrics: dict[str, Any], budget: int, directory: Path, resumed: bool) -> dict[str, Any]:
    ceiling = (metrics.get("vq_ceiling") or {}).get("all_correct") or {}
    return {"train_samples": budget, "dir": directory.name, "resumed": resumed, "name": metrics.get("name"),
            "seeds": metrics.get("seeds"), "compare_seconds": metrics.get("seconds"),
            "t2i_vq_ceiling": ceiling.get("mean"),
            "arms": {arm: _arm_point(data["summary"]) for arm, data in metrics["arms"].items()}}


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _finished(directory: Path, budget: int, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of a finished run in ``directory`` for this budget and config, or None when there is none."""
    path = directory / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        print(f"{_TAG} {path} is unreadable ({err}): running this budget again")
        return None
    arms = metrics.get("arms") if isinstance(metrics, dict) else None
    if not isinstance(arms, dict) or not arms or not all("summary" in a for a in arms.values()):
        print(f"{_TAG} {path} is incomplete (no per-arm summary): running this budget again")
        return None
    stored = (metrics.get("budget") or {}).get("train_samples")
    if stored != budget:
        raise ValueError(f"{path} holds a run with train_samples={stored}, not {budget}; remove {directory} "
                         f"or choose another output directory")
    old, new = _leaves(metrics.get("config") or {}), _leaves(expected)
    differ = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    if differ:
        changes = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in differ)
        raise ValueError(f"{path} was made with a different configuration ({changes}); remove {directory} to "
                         f"retrain this budget, or choose another output directory")
    return metrics


# ---------------------------------------------------------------------------------------------- output


def _arms(curve: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(arm for p in curve["points"] for arm in p["arms"]))


def _all_categories(curve: dict[str, Any]) -> list[str]:
    found = {c for p in curve["points"] for a in p["arms"].values() for c in a["qa_by_category"]}
    return [c for c in CATEGORY_ORDER if c in found] + sorted(found - set(CATEGORY_ORDER))


def _has_t2i(curve: dict[str, Any], arm: str) -> bool:
    return any(p["arms"].get(arm, {}).get("t2i_all_correct") is not None for p in curve["points"])


def _chance_values(curve: dict[str, Any], category: str | None) -> list[float]:
    """Every chance level of ``category`` (None: overall) over budgets and arms."""
    values = []
    for p in curve["points"]:
        for a in p["arms"].values():
            v = a["chance_overall"] if category is None else a["chance_by_category"].get(category)
            if v is not None:
                values.append(v)
    return values


def _pct(x: float | None, std: float | None = None, n: int = 1) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" + (f" ± {100 * std:.1f}" if std is not None and n > 1 else "")


def _chance_cell(values: list[float]) -> str:
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return _pct(lo) if hi - lo <= _CHANCE_TOLERANCE else f"{_pct(lo)}–{_pct(hi)}"


def write_curve_markdown(curve: dict[str, Any], path: str | Path) -> Path:
    """``curve.md``: the accuracy table (one row per budget, then the chance lines) and the cost table."""
    arms, cats = _arms(curve), _all_categories(curve)
    header, chance_row = ["training samples"], ["**chance** (majority answer)"]
    for arm in arms:
        header += [f"{arm} overall"] + [f"{arm} {c}" for c in cats]
        chance_row += [_chance_cell(_chance_values(curve, None))] + [_chance_cell(_chance_values(curve, c))
                                                                     for c in cats]
        if _has_t2i(curve, arm):
            header.append(f"{arm} t2i all-correct")
            chance_row.append("–")
    lines = [f"# Learning curve `{curve['name']}`: accuracy against training samples", "",
             f"Config `{curve['config']}`" + (f" with overrides `{' '.join(curve['overrides'])}`"
                                              if curve["overrides"] else "")
             + f"; budgets {', '.join(f'{b:,}' for b in curve['budgets'])} training samples per arm; one full "
             "comparison per budget in `samples-<budget>/`. QA accuracy in % on the test questions (mean ± std over "
             "seeds when several); t2i all-correct: % of generated images the scene parser finds fully correct "
             "(native only). Chance: always giving the category's most frequent training answer "
             "(overall: that, per category).", "",
             "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for p in curve["points"]:
        row = [f"{p['train_samples']:,}"]
        for arm in arms:
            a = p["arms"].get(arm)
            if a is None:
                row += ["–"] * (1 + len(cats) + _has_t2i(curve, arm))
                continue
            n, std = a["n_seeds"], a["std"]
            row.append(f"**{_pct(a['qa_overall'], std['qa_overall'], n)}**")
            row += [_pct(a["qa_by_category"].get(c), std["qa_by_category"].get(c), n) for c in cats]
            if _has_t2i(curve, arm):
                row.append(_pct(a["t2i_all_correct"], std["t2i_all_correct"], n))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| " + " | ".join(chance_row) + " |")
    ceilings = [p["t2i_vq_ceiling"] for p in curve["points"] if p.get("t2i_vq_ceiling") is not None]
    if ceilings:
        lines += ["", f"Text->image ceiling (VQ reconstructions of the real test images, all correct): "
                      f"{_chance_cell(ceilings)} %."]
    cost_header = ["training samples"] + [f"{a} training s" for a in arms] + [f"{a} POPE yes-rate %" for a in arms]
    cost_header += [f"{a} samples seen" for a in arms] + ["run"]
    lines += ["", "## Training time and POPE yes-rate", "",
              "Training time: wall seconds of the arm's training (the baseline's includes its ViT pretraining). "
              "A yes-rate far above 50 % is the hallucination signature.", "",
              "| " + " | ".join(cost_header) + " |", "|" + "---:|" * (len(cost_header) - 1) + "---|"]
    for p in curve["points"]:
        a = {arm: p["arms"].get(arm) or {} for arm in arms}
        row = [f"{p['train_samples']:,}"]
        row += ["–" if a[arm].get("train_seconds") is None else f"{a[arm]['train_seconds']:.0f}" for arm in arms]
        row += [_pct(a[arm].get("pope_yes_rate")) for arm in arms]
        row += ["–" if a[arm].get("samples_seen") is None else f"{a[arm]['samples_seen']:,.0f}" for arm in arms]
        row.append(f"[{p['dir']}]({p['dir']}/report.md)" + (" (resumed)" if p["resumed"] else ""))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "![learning curve](learning_curve.png)", "", "Every number above is in `curve.json`.", ""]
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _short(n: int) -> str:
    for size, unit in ((1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def plot_learning_curve(curve: dict[str, Any], path: str | Path) -> Path:
    """``learning_curve.png``: one panel per QA category plus overall plus text->image all-correct (when any arm
    has it); x = training samples (log2), one line with markers per arm, the chance line dashed."""
    from matplotlib.ticker import NullLocator

    from chameleon_lite.eval.plots import _new_figure, _save

    arms, cats = _arms(curve), _all_categories(curve)
    budgets = [p["train_samples"] for p in curve["points"]]
    if not budgets:
        raise ValueError("plot_learning_curve: the curve has no points")
    t2i = any(_has_t2i(curve, arm) for arm in arms)
    panels: list[tuple[str, str | None]] = [("overall", None), *((c, c) for c in cats)]
    if t2i:
        panels.append(("text->image all correct", "__t2i__"))
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = _new_figure(3.0 * columns, 2.5 * rows + 0.4)

    def value(arm_point: dict[str, Any], key: str | None) -> float | None:
        if key is None:
            return arm_point["qa_overall"]
        if key == "__t2i__":
            return arm_point["t2i_all_correct"]
        return arm_point["qa_by_category"].get(key)

    for i, (title, key) in enumerate(panels):
        ax = figure.add_subplot(rows, columns, i + 1)
        for a, arm in enumerate(arms):
            pts = [(p["train_samples"], value(p["arms"][arm], key)) for p in curve["points"] if arm in p["arms"]]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.4, color=f"C{a}", label=arm)
        if key == "__t2i__":
            ceiling = [(p["train_samples"], p["t2i_vq_ceiling"]) for p in curve["points"]
                       if p.get("t2i_vq_ceiling") is not None]
            if ceiling:
                xs, ys = zip(*ceiling)
                ax.plot(xs, ys, linestyle=":", color="gray", linewidth=1.2, label="VQ ceiling")
        else:
            chance = []
            for p in curve["points"]:
                levels = [a["chance_overall"] if key is None else a["chance_by_category"].get(key)
                          for a in p["arms"].values()]
                levels = [v for v in levels if v is not None]
                if levels:
                    chance.append((p["train_samples"], sum(levels) / len(levels)))
            if chance:
                xs, ys = zip(*chance)
                ax.plot(xs, ys, linestyle="--", color="black", linewidth=1.1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets)
        ax.set_xticklabels([_short(b) for b in budgets], fontsize=7, rotation=45 if len(budgets) > 5 else 0)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_ylim(0, 1.05)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if i % columns == 0:
            ax.set_ylabel("accuracy" if key != "__t2i__" else "fraction", fontsize=8)
        if i >= len(panels) - columns:
            ax.set_xlabel("training samples", fontsize=8)
        if key is None:
            ax.legend(fontsize=7, loc="lower right")
        elif key == "__t2i__":
            ax.legend(fontsize=7, loc="upper left")
    figure.suptitle(f"Learning curve `{curve['name']}`: QA accuracy and text->image all-correct", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


CURVE_KIND = "learning_curve"  # the manifest kind of OUT
CURVE_FILES = ("curve.json", "curve.md", "learning_curve.png")


def _write(curve: dict[str, Any], out: Path, plot: bool) -> None:
    record_files(out, add=CURVE_FILES, kind=CURVE_KIND)  # listed before they are written
    curve["files"] = {"json": "curve.json", "markdown": "curve.md"}
    if plot:
        curve["files"]["plot"] = plot_learning_curve(curve, out / "learning_curve.png").name
    (out / "curve.json").write_text(json.dumps(curve, indent=1), encoding="utf-8")
    write_curve_markdown(curve, out / "curve.md")


# ------------------------------------------------------------------------------------------------ run


def learning_curve(config: str | Path, out: str | Path, budgets: Sequence[int], *, overrides: Sequence[str] = (),
                   progress: bool = True) -> dict[str, Any]:
    """Run the comparison of ``config`` at every budget (see the module docstring); returns the curve
    (what ``OUT/curve.json`` holds).

    ``overrides``: OmegaConf dotlist entries for every run (``train_samples`` is set per budget and may not be
    among them). Budgets must be at least ``MIN_BUDGETS`` distinct positive integers; they run smallest first.
    The configuration is validated for every budget before anything is trained.
    """
    from chameleon_lite.comparison import run

    budgets = check_budgets(budgets)
    overrides = check_overrides(overrides)
    config, out = Path(config), Path(out)
    expected = {b: asdict(load_compare_config(config, [*overrides, f"train_samples={b}"])) for b in budgets}
    folders = [f"samples-{b}" for b in budgets]
    check_listed(out, [*CURVE_FILES, *folders], kind=CURVE_KIND)  # names the package did not write: refused
    for b, folder in zip(budgets, folders):
        if not (out / folder / "metrics.json").is_file():  # to be trained: compare's own check, now
            check_compare_out(out / folder, expected[b]["seeds"])
    out.mkdir(parents=True, exist_ok=True)
    record_files(out, add=folders, kind=CURVE_KIND)  # write-ahead, before compare writes into them
    curve: dict[str, Any] = {"name": expected[budgets[0]]["name"], "config": str(config), "overrides": overrides,
                             "budgets": budgets, "created": datetime.now(timezone.utc).isoformat(), "points": []}
    for i, budget in enumerate(budgets, 1):
        directory = out / f"samples-{budget}"
        step = f"{_TAG} {i}/{len(budgets)} train_samples={budget:,}:"
        metrics = _finished(directory, budget, expected[budget])
        resumed = metrics is not None
        if resumed:
            print(f"{step} {directory / 'metrics.json'} is finished; reading it back instead of retraining")
        else:
            print(f"{step} training and evaluating both arms into {directory}")
            metrics = run.compare(config, directory, overrides=[*overrides, f"train_samples={budget}"],
                                  progress=progress)["metrics"]
        curve["points"].append(_budget_point(metrics, budget, directory, resumed))
        _write(curve, out, plot=i == len(budgets))
    print(f"{_TAG} done: {out / 'curve.md'}, {out / 'curve.json'}, {out / 'learning_curve.png'}")
    return curve
