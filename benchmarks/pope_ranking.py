"""How well a model RANKS present above absent objects on POPE questions, apart from where it puts its threshold.

For each POPE question ("Is there a <colour> <shape>?") the model scores both answers after the question, as
stage 3 does (``lit_preference.response_rows``: the answer's tokens and ``<eos>``), and the margin is
``log p("yes") - log p("no")``. From the margins of the present (answer "yes") and absent ("no") objects:

- **AUC**: the chance that a present object's margin beats an absent one's (0.5: no ranking; 1.0: perfect).
  Preference tuning that only moves the yes/no threshold leaves it where it was.
- **F1 at margin 0**: answering "yes" where ``p(yes) > p(no)`` (close to, not always, the greedy answer, which
  compares every token of the vocabulary).
- **best F1 over thresholds**: the F1 of the best single threshold on the margin, chosen on the questions scored.
  On test this is an oracle, a bound on what any recalibration of this ranking could give, not a result.

    python benchmarks/pope_ranking.py --raw runs/demo/data --split test --questions 2113 \\
        --model before=runs/demo/seed0/native/model --model after=runs/stage3/seed0/native-dpo/model

Prints a markdown table and writes ``--out`` (JSON) when given. Both arms' model directories work.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from chameleon_lite.data.readers import qa_dataset
from chameleon_lite.training.lit_preference import load_policy, response_rows, sequence_logps
from chameleon_lite.world.preference_pairs import PreferencePair


def pope_questions(raw: Path, split: str, questions: int) -> list[dict]:
    """The POPE questions among the first ``questions`` questions of ``raw/split`` (the order ``compare`` reads)."""
    out = []
    for i, sample in enumerate(qa_dataset(str(raw / split / "qa-*.tar"))):
        if i >= questions:
            break
        pope_type = sample["meta"].get("pope_type")
        if pope_type is not None:
            out.append({**sample, "pope_type": pope_type, "held_out": bool(sample["meta"].get("held_out"))})
    return out


@torch.no_grad()
def margins(model_dir: str, samples: list[dict], batch_size: int = 64) -> torch.Tensor:
    """``log p("yes") - log p("no")`` per sample ``(N,)``, each answer scored after its question."""
    model = load_policy(model_dir).eval()
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        pairs = [PreferencePair(s["image"], s["question"], "yes", "no", "yes_no", s["category"], "pope", s["key"])
                 for s in chunk]
        yes = sequence_logps(model, response_rows(model, pairs, "chosen"))  # (B,)
        no = sequence_logps(model, response_rows(model, pairs, "rejected"))  # (B,)
        out.append((yes - no).float().cpu())
    return torch.cat(out)


def f1_at(margin: torch.Tensor, present: torch.Tensor, threshold: float) -> tuple[float, float]:
    """(F1, yes-rate) answering "yes" where ``margin > threshold``."""
    said_yes = margin > threshold
    tp = int((said_yes & present).sum())
    fp = int((said_yes & ~present).sum())
    fn = int((~said_yes & present).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return f1, float(said_yes.float().mean())


def ranking_scores(margin: torch.Tensor, present: torch.Tensor) -> dict:
    """AUC (Mann-Whitney, ties count a half), F1 and yes-rate at margin 0, and the best threshold's F1."""
    pos, neg = margin[present], margin[~present]
    if not len(pos) or not len(neg):
        raise ValueError("POPE scoring needs present and absent objects among the questions")
    diff = pos[:, None] - neg[None, :]  # (P, N)
    auc = float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())
    f1_zero, yes_zero = f1_at(margin, present, 0.0)
    # every distinct margin (and one below them all: everything "yes") is a candidate threshold
    candidates = torch.cat([margin.min()[None] - 1, margin.unique()])
    best = max((f1_at(margin, present, float(t)) + (float(t),) for t in candidates), key=lambda x: x[0])
    return {"n": len(margin), "present": len(pos), "auc": auc, "f1_at_zero": f1_zero, "yes_rate_at_zero": yes_zero,
            "best_f1": best[0], "best_yes_rate": best[1], "best_threshold": best[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, required=True, help="a shapes world directory (raw shards)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--questions", type=int, default=2113, help="the first N questions of the split")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    samples = pope_questions(args.raw, args.split, args.questions)
    present = torch.tensor([s["answer"].strip().lower() == "yes" for s in samples])
    held = torch.tensor([s["held_out"] for s in samples])
    results = {}
    print("| model | POPE questions | AUC | F1 at margin 0 (yes-rate) | best F1 over thresholds (yes-rate) | "
          "AUC, scenes of seen combos / with a held-out combo | seconds |")
    print("|---|---:|---:|---|---|---|---:|")
    for spec in args.model:
        name, _, model_dir = spec.partition("=")
        started = time.perf_counter()
        margin = margins(model_dir, samples)
        scores = ranking_scores(margin, present)
        by_scene = {k: ranking_scores(margin[mask], present[mask]) for k, mask in (("seen", ~held), ("held_out", held))
                    if mask.any()}
        seconds = time.perf_counter() - started
        results[name] = {"model_dir": model_dir, **scores, "by_scene": by_scene, "seconds": seconds}
        print(f"| {name} | {scores['n']} | {scores['auc']:.3f} | {100 * scores['f1_at_zero']:.1f} "
              f"({100 * scores['yes_rate_at_zero']:.1f} %) | {100 * scores['best_f1']:.1f} "
              f"({100 * scores['best_yes_rate']:.1f} %) | "
              + " / ".join(f"{by_scene[k]['auc']:.3f}" for k in ("seen", "held_out") if k in by_scene)
              + f" | {seconds:.0f} |", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"raw": str(args.raw), "split": args.split, "questions": args.questions,
                                        "results": results}, indent=2))


if __name__ == "__main__":
    main()
