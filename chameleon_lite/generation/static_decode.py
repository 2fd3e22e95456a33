"""The CUDA-graph decode step: :meth:`Decoder.forward <chameleon_lite.model.decoder.Decoder.forward>` captured once per
step shape and replayed with a single launch per step.

On a GPU at batch 1 a step of a 100M-parameter model is a few hundred microseconds of memory traffic but ~150
kernel launches, so the launches, not the bandwidth, can set the pace. A KV cache in static mode
(:meth:`KVCache.make_static <chameleon_lite.model.attention.KVCache.make_static>`) gives every decode step of the
decoder's own forward the same shapes and addresses: the slot of the new token is a 0-d device tensor, keys and
values are written there with ``index_copy_``, attention reads all preallocated slots under a mask, and the slot
advances inside the forward. :class:`CUDAGraphDecodeStep` captures that forward; there is no second copy of the
decoder's math. The same static forward runs eagerly with ``decode_step="static"`` (``fast_decode.DecodeStep``).

The engine uses it when asked (``generate_ids(..., decode_step="cuda_graph")``); the default stays the eager step
until the graphed step has been measured on a GPU (see benchmarks/README.md, issue 9). Covered by
``tests/test_cuda.py``, which has not run on a GPU yet.
"""

from __future__ import annotations

import torch

from chameleon_lite.generation.fast_decode import widen_logits
from chameleon_lite.model.attention import KVCache

__all__ = ["CUDAGraphDecodeStep"]


class CUDAGraphDecodeStep:
    """The decoder's forward on one new token per row, captured as a CUDA graph per ``columns`` value and replayed.

    Args:
        decoder: a :class:`~chameleon_lite.model.decoder.Decoder` on a CUDA device, eval mode (or dropout 0).
        cache: its KV cache holding the prefilled prompt; switched to static mode here.
        vocab_size: logit columns returned (default the decoder's logical vocabulary).
        warmup: eager calls on a side stream before each capture (lets lazy initialisation and kernel selection
            happen outside the graph).

    Calling it with ``tokens`` ``(B,)``, ``positions`` ``(B,)`` and optional ``columns=(lo, hi)`` copies the
    inputs into the graph's buffers, replays the graph for those columns (captured on first use: each distinct
    ``columns`` value, e.g. text and image columns in interleaved decoding, has its own graph, all sharing the
    cache), advances ``cache.length`` and returns the logits ``(B, vocab_size)`` (float32; 0 outside
    ``columns``, as :class:`~chameleon_lite.generation.fast_decode.DecodeStep`).

    Warm-up and capture write keys/values at the current slot only and the slot is restored afterwards; the next
    real step overwrites that slot before any query can see it (each layer writes before it attends), so they
    leave no trace.
    """

    def __init__(self, decoder: torch.nn.Module, cache: KVCache, *, vocab_size: int | None = None,
                 warmup: int = 2) -> None:
        device = cache.k.device
        if device.type != "cuda":
            raise ValueError(f"CUDAGraphDecodeStep needs a CUDA device, the cache is on {device}")
        if warmup < 1:
            raise ValueError(f"warmup={warmup} must be >= 1")
        if decoder.training and decoder.config.dropout > 0:
            raise ValueError("CUDAGraphDecodeStep needs a decoder in eval mode (or with dropout=0)")
        self.decoder, self.cache, self.warmup = decoder, cache, warmup
        self.vocab_size = vocab_size or decoder.config.vocab_size
        cache.make_static()
        B = cache.batch_size
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, 1) static input buffers
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, 1)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _forward(self, columns: tuple[int, int]) -> torch.Tensor:
        return self.decoder(self.tokens, position_ids=self.positions, cache=self.cache, columns=columns)[:, 0]

    def _capture(self, columns: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        cache, device = self.cache, self.cache.k.device
        length = cache.length
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self._forward(columns)
                cache.length = length
                cache.slot.fill_(length)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._forward(columns)  # (B, hi - lo): the graph's output buffer; the slot advances inside
        cache.length = length  # the capture ran no kernel: only the host-side length moved
        return graph, logits

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor,
                 columns: tuple[int, int] | None = None) -> torch.Tensor:
        columns = tuple(columns) if columns is not None else (0, self.vocab_size)
        self.cache.check_room(1)
        self.tokens.copy_(tokens[:, None])
        self.positions.copy_(positions[:, None])
        if columns not in self.graphs:
            self.graphs[columns] = self._capture(columns)
        graph, logits = self.graphs[columns]
        graph.replay()  # writes the new keys/values at the slot and advances it
        self.cache.length += 1
        return widen_logits(logits.clone(), columns[0], self.vocab_size)  # the buffer is overwritten next replay
