"""AdamW on CUDA, fused, with gradient clipping that works under Lightning's mixed precision.

Lightning's mixed-precision plugin refuses to clip gradients for an optimizer that unscales inside its step (fused
AdamW), even under bf16-mixed where nothing is scaled (found on the first GPU run, issue 21). Both arms' modules
build their optimizer with :func:`use_fused_adamw` and clip through :func:`clip_fused_directly`.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import torch

__all__ = ["use_fused_adamw", "clip_fused_directly"]


def use_fused_adamw(module: L.LightningModule, params: Iterable[torch.nn.Parameter]) -> bool:
    """Fused AdamW (one kernel per step) when every parameter is on CUDA and no fp16 gradient scaler is in use
    (a fused optimizer unscales inside its step, so gradients could not be clipped after unscaling)."""
    trainer = module._trainer
    if trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None:
        return False
    return all(p.device.type == "cuda" for p in params)


def clip_fused_directly(module: L.LightningModule, optimizer: torch.optim.Optimizer, clip_val: float,
                        algorithm: str | None) -> bool:
    """Clip the gradients of a fused optimizer ourselves, where no gradient scaler is in use (bf16-mixed, fp32).

    Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales in its step (fused AdamW),
    even under bf16-mixed, where nothing is scaled. Returns whether it clipped (False: leave it to Lightning).
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    if getattr(module.trainer.precision_plugin, "scaler", None) is not None:
        return False  # fp16: gradients are still scaled here; configure_optimizers does not fuse then
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm in (None, "norm"):
        torch.nn.utils.clip_grad_norm_(params, clip_val)
    else:
        torch.nn.utils.clip_grad_value_(params, clip_val)
    return True
