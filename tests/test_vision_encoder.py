"""ViT encoder of the baseline: shapes, feature-layer semantics, positions, validation, deterministic init."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from chameleon_lite.baseline.vision_encoder import VisionEncoder, ViTConfig, sincos_2d_position_embedding

TINY = ViTConfig(image_size=16, patch_size=4, d_model=32, n_layers=3, n_heads=4, mlp_ratio=2.0)


def make_encoder(seed: int = 0, **overrides) -> VisionEncoder:
    torch.manual_seed(seed)
    encoder = VisionEncoder(replace(TINY, **overrides))
    with torch.no_grad():  # non-trivial norms and biases so every term of the math matters
        for name, p in encoder.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return encoder.eval()


def random_images(batch: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(
    "pos_embed, use_cls, feature_layer", list(itertools.product(["learned", "sincos"], [False, True], [-1, -2, 0]))
)
def test_output_shapes(pos_embed, use_cls, feature_layer):
    encoder = make_encoder(pos_embed=pos_embed, use_cls=use_cls, feature_layer=feature_layer)
    images = random_images(batch=3)
    assert encoder.num_patches == 16
    assert encoder(images).shape == (3, 16, 32)
    assert encoder.pooled(images).shape == (3, 32)
    states = encoder.hidden_states(images)
    assert len(states) == 3 and all(s.shape == (3, 16 + int(use_cls), 32) for s in states)


def test_default_config_shapes():
    encoder = VisionEncoder(ViTConfig()).eval()
    assert encoder.num_patches == 64
    assert encoder(torch.zeros(1, 3, 64, 64)).shape == (1, 64, 192)


@pytest.mark.parametrize("use_cls", [False, True])
@pytest.mark.parametrize("feature_layer", [-2, -1, 0, 1, -3])
def test_feature_layer_is_that_blocks_output(use_cls, feature_layer):
    encoder = make_encoder(use_cls=use_cls, feature_layer=feature_layer)
    images = random_images()
    captured = []
    hooks = [block.register_forward_hook(lambda mod, inp, out: captured.append(out)) for block in encoder.blocks]
    encoder.pooled(images)  # runs every block once
    for h in hooks:
        h.remove()
    assert len(captured) == 3
    # manual run of the blocks from the embeddings
    x = encoder.embed(images)
    manual = []
    for block in encoder.blocks:
        x = block(x)
        manual.append(x)
    prefix = int(use_cls)
    expected = captured[feature_layer][:, prefix:]
    torch.testing.assert_close(encoder(images), expected, rtol=0, atol=0)
    torch.testing.assert_close(encoder(images), manual[feature_layer][:, prefix:], rtol=0, atol=0)
    # the features are not the neighbouring blocks' outputs
    other = (feature_layer + 1) % 3
    assert not torch.allclose(encoder(images), captured[other][:, prefix:])


def test_second_to_last_does_not_depend_on_or_run_later_blocks():
    encoder = make_encoder(feature_layer=-2)
    images = random_images()
    before_features, before_pooled = encoder(images), encoder.pooled(images)
    calls = []
    encoder.blocks[-1].register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        for p in encoder.blocks[-1].parameters():
            p.add_(torch.randn_like(p))
        encoder.norm.weight.mul_(3.0)
    after = encoder(images)
    assert calls == []  # the last block never ran for forward()
    torch.testing.assert_close(after, before_features, rtol=0, atol=0)
    assert not torch.allclose(encoder.pooled(images), before_pooled)  # pooled does use the last block


def test_pooled_is_final_norm_then_cls_or_mean():
    for use_cls in (False, True):
        encoder = make_encoder(use_cls=use_cls)
        images = random_images()
        last = encoder.norm(encoder.hidden_states(images)[-1])  # (B, prefix + N, d)
        expected = last[:, 0] if use_cls else last.mean(dim=1)
        torch.testing.assert_close(encoder.pooled(images), expected)


def test_patches_are_row_major():
    encoder = make_encoder(pos_embed="sincos")
    images = torch.zeros(1, 3, 16, 16)
    base = encoder.embed(images)
    images[0, :, 4:8, 8:12] = 1.0  # patch at row 1, column 2 of the 4 x 4 grid
    changed = (encoder.embed(images) - base).abs().sum(-1)[0]  # (N,)
    assert changed.nonzero().flatten().tolist() == [1 * 4 + 2]


def test_sincos_positions_are_fixed_buffers():
    sincos = make_encoder(pos_embed="sincos", use_cls=True)
    assert "pos_embed" not in dict(sincos.named_parameters())
    assert "pos_embed" not in sincos.state_dict()  # recomputed from the config, never saved
    table = sincos_2d_position_embedding(4, 32)  # (16, 32)
    torch.testing.assert_close(sincos.pos_embed[0, 1:], table)
    assert sincos.pos_embed[0, 0].abs().sum() == 0  # CLS position is the zero vector
    # position (r, c): first half encodes the row only, second half the column only; (0, 0) = [0.. 1.. 0.. 1..]
    assert torch.equal(table[0], torch.tensor([0.0] * 8 + [1.0] * 8 + [0.0] * 8 + [1.0] * 8))
    assert torch.equal(table[1 * 4 + 0, :16], table[1 * 4 + 3, :16])
    assert torch.equal(table[0 * 4 + 2, 16:], table[3 * 4 + 2, 16:])
    assert not torch.equal(table[1], table[4])  # (0, 1) differs from (1, 0)
    learned = make_encoder(pos_embed="learned", use_cls=True)
    assert dict(learned.named_parameters())["pos_embed"].shape == (1, 17, 32)


def test_bad_images_raise():
    encoder = make_encoder()
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        encoder(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        encoder(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="float"):
        encoder.pooled(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"feature_layer": -4}, "feature_layer"),
        ({"feature_layer": 3}, "feature_layer"),
        ({"n_layers": 1}, "feature_layer"),  # default -2 needs >= 2 blocks
        ({"patch_size": 5}, "patch_size"),
        ({"n_heads": 5}, "n_heads"),
        ({"pos_embed": "rope"}, "pos_embed"),
        ({"pos_embed": "sincos", "d_model": 30, "n_heads": 3}, "d_model"),
        ({"d_model": 0}, "d_model"),
        ({"dropout": 1.0}, "dropout"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_bad_configs_raise(overrides, field):
    with pytest.raises(ValueError, match=field):
        replace(TINY, **overrides)


def test_init_is_deterministic_and_reset_parameters_reproduces_it():
    torch.manual_seed(5)
    a = VisionEncoder(TINY)
    torch.manual_seed(5)
    b = VisionEncoder(TINY)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    a.reset_parameters(torch.Generator().manual_seed(1))
    b.reset_parameters(torch.Generator().manual_seed(1))
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    w = a.blocks[0].attn.q_proj.weight
    assert w.abs().max() <= 0.04 + 1e-6 and 0.01 < w.std() < 0.02  # truncated at 2 std
    assert torch.all(a.blocks[0].attn.q_proj.bias == 0) and torch.all(a.norm.weight == 1)


def test_dropout_only_in_training():
    encoder = make_encoder(dropout=0.5)
    images = random_images()
    torch.testing.assert_close(encoder(images), encoder(images))  # eval: deterministic
    encoder.train()
    assert not torch.allclose(encoder(images), encoder(images))
