"""``chameleon-lite compare``: train (or load) both arms per seed, evaluate them on the same held-out data, report.

::

    result = compare("configs/compare/tiny.yaml", out="runs/compare-tiny")
    result["metrics"]["arms"]["native"]["summary"]["qa.overall.accuracy"]   # {"mean", "std", "n"}

Writes ``OUT/metrics.json`` (every number, the config and the package version), ``OUT/report.md`` and the plots
(see ``chameleon_lite.comparison.report``), and trains into ``OUT/seed<N>/``. ``OUT/manifest.json`` (kind
``compare``) lists all of these (issue 14): a rerun into the same ``OUT`` replaces them, and any of these names
that ``OUT`` holds but the manifest does not list (the package did not write it) is refused with
``FileExistsError`` before anything is trained or written. Other files in ``OUT`` (the demo's ``data/`` and
``tokens/``, a user's notes) are not touched.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from chameleon_lite.baseline.vlm import BaselineVLM, parameter_counts
from chameleon_lite.comparison.config import CompareConfig, CompareConfigError, load_compare_config
from chameleon_lite.comparison.evaluate import (
    evaluate_captions,
    evaluate_pope_ranking,
    evaluate_qa,
    evaluate_text_to_image,
    evaluate_text_to_image_retrieval,
    measure_latency,
    vq_ceiling,
)
from chameleon_lite.comparison.progress import PipelineProgress, pipeline_samples
from chameleon_lite.comparison.training import ArmTraining, train_baseline, train_native
from chameleon_lite.data.readers import pair_dataset
from chameleon_lite.eval.understanding import reference_answers_from_shards
from chameleon_lite.native.chameleon import ChameleonLite
from chameleon_lite.safe_io import record_files
from chameleon_lite.training.lightning_cli import quiet_lightning
from chameleon_lite.world.scene_parser import parse_scene
from chameleon_lite.world.shapes_world import WORLD_FILE, load_world_spec
from chameleon_lite.world.splits import SPLITS

__all__ = ["compare", "check_matched_decoders", "flatten_numbers", "summarize_seeds"]

logger = logging.getLogger(__name__)
ARMS = ("native", "baseline")


def flatten_numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as ``{"a.b.c": value}`` (lists and strings are left out)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten_numbers(value, f"{prefix}{key}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix[:-1]] = float(tree)
    return out


def summarize_seeds(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation (0 for one seed) and count of every numeric leaf over the seeds."""
    flat = [flatten_numbers({k: v for k, v in run.items() if k != "seed"}) for run in per_seed]
    keys = sorted(set().union(*flat))
    summary = {}
    for key in keys:
        values = [f[key] for f in flat if key in f]
        summary[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "n": len(values)}
    return summary


def _machine() -> dict[str, Any]:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chameleon-lite")
    except PackageNotFoundError:
        return "unknown"


def _text_to_image_judge(cfg: CompareConfig, has_world: bool) -> str | None:
    """How generated images are scored (``eval.text_to_image_scorer``); None when text->image is not evaluated.
    ``CompareConfigError`` before anything is trained when the choice cannot work with this data and config."""
    ev = cfg.eval
    if ev.text_to_image <= 0:
        return None
    judge = ev.text_to_image_scorer if ev.text_to_image_scorer != "auto" else (
        "parser" if has_world else "r_precision")
    if judge == "parser" and not has_world:
        raise CompareConfigError(f"eval.text_to_image_scorer=parser needs a shapes world (world.yaml in "
                                 f"{cfg.data.raw})")
    if judge == "r_precision" and ev.scorer_dir is None and cfg.baseline.model_dir:
        raise CompareConfigError("text->image by R-precision needs eval.scorer_dir, or a baseline trained here (its "
                                 "ViT pretraining exports the scorer); baseline.model_dir is set and eval.scorer_dir "
                                 "is not")
    return judge


