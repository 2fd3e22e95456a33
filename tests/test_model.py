"""Decoder, attention backends, KV cache and loss; oracle against Hugging Face Chameleon (CPU, tiny configs)."""

from __future__ import annotations

import logging
import math
import sys
import types
from dataclasses import asdict, replace

import pytest
import torch

from chameleon_lite.model.attention import (
    KVCache,
    build_attention_mask,
    document_lengths,
    positions_from_document_ids,
    resolve_backend,
    xformers_available,
)
from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import Decoder, next_token_loss

TINY = DecoderConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64, max_seq_len=64,
                     attention_backend="sdpa")


def make_decoder(seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(replace(TINY, **overrides))
    with torch.no_grad():  # make norms non-trivial so their math is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("norm.bias"):
                p.normal_(0.0, 0.1)
    return model.eval()


def random_ids(*shape: int, seed: int = 1, high: int = TINY.vocab_size) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ HF oracle
IMAGE_IDS = (96, 97, 98, 99)  # named IMGIMG* in HF's vocabulary_map: HF sets their logits to the dtype min


def _hf_model(config: DecoderConfig, seed: int):
    pytest.importorskip("transformers")
    from transformers import ChameleonForConditionalGeneration

    from chameleon_lite.model.hf_port import hf_chameleon_config

    vocabulary_map = {"<image>": 95, **{f"IMGIMG{chr(ord('A') + i)}Z": t for i, t in enumerate(IMAGE_IDS)}}
    hf_config = hf_chameleon_config(config, vocabulary_map=vocabulary_map, attn_implementation="eager")
    torch.manual_seed(seed)
    hf = ChameleonForConditionalGeneration(hf_config).eval()
    with torch.no_grad():  # randomise everything, norms included, so every term of the math matters
        for name, p in hf.named_parameters():
            if "vqmodel" in name:
                continue
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("norm.bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    return hf


@pytest.mark.parametrize(
    "swin_norm, n_kv_heads, tie", [(False, 4, False), (True, 4, False), (False, 2, False), (True, 2, True)]
)
def test_logits_match_hf_chameleon(swin_norm: bool, n_kv_heads: int, tie: bool) -> None:
    from chameleon_lite.model.hf_port import export_hf_chameleon_state, load_hf_chameleon_state

    config = replace(TINY, swin_norm=swin_norm, n_kv_heads=n_kv_heads, tie_embeddings=tie, qk_norm=True)
    hf = _hf_model(config, seed=3)
    ours = Decoder(config).eval()
    load_hf_chameleon_state(ours, hf)

    ids = random_ids(2, 13)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits  # (B, T, V)
        mine = ours(ids)  # (B, T, V_padded)
    keep = [i for i in range(config.vocab_size) if i not in IMAGE_IDS]
    assert mine.shape == (2, 13, config.padded_vocab_size)
    assert theirs[..., list(IMAGE_IDS)].eq(torch.finfo(theirs.dtype).min).all()  # HF's text-only masking
    assert theirs[..., keep].std() > 0.3  # logits are far from trivial
    torch.testing.assert_close(mine[..., keep], theirs[..., keep], atol=1e-4, rtol=0)

    # negative control: the other block ordering gives clearly different logits
    other = Decoder(replace(config, swin_norm=not swin_norm)).eval()
    load_hf_chameleon_state(other, hf)
    with torch.no_grad():
        assert (other(ids)[..., keep] - theirs[..., keep]).abs().max() > 1e-2

    # reverse direction: export ours into a fresh HF model -> same logits
    fresh = _hf_model(config, seed=4)
    missing, unexpected = fresh.load_state_dict(export_hf_chameleon_state(ours), strict=False)
    assert not unexpected and all("vqmodel" in k for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits[..., keep], theirs[..., keep], atol=1e-5, rtol=0)


def test_hf_config_round_trip_and_limits() -> None:
    pytest.importorskip("transformers")
    from chameleon_lite.model.hf_port import decoder_config_from_hf, hf_chameleon_config

    config = replace(TINY, swin_norm=True, rope_theta=5000.0, norm_eps=1e-6)
    back = decoder_config_from_hf(hf_chameleon_config(config), attention_backend="sdpa",
                                  z_loss_weight=TINY.z_loss_weight)
    assert back == config
    with pytest.raises(ValueError, match="QK-norm"):
        hf_chameleon_config(replace(TINY, qk_norm=False))


# ------------------------------------------------------------------------------------------------ packing
def test_packed_documents_equal_separate_runs() -> None:
    model = make_decoder()
    lengths = [[5, 7, 4], [16]]  # two rows of 16 tokens: three documents, then one
    ids = random_ids(2, 16)
    document_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [3] * 16])
    positions = positions_from_document_ids(document_ids)
    assert positions[0].tolist() == list(range(5)) + list(range(7)) + list(range(4))
    with torch.no_grad():
        packed = model(ids, position_ids=positions, document_ids=document_ids)  # (2, 16, V)
        for row, row_lengths in enumerate(lengths):
            start = 0
            for n in row_lengths:
                alone = model(ids[row : row + 1, start : start + n])  # (1, n, V)
                torch.testing.assert_close(packed[row, start : start + n], alone[0], atol=1e-5, rtol=0)
                start += n
        # without the document mask the later documents see the earlier ones: results differ
        leaky = model(ids, position_ids=positions)
        assert (leaky[0, 5:] - packed[0, 5:]).abs().max() > 1e-3
        # a single document given explicitly equals the plain causal (is_causal) path
        torch.testing.assert_close(model(ids, document_ids=torch.zeros_like(ids)), model(ids), atol=1e-5, rtol=0)


