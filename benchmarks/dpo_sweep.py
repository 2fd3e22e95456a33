"""Stage-3 (DPO) settings swept on the VALIDATION split: for each arm's trained model and each setting, build the
pairs (on-policy, from the training split), tune, and score QA per category and POPE on validation questions.

    python benchmarks/dpo_sweep.py --raw runs/demo/data --native runs/demo/seed0/native/model \\
        --baseline runs/demo/seed0/baseline-stage2/model --out runs/dpo-sweep \\
        --run "lr5e-5:--model.init_args.lr=5e-5" --run "lr2e-4:--model.init_args.lr=2e-4"

Each ``--run NAME:ARGS`` adds ``fit`` overrides to both arms' recipes (``configs/<arm>/dpo_tiny.yaml``); the
row ``before`` is the model as trained. Scores are on the questions of ``--val-splits`` pooled (by default ``val``
and, where the world has one, ``val_held_out``: scenes around held-out combos, see ``world/splits.py``), with POPE
F1 per split beside them. Prints a markdown table and appends rows to ``OUT/sweep.jsonl``. The comparison's test
split is never read.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from chameleon_lite.comparison.evaluate import answer_questions, evaluate_qa
from chameleon_lite.comparison.run import precision_overrides
from chameleon_lite.comparison.training import train_preference
from chameleon_lite.eval.understanding import QARecord, reference_answers_from_shards, summarize_qa
from chameleon_lite.training.lit_preference import load_policy
from chameleon_lite.world.preference_pairs import (
    EXTRA_EXISTENCE,
    EXTRA_NEGATIVE_TYPES,
    PAIR_KINDS,
    PAIRS_PREFIX,
    build_preference_pairs,
    write_preference_shards,
)
from chameleon_lite.world.questions import CATEGORIES, POPE_NEGATIVE_TYPES


def summary_scores(qa: dict) -> dict:
    """The sweep's columns from a ``summarize_qa`` dict."""
    pope = qa["pope"].get("all", {})
    # false "yes" answers per POPE negative type: which absent objects the arm still confirms
    false_yes = {t: qa["pope"][t]["fp"] for t in POPE_NEGATIVE_TYPES if t in qa["pope"]}
    return {"qa": qa["overall"]["accuracy"], **{c: qa["by_category"].get(c, {}).get("accuracy") for c in CATEGORIES},
            "pope_f1": pope.get("f1"), "yes_rate": pope.get("yes_rate"),
            "pope_counts": {k: pope.get(k) for k in ("tp", "fp", "tn", "fn", "invalid")}, "false_yes": false_yes,
            "novel_objects": qa["novel_objects"]}


