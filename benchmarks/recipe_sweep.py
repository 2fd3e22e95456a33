"""A small recipe sweep for one arm on the VALIDATION split: train with overrides, then score what the model does.

Each ``--run NAME ARGS`` trains the native arm (``comparison.training.train_native``) or the baseline
(``train_baseline``) of a compare config at its sample budget, with extra ``fit`` overrides, then evaluates on the
world's validation split (never test: this is what the recipes are tuned on): QA accuracy per category with the
majority-answer chance line, text->image all-correct by the scene parser (native), and the validation losses the
trainer logged. Rows are appended to ``--out``/sweep.jsonl and printed as a markdown table.

    python benchmarks/recipe_sweep.py --config configs/compare/demo.yaml --data runs/demo --out runs/sweep \\
        --run base --run "wide:--model.init_args.model.d_model=384"

``--data`` is a directory the demo prepared (``OUT/data``, ``OUT/tokens``); ``--samples`` overrides the budget.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from functools import partial
from pathlib import Path

from chameleon_lite.comparison.config import load_compare_config
from chameleon_lite.comparison.evaluate import evaluate_qa, evaluate_text_to_image
from chameleon_lite.comparison.run import precision_overrides
from chameleon_lite.comparison.training import train_baseline, train_native
from chameleon_lite.eval.understanding import reference_answers_from_shards
from chameleon_lite.native.chameleon import ChameleonLite
from chameleon_lite.world.scene_parser import parse_scene
from chameleon_lite.world.shapes_world import load_world_spec

CATEGORIES = ("count", "color", "shape", "binding", "spatial", "negation", "existence")


def run_one(name: str, extra: list[str], args: argparse.Namespace) -> dict:
    cfg = load_compare_config(args.config, [f"data.raw={args.data}/data", f"data.tokens={args.data}/tokens"])
    samples = args.samples or cfg.train_samples
    precision = precision_overrides(cfg.precision)
    out = Path(args.out) / name
    started = time.perf_counter()
    if args.arm == "native":
        trained = train_native(cfg.native.recipe, out, tokens=cfg.data.tokens, tokenizer=cfg.data.tokenizer,
                               train_samples=samples, seed=args.seed,
                               extra=[*precision, *cfg.native.overrides, *extra], progress=False)
        from chameleon_lite.comparison.training import read_loss_curve

        val = {key: read_loss_curve(out / "native", key)[-1:] for key in ("val/image_loss", "val/text_loss")}
        model = ChameleonLite.from_pretrained(trained.model_dir)
    else:
        from chameleon_lite.baseline.vlm import BaselineVLM

        b = cfg.baseline
        trained = train_baseline(
            b.encoder_recipe, b.stage1_recipe, b.stage2_recipe, out, raw=cfg.data.raw, tokenizer=cfg.data.tokenizer,
            train_samples=samples, stage1_fraction=b.stage1_fraction, encoder_samples=b.encoder_samples,
            seed=args.seed, progress=False,
            extra={"encoder": [*precision, *b.encoder_overrides], "stage1": [*precision, *b.stage1_overrides],
                   "stage2": [*precision, *b.stage2_overrides, *extra]})
        val = {}
        model = BaselineVLM.from_pretrained(trained.model_dir)
    raw = Path(cfg.data.raw)
    references = reference_answers_from_shards(str(raw / "train" / "qa-*.tar"))
    qa = evaluate_qa(model, str(raw / "val" / "qa-*.tar"), limit=args.questions, reference_answers=references,
                     progress=False)
    row = {"name": name, "arm": args.arm, "overrides": extra, "samples": trained.samples_seen,
           "steps": trained.steps, "train_seconds": round(trained.seconds, 1),
           "tokens_per_s": round(trained.tokens_per_s), "qa_overall": qa["overall"]["accuracy"],
           **{f"qa_{c}": qa["by_category"].get(c, {}).get("accuracy") for c in CATEGORIES},
           "chance": {c: qa["chance"][c]["chance"] for c in CATEGORIES if c in qa.get("chance", {})},
           "yes_rate": qa["pope"]["all"]["yes_rate"],
           **{k.replace("/", "_"): (v[0][1] if v else None) for k, v in val.items()}}
    if args.arm == "native" and args.images:
        world = load_world_spec(raw)
        t2i, _ = evaluate_text_to_image(model, str(raw / "val" / "pairs-*.tar"),
                                        partial(parse_scene, config=world.world), limit=args.images,
                                        cfg_scale=cfg.eval.cfg_scale,
                                        image_temperature=cfg.eval.image_temperature, progress=False)
        row["t2i_all_correct"] = t2i["all_correct"]["mean"]
        row["t2i_recall"] = t2i["recall"]["mean"]
    row["wall_seconds"] = round(time.perf_counter() - started, 1)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/compare/demo.yaml")
    p.add_argument("--data", required=True, help="a directory holding data/ and tokens/ (as the demo writes)")
    p.add_argument("--out", required=True)
    p.add_argument("--arm", choices=("native", "baseline"), default="native")
    p.add_argument("--run", action="append", required=True, metavar="NAME[:OVERRIDES]",
                   help="a run: its name, then after a colon the extra fit overrides (space separated)")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--questions", type=int, default=400)
    p.add_argument("--images", type=int, default=32)
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for run in args.run:
        name, _, overrides = run.partition(":")
        row = run_one(name, shlex.split(overrides), args)
        with open(Path(args.out) / "sweep.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