def test_document_helpers() -> None:
    doc = torch.tensor([[7, 7, 7, 2, 2], [2, 2, 5, 5, 5]])
    assert positions_from_document_ids(doc).tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert document_lengths(doc) == [3, 2, 2, 3]
    assert document_lengths(torch.tensor([[1, 1], [1, 1]])) == [2, 2]  # rows never merge
    mask = build_attention_mask("sdpa", batch_size=1, q_len=5, device=torch.device("cpu"), document_ids=doc[:1])
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert mask.sdpa_mask[0, 0].equal(expected.bool())


# ------------------------------------------------------------------------------------------------ KV cache
def test_kv_cache_incremental_equals_full_forward() -> None:
    model = make_decoder(swin_norm=True)
    ids = random_ids(2, 15)
    with torch.no_grad():
        full = model(ids)  # (2, 15, V)
        cache = model.new_cache(batch_size=2, max_len=20)
        chunks = [model(ids[:, :7], cache=cache)]  # prefill
        for t in range(7, 12):  # one token at a time
            chunks.append(model(ids[:, t : t + 1], cache=cache))
        chunks.append(model(ids[:, 12:], cache=cache))  # a chunk of 3
    assert cache.length == 15
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="KV cache full"):
        model(ids[:, :6], cache=cache)


