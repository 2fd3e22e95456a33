"""Learning-rate schedules shared by the LightningModules (factors for ``torch.optim.lr_scheduler.LambdaLR``)."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup_steps: int, decay_steps: int | None, min_lr_ratio: float) -> Callable[[int], float]:
    """LR factor: linear warm-up, then cosine decay to ``min_lr_ratio`` at ``decay_steps`` (constant if None).

    ``factor(step)`` is the multiplier of the peak learning rate for optimizer step ``step`` (0-based): warm-up
    gives ``(step + 1) / warmup_steps``; after ``decay_steps`` the factor stays at ``min_lr_ratio``.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if not decay_steps or decay_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (decay_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