def score(model, raw: Path, splits: list[str], questions: int, references) -> dict:
    """Scores on the first ``questions`` questions of each split, pooled; ``by_split``: each split's own."""
    per_split = {split: evaluate_qa(model, str(raw / split / "qa-*.tar"), limit=questions,
                                    reference_answers=references, progress=False) for split in splits}
    pooled = summarize_qa([QARecord(**r) for split in splits for r in per_split[split]["records"]])
    return {**summary_scores(pooled), "questions": {s: len(per_split[s]["records"]) for s in splits},
            "by_split": {s: summary_scores(per_split[s]) for s in splits}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True, help="the world directory (train/, val/, world.yaml)")
    parser.add_argument("--native", help="the native arm's trained model directory")
    parser.add_argument("--baseline", help="the baseline arm's trained model directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--questions", type=int, default=400, help="validation questions scored per split")
    parser.add_argument("--val-splits", default="val,val_held_out",
                        help="validation splits scored, comma-separated (one the world lacks is left out, with a note)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(PAIR_KINDS), help="pair kinds to build, comma-separated")
    parser.add_argument("--balance-yes-no", action="store_true", help="choose 'yes' and 'no' equally often")
    parser.add_argument("--extra-existence", type=int, default=EXTRA_EXISTENCE,
                        help="per scene, this many more existence questions asked of its ground truth (0: none)")
    parser.add_argument("--negative-types", default=",".join(EXTRA_NEGATIVE_TYPES),
                        help="POPE types of the extra questions' absent objects, comma-separated")
    parser.add_argument("--negated-twins", action="store_true",
                        help="follow each extra existence question with its negated twin")
    parser.add_argument("--skip-before", action="store_true", help="do not score the models before tuning")
    parser.add_argument("--run", action="append", default=[], help="NAME:ARGS (fit overrides for both arms)")
    args = parser.parse_args()
    raw, out = Path(args.raw), Path(args.out)
    splits = [s for s in args.val_splits.split(",") if (raw / s).is_dir()]
    for missing in sorted(set(args.val_splits.split(",")) - set(splits)):
        print(f"note: {raw} has no {missing} split; it is not scored")
    if not splits:
        parser.error(f"none of the validation splits {args.val_splits} is in {raw}")
    references = reference_answers_from_shards(str(raw / "train" / "qa-*.tar"))
    precision = precision_overrides("auto")
    rows = []
    for arm, model_dir in (("native", args.native), ("baseline", args.baseline)):
        if not model_dir:
            continue
        model = load_policy(model_dir).eval()
        if not args.skip_before:
            rows.append({"arm": arm, "run": "before", "kinds": args.kinds, "balanced": args.balance_yes_no,
                         **score(model, raw, splits, args.questions, references)})
            print(json.dumps(rows[-1]), flush=True)
        pairs_dir = out / arm / "pairs"
        started = time.perf_counter()
        pairs, summary = build_preference_pairs(
            raw, pairs=args.pairs + 64, seed=args.seed, kinds=args.kinds.split(","),
            balance_yes_no=args.balance_yes_no, extra_existence=args.extra_existence,
            negative_types=args.negative_types.split(","), negated_twins=args.negated_twins,
            answer_fn=lambda images, questions: answer_questions(model, images, questions))
        write_preference_shards(pairs, pairs_dir, overwrite=True)
        print(f"{arm}: {summary} in {time.perf_counter() - started:.0f} s")
        for spec in args.run:
            name, _, extra = spec.partition(":")
            trained = train_preference(f"configs/{arm}/dpo_tiny.yaml", out / arm / name, arm, init_from=model_dir,
                                       pairs_glob=str(pairs_dir / f"{PAIRS_PREFIX}-*.tar"), pairs=args.pairs,
                                       seed=args.seed, extra=[*precision, *shlex.split(extra)], progress=False)
            tuned = load_policy(trained["model_dir"]).eval()
            rows.append({"arm": arm, "run": name, "kinds": args.kinds, "balanced": args.balance_yes_no,
                         "extra_existence": args.extra_existence, "negative_types": args.negative_types,
                         "negated_twins": args.negated_twins, "seconds": round(trained["seconds"], 1),
                         "val_reward_accuracy": trained["validation"].get("val/reward_accuracy"),
                         **score(tuned, raw, splits, args.questions, references)})
            print(json.dumps(rows[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    cols = ["qa", *CATEGORIES, "pope_f1", "yes_rate"]
    print(f"pooled over {', '.join(splits)}; POPE F1 of each split beside")
    print("| arm | run | " + " | ".join(cols) + " | " + " | ".join(f"{s} F1" for s in splits)
          + " | false yes: random / popular / adversarial | false no | held-out combos confirmed | train s |")
    print("|---|---|" + "---|" * (len(cols) + len(splits) + 4))
    for r in rows:
        cells = ["–" if r.get(c) is None else f"{100 * r[c]:.1f}" for c in cols]
        cells += ["–" if r["by_split"][s]["pope_f1"] is None else f"{100 * r['by_split'][s]['pope_f1']:.1f}"
                  for s in splits]
        false_yes = " / ".join(str(r["false_yes"].get(t, "–")) for t in POPE_NEGATIVE_TYPES)
        novel = f"{r['novel_objects']['confirmed']}/{r['novel_objects']['total']}"
        print(f"| {r['arm']} | {r['run']} | " + " | ".join(cells)
              + f" | {false_yes} | {r['pope_counts']['fn']} | {novel} | {r.get('seconds', '')} |")


if __name__ == "__main__":
    main()