def test_kv_cache_keeps_document_masks() -> None:
    """Row 0 is left-padded (pad = document 0), row 1 packs two prompts; decoding continues the last document."""
    model = make_decoder()
    ids = random_ids(2, 12)
    document_ids = torch.tensor([[0, 0, 0] + [1] * 9, [0] * 4 + [1] * 8])
    positions = positions_from_document_ids(document_ids)
    with torch.no_grad():
        full = model(ids, position_ids=positions, document_ids=document_ids)
        cache = model.new_cache(batch_size=2, max_len=12)
        chunks = [model(ids[:, :8], position_ids=positions[:, :8], document_ids=document_ids[:, :8], cache=cache)]
        for t in range(8, 12):  # no document_ids: continue the last cached document
            chunks.append(model(ids[:, t : t + 1], position_ids=positions[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)
    with torch.no_grad():  # and the last documents are unaffected by what precedes them
        torch.testing.assert_close(full[0, 3:], model(ids[:1, 3:])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(full[1, 4:], model(ids[1:, 4:])[0], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ inputs
def test_inputs_embeds_equal_input_ids_and_padded_logits_never_win() -> None:
    model = make_decoder()
    ids = random_ids(2, 9)
    with torch.no_grad():
        by_ids = model(ids)
        by_embeds = model(inputs_embeds=model.embed(ids))
    torch.testing.assert_close(by_embeds, by_ids, atol=0, rtol=0)
    assert by_ids.shape[-1] == 128 and by_ids[..., 100:].eq(torch.finfo(by_ids.dtype).min).all()
    assert by_ids.argmax(-1).max() < 100
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.embed(ids))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="document_ids"):
        model(ids, document_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_ids(1, 65))


# ------------------------------------------------------------------------------------------------ loss
def test_next_token_loss_hand_made() -> None:
    logits = torch.tensor([[[1.0, 2.0, 0.0, -1.0], [5.0, 5.0, 5.0, 5.0], [0.5, 0.0, 3.0, 1.0]]])  # (1, 3, 4)
    targets = torch.tensor([[1, -100, 2]])
    weights = torch.tensor([[2.0, 5.0, 1.0]])

    def lse(row):
        return math.log(sum(math.exp(v) for v in row))

    rows = logits[0].tolist()
    ce0, ce2 = lse(rows[0]) - 2.0, lse(rows[2]) - 3.0
    out = next_token_loss(logits, targets, weights, z_loss_weight=0.1)
    assert out["ce"].item() == pytest.approx((2 * ce0 + 1 * ce2) / 3, rel=1e-6)
    z = (lse(rows[0]) ** 2 + lse(rows[2]) ** 2) / 2
    assert out["z_loss"].item() == pytest.approx(z, rel=1e-6)
    assert out["loss"].item() == pytest.approx((2 * ce0 + ce2) / 3 + 0.1 * z, rel=1e-6)
    assert out["n_tokens"].item() == 2 and out["weight_sum"].item() == 3.0
    assert out["accuracy"].item() == 1.0  # both counted rows predict their target

    # weight 0 removes a token entirely (also from the z-loss); no weights = plain mean
    only_last = next_token_loss(logits, targets, torch.tensor([[0.0, 1.0, 1.0]]))
    assert only_last["ce"].item() == pytest.approx(ce2, rel=1e-6)
    assert only_last["z_loss"].item() == pytest.approx(lse(rows[2]) ** 2, rel=1e-6)
    assert next_token_loss(logits, targets)["ce"].item() == pytest.approx((ce0 + ce2) / 2, rel=1e-6)

    # padded columns (dtype min) change nothing
    padded = torch.cat([logits, torch.full((1, 3, 4), torch.finfo(torch.float32).min)], dim=-1)
    torch.testing.assert_close(next_token_loss(padded, targets, weights, 0.1)["loss"], out["loss"])

    # nothing counted: zeros with a usable gradient, not NaN
    leaf = logits.clone().requires_grad_(True)
    empty = next_token_loss(leaf, torch.full((1, 3), -100), z_loss_weight=0.1)
    empty["loss"].backward()
    assert empty["loss"].item() == 0.0 and torch.isfinite(leaf.grad).all()


# ------------------------------------------------------------------------------------------------ config
def test_config_derived_values_and_round_trip() -> None:
    from omegaconf import OmegaConf

    config = DecoderConfig(vocab_size=1000, d_model=256, n_heads=8)
    assert config.padded_vocab_size == 1024 and config.head_dim == 32 and config.n_kv_heads == 8
    assert config.mlp_hidden == 704  # int(2/3 * 4 * 256) = 682 -> next multiple of 64
    assert DecoderConfig(**asdict(config)) == config
    assert OmegaConf.to_object(OmegaConf.structured(config)) == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(d_model=30, n_heads=4), "divisible"),
        (dict(d_model=36, n_heads=4), "even"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(attention_backend="flash"), "attention_backend"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(z_loss_weight=-1.0), "z_loss_weight"),
    ],
)
def test_config_validation(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        DecoderConfig(**kwargs)


# ------------------------------------------------------------------------------------------------ backends
def test_resolve_backend(caplog) -> None:
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("flash", "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("xformers", "cpu")
    if not xformers_available():
        assert resolve_backend("auto", "cuda") == "sdpa"
        with pytest.raises(ValueError, match="not installed"):
            resolve_backend("xformers", "cuda")
    with pytest.raises(ValueError, match="CUDA"):
        make_decoder(attention_backend="xformers")(random_ids(1, 4))
    model = make_decoder(attention_backend="auto")
    with caplog.at_level(logging.INFO, logger="chameleon_lite.model.decoder"):
        model(random_ids(1, 4))
        model(random_ids(1, 4))
    messages = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert len(messages) == 1 and "sdpa" in messages[0]


def _fake_xformers() -> tuple[types.ModuleType, types.ModuleType]:
    """A dense CPU stand-in with xformers' documented semantics (layout (B, M, H, K), block-diagonal biases)."""

    class LowerTriangularMask:
        pass

    class BlockDiagonalCausalMask:
        def __init__(self, seqlens):
            self.seqlens = list(seqlens)

        @classmethod
        def from_seqlens(cls, q_seqlen):
            return cls(q_seqlen)

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0):
        M = q.shape[1]
        allowed = torch.ones(M, M).tril().bool()
        if isinstance(attn_bias, BlockDiagonalCausalMask):
            assert q.shape[0] == 1 and sum(attn_bias.seqlens) == M
            block = torch.repeat_interleave(torch.arange(len(attn_bias.seqlens)), torch.tensor(attn_bias.seqlens))
            allowed &= block[:, None] == block[None, :]
        out = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=allowed
        )
        return out.transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    ops.fmha = types.SimpleNamespace(attn_bias=types.SimpleNamespace(
        LowerTriangularMask=LowerTriangularMask, BlockDiagonalCausalMask=BlockDiagonalCausalMask))
    package = types.ModuleType("xformers")
    package.ops = ops
    return package, ops


