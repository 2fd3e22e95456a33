"""Projectors of the baseline: shapes and token counts per kind, MLP math, resampler permutation invariance,
validation, deterministic init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chameleon_lite.baseline.projectors import (
    LinearProjector,
    MLPProjector,
    ProjectorConfig,
    ResamplerProjector,
    build_projector,
)
from chameleon_lite.baseline.vision_encoder import VisionEncoder, ViTConfig


def features(batch: int = 2, n: int = 16, d: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, n, d, generator=torch.Generator().manual_seed(seed))


def build(kind: str, d_in: int = 24, d_out: int = 32, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = ProjectorConfig(kind=kind, **{"n_queries": 5, "n_layers": 2, "n_heads": 4, **overrides})
    projector = build_projector(config, d_in, d_out).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in projector.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return projector


@pytest.mark.parametrize(
    "kind, cls, n_out",
    [("linear", LinearProjector, 16), ("mlp", MLPProjector, 16), ("resampler", ResamplerProjector, 5)],
)
def test_shapes_and_token_counts(kind, cls, n_out):
    projector = build(kind)
    assert isinstance(projector, cls)
    out = projector(features())
    assert out.shape == (2, n_out, 32)
    assert projector.num_output_tokens(16) == n_out
    assert projector(features(batch=3, n=7)).shape == (3, projector.num_output_tokens(7), 32)


@pytest.mark.parametrize("kind", ["linear", "mlp", "resampler"])
@pytest.mark.parametrize("pos_embed, use_cls, feature_layer", [("learned", False, -2), ("sincos", True, -1)])
def test_encoder_to_projector(kind, pos_embed, use_cls, feature_layer):
    torch.manual_seed(0)
    encoder = VisionEncoder(ViTConfig(image_size=16, patch_size=4, d_model=24, n_layers=2, n_heads=4,
                                      pos_embed=pos_embed, use_cls=use_cls, feature_layer=feature_layer)).eval()
    projector = build(kind)
    out = projector(encoder(torch.zeros(2, 3, 16, 16)))
    assert out.shape == (2, projector.num_output_tokens(encoder.num_patches), 32)


def test_mlp_is_linear_gelu_linear_with_hidden_mult():
    projector = build("mlp", hidden_mult=2.0)
    assert projector.fc1.out_features == 64 and projector.fc2.in_features == 64
    x = features()
    expected = F.linear(F.gelu(F.linear(x, projector.fc1.weight, projector.fc1.bias)), projector.fc2.weight,
                        projector.fc2.bias)
    torch.testing.assert_close(projector(x), expected)
    assert build("mlp").fc1.out_features == 32  # hidden_mult=1.0 -> d_out (LLaVA-1.5)


def test_linear_projector_acts_per_token():
    projector = build("linear")
    x = features()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(projector(x[:, perm]), projector(x)[:, perm])


def test_resampler_is_invariant_to_patch_order_but_not_to_content():
    projector = build("resampler")
    x = features(n=16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(projector(x[:, perm]), projector(x), rtol=1e-5, atol=1e-5)
    changed = x.clone()
    changed[:, 3] += 1.0
    assert not torch.allclose(projector(changed), projector(x), atol=1e-4)
    # each output row depends only on its own image
    out = projector(x)
    torch.testing.assert_close(projector(x[:1]), out[:1], rtol=1e-5, atol=1e-5)
    # the queries are distinct, so the output tokens are too
    assert not torch.allclose(out[:, 0], out[:, 1], atol=1e-3)


def test_resampler_output_is_layer_normed():
    projector = build("resampler")
    with torch.no_grad():
        projector.norm.weight.fill_(1.0)
        projector.norm.bias.zero_()
    out = projector(features())
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "mlp", "resampler"])
def test_bad_features_raise(kind):
    projector = build(kind)
    with pytest.raises(ValueError, match=r"\(B, N, 24\)"):
        projector(features(d=12))
    with pytest.raises(ValueError, match=r"\(B, N, 24\)"):
        projector(torch.zeros(16, 24))
    with pytest.raises(ValueError, match="n_in"):
        projector.num_output_tokens(0)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"kind": "qformer"}, "kind"),
        ({"n_queries": 0}, "n_queries"),
        ({"n_layers": -1}, "n_layers"),
        ({"n_heads": 0}, "n_heads"),
        ({"hidden_mult": 0.0}, "hidden_mult"),
    ],
)
def test_bad_configs_raise(overrides, field):
    with pytest.raises(ValueError, match=field):
        ProjectorConfig(**overrides)


def test_bad_build_arguments_raise():
    with pytest.raises(ValueError, match="n_heads"):
        build_projector(ProjectorConfig(kind="resampler", n_heads=5), 24, 32)
    with pytest.raises(ValueError, match="d_out"):
        build_projector(ProjectorConfig(kind="linear"), 24, 0)


@pytest.mark.parametrize("kind", ["linear", "mlp", "resampler"])
def test_init_is_deterministic(kind):
    a, b = build_projector(ProjectorConfig(kind=kind), 8, 16), build_projector(ProjectorConfig(kind=kind), 8, 16)
    a.reset_parameters(torch.Generator().manual_seed(3))
    b.reset_parameters(torch.Generator().manual_seed(3))
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    b.reset_parameters(torch.Generator().manual_seed(4))
    assert not all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


def test_linear_and_mlp_use_torch_default_init_and_resampler_trunc_normal():
    for kind in ("linear", "mlp"):
        projector = build_projector(ProjectorConfig(kind=kind), 48, 32)
        projector.reset_parameters(torch.Generator().manual_seed(0))
        first = next(m for m in projector.modules() if isinstance(m, torch.nn.Linear))
        bound = 1 / 48**0.5
        assert first.weight.abs().max() <= bound and first.weight.abs().max() > 0.9 * bound
        assert first.bias.abs().max() > 0  # biases drawn too, as nn.Linear
    resampler = build_projector(ProjectorConfig(kind="resampler"), 48, 32)
    assert resampler.input_proj.weight.abs().max() <= 0.04 + 1e-6 and torch.all(resampler.input_proj.bias == 0)
