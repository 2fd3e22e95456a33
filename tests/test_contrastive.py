"""Contrastive pretraining: text encoder padding invariance, SigLIP/CLIP losses against naive forms, retrieval
recall on hand-made cases, and memorisation of a few pairs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chameleon_lite.baseline.contrastive import (
    ContrastiveConfig,
    ContrastiveModel,
    TextEncoder,
    TextEncoderConfig,
    clip_loss,
    retrieval_recall_at_k,
    siglip_loss,
)
from chameleon_lite.baseline.vision_encoder import VisionEncoder, ViTConfig

PAD = 3
TEXT = TextEncoderConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, max_len=16, pad_id=PAD)
VIT = ViTConfig(image_size=16, patch_size=4, d_model=32, n_layers=2, n_heads=4, mlp_ratio=2.0, feature_layer=-1)


def make_text_encoder(seed: int = 0, **overrides) -> TextEncoder:
    torch.manual_seed(seed)
    encoder = TextEncoder(TextEncoderConfig(**{**TEXT.__dict__, **overrides}))
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return encoder.eval()


def random_unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ------------------------------------------------------------------------------------------------ text encoder
@pytest.mark.parametrize("pool", ["eos", "mean"])
def test_padding_does_not_change_text_output(pool):
    encoder = make_text_encoder(pool=pool)
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, PAD, PAD]])
    lengths = torch.tensor([5, 3])
    out = encoder(ids, lengths)
    assert out.shape == (2, 32)
    padded = torch.cat([ids, torch.full((2, 6), PAD)], dim=1)  # (2, 11)
    torch.testing.assert_close(encoder(padded, lengths), out, rtol=1e-5, atol=1e-6)
    junk = padded.clone()
    junk[1, 3:] = 20  # tokens beyond the length are ignored whatever they hold
    torch.testing.assert_close(encoder(junk, lengths), out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encoder(padded), out, rtol=1e-5, atol=1e-6)  # lengths derived from pad_id
    # a real token does matter (the check above is not vacuous)
    changed = ids.clone()
    changed[1, 0] = 30
    assert not torch.allclose(encoder(changed, lengths)[1], out[1], atol=1e-4)


def test_eos_pool_is_last_real_token_and_mean_pool_is_masked_mean():
    eos = make_text_encoder(pool="eos")
    mean = make_text_encoder(pool="mean")  # same seed -> same weights
    ids = torch.tensor([[5, 6, 7, PAD], [8, 9, 10, 11]])
    lengths = torch.tensor([3, 4])
    captured = {}
    eos.norm.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    out = eos(ids, lengths)
    h = captured["h"]  # (B, L, d)
    torch.testing.assert_close(out, torch.stack([h[0, 2], h[1, 3]]))
    torch.testing.assert_close(mean(ids, lengths), torch.stack([h[0, :3].mean(0), h[1].mean(0)]))


def test_text_encoder_bad_inputs_raise():
    encoder = make_text_encoder()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="length"):
        encoder(ids, torch.tensor([0]))
    with pytest.raises(ValueError, match="length"):
        encoder(ids, torch.tensor([4]))
    with pytest.raises(ValueError, match="max_len"):
        encoder(torch.full((1, 17), 5), torch.tensor([17]))
    with pytest.raises(ValueError, match="ids"):
        encoder(ids.float(), torch.tensor([3]))


# ------------------------------------------------------------------------------------------------ losses
def test_siglip_loss_matches_naive_double_loop():
    B = 4
    img, txt = random_unit(B, 8, seed=0), random_unit(B, 8, seed=1)
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-3.0)
    naive = 0.0
    for i in range(B):
        for j in range(B):
            label = 1.0 if i == j else -1.0
            logit = 10.0 * float(img[i] @ txt[j]) - 3.0
            naive += -math.log(1.0 / (1.0 + math.exp(-label * logit)))
    naive /= B
    assert siglip_loss(img, txt, scale, bias).item() == pytest.approx(naive, rel=1e-5)


def test_siglip_loss_decreases_when_pairs_match_better():
    img, txt = random_unit(6, 64, seed=2), random_unit(6, 64, seed=3)
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    losses = [siglip_loss(img, F.normalize(txt + alpha * img, dim=-1), scale, bias).item() for alpha in (0, 1, 3, 100)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0]


def test_clip_loss_matches_symmetric_cross_entropy():
    B = 5
    img, txt = random_unit(B, 8, seed=4), random_unit(B, 8, seed=5)
    scale = torch.tensor(math.log(14.0))
    logits = 14.0 * img @ txt.T
    naive_i2t = -sum(F.log_softmax(logits[i], dim=0)[i] for i in range(B)) / B
    naive_t2i = -sum(F.log_softmax(logits[:, j], dim=0)[j] for j in range(B)) / B
    torch.testing.assert_close(clip_loss(img, txt, scale), (naive_i2t + naive_t2i) / 2)
    ce = F.cross_entropy(logits, torch.arange(B)), F.cross_entropy(logits.T, torch.arange(B))
    torch.testing.assert_close(clip_loss(img, txt, scale), (ce[0] + ce[1]) / 2)
    assert clip_loss(img, img, scale) < clip_loss(img, txt, scale)


def test_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="B, E"):
        clip_loss(torch.zeros(3, 4), torch.zeros(2, 4), torch.tensor(0.0))
    with pytest.raises(ValueError, match="B, E"):
        siglip_loss(torch.zeros(3, 4), torch.zeros(3, 5), torch.tensor(0.0), torch.tensor(0.0))


# ------------------------------------------------------------------------------------------------ retrieval
def _angles(degrees: list[float]) -> torch.Tensor:
    r = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([r.cos(), r.sin()], dim=1)  # (B, 2) unit vectors


# images at 0/90/180/270 degrees; texts 0 and 1 sit next to their images, texts 2 and 3 next to each other's
IMAGES = _angles([0, 90, 180, 270])
TEXTS = _angles([0, 100, 255, 170])


def test_recall_is_one_for_identical_embeddings():
    emb = random_unit(7, 16, seed=6)
    for direction in ("image_to_text", "text_to_image"):
        assert retrieval_recall_at_k(emb, emb, k=1, direction=direction) == 1.0
        assert retrieval_recall_at_k(emb, emb.flip(0), k=7, direction=direction) == 1.0  # k = B always hits


def test_recall_on_a_hand_made_permutation():
    eye = torch.eye(4)
    assert retrieval_recall_at_k(eye, eye[[0, 2, 1, 3]]) == 0.5  # pairs 1 and 2 swapped
    assert retrieval_recall_at_k(eye, eye[[1, 2, 3, 0]]) == 0.0
    assert retrieval_recall_at_k(IMAGES, TEXTS, k=1) == 0.5
    assert retrieval_recall_at_k(IMAGES, TEXTS, k=2) == 0.75  # image 2 finds text 2 second; image 3 misses text 3
    assert retrieval_recall_at_k(IMAGES, TEXTS, k=1, direction="text_to_image") == 0.5
    assert retrieval_recall_at_k(IMAGES, TEXTS, k=2, direction="text_to_image") == 0.75
    assert retrieval_recall_at_k(IMAGES * 5, TEXTS * 0.1, k=1) == 0.5  # cosine: scale does not matter
    # an asymmetric case: image 2 finds text 1 (a miss), but text 2 finds image 2 (a hit)
    img, txt = _angles([0, 180, 190]), _angles([0, 184, 270])
    assert retrieval_recall_at_k(img, txt) == pytest.approx(2 / 3)
    assert retrieval_recall_at_k(img, txt, direction="text_to_image") == 1.0


def test_recall_groups_make_identical_captions_interchangeable():
    groups = torch.tensor([0, 1, 2, 2])  # pairs 2 and 3 share a caption
    for direction in ("image_to_text", "text_to_image"):
        assert retrieval_recall_at_k(IMAGES, TEXTS, k=1, text_groups=groups, direction=direction) == 1.0
    # identical caption embeddings: without groups one of the two images must miss; with groups both hit
    img = _angles([0, 10, 90, 180])
    txt = _angles([5, 5, 90, 180])
    assert retrieval_recall_at_k(img, txt) == 0.75
    assert retrieval_recall_at_k(img, txt, text_groups=torch.tensor([7, 7, 8, 9])) == 1.0
    # a group that does not match the retrieved text does not help
    assert retrieval_recall_at_k(IMAGES, TEXTS, text_groups=torch.tensor([0, 1, 2, 3])) == 0.5


def test_recall_bad_arguments_raise():
    with pytest.raises(ValueError, match="k="):
        retrieval_recall_at_k(IMAGES, TEXTS, k=5)
    with pytest.raises(ValueError, match="text_groups"):
        retrieval_recall_at_k(IMAGES, TEXTS, text_groups=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="direction"):
        retrieval_recall_at_k(IMAGES, TEXTS, direction="both")


# ------------------------------------------------------------------------------------------------ the model
def make_model(loss: str, seed: int = 0) -> ContrastiveModel:
    torch.manual_seed(seed)
    return ContrastiveModel(VisionEncoder(VIT), TextEncoder(TEXT), ContrastiveConfig(embed_dim=16, loss=loss))


def test_model_outputs_unit_vectors_and_parameters_follow_the_loss():
    siglip, clip = make_model("siglip"), make_model("clip")
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    ids, lengths = torch.randint(4, 40, (3, 6)), torch.tensor([6, 4, 2])
    img_emb, txt_emb = siglip(images, ids, lengths)
    assert img_emb.shape == txt_emb.shape == (3, 16)
    torch.testing.assert_close(img_emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt_emb.norm(dim=-1), torch.ones(3))
    assert siglip.temperature == pytest.approx(10.0) and siglip.logit_bias.item() == -10.0
    assert clip.logit_bias is None and "logit_bias" not in dict(clip.named_parameters())
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)
    assert clip.temperature == pytest.approx(100.0)  # clamped to max_temperature
    loss = siglip.loss(img_emb, txt_emb)
    loss.backward()
    assert loss.dim() == 0 and all(p.grad is not None for p in siglip.parameters() if p.requires_grad)


@pytest.mark.parametrize("loss_name", ["siglip", "clip"])
def test_model_memorises_eight_pairs(loss_name):
    model = make_model(loss_name).train()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 16, 16, generator=gen) * 2 - 1
    ids = torch.randint(4, 40, (8, 8), generator=gen)
    lengths = torch.randint(3, 9, (8,), generator=gen)
    with torch.no_grad():
        assert retrieval_recall_at_k(*model(images, ids, lengths), k=1) < 0.5  # not memorised at init
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = model.loss(*model(images, ids, lengths))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        img_emb, txt_emb = model(images, ids, lengths)
        final = model.loss(img_emb, txt_emb).item()
    assert final < 0.5 * losses[0]
    assert retrieval_recall_at_k(img_emb, txt_emb, k=1) == 1.0
    assert retrieval_recall_at_k(img_emb, txt_emb, k=1, direction="text_to_image") == 1.0


@pytest.mark.parametrize(
    "factory, field",
    [
        (lambda: TextEncoderConfig(vocab_size=0), "vocab_size"),
        (lambda: TextEncoderConfig(vocab_size=10, pad_id=10), "pad_id"),
        (lambda: TextEncoderConfig(vocab_size=10, pool="cls"), "pool"),
        (lambda: TextEncoderConfig(vocab_size=10, d_model=30), "n_heads"),
        (lambda: TextEncoderConfig(vocab_size=10, max_len=0), "max_len"),
        (lambda: ContrastiveConfig(loss="triplet"), "loss"),
        (lambda: ContrastiveConfig(embed_dim=0), "embed_dim"),
        (lambda: ContrastiveConfig(init_temperature=0.0), "init_temperature"),
        (lambda: ContrastiveConfig(init_temperature=200.0), "max_temperature"),
    ],
)
def test_bad_configs_raise(factory, field):
    with pytest.raises(ValueError, match=field):
        factory()
