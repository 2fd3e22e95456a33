"""The engine's decode step (chameleon_lite.generation.fast_decode.DecodeStep: Decoder.forward on one token per row,
reading
the weight copies its cache carries) computes what the forward computes from the parameters, and the engine's
default path produces what the parameter path produces."""

from __future__ import annotations

import types
from dataclasses import replace

import pytest
import torch

from chameleon_lite.generation.fast_decode import (
    SERIAL_MAX_D_MODEL,
    DecodeStep,
    IntraOpThreads,
    decode_threads,
)
from chameleon_lite.generation.native import generate_ids
from chameleon_lite.generation.sampling import SamplingParams
from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import Decoder
from chameleon_lite.tokenization.vocab import Vocab

TINY = DecoderConfig(vocab_size=90, pad_vocab_to_multiple_of=32, d_model=32, n_layers=2, n_heads=4, mlp_hidden=48,
                     max_seq_len=48, init_std=0.3, attention_backend="sdpa")


def make_decoder(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    decoder = Decoder(replace(TINY, **overrides))
    with torch.no_grad():  # non-trivial norm weights so folding them into the projections is exercised
        for name, p in decoder.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return decoder.to(dtype).eval()


def left_padded_prompts(lengths: list[int], vocab_size: int, seed: int = 1):
    """ids, document ids (1 on pad slots) and positions of a left-padded batch, as the engine builds it."""
    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.randint(0, vocab_size, (len(lengths), longest), generator=g)
    document_ids = torch.ones(len(lengths), longest, dtype=torch.long)
    positions = torch.zeros(len(lengths), longest, dtype=torch.long)
    for r, n in enumerate(lengths):
        document_ids[r, longest - n :] = 0
        positions[r, longest - n :] = torch.arange(n)
    return ids, document_ids, positions, torch.tensor(lengths)


@pytest.mark.parametrize(
    ("dtype", "overrides", "lengths"),
    [
        (torch.float64, {}, [3, 7, 5]),
        (torch.float64, {}, [6]),  # one row: the other weight layout
        (torch.float64, {"n_kv_heads": 2}, [3, 7, 5]),
        (torch.float64, {"swin_norm": True}, [4]),
        (torch.float64, {"swin_norm": True}, [4, 2]),
        (torch.float64, {"qk_norm": False, "tie_embeddings": True}, [2, 5]),
        (torch.float32, {"n_kv_heads": 1}, [3, 7, 5]),
        (torch.float32, {}, [5]),
    ],
)
def test_decode_step_equals_forward(dtype: torch.dtype, overrides: dict, lengths: list[int]) -> None:
    decoder = make_decoder(dtype, **overrides)
    V, B = decoder.config.vocab_size, len(lengths)
    ids, document_ids, positions, lengths = left_padded_prompts(lengths, V)
    slow_cache, fast_cache = decoder.new_cache(B, 24), decoder.new_cache(B, 24, prepare_weights=True)
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for cache in (slow_cache, fast_cache):
            decoder(ids, position_ids=positions, document_ids=document_ids, cache=cache)
        step = DecodeStep(decoder, fast_cache)
        next_positions = lengths.clone()
        for _ in range(8):
            tokens = torch.randint(0, V, (B,), generator=g)
            want = decoder(tokens[:, None], position_ids=next_positions[:, None], cache=slow_cache)[:, -1, :V]
            got = step(tokens, next_positions)
            # RMSNorm rounds its statistics through fp32 even for a float64 decoder (as Chameleon): ~1e-6 differences
            tol = 1e-5 if dtype == torch.float64 else 1e-4
            assert got.shape == (B, V) and got.dtype == dtype
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            next_positions += 1
    assert fast_cache.length == slow_cache.length == ids.shape[1] + 8
    end = fast_cache.length
    torch.testing.assert_close(fast_cache.k[..., :end, :], slow_cache.k[..., :end, :], rtol=tol, atol=tol)
    torch.testing.assert_close(fast_cache.v[..., :end, :], slow_cache.v[..., :end, :], rtol=tol, atol=tol)
    assert torch.equal(fast_cache.document_ids[:, :end], slow_cache.document_ids[:, :end])


def test_decode_step_columns_and_refusals() -> None:
    decoder = make_decoder()
    V = decoder.config.vocab_size
    ids, document_ids, positions, lengths = left_padded_prompts([4, 2], V)

    def one_step(columns=None, prepare=True, **kwargs) -> torch.Tensor:
        cache = decoder.new_cache(2, 16, prepare_weights=prepare)
        decoder(ids, position_ids=positions, document_ids=document_ids, cache=cache)
        return DecodeStep(decoder, cache, **kwargs)(torch.tensor([5, 6]), lengths, columns)

    with torch.inference_mode():
        with pytest.raises(ValueError, match="prefilled"):
            DecodeStep(decoder, decoder.new_cache(2, 16))
        full = one_step()
        variants = [one_step((10, 40)), one_step((10, 40), prepare=False), one_step((10, 40), static=True)]
        torch.testing.assert_close(one_step(prepare=False), full, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(one_step(static=True), full, rtol=1e-9, atol=1e-9)
        with pytest.raises(ValueError, match="columns"):
            one_step((40, 10))
    for part in variants:
        torch.testing.assert_close(part[:, 10:40], full[:, 10:40], rtol=1e-9, atol=1e-9)
        assert (part[:, :10] == 0).all() and (part[:, 40:] == 0).all()


def test_decode_threads_policy_and_scope() -> None:
    def stub(d_model: int, device: str = "cpu"):
        return types.SimpleNamespace(config=types.SimpleNamespace(d_model=d_model),
                                     embed_tokens=types.SimpleNamespace(weight=torch.empty(0, device=device)))

    assert decode_threads(stub(256)) == 1 and decode_threads(stub(SERIAL_MAX_D_MODEL)) == 1
    assert decode_threads(stub(SERIAL_MAX_D_MODEL + 64)) is None  # big enough for parallel matmuls to pay
    assert decode_threads(stub(256, device="meta")) is None  # not a CPU
    assert decode_threads(torch.nn.Linear(2, 2)) is None
    before = torch.get_num_threads()
    with IntraOpThreads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with IntraOpThreads(None):
        assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------------- engine
VOCAB = Vocab(n_text=24, codebook_size=16)
GRID = (2, 3)


@pytest.fixture(scope="module")
def engine_decoder() -> Decoder:
    return make_decoder(vocab_size=VOCAB.size, max_seq_len=64, n_kv_heads=2)


def plain_path(monkeypatch, fn):
    """Run ``fn`` with the caches' weight copies switched off (every product reads the parameters)."""
    new_cache = Decoder.new_cache

    def without_copies(self, *args, prepare_weights=False, **kwargs):
        return new_cache(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Decoder, "new_cache", without_copies)
        return fn()


@pytest.mark.parametrize(
    ("mode", "kwargs"),
    [
        ("text", {"sampling": SamplingParams(temperature=0.0)}),
        ("text", {"sampling": SamplingParams(temperature=1.3, top_k=7), "seed": 4}),
        ("image", {"sampling": SamplingParams(image_temperature=0.0)}),
        ("image", {"sampling": SamplingParams(image_top_p=0.9), "cfg_scale": 2.5, "seed": 1}),
        ("interleaved", {"sampling": SamplingParams(temperature=0.0, image_temperature=0.0)}),
        ("interleaved", {"sampling": SamplingParams(temperature=0.0), "seed": 3}),  # greedy text, sampled codes
    ],
)
def test_engine_default_path_equals_parameter_path(monkeypatch, engine_decoder: Decoder, mode: str,
                                                   kwargs: dict) -> None:
    boi = [VOCAB.boi] if mode == "image" else []
    prompts = [[VOCAB.bos, 5, 9, 11, *boi], [VOCAB.bos, 7, *boi], [VOCAB.bos, 3, 8, 13, 21, 6, *boi]]
    if mode == "interleaved":  # make <boi> likely so images are opened and closed
        decoder = make_decoder(vocab_size=VOCAB.size, max_seq_len=64, n_kv_heads=2)
        with torch.no_grad():
            decoder.lm_head.weight[VOCAB.boi] = 3.0 * decoder.norm.weight.sign()
    else:
        decoder = engine_decoder

    def run():
        return generate_ids(decoder, VOCAB, GRID, prompts, mode=mode, max_new_tokens=20, **kwargs)

    fast = run()
    assert fast == plain_path(monkeypatch, run)
    if mode == "interleaved":
        assert any(VOCAB.boi in out for out in fast)


class Wrapped(torch.nn.Module):
    """A decoder module that is not a ``Decoder``: the engine must use its padded prefill and its own forward."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.inner, self.config, self.embed_tokens = decoder, decoder.config, decoder.embed_tokens

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_generic_decoder_module_takes_the_plain_paths(engine_decoder: Decoder) -> None:
    prompts = [[VOCAB.bos, 5, 9, 11], [VOCAB.bos, 7], [VOCAB.bos, 3, 8, 13, 21, 6]]
    greedy = SamplingParams(temperature=0.0)
    wrapped = Wrapped(engine_decoder)
    want = generate_ids(engine_decoder, VOCAB, GRID, prompts, max_new_tokens=12, sampling=greedy)
    assert generate_ids(wrapped, VOCAB, GRID, prompts, max_new_tokens=12, sampling=greedy) == want
    with torch.no_grad():
        embeds = [engine_decoder.embed(torch.tensor(p)) for p in prompts]
    assert generate_ids(wrapped, VOCAB, GRID, prompts, max_new_tokens=12, sampling=greedy,
                        prompt_embeds=embeds) == want


@pytest.mark.parametrize("lengths", [[2, 9, 5, 1], [10, 9, 10]])  # packed prefill, then padded (packing dearer)
def test_batch_equals_each_prompt_alone_with_either_prefill(engine_decoder: Decoder, lengths: list[int]) -> None:
    prompts = [[VOCAB.bos] + [3 + (7 * i + n) % 20 for i in range(n - 1)] for n in lengths]
    greedy = SamplingParams(temperature=0.0)
    embeds = [engine_decoder.embed(torch.tensor(p)).detach() + 0.3 for p in prompts]
    for kwargs in ({}, {"prompt_embeds": embeds}):
        batched = generate_ids(engine_decoder, VOCAB, GRID, prompts, max_new_tokens=8, sampling=greedy, **kwargs)
        alone = [generate_ids(engine_decoder, VOCAB, GRID, [p], max_new_tokens=8, sampling=greedy,
                              **{k: [v[i]] for k, v in kwargs.items()})[0] for i, p in enumerate(prompts)]
        assert batched == alone


@pytest.mark.parametrize("mode", ["text", "image", "interleaved"])
def test_long_budget_equals_parameter_path(monkeypatch, mode: str) -> None:
    decoder = make_decoder(vocab_size=VOCAB.size, max_seq_len=96, seed=2)  # seed 2: no <eos> within the budget
    boi = [VOCAB.bos, VOCAB.boi] if mode == "image" else [VOCAB.bos]
    prompts = [[*boi[:1], 5, 9, *boi[1:]], [*boi[:1], 7, 3, 8, 13, *boi[1:]]]
    sampling = SamplingParams(temperature=0.0, image_temperature=0.0)

    def run():
        return generate_ids(decoder, VOCAB, GRID, prompts, mode=mode, max_new_tokens=80, sampling=sampling)

    fast = run()
    assert fast == plain_path(monkeypatch, run)
    assert max(len(out) for out in fast) == (GRID[0] * GRID[1] + 1 if mode == "image" else 80)
