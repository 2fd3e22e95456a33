"""The decoder's forward on a static KV cache (every decode step the same shapes, what
chameleon_lite.generation.static_decode captures as a CUDA graph) computes what the eager step computes, and the
engine gives
the same tokens with ``decode_step="static"`` as with the default. The CUDA-graph replay of the same
step needs CUDA: ``tests/test_cuda.py``."""

from __future__ import annotations

import types

import pytest
import torch
from test_fast_decode import GRID, VOCAB, Wrapped, left_padded_prompts, make_decoder

from chameleon_lite.generation.fast_decode import DecodeStep
from chameleon_lite.generation.native import generate_ids
from chameleon_lite.generation.sampling import SamplingParams
from chameleon_lite.generation.static_decode import CUDAGraphDecodeStep


@pytest.mark.parametrize(
    ("dtype", "overrides", "lengths"),
    [
        (torch.float64, {}, [3, 7, 5]),
        (torch.float64, {"n_kv_heads": 2}, [3, 7, 5]),  # grouped-query heads folded into the query axis
        (torch.float64, {"swin_norm": True, "n_kv_heads": 1}, [4, 2]),
        (torch.float64, {"qk_norm": False, "tie_embeddings": True}, [6]),
        (torch.float32, {"n_kv_heads": 2}, [2, 5]),
    ],
)
def test_static_step_equals_eager_step(dtype: torch.dtype, overrides: dict, lengths: list[int]) -> None:
    decoder = make_decoder(dtype, **overrides)
    V, B = decoder.config.vocab_size, len(lengths)
    ids, document_ids, positions, lengths = left_padded_prompts(lengths, V)
    fast_cache, static_cache = decoder.new_cache(B, 24), decoder.new_cache(B, 24)
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for cache in (fast_cache, static_cache):
            decoder(ids, position_ids=positions, document_ids=document_ids, cache=cache)
        fast, static = DecodeStep(decoder, fast_cache), DecodeStep(decoder, static_cache, static=True)
        next_positions = lengths.clone()
        # both round RMSNorm statistics through fp32 (as Chameleon), in different op orders: ~1e-6 differences
        tol = 1e-5 if dtype == torch.float64 else 1e-4
        for _ in range(10):
            tokens = torch.randint(0, V, (B,), generator=g)
            want = fast(tokens, next_positions)  # (B, V)
            got = static(tokens, next_positions)
            assert got.shape == (B, V)
            torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol)
            next_positions += 1
        # the keys/values written at the static slots are the fast step's
        end = fast_cache.length
        assert static_cache.length == end and int(static_cache.slot) == end
        torch.testing.assert_close(static_cache.k[..., :end, :], fast_cache.k[..., :end, :], rtol=tol, atol=tol)
        with pytest.raises(ValueError, match="static KV cache"):  # one token per row per forward
            decoder(torch.zeros(B, 2, dtype=torch.long), cache=static_cache)


def test_static_step_refusals() -> None:
    decoder = make_decoder()
    with pytest.raises(ValueError, match="prefilled"):
        DecodeStep(decoder, decoder.new_cache(1, 8), static=True)
    cache = decoder.new_cache(1, 8)
    with torch.inference_mode():
        decoder(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="CUDA"):
        CUDAGraphDecodeStep(decoder, cache)


@pytest.mark.parametrize(
    ("mode", "kwargs"),
    [
        ("text", {"sampling": SamplingParams(temperature=0.0)}),
        ("text", {"sampling": SamplingParams(temperature=1.3, top_k=7), "seed": 4}),
        ("image", {"sampling": SamplingParams(image_top_p=0.9), "cfg_scale": 2.5, "seed": 1}),
        ("interleaved", {"sampling": SamplingParams(temperature=0.0, image_temperature=0.0)}),
    ],
)
def test_engine_static_path_equals_fast_path(mode: str, kwargs: dict) -> None:
    decoder = make_decoder(vocab_size=VOCAB.size, max_seq_len=64, n_kv_heads=2)
    boi = [VOCAB.boi] if mode == "image" else []
    prompts = [[VOCAB.bos, 5, 9, 11, *boi], [VOCAB.bos, 7, *boi], [VOCAB.bos, 3, 8, 13, 21, 6, *boi]]
    if mode == "interleaved":  # make <boi> likely so images are opened and closed
        with torch.no_grad():
            decoder.lm_head.weight[VOCAB.boi] = 3.0 * decoder.norm.weight.sign()

    def run(decode_step: str) -> list[list[int]]:
        return generate_ids(decoder, VOCAB, GRID, prompts, mode=mode, max_new_tokens=20, decode_step=decode_step,
                            **kwargs)

    fast = run("fast")
    assert run("static") == fast and run("auto") == fast
    if mode == "interleaved":
        assert any(VOCAB.boi in out for out in fast)


def test_engine_decode_step_validation() -> None:
    decoder = make_decoder(vocab_size=VOCAB.size, max_seq_len=64)
    prompts = [[VOCAB.bos, 5]]
    with pytest.raises(ValueError, match="decode_step='graph'"):
        generate_ids(decoder, VOCAB, GRID, prompts, decode_step="graph")
    with pytest.raises(ValueError, match="CUDA device"):
        generate_ids(decoder, VOCAB, GRID, prompts, decode_step="cuda_graph")
    # any module with the decoder's forward takes the static path: it is that forward
    want = generate_ids(decoder, VOCAB, GRID, prompts, max_new_tokens=5, sampling=SamplingParams(temperature=0.0))
    assert generate_ids(Wrapped(decoder), VOCAB, GRID, prompts, max_new_tokens=5, decode_step="static",
                        sampling=SamplingParams(temperature=0.0)) == want


def test_high_level_generate_passes_decode_step_through(monkeypatch) -> None:
    from chameleon_lite.generation import engine
    from chameleon_lite.generation.native import generate

    seen = []
    real = engine._make_step

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(engine, "_make_step", spy)
    decoder = make_decoder(vocab_size=VOCAB.size, max_seq_len=64)
    model = types.SimpleNamespace(decoder=decoder, bundle=types.SimpleNamespace(
        vocab=VOCAB, image_grid=GRID, use_eol=False, image_tokens=GRID[0] * GRID[1] + 2,
        text=types.SimpleNamespace(encode=lambda s: [5, 9], decode=lambda ids: "x" * len(ids))))
    fast = generate(model, "hi", max_new_tokens=6, decode_step="fast")
    assert generate(model, "hi", max_new_tokens=6, decode_step="static") == fast
    assert seen == ["fast", "static"]