def test_xformers_path_layout_with_a_stand_in(monkeypatch) -> None:
    """Checks our flattening / seqlen bookkeeping for xformers on CPU (the kernel itself needs CUDA)."""
    package, ops = _fake_xformers()
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    ids = random_ids(2, 16)
    document_ids = torch.tensor([[0] * 5 + [1] * 11, [1] * 16])
    positions = positions_from_document_ids(document_ids)
    sdpa, xf = make_decoder(), make_decoder()
    xf._backend = ("cpu", "xformers")  # resolve_backend would (rightly) refuse xformers on CPU
    with torch.no_grad():
        for kwargs in (dict(), dict(position_ids=positions, document_ids=document_ids)):
            torch.testing.assert_close(xf(ids, **kwargs), sdpa(ids, **kwargs), atol=1e-5, rtol=0)
        torch.testing.assert_close(xf(ids[:1]), sdpa(ids[:1]), atol=1e-5, rtol=0)  # LowerTriangularMask
        cache = xf.new_cache(batch_size=2)  # cached decoding falls back to SDPA
        torch.testing.assert_close(xf(ids, cache=cache), sdpa(ids), atol=1e-5, rtol=0)


@pytest.mark.cuda
def test_xformers_matches_sdpa_on_cuda() -> None:
    if not torch.cuda.is_available() or not xformers_available():
        pytest.skip("needs CUDA and xformers")
    ids = random_ids(2, 16).cuda()
    document_ids = torch.tensor([[0] * 5 + [1] * 11, [2] * 16]).cuda()
    positions = positions_from_document_ids(document_ids)
    sdpa = make_decoder(attention_backend="sdpa").cuda()
    xf = make_decoder(attention_backend="xformers").cuda()
    with torch.no_grad():
        for kwargs in (dict(), dict(position_ids=positions, document_ids=document_ids)):
            torch.testing.assert_close(xf(ids, **kwargs), sdpa(ids, **kwargs), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ training details
def _grads(model: Decoder, ids: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(seed)
    logits = model(ids[:, :-1], document_ids=torch.tensor([[0] * 6 + [1] * 5] * ids.shape[0]))
    next_token_loss(logits, ids[:, 1:], z_loss_weight=1e-2)["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_same_gradients() -> None:
    model = make_decoder(dropout=0.1, swin_norm=True).train()  # dropout: checkpointing must replay the same masks
    ids = random_ids(2, 12)
    plain = _grads(model, ids, seed=5)
    model.gradient_checkpointing = True
    checkpointed = _grads(model, ids, seed=5)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_init_tying_and_parameter_count() -> None:
    config = replace(TINY, d_model=64, n_layers=8, mlp_hidden=128, init_std=0.02)
    model = Decoder(config)
    assert model.layers[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)  # 1/sqrt(16)
    n_embed = config.padded_vocab_size * config.d_model
    assert model.num_parameters(non_embedding=False) - model.num_parameters() == 2 * n_embed
    tied = Decoder(replace(config, tie_embeddings=True))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert tied.num_parameters(non_embedding=False) == model.num_parameters(non_embedding=False) - n_embed
    assert tied.num_parameters() == model.num_parameters()


def test_kv_cache_shapes() -> None:
    cache = KVCache(n_layers=2, batch_size=3, n_kv_heads=2, head_dim=8, max_len=10)
    assert cache.k.shape == (2, 3, 2, 10, 8) and cache.max_len == 10 and cache.length == 0
    k, v = cache.update(1, torch.ones(3, 2, 4, 8), torch.ones(3, 2, 4, 8))
    assert k.shape == (3, 2, 4, 8)
    cache.advance(4)
    with pytest.raises(ValueError, match="full"):
        cache.advance(7)
