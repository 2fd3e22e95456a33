"""Attention backends, attention masks and the KV cache used by the decoder.

Three backends compute the same thing (softmax(q k^T / sqrt(d)) v under a causal, document-restricted mask):

* ``"sdpa"``: PyTorch ``F.scaled_dot_product_attention``. Works everywhere (CPU, CUDA, MPS). A single
  document without a cache uses ``is_causal=True`` (lets PyTorch pick the flash kernel); packed sequences
  and cached decoding use a boolean mask ``(B, 1, T_q, T_k)`` built once per forward.
* ``"xformers"``: ``xformers.ops.memory_efficient_attention`` with ``LowerTriangularMask`` (one document)
  or ``BlockDiagonalCausalMask.from_seqlens`` (packed documents: the batch is flattened into one row of
  concatenated documents, so no ``(T, T)`` mask is materialised). CUDA only; xformers is imported lazily
  and is an optional dependency. Calls with a KV cache (incremental decoding) always go through SDPA: the
  mask there is tiny and decode is memory bound.
* ``"flex"``: PyTorch ``flex_attention`` (torch >= 2.5) with a document-causal ``BlockMask``: a fused kernel
  that skips fully masked blocks, so packed documents keep a flash-style kernel without xformers (SDPA with a
  boolean mask cannot use its flash kernel). Used only for packed documents without a cache; plain causal
  forwards and cached decoding go through SDPA. On CUDA ``flex_attention`` is compiled once (uncompiled it
  materialises the full score matrix). On CPU it runs eager and forward only: PyTorch has no flex backward on
  CPU, so training with ``"flex"`` needs CUDA. No attention dropout.

``resolve_backend("auto", device)`` picks xformers on CUDA when it is installed, SDPA otherwise (``"flex"`` is
opt-in); the decoder resolves once per device type and logs the choice.

Documents: ``document_ids`` ``(B, T)`` label each token; a token attends to earlier tokens (and itself)
carrying the same id. Ids are expected to form contiguous runs (what packing produces); the xformers path
treats every run as its own document, SDPA and flex compare ids, so only non-contiguous repeats would differ.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "sdpa", "xformers", "flex")


# ---------------------------------------------------------------------------------------------- backend choice
def xformers_available() -> bool:
    """True when the ``xformers`` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("xformers") is not None


def flex_attention_available() -> bool:
    """True when this torch has ``torch.nn.attention.flex_attention`` (torch >= 2.5)."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """Turn a requested backend (``"auto" | "sdpa" | "xformers" | "flex"``) into the one used on ``device``.

    Raises:
        ValueError: unknown name, ``"xformers"`` forced without CUDA or without xformers installed, or
            ``"flex"`` on a torch without ``flex_attention``.
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention_backend={requested!r} is not one of {BACKENDS}")
    device_type = torch.device(device).type
    if requested == "sdpa":
        return "sdpa"
    if requested == "flex":
        if not flex_attention_available():
            raise ValueError(f"attention_backend='flex' needs torch >= 2.5 (torch {torch.__version__} has no "
                             "torch.nn.attention.flex_attention). Use 'auto' or 'sdpa'.")
        return "flex"
    if requested == "xformers":
        if device_type != "cuda":
            raise ValueError(
                f"attention_backend='xformers' needs a CUDA device (got {device_type!r}); xformers has no CPU "
                "operators. Use 'auto' or 'sdpa'."
            )
        if not xformers_available():
            raise ValueError("attention_backend='xformers' but xformers is not installed (pip install xformers)")
        return "xformers"
    return "xformers" if device_type == "cuda" and xformers_available() else "sdpa"


