"""The ``flex`` attention backend on CPU: forward only (PyTorch has no flex backward on CPU; the CUDA tests in
``tests/test_cuda.py`` cover gradients). Checked against SDPA, which the rest of the suite checks against
Hugging Face's Chameleon."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from chameleon_lite.model import attention
from chameleon_lite.model.attention import (
    attend,
    build_attention_mask,
    flex_attention_available,
    positions_from_document_ids,
    resolve_backend,
)
from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import Decoder

pytestmark = pytest.mark.skipif(not flex_attention_available(), reason="this torch has no flex_attention")

CONFIG = DecoderConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=320)


def documents(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """``(B, T)`` contiguous runs of ids from per-row run lengths (each row must sum to the same T)."""
    rows = [torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)) for lengths in lengths_per_row]
    return torch.stack(rows)


# 300 tokens: crosses flex's 128-token block boundaries, with documents that start inside blocks
DOCS = documents([[7, 130, 1, 100, 62], [300]])


def decoder(backend: str, seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(replace(CONFIG, attention_backend=backend, **overrides)).eval()


def test_resolve_flex(monkeypatch) -> None:
    assert resolve_backend("flex", "cpu") == "flex"
    assert resolve_backend("auto", "cpu") == "sdpa"  # flex is opt-in
    monkeypatch.setattr(attention, "flex_attention_available", lambda: False)
    with pytest.raises(ValueError, match="torch >= 2.5"):
        resolve_backend("flex", "cpu")


def test_flex_attention_equals_sdpa_on_packed_documents_with_gqa() -> None:
    B, H, H_kv, hd = 2, 4, 2, 16
    T = DOCS.shape[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, hd, generator=g) for h in (H, H_kv, H_kv))
    flex_mask = build_attention_mask("flex", batch_size=B, q_len=T, device=q.device, document_ids=DOCS)
    sdpa_mask = build_attention_mask("sdpa", batch_size=B, q_len=T, device=q.device, document_ids=DOCS)
    assert flex_mask.flex_block_mask is not None and sdpa_mask.sdpa_mask is not None
    out = attend(q, k, v, flex_mask)  # (B, H, T, hd)
    torch.testing.assert_close(out, attend(q, k, v, sdpa_mask), atol=1e-5, rtol=1e-5)

    # documents are isolated: changing the values of row 0's second document changes that document only
    doc = DOCS[0] == 1  # (T,)
    v2 = v.clone()
    v2[0, :, doc] += 3.0
    changed = (attend(q, k, v2, flex_mask) - out).abs().amax(dim=(1, 3)) > 1e-6  # (B, T)
    assert torch.equal(changed[0], doc) and not changed[1].any()


def test_flex_decoder_equals_sdpa_decoder() -> None:
    sdpa, flex = decoder("sdpa"), decoder("flex")
    ids = torch.randint(0, CONFIG.vocab_size, DOCS.shape, generator=torch.Generator().manual_seed(1))
    positions = positions_from_document_ids(DOCS)
    with torch.no_grad():
        packed = flex(ids, position_ids=positions, document_ids=DOCS)
        torch.testing.assert_close(packed, sdpa(ids, position_ids=positions, document_ids=DOCS), atol=1e-4, rtol=0)
        # without documents or with a cache, flex uses the same SDPA calls: identical results
        assert torch.equal(flex(ids[:, :50]), sdpa(ids[:, :50]))
        cached = flex(ids[:, :50], cache=flex.new_cache(2))
        assert torch.equal(cached, sdpa(ids[:, :50], cache=sdpa.new_cache(2)))
    assert flex.attention_backend(ids.device) == "flex"


def test_flex_refuses_attention_dropout() -> None:
    model = decoder("flex", dropout=0.1).train()
    ids = torch.zeros(DOCS.shape, dtype=torch.long)
    with torch.no_grad(), pytest.raises(ValueError, match="no attention dropout"):
        model(ids, document_ids=DOCS)
