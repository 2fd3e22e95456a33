"""Fused AdamW with gradient clipping under Lightning's mixed precision (the first GPU run's failure, issue 21).

Lightning's mixed-precision plugin raised "does not allow for gradient clipping ... fused optimizer" for the fused
AdamW the native arm builds on CUDA, under bf16-mixed where nothing is scaled. CPU has a fused AdamW too, so the
path is checked here by forcing ``use_fused_adamw``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from chameleon_lite.training.optimizers import clip_fused_directly, use_fused_adamw
from tests.test_cuda import SMALL, fit_native, packed_batches, vocab  # noqa: F401  (vocab is a fixture)


def _module(scaler=None):
    return SimpleNamespace(_trainer=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler)),
                           trainer=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler)))


def test_fused_clipping_clips_by_norm_and_by_value():
    weight = torch.nn.Parameter(torch.zeros(10))
    optimizer = torch.optim.AdamW([weight], fused=True)
    weight.grad = torch.full((10,), 3.0)  # norm 9.49
    assert clip_fused_directly(_module(), optimizer, 1.0, "norm")
    assert weight.grad.norm().item() == pytest.approx(1.0, rel=1e-4)
    weight.grad = torch.full((10,), 3.0)
    assert clip_fused_directly(_module(), optimizer, 0.5, "value")
    assert weight.grad.max().item() == pytest.approx(0.5)


def test_unfused_or_scaled_gradients_are_left_to_lightning():
    weight = torch.nn.Parameter(torch.zeros(3))
    weight.grad = torch.full((3,), 3.0)
    assert not clip_fused_directly(_module(), torch.optim.AdamW([weight], foreach=False), 1.0, "norm")
    assert not clip_fused_directly(_module(scaler=object()), torch.optim.AdamW([weight], fused=True), 1.0, "norm")
    assert weight.grad.tolist() == [3.0, 3.0, 3.0]  # untouched
    assert not use_fused_adamw(_module(scaler=object()), [weight])  # fp16 scaler: never fused
    assert not use_fused_adamw(_module(), [weight])  # CPU parameters: not fused by default


def test_native_module_trains_bf16_mixed_with_fused_adamw_and_clipping(monkeypatch, vocab, tmp_path):  # noqa: F811
    """The trainer's gradient_clip_val=1.0 with a fused AdamW under bf16-mixed: Lightning alone raises here."""
    monkeypatch.setattr("chameleon_lite.training.lit_native.use_fused_adamw", lambda module, params: True)
    small = SMALL.__class__(**{**SMALL.__dict__, "d_model": 64, "n_layers": 2})
    losses = fit_native(vocab, packed_batches(vocab, 2, batch_size=2, seq_len=64, alphabet=16, text_len=(8, 16)), 3,
                        accelerator="cpu", precision="bf16-mixed", tmp_path=tmp_path, model=small)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
