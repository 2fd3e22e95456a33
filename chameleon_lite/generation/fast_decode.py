"""A lean single-token decode step for :class:`~chameleon_lite.model.decoder.Decoder` (inference only).

``Decoder.forward`` is general (packed documents, prefill, training, checkpointing, validation); at batch 1 on
a CPU its per-step cost is mostly Python and per-op overhead around ~30 small matrix-vector products.
:class:`FastDecodeStep` computes the SAME function for the one-new-token-per-row case with as few tensor ops as
possible. The generation engine builds one per call, after prefilling the prompts through ``Decoder.forward``
into a :class:`~chameleon_lite.model.attention.KVCache`, and the step then reads and writes that cache.

Notable choices (all derived at build time from the decoder's parameters: the decoder is not modified, so its
state dict, training checkpoints and the Hugging Face port are untouched):

- Fused projections: per block one ``(d, q|k|v)`` and one ``(d, gate|up)`` matrix, stored transposed like the
  output projections (``x @ W_t`` is MKL's fastest orientation for 1-3 rows). Building them copies the block
  weights once per call (~3 ms for the benchmark's 5.8M-parameter model); nothing is cached on the decoder, so
  weights changed in place can never be served stale.
- RMSNorm folded into the next projection: ``(w * x * r) @ W^T == (x @ (W * w)^T) * r``, with the row's
  ``r = rsqrt(mean(x^2) + eps)`` (fp32 statistics, as ``RMSNorm``) from one ``vector_norm``. Swin-norm blocks
  normalise the branch outputs instead, so there the norms are applied as written.
- QK-norm of all q and k heads in one ``layer_norm`` + ``addcmul``; RoPE in one ``roll`` + ``mul`` +
  ``addcmul`` with cos/sin tables precomputed for every position (``rotate_half(x) == roll(x, hd/2) * sign``).
- Attention over the cached prefix with one SDPA call (grouped-query heads natively); left-padding slots are
  excluded by an additive ``-inf`` bias computed once from the cache's document ids.
- Residual adds fused into the output projections (``addmm``); the head computes only the logical vocabulary,
  or only a column range the caller asks for (image codes: a fifth of it).
- Single-threaded on CPU for small models (:func:`decode_threads`): every parallel region costs more than it
  saves at these sizes, and stalls for a scheduler slice when the cores are shared.

The result equals ``Decoder.forward(tokens[:, None], position_ids=positions[:, None], cache=cache)[:, -1, :V]``
up to floating-point rounding (``tests/test_fast_decode.py``). Dropout is not applied, so
:meth:`FastDecodeStep.supports` refuses a decoder in training mode with dropout > 0. ``torch.compile`` of the
step was tried (16 s to compile, no faster than this eager step on CPU) and is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chameleon_lite.model.attention import KVCache
from chameleon_lite.model.decoder import Decoder, PerHeadLayerNorm

SERIAL_MAX_D_MODEL = 1024  # up to this width CPU decoding runs single-threaded (see decode_threads)


@dataclass
class _LayerWeights:
    """One block's weights as the step uses them."""

    qkv_t: torch.Tensor  # (d, (H + 2Hkv) hd) fused q|k|v projection, transposed; prenorm: attn_norm folded in
    o_t: torch.Tensor  # (H hd, d)
    gate_up_t: torch.Tensor  # (d, 2 hidden) fused gate|up projection, transposed; prenorm: mlp_norm folded in
    down_t: torch.Tensor  # (hidden, d)
    qk_weight: torch.Tensor | None  # (H + Hkv, hd) per-head LayerNorm weights of q then k; None without QK-norm
    qk_bias: torch.Tensor | None  # (H + Hkv, hd)
    attn_norm: torch.Tensor  # (d,) used only with swin-norm
    mlp_norm: torch.Tensor  # (d,) used only with swin-norm
    k_cache: torch.Tensor  # (B, Hkv, max_len, hd) this layer's slice of the KV cache
    v_cache: torch.Tensor  # (B, Hkv, max_len, hd)


def check_decode_step_inputs(step_name: str, decoder: Decoder, cache: KVCache) -> None:
    """Raise ``ValueError`` unless ``decoder`` is supported (:meth:`FastDecodeStep.supports`) and ``cache`` holds a
    prefilled prompt; ``step_name`` names the step class in the message."""
    if not FastDecodeStep.supports(decoder):
        raise ValueError(f"{step_name} needs a chameleon_lite Decoder in eval mode (or with dropout=0)")
    if cache.length < 1:
        raise ValueError(f"{step_name} needs a prefilled cache (cache.length >= 1)")