# ---------------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Preallocated keys/values for incremental decoding, shared by all layers of one decoder.

    ``k``/``v`` have shape ``(n_layers, B, n_kv_heads, max_len, head_dim)``; ``document_ids`` ``(B, max_len)``
    remembers each cached token's document so packed/left-padded prompts keep their masks while decoding.
    A forward over ``T`` new tokens writes slots ``[length, length + T)`` in every layer and then the decoder
    calls :meth:`advance`. Keys are stored after RoPE (positions are baked in).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.document_ids = torch.zeros(batch_size, max_len, device=device, dtype=torch.long)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        """Forget everything (the buffers are reused)."""
        self.length = 0

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise ValueError(f"KV cache full: {self.length} cached + {n_new} new tokens > max_len={self.max_len}")

    def append_document_ids(self, document_ids: torch.Tensor | None, n_new: int) -> torch.Tensor:
        """Store the new tokens' document ids and return those of all tokens so far, ``(B, length + n_new)``.

        Without ``document_ids`` the new tokens continue the document of the last cached token (document 0
        for an empty cache).
        """
        self.check_room(n_new)
        start, end = self.length, self.length + n_new
        if document_ids is None:
            if start == 0:
                self.document_ids[:, start:end] = 0
            else:
                self.document_ids[:, start:end] = self.document_ids[:, start - 1 : start]
        else:
            self.document_ids[:, start:end] = document_ids
        return self.document_ids[:, :end]

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k_new``/``v_new`` ``(B, n_kv_heads, T, head_dim)`` for ``layer``; return all keys/values so far."""
        start, end = self.length, self.length + k_new.shape[2]
        self.k[layer, :, :, start:end] = k_new
        self.v[layer, :, :, start:end] = v_new
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, Hkv, end, hd)

    def advance(self, n_new: int) -> None:
        """Mark ``n_new`` more tokens as cached (called by the decoder after all layers wrote them)."""
        self.check_room(n_new)
        self.length += n_new


# ---------------------------------------------------------------------------------------------- masks
@dataclass
class AttentionMask:
    """What every layer of one forward needs to mask attention; built once by :func:`build_attention_mask`.

    Exactly one of: ``is_causal`` (plain causal, SDPA), ``sdpa_mask`` (boolean ``(B or 1, 1, T_q, T_k)``,
    True = may attend), ``xformers_bias`` (an xformers attention-bias object; q/k/v are flattened to one row)
    or ``flex_block_mask`` (a flex-attention ``BlockMask`` for ``(B, ·, T, T)``).
    """

    backend: str
    is_causal: bool = False
    sdpa_mask: torch.Tensor | None = None
    xformers_bias: Any = None
    flex_block_mask: Any = None


def positions_from_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every document boundary: ``[[7,7,7,2,2]] -> [[0,1,2,0,1]]``, ``(B, T)``."""
    B, T = document_ids.shape
    index = torch.arange(T, device=document_ids.device).expand(B, T)  # (B, T)
    is_start = torch.ones_like(document_ids, dtype=torch.bool)
    is_start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T)
    return index - start_index


def document_lengths(document_ids: torch.Tensor) -> list[int]:
    """Lengths of the runs of equal ids, row after row (rows never merge): ``[[0,0,1],[1,1,1]] -> [2,1,3]``.

    Needs a host sync (used by the xformers path once per forward).
    """
    B, T = document_ids.shape
    is_start = torch.ones_like(document_ids, dtype=torch.bool)
    is_start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    starts = torch.nonzero(is_start.reshape(-1)).flatten().tolist() + [B * T]
    return [b - a for a, b in zip(starts[:-1], starts[1:])]


def build_attention_mask(
    backend: str,
    *,
    batch_size: int,
    q_len: int,
    device: torch.device,
    document_ids: torch.Tensor | None = None,
    cache: KVCache | None = None,
) -> AttentionMask:
    """Build the causal (and same-document) mask for one forward.

    Args:
        backend: a resolved backend (``"sdpa"``, ``"xformers"`` or ``"flex"``).
        document_ids: ``(B, T_q)`` for a plain forward; with a ``cache`` pass the ids of ALL tokens so far,
            ``(B, cache.length + T_q)`` (see :meth:`KVCache.append_document_ids`).
        cache: the KV cache before this forward's tokens were added (its ``length`` is the offset).
    """
    offset = cache.length if cache is not None else 0
    if backend == "xformers" and cache is None:
        from xformers.ops import fmha  # lazy: optional, CUDA-only dependency

        if document_ids is None:
            if batch_size == 1:
                return AttentionMask(backend, xformers_bias=fmha.attn_bias.LowerTriangularMask())
            lengths = [q_len] * batch_size
        else:
            lengths = document_lengths(document_ids)
        return AttentionMask(backend, xformers_bias=fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(lengths))
    if backend == "flex" and cache is None and document_ids is not None:
        if document_ids.shape != (batch_size, q_len):
            raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}, expected {(batch_size, q_len)}")
        return AttentionMask(backend, flex_block_mask=document_causal_block_mask(document_ids))
    if backend not in ("sdpa", "xformers", "flex"):
        raise ValueError(f"unresolved attention backend {backend!r}; call resolve_backend first")

    if document_ids is None and offset == 0:
        return AttentionMask("sdpa", is_causal=True)
    k_len = offset + q_len
    q_index = torch.arange(offset, k_len, device=device)  # (T_q,) positions in the cached sequence
    k_index = torch.arange(k_len, device=device)  # (T_k,)
    mask = (k_index[None, :] <= q_index[:, None])[None, None]  # (1, 1, T_q, T_k)
    if document_ids is not None:
        if document_ids.shape != (batch_size, k_len):
            raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}, expected {(batch_size, k_len)}")
        same_doc = document_ids[:, offset:, None] == document_ids[:, None, :]  # (B, T_q, T_k)
        mask = mask & same_doc[:, None]  # (B, 1, T_q, T_k)
    return AttentionMask("sdpa", sdpa_mask=mask)