def _evaluate_arm(arm: str, model: Any, config: CompareConfig, parse, references, progress: bool,
                  scorer: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    raw, ev = Path(config.data.raw), config.eval
    test = raw / "test"
    result: dict[str, Any] = {}
    if _has_qa(raw, "test"):  # imported data may have captions only
        result["qa"] = evaluate_qa(model, str(test / "qa-*.tar"), limit=ev.qa_questions, batch_size=ev.batch_size,
                                   reference_answers=references, progress=progress)
        # the same POPE questions as a ranking: does a gain move the threshold or separate present from absent?
        result["qa"]["pope_ranking"] = evaluate_pope_ranking(model, str(test / "qa-*.tar"), result["qa"]["records"],
                                                             batch_size=ev.batch_size)
    result["captioning"] = evaluate_captions(model, str(test / "pairs-*.tar"), limit=ev.captions,
                                             batch_size=ev.batch_size, progress=progress)
    rows: list[dict[str, Any]] = []
    if arm == "native" and ev.text_to_image > 0 and scorer is not None:
        result["text_to_image"], rows = evaluate_text_to_image_retrieval(
            model, str(test / "pairs-*.tar"), scorer, limit=ev.text_to_image, r=ev.r_precision_r,
            key=ev.r_precision_key, cfg_scale=ev.cfg_scale, image_temperature=ev.image_temperature,
            batch_size=min(ev.batch_size, 16), progress=progress)
    elif arm == "native" and ev.text_to_image > 0 and parse is not None:
        result["text_to_image"], rows = evaluate_text_to_image(
            model, str(test / "pairs-*.tar"), parse, limit=ev.text_to_image, cfg_scale=ev.cfg_scale,
            image_temperature=ev.image_temperature, batch_size=min(ev.batch_size, 16), progress=progress)
    first = next(iter(pair_dataset(str(test / "pairs-*.tar"))))
    visual = model.bundle.image_tokens if arm == "native" else model.visual_tokens  # native: with <boi>, <eoi>
    result["cost"] = {"visual_tokens_per_image": visual, "parameters": parameter_counts(model),
                      "latency": measure_latency(model, first["image"])}
    return result, rows


def _preference_stage(arm: str, model: Any, model_dir: str, cfg: CompareConfig, seed_dir: Path, seed: int,
                      precision: list[str], parse, references, bar: PipelineProgress) -> dict[str, Any]:
    """Stage 3 of one arm: pairs from the training split (on-policy: this model's wrong answers), DPO from
    ``model_dir``, then the same evaluation again. Returns the pairs' summary, the training cost and ``after``
    (QA with its per-question records, as before tuning, and captions of the tuned model; text->image is not
    re-run, DPO trains text responses only)."""
    from chameleon_lite.comparison.evaluate import answer_questions
    from chameleon_lite.comparison.training import train_preference
    from chameleon_lite.world.preference_pairs import PAIRS_PREFIX, build_preference_pairs, write_preference_shards

    s3 = cfg.stage3
    bar.stage(f"seed {seed} · {arm} preference pairs")
    answer_fn = (lambda images, questions: answer_questions(model, images, questions)) if s3.on_policy else None
    pairs, summary = build_preference_pairs(cfg.data.raw, pairs=s3.pairs + s3.val_pairs, seed=seed,
                                            answer_fn=answer_fn, batch_size=cfg.eval.batch_size,
                                            **s3.pair_options())
    pairs_dir = seed_dir / f"{arm}-dpo" / "pairs"
    write_preference_shards(pairs, pairs_dir, overwrite=True)
    recipe = s3.native_recipe if arm == "native" else s3.baseline_recipe
    training = train_preference(recipe, seed_dir, arm, init_from=model_dir, pairs=s3.pairs, seed=seed,
                                pairs_glob=str(pairs_dir / f"{PAIRS_PREFIX}-*.tar"),
                                extra=[*precision, f"--data.init_args.val_pairs={s3.val_pairs}", *s3.overrides],
                                bar=bar, label=f"seed {seed}")
    tuned = _load(arm, training["model_dir"], cfg.eval.resolved_device())
    no_images = replace(cfg, eval=replace(cfg.eval, text_to_image=0))
    after, _ = _evaluate_arm(arm, tuned, no_images, parse, references, False)
    return {"pairs": summary, "training": training,
            "after": {"qa": after["qa"], "captioning": after["captioning"]}}


def _load(arm: str, model_dir: str, device: str = "cpu") -> Any:
    cls = ChameleonLite if arm == "native" else BaselineVLM
    return cls.from_pretrained(model_dir, device=device)


@quiet_lightning()  # quiet from Python too: no Lightning banners per fit (levels restored on return)
def compare(config: str | Path | CompareConfig, out: str | Path, *, overrides: list[str] = (),
            progress: bool = True) -> dict[str, Any]:
    """Run a comparison; returns ``{"metrics": ..., "report": path}`` and writes everything under ``out``.

    Raises ``FileExistsError`` before anything is trained when ``out`` holds a file or folder of a name this
    writes (``report.md``, ``metrics.json``, the plots, ``seed<N>``) that the package did not write there.
    """
    from chameleon_lite.comparison.report import COMPARE_KIND, check_compare_out, write_report

    cfg = config if isinstance(config, CompareConfig) else load_compare_config(config, overrides)
    out = Path(out)
    check_compare_out(out, cfg.seeds)
    out.mkdir(parents=True, exist_ok=True)
    # write-ahead: the seed folders are listed before training writes into them, so an interrupted run can rerun
    record_files(out, add=[f"seed{seed}" for seed in cfg.seeds], kind=COMPARE_KIND)
    started = time.perf_counter()
    raw = Path(cfg.data.raw)
    world = _load_world(raw)  # None: imported data (data import)
    if world is None:
        _check_plain_data(raw, cfg)
    parse = partial(parse_scene, config=world.world) if world is not None else None  # text->image needs a parser
    judge = _text_to_image_judge(cfg, world is not None)  # "parser", "r_precision" or None (not scored)
    if not (cfg.native.model_dir or cfg.baseline.model_dir):
        check_matched_decoders(cfg)  # before anything is trained
    references = reference_answers_from_shards(str(raw / "train" / "qa-*.tar")) if _has_qa(raw, "train") else None
    metrics: dict[str, Any] = {
        "name": cfg.name, "package_version": _version(), "created": datetime.now(timezone.utc).isoformat(),
        "machine": _machine(), "config": asdict(cfg), "seeds": list(cfg.seeds),
        "budget": {"train_samples": cfg.train_samples}, "arms": {arm: {"per_seed": []} for arm in ARMS},
        "world": _world_summary(world, cfg.data.tokenizer) if world is not None else None,
        "data": None if world is not None else _data_summary(raw, cfg.data.tokenizer),
    }
    examples: dict[str, Any] = {}
    precision = precision_overrides(cfg.precision)
    metrics["precision"] = precision[0].split("=", 1)[1] if precision else "recipe"
    bar = PipelineProgress(pipeline_samples(cfg), enabled=progress)  # one display: stage, samples, time left
    for seed in cfg.seeds:
        seed_dir = out / f"seed{seed}"
        L.seed_everything(seed, workers=True)
        trained: dict[str, ArmTraining | None] = {}
        if cfg.native.model_dir:
            trained["native"] = None
        else:
            trained["native"] = train_native(
                cfg.native.recipe, seed_dir, tokens=cfg.data.tokens, tokenizer=cfg.data.tokenizer,
                train_samples=cfg.train_samples, seed=seed, extra=[*precision, *cfg.native.overrides],
                progress=progress, bar=bar, label=f"seed {seed}")
        if cfg.baseline.model_dir:
            trained["baseline"] = None
        else:
            b = cfg.baseline
            trained["baseline"] = train_baseline(
                b.encoder_recipe, b.stage1_recipe, b.stage2_recipe, seed_dir, raw=str(raw),
                tokenizer=cfg.data.tokenizer, train_samples=cfg.train_samples, stage1_fraction=b.stage1_fraction,
                encoder_samples=b.encoder_samples, seed=seed, progress=progress, bar=bar, label=f"seed {seed}",
                export_scorer=judge == "r_precision" and cfg.eval.scorer_dir is None,
                extra={"encoder": [*precision, *b.encoder_overrides], "stage1": [*precision, *b.stage1_overrides],
                       "stage2": [*precision, *b.stage2_overrides]})
        decoders = {}
        for arm in ARMS:
            bar.stage(f"seed {seed} · evaluating {arm}")
            model_dir = getattr(cfg, arm).model_dir or trained[arm].model_dir
            model = _load(arm, model_dir, cfg.eval.resolved_device())
            decoders[arm] = asdict(model.decoder.config)
            scorer = None
            if arm == "native" and judge == "r_precision":
                from chameleon_lite.eval.r_precision import load_scorer

                scorer = load_scorer(cfg.eval.scorer_dir or trained["baseline"].stages["encoder"]["scorer_dir"],
                                     device=cfg.eval.resolved_device())
            result, rows = _evaluate_arm(arm, model, cfg, parse, references, False, scorer)  # the bar is the display
            result["seed"] = seed
            result["model_dir"] = str(model_dir)
            result["training"] = trained[arm].to_dict() if trained[arm] is not None else None
            if cfg.stage3.pairs:
                result["stage3"] = _preference_stage(arm, model, str(model_dir), cfg, seed_dir, seed, precision,
                                                     parse, references, bar)
            metrics["arms"][arm]["per_seed"].append(result)
            if arm == "native" and seed == cfg.seeds[0]:
                examples["generated"] = rows
                # the tokenizer's ceiling on as many real images as text->image draws (none: not measured)
                if model.bundle.image_tokenizer is not None and parse is not None and cfg.eval.text_to_image > 0:
                    metrics["vq_ceiling"], examples["reconstructions"] = vq_ceiling(
                        model.bundle, str(raw / "test" / "pairs-*.tar"), parse, limit=cfg.eval.text_to_image)
            del model
        differ = sorted(k for k in decoders["native"] if decoders["native"][k] != decoders["baseline"].get(k))
        metrics["matched_decoder"] = metrics.get("matched_decoder", True) and not differ
        if differ:
            metrics.setdefault("decoder_differences", {})[str(seed)] = {
                k: [decoders["native"][k], decoders["baseline"][k]] for k in differ}
            logger.warning("the arms' decoder configurations differ in %s: not a matched comparison", differ)
    for arm in ARMS:
        runs = metrics["arms"][arm]["per_seed"]
        metrics["arms"][arm]["summary"] = summarize_seeds(
            [{k: v for k, v in r.items() if k not in ("model_dir", "qa")}
             | ({"qa": _qa_numbers(r["qa"])} if "qa" in r else {}) for r in runs])
    metrics["seconds"] = time.perf_counter() - started
    bar.stage("writing the report")
    report = write_report(metrics, examples, out)
    bar.close()
    return {"metrics": metrics, "report": report}


def check_matched_decoders(cfg: CompareConfig) -> None:
    """Both arms' recipes, with their overrides, must build identical decoders (all of ``DecoderConfig`` but the
    vocabulary size, which the shared tokenizer sets): ``CompareConfigError`` naming the differing fields, found when
    the config is read rather than after training."""
    from chameleon_lite.training.lightning_cli import parse_recipe

    def decoder(recipe: str, overrides: list[str]) -> dict[str, Any]:
        parsed = parse_recipe(recipe, [o for o in overrides if o.startswith("--model.")])
        model = parsed.model.init_args.model
        return dict(model.as_dict() if hasattr(model, "as_dict") else model or {})

    native = decoder(cfg.native.recipe, cfg.native.overrides)
    baseline = decoder(cfg.baseline.stage2_recipe, cfg.baseline.stage2_overrides)
    differ = sorted(k for k in native.keys() | baseline.keys()
                    if k != "vocab_size" and native.get(k) != baseline.get(k))
    if differ:
        detail = ", ".join(f"{k}: native {native.get(k)!r} vs baseline {baseline.get(k)!r}" for k in differ)
        raise CompareConfigError(f"{cfg.name}: the arms' decoders differ ({detail}); a matched comparison needs "
                                 f"identical decoders ({cfg.native.recipe}, {cfg.baseline.stage2_recipe} and their "
                                 "overrides)")


def _load_world(raw: Path) -> Any:
    """The shapes world's spec when ``raw`` holds a ``world.yaml``, else None (data from ``data import``)."""
    return load_world_spec(raw) if (raw / WORLD_FILE).is_file() else None


def _has_qa(raw: Path, split: str) -> bool:
    return any((raw / split).glob("qa-*.tar"))


def _check_plain_data(raw: Path, cfg: CompareConfig) -> None:
    """Data without ``world.yaml`` (``chameleon-lite data import``): stage 3 needs a world's scenes, and test
    questions without training questions would be scored against nothing learned. ``CompareConfigError`` naming it."""
    if _has_qa(raw, "test") and not _has_qa(raw, "train"):
        raise CompareConfigError(f"{raw / 'test'} has questions (qa-*.tar) but {raw / 'train'} has none: import "
                                 "questions for the training images too, or none at all (then only captions and "
                                 "text->image are scored)")
    if cfg.stage3.pairs:
        raise CompareConfigError(f"stage3.pairs={cfg.stage3.pairs}: preference pairs are built from a shapes world's "
                                 f"scenes and {raw} has no world.yaml")


def _data_summary(raw: Path, tokenizer: str) -> dict[str, Any]:
    """What imported data is (no world.yaml): samples per split and kind (counted from the tar headers, no image
    decoded), and the tokenizer's code grid."""
    import tarfile

    from chameleon_lite.model.model_dir import resolve_bundle_path
    from chameleon_lite.tokenization.bundle import load_bundle
    def samples(split: str, prefix: str) -> int:
        keys = set()
        for shard in sorted((raw / split).glob(f"{prefix}-*.tar")):
            with tarfile.open(shard) as tar:
                keys.update(name.split(".", 1)[0] for name in tar.getnames())  # webdataset: key = before the 1st dot
        return len(keys)

    counts = {split: {"pairs": samples(split, "pairs"), "questions": samples(split, "qa")}
              for split in ("train", "val", "test")}
    bundle = load_bundle(resolve_bundle_path(tokenizer), load_image_tokenizer=False)
    return {"raw": str(raw), "splits": counts, "tokenizer": bundle.name, "image_grid": list(bundle.image_grid),
            "codebook_size": bundle.vocab.codebook_size}


def _world_summary(spec: Any, tokenizer: str) -> dict[str, Any]:
    """What the data is: the world's config, split sizes, held-out combos and the tokenizer's code grid."""
    from chameleon_lite.model.model_dir import resolve_bundle_path
    from chameleon_lite.tokenization.bundle import load_bundle
    bundle = load_bundle(resolve_bundle_path(tokenizer), load_image_tokenizer=False)
    return {"config": spec.world.to_dict(), "splits": {s: getattr(spec, s) for s in SPLITS},
            "held_out": [list(c) for c in spec.held_out], "test_held_out_fraction": spec.test_held_out_fraction,
            "tokenizer": bundle.name, "image_grid": list(bundle.image_grid),
            "codebook_size": bundle.vocab.codebook_size}


def precision_overrides(precision: str) -> list[str]:
    """``--trainer.precision`` for every stage of both arms (the same for both: a fair comparison), or none."""
    if precision != "auto":
        return [f"--trainer.precision={precision}"]
    if torch.cuda.is_available():
        return []  # the recipes' own (bf16-mixed in the GPU recipes)
    from chameleon_lite.training.perf import fastest_cpu_precision

    chosen = fastest_cpu_precision()
    logger.info("precision auto: %s on this CPU", chosen)
    return [f"--trainer.precision={chosen}"]


def _qa_numbers(qa: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in qa.items() if k != "records"}
