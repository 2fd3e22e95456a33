"""The engine's decode step: :meth:`Decoder.forward <chameleon_lite.model.decoder.Decoder.forward>` on one new token
per row.

There is no second copy of the decoder's math here: a step calls the decoder's own forward with its KV cache, the
new tokens' RoPE positions and the logit columns the caller can use, so grouped-query attention, QK-norm,
swin-norm and every attention backend of :mod:`chameleon_lite.model.attention` are the ones training uses. What makes
that forward fast at batch 1 on a CPU lives in the forward itself (``chameleon_lite.model.decoder``): per-block weight
copies concatenated and transposed once per generation call (``Decoder.new_cache(prepare_weights=True)``), RMSNorm
statistics from one ``vector_norm``, QK-norm and RoPE over the q and k heads together, a RoPE table, decode masks
kept by the cache, and a head restricted to ``columns``. The CUDA-graph step
(:mod:`chameleon_lite.generation.static_decode`)
captures the same forward.

Also here: the CPU thread policy of decoding (:func:`decode_threads`, :class:`IntraOpThreads`).
"""

from __future__ import annotations

import torch

from chameleon_lite.model.attention import KVCache
from chameleon_lite.model.decoder import Decoder

SERIAL_MAX_D_MODEL = 1024  # up to this width CPU decoding runs single-threaded (see decode_threads)

__all__ = ["SERIAL_MAX_D_MODEL", "DecodeStep", "IntraOpThreads", "decode_threads", "widen_logits"]


class DecodeStep:
    """One decode step (one new token per row) of a decoder module reading and writing ``cache``, eager.

    Args:
        decoder: a :class:`~chameleon_lite.model.decoder.Decoder` (or a module whose forward takes the same arguments).
        cache: its KV cache, already holding the prefilled prompt (``cache.length > 0``).
        vocab_size: number of logit columns to return (default: the decoder's logical ``vocab_size``).
        static: switch the cache to static mode first (:meth:`KVCache.make_static`: every step the same shapes,
            what the CUDA-graph step replays; eager here, for checking it on any device).

    Calling it with ``tokens`` ``(B,)`` and their RoPE ``positions`` ``(B,)`` runs
    ``decoder(tokens[:, None], position_ids=positions[:, None], cache=cache, columns=columns)``, which writes the
    tokens' keys/values at slot ``cache.length`` and advances the cache, and returns the next-token logits
    ``(B, vocab_size)`` (float32 or wider). Every new token continues the document of its row's last cached
    token. With ``columns=(lo, hi)`` only logits ``[lo, hi)`` are computed; the other columns hold 0 and must be
    masked by the caller.
    """

    def __init__(self, decoder: torch.nn.Module, cache: KVCache, *, vocab_size: int | None = None,
                 static: bool = False) -> None:
        if cache.length < 1:
            raise ValueError("a decode step needs a prefilled cache (cache.length >= 1)")
        self.decoder, self.cache = decoder, cache
        # a Decoder without hooks of its own is called through forward (no nn.Module.__call__ per step)
        hooked = getattr(decoder, "_forward_hooks", None) or getattr(decoder, "_forward_pre_hooks", None)
        self._forward = decoder.forward if isinstance(decoder, Decoder) and not hooked else decoder
        self.vocab_size = vocab_size or decoder.config.vocab_size
        if not 0 < self.vocab_size <= decoder.config.padded_vocab_size:
            raise ValueError(f"vocab_size={self.vocab_size} must lie in [1, {decoder.config.padded_vocab_size}]")
        if static:
            cache.make_static()

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, columns: tuple[int, int] | None = None
    ) -> torch.Tensor:
        lo, hi = columns if columns is not None else (0, self.vocab_size)
        logits = self._forward(tokens[:, None], position_ids=positions[:, None], cache=self.cache, columns=(lo, hi))
        return widen_logits(logits[:, 0], lo, self.vocab_size)  # (B, V)


def widen_logits(part: torch.Tensor, lo: int, vocab_size: int) -> torch.Tensor:
    """Logit columns ``[lo, lo + width)`` ``(B, width)`` placed in a ``(B, vocab_size)`` float tensor (0 elsewhere)."""
    if part.dtype not in (torch.float32, torch.float64):
        part = part.float()
    if (lo, part.shape[-1]) == (0, vocab_size):
        return part
    logits = part.new_zeros(part.shape[0], vocab_size)  # (B, V)
    logits[:, lo : lo + part.shape[-1]] = part
    return logits


def decode_threads(decoder: torch.nn.Module) -> int | None:
    """Intra-op threads for decoding with ``decoder``: 1 on CPU up to ``SERIAL_MAX_D_MODEL``, else None (keep).

    At these sizes every parallel region (``layer_norm``, SDPA, copies of a few MB) costs more than it saves, and
    on a CPU shared with other jobs each one can stall for a scheduler time slice: measured on 2 shared cores,
    a prefill took 3.3 ms single-threaded and ~400 ms with 2 threads while another job ran. MKL runs the small
    matrix products single-threaded anyway.
    """
    weight = getattr(getattr(decoder, "embed_tokens", None), "weight", None)
    d_model = getattr(getattr(decoder, "config", None), "d_model", None)
    if weight is None or d_model is None or weight.device.type != "cpu" or d_model > SERIAL_MAX_D_MODEL:
        return None
    return 1


class IntraOpThreads:
    """Context manager: ``torch.set_num_threads(n)`` inside, the caller's setting restored on exit (None: no-op)."""

    def __init__(self, n: int | None) -> None:
        self.n, self.previous = n, None

    def __enter__(self) -> IntraOpThreads:
        if self.n is not None and self.n != (threads := torch.get_num_threads()):
            self.previous = threads
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            torch.set_num_threads(self.previous)
            self.previous = None