def document_causal_block_mask(document_ids: torch.Tensor) -> Any:
    """A flex-attention ``BlockMask`` letting token ``q`` see token ``k`` iff ``k <= q`` and both share a document.

    Args:
        document_ids: ``(B, T)``.

    The mask is built with a compiled ``create_block_mask`` on CUDA (eager on CPU). Blocks of 128x128 with no
    visible pair are skipped by the kernel; a batch of many short documents is therefore cheap.
    """
    from torch.nn.attention.flex_attention import create_block_mask  # lazy: torch >= 2.5

    B, T = document_ids.shape

    def document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    compile_mask = document_ids.device.type == "cuda" and not torch.compiler.is_compiling()  # dynamo traces it
    return create_block_mask(document_causal, B, None, T, T, device=document_ids.device, _compile=compile_mask)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention  # lazy: torch >= 2.5

    return torch.compile(flex_attention, dynamic=False)


def _flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, dropout_p: float) -> torch.Tensor:
    if dropout_p > 0:
        raise ValueError("attention_backend='flex' has no attention dropout; use dropout=0 or the 'sdpa' backend")
    n_rep = q.shape[1] // k.shape[1]
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # inside a compiled decoder: dynamo lowers flex_attention to its fused kernel
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=n_rep > 1)
    if q.device.type == "cuda":
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=n_rep > 1)

    with warnings.catch_warnings():  # "called without torch.compile": expected on CPU, where it is forward-only
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=n_rep > 1)


# ---------------------------------------------------------------------------------------------- attention
def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, dropout_p: float = 0.0
) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    Args:
        q: ``(B, H, T_q, hd)``; k, v: ``(B, H_kv, T_k, hd)`` with ``H % H_kv == 0`` (query head ``h`` reads kv
            head ``h // (H // H_kv)``, as in Llama/Chameleon ``repeat_kv``).
        mask: from :func:`build_attention_mask`.
        dropout_p: attention-probability dropout (pass 0 in eval).

    Returns:
        ``(B, H, T_q, hd)``.
    """
    B, H, T_q, hd = q.shape
    n_rep = H // k.shape[1]
    if mask.xformers_bias is not None:
        return _xformers_attend(q, k, v, mask.xformers_bias, dropout_p)
    if mask.flex_block_mask is not None:
        return _flex_attend(q, k, v, mask.flex_block_mask, dropout_p)
    if mask.sdpa_mask is None:
        # no explicit mask: flash/efficient kernels support GQA natively
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=mask.is_causal, dropout_p=dropout_p, enable_gqa=n_rep > 1
        )
    # with a mask the memory-efficient kernel may not support GQA: repeat kv heads explicitly
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, T_k, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.sdpa_mask, dropout_p=dropout_p)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, H_kv, T, hd) -> (B, H_kv * n_rep, T, hd)``, each kv head repeated ``n_rep`` times in place."""
    if n_rep == 1:
        return x
    B, H_kv, T, hd = x.shape
    return x[:, :, None].expand(B, H_kv, n_rep, T, hd).reshape(B, H_kv * n_rep, T, hd)


def _xformers_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Any, dropout_p: float) -> torch.Tensor:
    from xformers.ops import fmha, memory_efficient_attention  # lazy: optional, CUDA-only dependency

    B, H, T, hd = q.shape
    n_rep = H // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, T, hd)
    if isinstance(bias, fmha.attn_bias.BlockDiagonalCausalMask):
        # documents are concatenated into a single row: (1, B*T, H, hd)
        q_, k_, v_ = (t.transpose(1, 2).reshape(1, B * T, H, hd) for t in (q, k, v))
    else:
        q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, hd)
    out = memory_efficient_attention(q_, k_, v_, attn_bias=bias, p=dropout_p)  # (B or 1, ·, H, hd)
    return out.reshape(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
