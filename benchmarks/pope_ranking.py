"""How well a model RANKS present above absent objects on POPE questions, apart from where it puts its threshold
(``chameleon_lite.eval.pope_ranking``: AUC of the margin log p("yes") - log p("no"), F1 at margin 0, and the best
threshold's F1, an oracle bound on any recalibration when read on test). ``compare`` reports the same numbers for
its own questions; this script scores any model directories on any split of a shapes world:

    python benchmarks/pope_ranking.py --raw runs/demo/data --split test --questions 2113 \\
        --model before=runs/demo/seed0/native/model --model after=runs/stage3/seed0/native-dpo/model

Prints a markdown table and writes ``--out`` (JSON) when given. Both arms' model directories work.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from chameleon_lite.comparison.evaluate import evaluate_pope_ranking
from chameleon_lite.data.readers import qa_dataset
from chameleon_lite.training.lit_preference import load_policy


def pope_records(shards: str, questions: int) -> list[dict]:
    """The first ``questions`` questions of ``shards`` (the order ``compare`` reads) as the fields of ``evaluate_qa``'s
    records that ``evaluate_pope_ranking`` reads."""
    return [{"key": s["key"], "answer": s["answer"], "pope_type": s["meta"].get("pope_type"),
             "held_out": bool(s["meta"].get("held_out"))} for _, s in zip(range(questions), qa_dataset(shards))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, required=True, help="a shapes world directory (raw shards)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--questions", type=int, default=2113, help="the first N questions of the split")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    args = parser.parse_args()
    shards = str(args.raw / args.split / "qa-*.tar")
    records = pope_records(shards, args.questions)
    results = {}
    print("| model | POPE questions | AUC | F1 at margin 0 (yes-rate) | best F1 over thresholds (yes-rate) | "
          "AUC, scenes of seen combos / with a held-out combo | seconds |")
    print("|---|---:|---:|---|---|---|---:|")
    for spec in args.model:
        name, _, model_dir = spec.partition("=")
        started = time.perf_counter()
        ranked = evaluate_pope_ranking(load_policy(model_dir), shards, records)
        seconds = time.perf_counter() - started
        results[name] = {"model_dir": model_dir, **ranked, "seconds": seconds}
        scores = ranked["all"]
        print(f"| {name} | {scores['total']} | {scores['auc']:.3f} | {100 * scores['f1_at_zero']:.1f} "
              f"({100 * scores['yes_rate_at_zero']:.1f} %) | {100 * scores['best_f1']:.1f} "
              f"({100 * scores['best_yes_rate']:.1f} %) | "
              + " / ".join(f"{ranked[k]['auc']:.3f}" for k in ("seen", "held_out") if k in ranked)
              + f" | {seconds:.0f} |", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"raw": str(args.raw), "split": args.split, "questions": args.questions,
                                        "results": results}, indent=2))


if __name__ == "__main__":
    main()
