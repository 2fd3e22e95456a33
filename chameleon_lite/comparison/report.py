"""``metrics.json``, ``report.md`` and the PNG plots of a comparison.

Plots: ``accuracy_per_category.png`` (both arms, ``correct/total`` on each bar, majority-answer chance lines),
``loss_curves.png``, ``generated_images.png`` (native text->image samples with the prompt and the parser's
verdict), ``vq_reconstructions.png`` (real test images beside their VQ reconstructions).

The output directory's ``manifest.json`` (kind ``compare``) lists these files (issue 14): a rerun replaces them
(and removes a plot of ours that this run does not make), and a file of one of these names that the package did
not write is refused with ``FileExistsError`` before anything is written.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from chameleon_lite.eval.plots import image_grid_with_captions, plot_accuracy_per_category, plot_loss_curves
from chameleon_lite.safe_io import check_listed, record_files, remove_listed

__all__ = ["write_report", "check_compare_out", "REPORT_FILES", "PLOT_FILES", "COMPARE_KIND"]

COMPARE_KIND = "compare"  # the manifest kind of a comparison's output directory
PLOT_FILES = ("accuracy_per_category.png", "loss_curves.png", "generated_images.png", "vq_reconstructions.png")
REPORT_FILES = ("report.md", "metrics.json", *PLOT_FILES)
"""Every file ``write_report`` may write into the output directory."""


def check_compare_out(out: str | Path, seeds: Any) -> None:
    """Refuse (``FileExistsError``, naming it) an ``out`` holding a report file or a ``seed<N>`` folder that the
    package did not write there (its ``manifest.json`` does not list it); changes nothing. ``compare`` calls it
    before anything is trained."""
    check_listed(out, [*REPORT_FILES, *(f"seed{seed}" for seed in seeds)], kind=COMPARE_KIND)

CATEGORY_ORDER = ("count", "color", "shape", "binding", "spatial", "negation", "existence")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _mean_std(summary: dict[str, Any], key: str, scale: float = 1.0, digits: int = 1) -> str:
    entry = summary.get(key)
    if entry is None:
        return "–"
    text = f"{scale * entry['mean']:.{digits}f}"
    return text + (f" ± {scale * entry['std']:.{digits}f}" if entry["n"] > 1 else "")


def _pairs_grid(pairs: list[tuple[Image.Image, Image.Image]], path: Path, columns: int = 8) -> Path:
    """Originals (top of each cell) over their reconstructions."""
    w, h = pairs[0][0].size
    rows = -(-len(pairs) // columns)
    grid = Image.new("RGB", (columns * (w + 4), rows * (2 * h + 8)), "white")
    for i, (original, recon) in enumerate(pairs):
        x, y = (i % columns) * (w + 4), (i // columns) * (2 * h + 8)
        grid.paste(original.convert("RGB"), (x, y))
        grid.paste(recon.convert("RGB"), (x, y + h + 2))
    grid = grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST)
    grid.save(path)
    return path


def _plots(metrics: dict[str, Any], examples: dict[str, Any], out: Path) -> dict[str, str]:
    plots: dict[str, str] = {}
    first = {arm: data["per_seed"][0] for arm, data in metrics["arms"].items() if data["per_seed"]}
    if all("qa" in run for run in first.values()):
        by_arm = {arm: run["qa"]["by_category"] for arm, run in first.items()}
        chance_src = next(iter(first.values()))["qa"].get("chance", {})
        chance = {c: v["chance"] for c, v in chance_src.items() if c in next(iter(by_arm.values()))}
        plots["accuracy"] = str(plot_accuracy_per_category(by_arm, chance, out / "accuracy_per_category.png"))
    curves = {arm: run["training"]["loss_curve"] for arm, run in first.items()
              if run.get("training") and run["training"]["loss_curve"]}
    if curves:
        plots["loss"] = str(plot_loss_curves(curves, out / "loss_curves.png",
                                             title="Training loss (native: text + image tokens; baseline: text)"))
    rows = examples.get("generated") or []
    if rows:
        rows = rows[:16]
        plots["generated"] = str(image_grid_with_captions(
            [r["image"] for r in rows], [r["caption"] for r in rows], [r["verdict"] for r in rows],
            out / "generated_images.png", passed=[r["passed"] for r in rows]))
    if examples.get("reconstructions"):
        plots["reconstructions"] = str(_pairs_grid(examples["reconstructions"][:16], out / "vq_reconstructions.png"))
    return plots


def _qa_table(metrics: dict[str, Any]) -> list[str]:
    arms = list(metrics["arms"])
    first = {arm: metrics["arms"][arm]["per_seed"][0]["qa"] for arm in arms}
    summaries = {arm: metrics["arms"][arm]["summary"] for arm in arms}
    chance = next(iter(first.values())).get("chance", {})
    cats = [c for c in CATEGORY_ORDER if any(c in q["by_category"] for q in first.values())]
    cats += sorted({c for q in first.values() for c in q["by_category"]} - set(cats))
    lines = ["| category | " + " | ".join(arms) + " | chance (majority answer) |",
             "|---|" + "---|" * len(arms) + "---|"]
    for cat in cats:
        cells = []
        for arm in arms:
            s = first[arm]["by_category"].get(cat)
            if s is None:
                cells.append("–")
                continue
            cell = f"{_mean_std(summaries[arm], f'qa.by_category.{cat}.accuracy', 100)} % ({s['correct']}/{s['total']})"
            cells.append(cell)
        ch = chance.get(cat, {})
        majority = ch.get("majority_answer", "–")
        lines.append(f"| {cat} | " + " | ".join(cells) + f" | {_pct(ch.get('chance'))} % ({majority}) |")
    overall = [f"**{_mean_std(summaries[a], 'qa.overall.accuracy', 100)} %** "
               f"({first[a]['overall']['correct']}/{first[a]['overall']['total']})" for a in arms]
    lines.append("| **all** | " + " | ".join(overall) + " | |")
    return lines


HELD_OUT_SCENES = {"seen": "scenes of seen combos", "held_out": "scenes with a held-out combo"}


def _pope_table(metrics: dict[str, Any]) -> list[str]:
    arms = list(metrics["arms"])
    lines = ["| arm | negatives | precision | recall | F1 | yes-rate | n |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        pope = metrics["arms"][arm]["per_seed"][0]["qa"]["pope"]
        by_scene = metrics["arms"][arm]["per_seed"][0]["qa"].get("pope_held_out", {})
        rows = [*pope.items(), *((f"all, {HELD_OUT_SCENES[k]}", s) for k, s in by_scene.items())]
        for kind, s in rows:
            lines.append(f"| {arm} | {kind} | {_pct(s['precision'])} | {_pct(s['recall'])} | {_pct(s['f1'])} | "
                         f"{_pct(s['yes_rate'])} | {s['total']} |")
        novel = metrics["arms"][arm]["per_seed"][0]["qa"].get("novel_objects", {})
        if novel.get("total"):  # confirming a combination never trained on: generalisation, not hallucination
            lines.append(f"| {arm} | none: present objects of a held-out combo | | {_pct(novel['recall'])} | | | "
                         f"{novel['total']} |")
    return lines + _pope_ranking_lines(metrics)


def _pope_ranking_lines(metrics: dict[str, Any]) -> list[str]:
    """The POPE questions as a ranking (``eval/pope_ranking.py``), first seed; nothing where it was not measured."""
    ranked = {a: d["per_seed"][0]["qa"].get("pope_ranking") for a, d in metrics["arms"].items()}
    if not all(ranked.values()):
        return []
    lines = ["", "As a ranking: the AUC of each answer's margin log p(\"yes\") − log p(\"no\") over the same "
             "questions (0.5: no ranking, 1: every present object above every absent one), and the F1 of the best "
             "threshold on that margin, chosen on these questions (an oracle, a bound on any recalibration):", ""]
    for arm, r in ranked.items():
        by_scene = "".join(f"; {HELD_OUT_SCENES[k]} {r[k]['auc']:.3f}" for k in HELD_OUT_SCENES if k in r)
        lines.append(f"- {arm}: AUC {r['all']['auc']:.3f}{by_scene}; best-threshold F1 {_pct(r['all']['best_f1'])} % "
                     f"at a yes-rate of {_pct(r['all']['best_yes_rate'])} %.")
    return lines


def _stage3_lines(metrics: dict[str, Any]) -> list[str]:
    """Before and after stage 3 (DPO) for each arm: every QA category, POPE (all negatives) and captions."""
    arms = [a for a, d in metrics["arms"].items() if "stage3" in d["per_seed"][0]]
    if not arms:
        return []
    first = {a: metrics["arms"][a]["per_seed"][0] for a in arms}
    summaries = {a: metrics["arms"][a]["summary"] for a in arms}
    lines = ["", "## Stage 3: preference tuning (DPO)", ""]
    for arm in arms:
        s3 = first[arm]["stage3"]
        t = s3["training"]
        lines.append(f"- **{arm}**: {t['pairs_seen']:,} pairs in {t['steps']} steps ({t['seconds']:.0f} s); pairs by "
                     f"kind {s3['pairs']['by_kind']}, rejected side by source {s3['pairs']['by_source']}; validation "
                     f"reward accuracy {_pct(t['validation'].get('val/reward_accuracy'))} %.")
    lines += ["", "| | " + " | ".join(f"{a} before | {a} after" for a in arms) + " |",
              "|---|" + "---|---|" * len(arms)]

    def row(name: str, key: str, counts=None, scale: float = 100, digits: int = 1) -> None:
        cells = []
        for arm in arms:
            s = summaries[arm]
            before, after = _mean_std(s, key, scale, digits), _mean_std(s, f"stage3.after.{key}", scale, digits)
            if counts is not None:
                b, a = counts(first[arm]["qa"]), counts(first[arm]["stage3"]["after"]["qa"])
                before, after = f"{before} ({b})", f"{after} ({a})"
            cells += [before, after]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def category_counts(q: dict[str, Any], cat: str) -> str:
        s = q["by_category"].get(cat, {})
        return f"{s.get('correct', 0)}/{s.get('total', 0)}"

    cats = [c for c in CATEGORY_ORDER if any(c in first[a]["qa"]["by_category"] for a in arms)]
    for cat in cats:
        row(f"QA {cat} %", f"qa.by_category.{cat}.accuracy", partial(category_counts, cat=cat))
    row("**QA all %**", "qa.overall.accuracy", lambda q: f"{q['overall']['correct']}/{q['overall']['total']}")
    for key, name in (("precision", "precision"), ("recall", "recall"), ("f1", "F1"), ("yes_rate", "yes-rate")):
        row(f"POPE {name} %", f"qa.pope.all.{key}",
            (lambda q: f"tp {q['pope']['all']['tp']} fp {q['pope']['all']['fp']} tn {q['pope']['all']['tn']} "
                       f"fn {q['pope']['all']['fn']}") if key == "yes_rate" else None)
    for group, name in HELD_OUT_SCENES.items():  # the pooled F1 mixes denying new combos with confirming absent ones
        if all(group in first[a]["qa"].get("pope_held_out", {}) for a in arms):
            row(f"POPE F1 %, {name}", f"qa.pope_held_out.{group}.f1",
                lambda q, g=group: f"fp {q['pope_held_out'][g]['fp']} fn {q['pope_held_out'][g]['fn']} "
                                   f"of {q['pope_held_out'][g]['total']}")
    if all(first[a]["qa"].get("pope_ranking") and first[a]["stage3"]["after"]["qa"].get("pope_ranking") for a in arms):
        row("POPE AUC of the yes/no margin", "qa.pope_ranking.all.auc", scale=1, digits=3)
        for group, name in HELD_OUT_SCENES.items():
            if all(group in first[a]["qa"]["pope_ranking"] for a in arms):
                row(f"POPE AUC, {name}", f"qa.pope_ranking.{group}.auc", scale=1, digits=3)
    if all(first[a]["qa"].get("novel_objects", {}).get("total") for a in arms):
        row("held-out combos present, confirmed %", "qa.novel_objects.recall",
            lambda q: f"{q['novel_objects']['confirmed']}/{q['novel_objects']['total']}")
    row("captions BLEU-4", "captioning.bleu_4")
    row("captions CIDEr-D", "captioning.cider_d", scale=1, digits=3)
    return lines


def _held_out_lines(metrics: dict[str, Any]) -> list[str]:
    lines = ["| arm | seen combinations | held-out combinations |", "|---|---|---|"]
    for arm, data in metrics["arms"].items():
        h = data["per_seed"][0]["qa"]["held_out"]
        cells = []
        for key in ("seen", "held_out"):
            s = h.get(key) or {}
            cells.append(f"{_pct(s.get('accuracy'))} % ({s.get('correct', 0)}/{s.get('total', 0)})" if s else "–")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _cost_lines(metrics: dict[str, Any]) -> list[str]:
    lines = ["| | " + " | ".join(metrics["arms"]) + " |", "|---|" + "---|" * len(metrics["arms"])]
    runs = {arm: data["per_seed"][0] for arm, data in metrics["arms"].items()}

    def row(name: str, fn) -> None:
        lines.append(f"| {name} | " + " | ".join(fn(r) for r in runs.values()) + " |")

    row("visual tokens per image", lambda r: str(r["cost"]["visual_tokens_per_image"]))
    for part in ("encoder", "projector", "decoder", "embeddings", "total"):
        row(f"parameters: {part}", lambda r, p=part: f"{r['cost']['parameters'][p]:,}")
    t = {a: r.get("training") for a, r in runs.items()}
    if all(t.values()):
        def front_end(r: dict[str, Any]) -> str:
            enc = r["training"]["stages"].get("encoder")
            if enc is None:
                return "VQ tokenizer from the bundle (trained beforehand)"
            return f"ViT, contrastive: {enc['samples']:,} samples, {enc['seconds']:.0f} s (not in the budget)"

        row("image front end", front_end)
        row("training samples seen (budget)", lambda r: f"{r['training']['samples_seen']:,}")
        row("training steps", lambda r: str(r["training"]["steps"]))
        row("training time (s, incl. the ViT's pretraining)", lambda r: f"{r['training']['seconds']:.0f}")
        row("training samples/s", lambda r: f"{r['training']['samples_per_s']:.1f}")
        row("training tokens/s", lambda r: f"{r['training']['tokens_per_s']:.0f}")
        row("training FLOPs", lambda r: f"{r['training']['flops']:.2e}")
        row("peak RSS (CPU) or CUDA allocation while training (MiB)",
            lambda r: f"{r['training']['peak_memory_mb']:.0f}")
    row("time to first token (ms)", lambda r: f"{1000 * r['cost']['latency']['ttft_s']:.1f}")
    row("decode tokens/s", lambda r: "–" if r["cost"]["latency"]["decode_tokens_per_s"] is None
        else f"{r['cost']['latency']['decode_tokens_per_s']:.0f}")
    return lines


def _understanding_lines(metrics: dict[str, Any]) -> list[str]:
    """QA by category, POPE and held-out combinations; nothing when the data has no questions."""
    if not all("qa" in d["per_seed"][0] for d in metrics["arms"].values()):
        return []
    lines = ["## Question answering by category", "", *_qa_table(metrics), "",
             "![accuracy per category](accuracy_per_category.png)", "",
             "## Existence questions (POPE-style)", "", *_pope_table(metrics), ""]
    if any(d["per_seed"][0]["qa"]["held_out"].get(k) for d in metrics["arms"].values() for k in ("seen", "held_out")):
        lines += ["## Compositional generalisation", "", *_held_out_lines(metrics), ""]
    return lines


def _reading(metrics: dict[str, Any]) -> list[str]:
    """A few sentences generated from the numbers (largest per-category gaps, POPE yes-rates)."""
    arms = metrics["arms"]
    if not {"native", "baseline"} <= set(arms):
        return []
    if "qa" not in arms["native"]["per_seed"][0]:
        return ["- No questions in this data: the arms are compared on captions and text->image only."]
    n = arms["native"]["per_seed"][0]["qa"]
    b = arms["baseline"]["per_seed"][0]["qa"]
    gaps = []
    for cat, s in n["by_category"].items():
        if cat in b["by_category"] and s["accuracy"] is not None and b["by_category"][cat]["accuracy"] is not None:
            gaps.append((s["accuracy"] - b["by_category"][cat]["accuracy"], cat))
    gaps.sort()
    lines = [f"- Overall QA accuracy: native {_pct(n['overall']['accuracy'])} %, baseline "
             f"{_pct(b['overall']['accuracy'])} % on the same {n['overall']['total']} test questions."]
    if gaps and gaps[-1][0] > 0:
        lines.append(f"- Largest gap in the native arm's favour: {gaps[-1][1]} ({100 * gaps[-1][0]:+.1f} points).")
    if gaps and gaps[0][0] < 0:
        lines.append(f"- Largest gap in the baseline's favour: {gaps[0][1]} ({-100 * gaps[0][0]:+.1f} points).")
    for name, q in (("native", n), ("baseline", b)):
        all_pope = q["pope"].get("all")
        if all_pope:
            lines.append(f"- {name}: says \"yes\" to {_pct(all_pope['yes_rate'])} % of existence questions "
                         f"(F1 {_pct(all_pope['f1'])} %); a yes-rate far above 50 % is the hallucination signature.")
    t2i = arms["native"]["per_seed"][0].get("text_to_image")
    if t2i and metrics.get("vq_ceiling"):
        lines.append(f"- Text->image (native only): {_pct(t2i['all_correct']['mean'])} % of generated images are "
                     f"fully correct by the parser, against {_pct(metrics['vq_ceiling']['all_correct']['mean'])} % "
                     f"for VQ reconstructions of the real images (the tokenizer's ceiling).")
    return lines


def _world_lines(metrics: dict[str, Any]) -> list[str]:
    """The data both arms were trained and tested on, in two sentences (empty for older metrics files)."""
    world = metrics.get("world")
    data = metrics.get("data")
    if not world and data:
        n = data["splits"]
        h, w = data["image_grid"]
        return [f"**Data.** `{data['raw']}` (no `world.yaml`: imported data): "
                + ", ".join(f"{s} {n[s]['pairs']:,} image-caption pairs and {n[s]['questions']:,} questions"
                            for s in ("train", "val", "test"))
                + f". The native arm sees each image as {h}×{w} codes of the {data['codebook_size']}-code tokenizer "
                f"`{data['tokenizer']}`. There is no scene parser for this data: text→image, when evaluated, is "
                "scored by R-precision.", ""]
    if not world:
        return []
    c, n = world["config"], world["splits"]
    held = ", ".join(f"{color} {shape}" for color, shape in world["held_out"])
    h, w = world["image_grid"]
    return [f"**Data.** A shapes world of {n['train']:,} training, {n['val']:,} validation and {n['test']:,} test "
            f"scenes: {c['min_objects']}–{c['max_objects']} objects on a {c['grid']}×{c['grid']} grid, "
            f"{c['image_size']}×{c['image_size']} px, shapes {', '.join(c['shapes'])}, colours "
            f"{', '.join(c['colors'])}. Held out of training: {held} "
            f"({world['test_held_out_fraction']:.0%} of test scenes are built around one"
            + (f"; so are {n['val_held_out']:,} more validation scenes, which `compare` does not read"
               if n.get("val_held_out") else "")
            + "). The native arm sees each "
            f"image as {h}×{w} codes of the {world['codebook_size']}-code tokenizer `{world['tokenizer']}`.", ""]


def write_report(metrics: dict[str, Any], examples: dict[str, Any], out: str | Path) -> Path:
    """Write the plots, ``metrics.json`` and ``report.md`` into ``out``; returns the report's path.

    ``FileExistsError`` (nothing written) when ``out`` holds one of ``REPORT_FILES`` that its manifest does not list.
    """
    out = Path(out)
    check_listed(out, REPORT_FILES, kind=COMPARE_KIND)
    out.mkdir(parents=True, exist_ok=True)
    record_files(out, add=REPORT_FILES, kind=COMPARE_KIND)  # write-ahead; the plots not made are dropped below
    metrics["plots"] = _plots(metrics, examples, out)
    made = {Path(p).name for p in metrics["plots"].values()}
    remove_listed(out, [name for name in PLOT_FILES if name not in made], kind=COMPARE_KIND)  # ours, from a rerun
    metrics["examples"] = {"generated": [{k: v for k, v in r.items() if k != "image"}
                                         for r in examples.get("generated", [])[:16]]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str), encoding="utf-8")
    seeds = metrics["seeds"]
    ev = metrics["config"]["eval"]
    lines = [
        f"# Comparison `{metrics['name']}`: native early fusion vs encoder–projector",
        "",
        f"Created {metrics['created'][:19]} UTC with chameleon-lite {metrics['package_version']} on "
        f"{metrics['machine']['device']} ({metrics['machine']['cpus']} CPUs, torch {metrics['machine']['torch']}); "
        f"seeds {seeds}; wall time {metrics['seconds'] / 60:.1f} min. Budget: {metrics['budget']['train_samples']:,} "
        f"training samples per arm. Tables show seed {seeds[0]}'s counts; percentages are the mean "
        f"(± std over seeds when several). Evaluation: the first {ev['qa_questions']} test questions, "
        f"{ev['captions']} test captions, {ev['text_to_image']} text->image prompts (CFG {ev['cfg_scale']}, "
        f"image temperature {ev.get('image_temperature', 1.0)}).",
        "",
        *_world_lines(metrics),
        "## Reading",
        "",
        *_reading(metrics),
        "",
        *_understanding_lines(metrics),
        "## Captioning",
        "",
        "| arm | BLEU-4 | CIDEr-D | n |",
        "|---|---|---|---|",
    ]
    for arm, data in metrics["arms"].items():
        c = data["per_seed"][0]["captioning"]
        s = data["summary"]
        lines.append(f"| {arm} | {_mean_std(s, 'captioning.bleu_4', 100)} | {_mean_std(s, 'captioning.cider_d', 1, 3)}"
                     f" | {c['n_samples']} |")
    t2i = metrics["arms"].get("native", {}).get("per_seed", [{}])[0].get("text_to_image")
    if t2i and t2i.get("scorer") == "r_precision":
        s = metrics["arms"]["native"]["summary"]
        lines += ["", "## Text -> image (native only), scored by R-precision", "",
                  f"A contrastive image-text model trained on the training pairs (the baseline's ViT pretraining, "
                  f"outside the budget) ranks each image's own caption against {t2i['r'] - 1} captions of other "
                  f"groups (grouped by {t2i['key']}); chance is {100 / t2i['r']:.1f} %.", "",
                  "| images | R-precision | n |", "|---|---|---|"]
        for name, label in (("generated", "generated from the caption"), ("vq_reconstruction",
                            "VQ reconstructions of the real images (ceiling)"), ("real", "real test images")):
            lines.append(f"| {label} | {_mean_std(s, f'text_to_image.{name}.r_precision', 100)} % "
                         f"({t2i[name]['hits']}/{t2i[name]['n']}) | {t2i[name]['n']} |")
        if "generated" in metrics["plots"]:
            lines += ["", "![generated images](generated_images.png)"]
    elif t2i:
        ceiling = metrics.get("vq_ceiling", {})
        lines += ["", "## Text -> image (native only), scored by the scene parser", "",
                  "| metric | generated | VQ reconstruction ceiling |", "|---|---|---|"]
        for key in ("precision", "recall", "count_correct", "attributes_correct", "binding_correct",
                    "relations_correct", "all_correct"):
            g, c = t2i.get(key, {}), ceiling.get(key, {})
            lines.append(f"| {key} | {_pct(g.get('mean'))} % (n={g.get('count', 0)}) | "
                         f"{_pct(c.get('mean'))} % (n={c.get('count', 0)}) |")
        if "generated" in metrics["plots"]:
            lines += ["", "![generated images](generated_images.png)"]
        if "reconstructions" in metrics["plots"]:
            lines += ["", "Real test images (top) and their VQ reconstructions (bottom):", "",
                      "![VQ reconstructions](vq_reconstructions.png)"]
    lines += _stage3_lines(metrics)
    lines += ["", "## Cost", "", *_cost_lines(metrics)]
    if "loss" in metrics["plots"]:
        lines += ["", "![loss curves](loss_curves.png)"]
    lines += ["", "Every number above is in `metrics.json`, with the config that produced it.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