class FastDecodeStep:
    """One decode step (one new token per row) of a :class:`Decoder` reading and writing ``cache``.

    Args:
        decoder: the decoder (eval mode, or dropout 0); see :meth:`supports`.
        cache: its KV cache, already holding the prefilled prompt (``cache.length > 0``).
        vocab_size: number of logit columns to return (default: the decoder's logical ``vocab_size``).
        head_columns: ``(lo, hi)`` head rows to keep a transposed copy of (see below), or None.

    Calling it with ``tokens`` ``(B,)`` and their RoPE ``positions`` ``(B,)`` writes the tokens' keys/values at
    slot ``cache.length``, advances the cache and returns the next-token logits ``(B, vocab_size)`` (float32 or
    wider). Every new token continues the document of the last cached token of its row (what
    ``Decoder.forward`` does when given no ``document_ids``). With ``columns=(lo, hi)`` only logits
    ``[lo, hi)`` are computed (the output head is the largest matrix; a caller that will mask every other
    column anyway, e.g. image codes only, skips most of it); the other columns hold 0 and must be masked by the
    caller. ``head_columns`` (a ``columns`` value, or ``(0, vocab_size)`` for all) keeps a transposed copy of
    those head rows, which makes the head product of calls asking for them ~20% faster: worth it when many
    steps will (the engine passes it from 64 new tokens on).
    """

    def __init__(
        self, decoder: Decoder, cache: KVCache, *, vocab_size: int | None = None,
        head_columns: tuple[int, int] | None = None,
    ) -> None:
        check_decode_step_inputs("FastDecodeStep", decoder, cache)
        config = decoder.config
        self.decoder, self.cache = decoder, cache
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.gqa = self.n_heads != self.n_kv_heads
        self.eps = config.norm_eps
        weight = decoder.embed_tokens.weight
        self.stats_dtype = None if weight.dtype == torch.float64 else torch.float32  # RMSNorm statistics: >= fp32
        self.eps_tensor = torch.tensor([self.eps], device=weight.device, dtype=self.stats_dtype or weight.dtype)
        self.inv_d = 1.0 / config.d_model
        self.swin_norm = config.swin_norm
        self.vocab_size = vocab_size or config.vocab_size
        if not 0 < self.vocab_size <= config.padded_vocab_size:
            raise ValueError(f"vocab_size={self.vocab_size} must lie in [1, {config.padded_vocab_size}]")
        self.embedding = decoder.embed_tokens.weight  # (V_padded, d)
        device, dtype = self.embedding.device, self.embedding.dtype
        self.final_norm = decoder.norm.weight  # (d,)
        self.head = decoder.lm_head.weight[: self.vocab_size]  # (V, d) contiguous rows, no copy
        # a transposed copy of the head columns most steps will ask for: ~20% faster products, copied once
        self.head_columns = tuple(head_columns) if head_columns is not None else None
        self.head_t = None if head_columns is None else _fused_t([self.head[head_columns[0] : head_columns[1]]])
        self.threads = decode_threads(decoder)
        self.layers = [self._layer_weights(block, i) for i, block in enumerate(decoder.layers)]

        # RoPE tables for every position; sin carries the sign of rotate_half: roll(x, hd/2) * sin_signed
        positions = torch.arange(config.max_seq_len, device=device)[None]  # (1, P)
        cos, sin = decoder.rotary(positions, dtype)  # (1, P, hd) each
        half = self.head_dim // 2
        sin_signed = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)  # (P, hd)
        self.cos_sin = torch.stack((cos[0], sin_signed), dim=1)  # (P, 2, hd)

        # every new token continues the document of its row's last cached token: mask the other slots (left pad)
        length = cache.length
        row_document = cache.document_ids[:, length - 1 : length]  # (B, 1)
        cache.document_ids[:, length:] = row_document  # what Decoder.forward would record for the new tokens
        visible = cache.document_ids == row_document  # (B, max_len)
        if bool(visible.all()):
            self.bias = None  # no padding: attend to the whole prefix
        else:
            bias = torch.zeros(visible.shape, device=device, dtype=dtype)
            self.bias = bias.masked_fill(~visible, float("-inf"))[:, None, None, :]  # (B, 1, 1, max_len)

    @staticmethod
    def supports(decoder: torch.nn.Module) -> bool:
        """True for a plain :class:`Decoder` (forward not overridden) that applies no dropout."""
        return (isinstance(decoder, Decoder) and type(decoder).forward is Decoder.forward
                and (not decoder.training or decoder.config.dropout == 0))

    def _layer_weights(self, block: torch.nn.Module, layer: int) -> _LayerWeights:
        attn, mlp = block.attn, block.mlp
        attn_scale = mlp_scale = None
        if not self.swin_norm:  # pre-norm: fold the norm weights into the columns of the next projection
            attn_scale, mlp_scale = block.attn_norm.weight, block.mlp_norm.weight
        qk_weight = qk_bias = None
        if isinstance(attn.q_norm, PerHeadLayerNorm):
            self.qk_eps = attn.q_norm.eps
            qk_weight = torch.cat([attn.q_norm.weight, attn.k_norm.weight])  # (H + Hkv, hd)
            qk_bias = torch.cat([attn.q_norm.bias, attn.k_norm.bias])
        return _LayerWeights(
            qkv_t=_fused_t([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], attn_scale),
            o_t=_fused_t([attn.o_proj.weight]),
            gate_up_t=_fused_t([mlp.gate_proj.weight, mlp.up_proj.weight], mlp_scale),
            down_t=_fused_t([mlp.down_proj.weight]),
            qk_weight=qk_weight, qk_bias=qk_bias, attn_norm=block.attn_norm.weight, mlp_norm=block.mlp_norm.weight,
            k_cache=self.cache.k[layer], v_cache=self.cache.v[layer],
        )

    def _inv_rms(self, x: torch.Tensor) -> torch.Tensor:
        """``rsqrt(mean(x^2) + eps)`` per row with fp32 statistics (RMSNorm's), ``(B, 1)``.

        Computed as ``rsqrt(eps + |x|^2 / d)`` from one ``vector_norm``: three ops instead of ``pow`` + ``mean`` +
        ``add`` + ``rsqrt`` (``mean`` dispatches ``sum`` and ``div``; a Python-float ``add`` converts the scalar).
        """
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=self.stats_dtype)  # (B, 1)
        return torch.addcmul(self.eps_tensor, norm, norm, value=self.inv_d).rsqrt_()

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, columns: tuple[int, int] | None = None
    ) -> torch.Tensor:
        with IntraOpThreads(self.threads):
            return self._step(tokens, positions, columns)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, columns: tuple[int, int] | None) -> torch.Tensor:
        cache = self.cache
        cache.check_room(1)
        slot = cache.length
        B, H, Hkv, hd = tokens.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        swin = self.swin_norm
        x = F.embedding(tokens, self.embedding)  # (B, d)
        cos_sin = self.cos_sin.index_select(0, positions)  # (B, 2, hd)
        cos, sin = cos_sin[:, :1], cos_sin[:, 1:]  # (B, 1, hd) each, broadcast over heads
        bias = self.bias[..., : slot + 1] if self.bias is not None else None  # (B, 1, 1, slot + 1)
        for w in self.layers:
            # ---- attention
            qkv = torch.mm(x, w.qkv_t)  # (B, (H + 2Hkv) hd)
            if not swin:
                qkv.mul_(self._inv_rms(x))
            qkv = qkv.view(B, H + 2 * Hkv, hd)
            qk = qkv[:, : H + Hkv]  # (B, H + Hkv, hd)
            if w.qk_weight is not None:
                qk = torch.addcmul(w.qk_bias, F.layer_norm(qk, (hd,), eps=self.qk_eps), w.qk_weight)
            qk = torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin)  # RoPE, (B, H + Hkv, hd)
            w.k_cache.select(2, slot).copy_(qk[:, H:])  # (B, Hkv, hd)
            w.v_cache.select(2, slot).copy_(qkv[:, H + Hkv :])  # (B, Hkv, hd)
            y = F.scaled_dot_product_attention(
                qk[:, :H, None], w.k_cache.narrow(2, 0, slot + 1), w.v_cache.narrow(2, 0, slot + 1),
                attn_mask=bias, enable_gqa=self.gqa,
            )  # (B, H, 1, hd)
            y = y.reshape(B, H * hd)
            if swin:
                x = x + _rms_norm(torch.mm(y, w.o_t), w.attn_norm, self.eps)
            else:
                x = torch.addmm(x, y, w.o_t)  # (B, d) residual + o_proj
            # ---- MLP
            gate_up = torch.mm(x, w.gate_up_t)  # (B, 2 hidden)
            if not swin:
                gate_up.mul_(self._inv_rms(x))
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = F.silu(gate).mul_(up)  # (B, hidden)
            if swin:
                x = x + _rms_norm(torch.mm(hidden, w.down_t), w.mlp_norm, self.eps)
            else:
                x = torch.addmm(x, hidden, w.down_t)  # (B, d) residual + down_proj
        cache.advance(1)
        h = x * self.final_norm  # (B, d); the norm's 1/rms is applied to the (fewer) logits
        lo, hi = columns if columns is not None else (0, self.vocab_size)
        if (lo, hi) == self.head_columns:
            part = torch.mm(h, self.head_t)  # (B, hi - lo)
        else:
            part = F.linear(h, self.head if (lo, hi) == (0, self.vocab_size) else self.head[lo:hi])
        part = part.mul_(self._inv_rms(x))
        if (lo, hi) == (0, self.vocab_size):
            return self._as_float(part)  # (B, V)
        logits = h.new_zeros(B, self.vocab_size)  # (B, V)
        logits[:, lo:hi] = part
        return self._as_float(logits)

    @staticmethod
    def _as_float(logits: torch.Tensor) -> torch.Tensor:
        return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


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


def _fused_t(weights: list[torch.Tensor], scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(cat(weights) * scale).t()`` as a new contiguous ``(d_in, sum d_out)`` matrix, written in one pass.

    ``weights`` are ``(d_out_i, d_in)`` linear weights; ``scale`` ``(d_in,)`` multiplies their input columns.
    """
    d_in = weights[0].shape[1]
    fused = weights[0].new_empty(d_in, sum(w.shape[0] for w in weights))  # (d_in, sum d_out)
    start = 0
    for w in weights:
        target = fused[:, start : start + w.shape[0]]  # (d_in, d_out_i)
        if scale is None:
            target.copy_(w.t())
        else:
            torch.mul(w.t(), scale[:, None], out=target)
        start += w.shape[0]
    return fused


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same math as ``model.RMSNorm`` (statistics in fp32)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
    return weight * x32.to(x.dtype)
