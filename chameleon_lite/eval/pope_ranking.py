"""POPE as a ranking: how well a model's yes/no margin separates present from absent objects, apart from where its
threshold sits.

A model's margin on an existence question is ``log p("yes") - log p("no")`` (each answer scored after the question;
``comparison.evaluate.pope_margins`` computes it for either arm). From the margins of the present (answer "yes")
and absent ("no") objects:

- **AUC**: the chance that a present object's margin beats an absent one's (ties count a half; 0.5 is no ranking,
  1.0 a perfect one). Preference tuning that only moves the yes/no threshold leaves it where it was.
- **F1 at margin 0**: answering "yes" where ``p(yes) > p(no)`` (close to the greedy answer, which compares every
  token of the vocabulary, not only these two).
- **Best F1 over thresholds**: the best single threshold on the margin, chosen on the scored questions themselves:
  on a test split an oracle, a bound on what any recalibration of this ranking could give, not a result.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["f1_at", "ranking_scores"]


def f1_at(margin: torch.Tensor, present: torch.Tensor, threshold: float) -> tuple[float, float]:
    """(F1, yes-rate) of answering "yes" where ``margin > threshold``; ``margin`` float ``(N,)``, ``present`` bool
    ``(N,)``."""
    said_yes = margin > threshold  # (N,)
    tp = int((said_yes & present).sum())
    fp = int((said_yes & ~present).sum())
    fn = int((~said_yes & present).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return f1, float(said_yes.float().mean())


def ranking_scores(margin: torch.Tensor, present: torch.Tensor) -> dict[str, Any]:
    """AUC, F1 and yes-rate at margin 0, and the best threshold's F1, yes-rate and threshold, for ``margin`` float
    ``(N,)`` and ``present`` bool ``(N,)``. ``ValueError`` unless both present and absent objects are among them."""
    margin, present = margin.float().flatten(), present.bool().flatten()
    if margin.shape != present.shape:
        raise ValueError(f"margin {tuple(margin.shape)} and present {tuple(present.shape)} differ in length")
    pos, neg = margin[present], margin[~present]  # (P,), (N - P,)
    if not len(pos) or not len(neg):
        raise ValueError("POPE ranking needs present and absent objects among the questions")
    diff = pos[:, None] - neg[None, :]  # (P, N - P)
    auc = float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())
    f1_zero, yes_zero = f1_at(margin, present, 0.0)
    # every distinct margin is a candidate threshold, and one below them all (every answer "yes")
    candidates = torch.cat([margin.min()[None] - 1, margin.unique()])
    best = max((f1_at(margin, present, float(t)) + (float(t),) for t in candidates), key=lambda x: x[0])
    return {"total": len(margin), "present": len(pos), "auc": auc, "f1_at_zero": f1_zero,
            "yes_rate_at_zero": yes_zero, "best_f1": best[0], "best_yes_rate": best[1], "best_threshold": best[2]}
