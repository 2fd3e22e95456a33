"""Static-shape decode steps: one step whose tensors never change shape or address, and its CUDA-graph replay.

:class:`~chameleon_lite.generation.fast_decode.FastDecodeStep` (the engine's default) narrows the KV cache to the tokens
written so far, a shape that changes every step, and is launched op by op from Python. On a GPU at batch 1 a step
of a 100M-parameter model is a few hundred microseconds of memory traffic but ~150 kernel launches, so the
launches, not the bandwidth, can set the pace. :class:`StaticDecodeStep` computes the same function with static
shapes (the slot of the new token is a 0-d device tensor, attention reads the whole preallocated cache under a
mask), so :class:`CUDAGraphDecodeStep` can capture it once and replay it with a single launch per step.

The engine uses them when asked (``generate_ids(..., decode_step="static" | "cuda_graph")``); the default stays
the fast step until the graphed step has been measured on a GPU (see benchmarks/README.md, issue 9).

Status: ``StaticDecodeStep`` is checked on CPU against ``FastDecodeStep`` and through the engine
(``tests/test_static_decode.py``); ``CUDAGraphDecodeStep`` needs CUDA and is covered by ``tests/test_cuda.py``,
which has not run on a GPU yet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from chameleon_lite.generation.fast_decode import check_decode_step_inputs
from chameleon_lite.model.attention import KVCache
from chameleon_lite.model.decoder import Decoder, apply_rotary

__all__ = ["CUDAGraphDecodeStep", "StaticDecodeStep"]


class StaticDecodeStep(nn.Module):
    """One decode step of a :class:`Decoder` with static shapes, for CUDA graphs / ``torch.compile``.

    Unlike ``FastDecodeStep`` (which narrows the cache to ``length + 1`` slots, a shape that changes every step),
    ``forward(tokens, positions, slot)`` takes the slot as a 0-d tensor, writes the new keys/values there with
    ``index_copy_``, and attends over ALL ``max_len`` cache slots under a boolean mask
    ``visible & (slot_index <= slot)``, so every call has the same shapes and a CUDA graph can replay it. Query
    heads of one key/value group are folded into the query-length axis (``(B, H, 1, hd) -> (B, H_kv, H/H_kv, hd)``)
    so grouped-query attention reads each cached head once, with no ``repeat_kv`` copy. The cache tensors are
    registered as buffers (static addresses for CUDA graphs).

    Args:
        decoder: a plain ``Decoder`` in eval mode (or with dropout 0).
        cache: its KV cache holding the prefilled prompt (``cache.length >= 1``); left-padding slots (another
            document id than the row's last token) stay masked, as in ``FastDecodeStep``.
        vocab_size: logit columns returned (default the decoder's logical vocabulary).

    Call :meth:`step` to decode: it passes the current slot, then advances the slot and ``cache.length``.
    The extra attention over not-yet-written slots costs ``O(max_len)`` instead of ``O(length)`` per step: size
    the cache to the request (prompt + new tokens), as the engine does.
    """

    def __init__(self, decoder: Decoder, cache: KVCache, vocab_size: int | None = None) -> None:
        super().__init__()
        check_decode_step_inputs("StaticDecodeStep", decoder, cache)
        config = decoder.config
        self.decoder, self.cache = decoder, cache
        self.vocab_size = vocab_size or config.vocab_size
        weight = decoder.embed_tokens.weight
        self.register_buffer("k", cache.k, persistent=False)  # (L, B, Hkv, S, hd), shares the cache's storage
        self.register_buffer("v", cache.v, persistent=False)
        length = cache.length
        row_document = cache.document_ids[:, length - 1 : length]  # (B, 1)
        cache.document_ids[:, length:] = row_document  # what Decoder.forward records for the new tokens
        visible = cache.document_ids == row_document  # (B, S)
        self.register_buffer("visible", visible[:, None, None, :].clone(), persistent=False)  # (B, 1, 1, S)
        self.register_buffer("slot_index", torch.arange(cache.max_len, device=weight.device), persistent=False)
        positions = torch.arange(config.max_seq_len, device=weight.device)[None]  # (1, P)
        cos, sin = decoder.rotary(positions, weight.dtype)  # (1, P, hd) each
        self.register_buffer("cos", cos[0].clone(), persistent=False)  # (P, hd)
        self.register_buffer("sin", sin[0].clone(), persistent=False)
        self.slot = torch.tensor(length, device=weight.device)  # next slot to write, a 0-d device tensor

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, vocab_size)`` (float32) of the next token after ``tokens`` ``(B,)`` at ``positions``
        ``(B,)``, whose keys/values are written at cache slot ``slot`` (0-d tensor)."""
        d = self.decoder
        config = d.config
        B = tokens.shape[0]
        H, H_kv, hd = config.n_heads, config.n_kv_heads, config.head_dim
        x = d.embed_tokens(tokens)[:, None]  # (B, 1, d)
        cos = self.cos.index_select(0, positions)[:, None]  # (B, 1, hd)
        sin = self.sin.index_select(0, positions)[:, None]  # (B, 1, hd)
        mask = self.visible & (self.slot_index <= slot)  # (B, 1, 1, S)
        where = slot.reshape(1)
        for i, block in enumerate(d.layers):
            attn = block.attn
            h = x if config.swin_norm else block.attn_norm(x)
            q = attn.q_norm(attn.q_proj(h).view(B, 1, H, hd)).transpose(1, 2)  # (B, H, 1, hd)
            k = attn.k_norm(attn.k_proj(h).view(B, 1, H_kv, hd)).transpose(1, 2)  # (B, Hkv, 1, hd)
            v = attn.v_proj(h).view(B, 1, H_kv, hd).transpose(1, 2)  # (B, Hkv, 1, hd)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            self.k[i].index_copy_(2, where, k)  # (B, Hkv, S, hd)
            self.v[i].index_copy_(2, where, v)
            q = q.reshape(B, H_kv, H // H_kv, hd)  # query head h = g * (H / Hkv) + r -> group g, row r
            y = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask)  # (B, Hkv, H/Hkv, hd)
            y = attn.o_proj(y.reshape(B, 1, H * hd))  # (B, 1, d)
            if config.swin_norm:
                x = x + block.attn_norm(y)
                x = x + block.mlp_norm(block.mlp(x))
            else:
                x = x + y
                x = x + block.mlp(block.mlp_norm(x))
        return d.lm_head(d.norm(x))[:, 0, : self.vocab_size].float()  # (B, V)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, fn: Callable | None = None) -> torch.Tensor:
        """Run ``fn`` (default ``self``; pass a compiled version) at the current slot, then advance it."""
        self.cache.check_room(1)
        logits = (self if fn is None else fn)(tokens, positions, self.slot)
        self.slot += 1
        self.cache.advance(1)
        return logits

    def rewind(self, length: int) -> None:
        """Forget the decoded tokens: back to ``length`` cached tokens (the prompt)."""
        self.cache.length = length
        self.slot.fill_(length)


class CUDAGraphDecodeStep:
    """A :class:`StaticDecodeStep` captured as one CUDA graph and replayed once per decode step.

    Args:
        static: a static step on a CUDA device, its cache prefilled.
        warmup: eager calls on a side stream before the capture (lets lazy initialisation and kernel selection
            happen outside the graph).

    Calling it with ``tokens`` ``(B,)`` and ``positions`` ``(B,)`` copies them into the graph's input buffers,
    replays the graph (which writes the new keys/values at the current slot), advances the slot and the cache,
    and returns a copy of the logits ``(B, vocab_size)`` (float32). ``columns`` is accepted for the engine's call
    signature and ignored: the graph computes the whole logical vocabulary.

    The warm-up and capture runs write keys/values at the current slot only; the first real step overwrites that
    slot before any query can see it (each layer writes before it attends), so they leave no trace.
    """

    def __init__(self, static: StaticDecodeStep, warmup: int = 2) -> None:
        device = static.slot.device
        if device.type != "cuda":
            raise ValueError(f"CUDAGraphDecodeStep needs a CUDA device, the decoder is on {device}")
        if warmup < 1:
            raise ValueError(f"warmup={warmup} must be >= 1")
        self.static = static
        B = static.cache.batch_size
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)  # (B,) static input buffers
        self.positions = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                static(self.tokens, self.positions, static.slot)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = static(self.tokens, self.positions, static.slot)  # (B, V) the graph's output buffer

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor,
                 columns: tuple[int, int] | None = None) -> torch.Tensor:
        self.static.cache.check_room(1)
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        self.static.slot += 1
        self.static.cache.advance(1)
        return self.logits.clone()  # the buffer is overwritten by the next replay
