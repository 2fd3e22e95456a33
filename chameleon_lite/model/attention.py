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

    Static mode (:meth:`make_static`, after the prefill): the next slot is also kept as a 0-d device tensor
    ``slot``, a forward takes one token per row, writes it at ``slot`` with ``index_copy_`` and attends over all
    ``max_len`` slots under a mask, so every decode step has the same shapes and addresses (what a CUDA graph or
    ``torch.compile(mode="reduce-overhead")`` needs). Eager decoding reads only the ``length + 1`` written slots.
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
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views (B, Hkv, max_len, hd)
        self.slots = torch.arange(max_len, device=device)  # (max_len,) slot indices (static mode's mask)
        self.length = 0
        self.weights: list[dict[str, torch.Tensor]] | None = None  # per-layer weight copies (Decoder.new_cache)
        self.head_weights: dict[tuple[int, int], torch.Tensor] = {}  # output-head copies per column range
        self.slot: torch.Tensor | None = None  # static mode: the next slot as a 0-d device tensor
        self._visible: torch.Tensor | None = None  # decode mask (B, 1, 1, max_len); None: see _visible_ready
        self._visible_ready = False

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        """Forget everything (the buffers are reused; static mode ends)."""
        self.length = 0
        self.slot = None
        self._visible_ready = False

    def make_static(self) -> None:
        """Enter static mode (see the class docstring); the cache must hold the prefilled prompt."""
        if self.length < 1:
            raise ValueError("a static KV cache needs a prefilled prompt (length >= 1)")
        with torch.inference_mode(False):  # a plain tensor: callers may move it outside inference mode
            self.slot = torch.tensor(self.length, device=self.k.device)

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise ValueError(f"KV cache full: {self.length} cached + {n_new} new tokens > max_len={self.max_len}")

    def append_document_ids(self, document_ids: torch.Tensor | None, n_new: int) -> torch.Tensor:
        """Store the new tokens' document ids and return those of all tokens so far, ``(B, length + n_new)``.

        Without ``document_ids`` the new tokens continue the document of the last cached token (document 0
        for an empty cache).
        """
        self.check_room(n_new)
        self._visible_ready = False
        start, end = self.length, self.length + n_new
        if document_ids is None:
            if start == 0:
                self.document_ids[:, start:end] = 0
            else:
                self.document_ids[:, start:end] = self.document_ids[:, start - 1 : start]
        else:
            self.document_ids[:, start:end] = document_ids
        return self.document_ids[:, :end]

    def decode_visibility(self) -> torch.Tensor | None:
        """Which slots a new token that continues its row's last document may see, ``(B, 1, 1, max_len)`` bool, or
        None when every slot is visible (no padding) and the cache is not static.

        Computed once after the prompt: the remaining slots are recorded as that document too, so single-token
        steps need not write document ids.
        """
        if not self._visible_ready:
            length = self.length
            row_document = self.document_ids[:, length - 1 : length]  # (B, 1)
            self.document_ids[:, length:] = row_document
            visible = self.document_ids == row_document  # (B, max_len)
            self._visible = None if bool(visible.all()) else visible[:, None, None, :]
            self._visible_ready = True
        if self.slot is not None and self._visible is None:
            self._visible = torch.ones(self.batch_size, 1, 1, self.max_len, dtype=torch.bool, device=self.k.device)
        return self._visible

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k_new``/``v_new`` ``(B, n_kv_heads, T, head_dim)`` for ``layer``; return the keys/values to attend
        over: those written so far, or in static mode all ``max_len`` slots."""
        k, v = self.layers[layer]  # (B, Hkv, max_len, hd)
        if self.slot is not None:
            where = self.slot.reshape(1)
            k.index_copy_(2, where, k_new)
            v.index_copy_(2, where, v_new)
            return k, v
        start, n = self.length, k_new.shape[2]
        k.narrow(2, start, n).copy_(k_new)
        v.narrow(2, start, n).copy_(v_new)
        return k.narrow(2, 0, start + n), v.narrow(2, 0, start + n)  # (B, Hkv, length + T, hd)

    def advance(self, n_new: int) -> None:
        """Mark ``n_new`` more tokens as cached (called by the decoder after all layers wrote them)."""
        self.check_room(n_new)
        self.length += n_new
        if self.slot is not None:
            self.slot.add_(n_new)


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


_NO_MASK = AttentionMask("sdpa")  # shared by decode steps that see every cached slot (read only)


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


def cache_attention_mask(
    backend: str, cache: KVCache, *, q_len: int, device: torch.device, document_ids: torch.Tensor | None = None
) -> AttentionMask:
    """Record a forward's new tokens in ``cache`` (their document ids) and build its mask.

    One new token per row without ``document_ids`` (a decode step) continues its row's last document and reads
    the mask kept by :meth:`KVCache.decode_visibility` (no mask at all without padding); in static mode the mask
    also hides the slots after ``cache.slot``. Anything else goes through :func:`build_attention_mask`.
    """
    if q_len == 1 and document_ids is None and cache.length > 0:
        cache.check_room(1)
        visible = cache.decode_visibility()  # (B, 1, 1, max_len) or None
        if cache.slot is not None:
            return AttentionMask("sdpa", sdpa_mask=visible & (cache.slots <= cache.slot))  # (B, 1, 1, S)
        if visible is None:
            return _NO_MASK  # every cached slot is visible
        return AttentionMask("sdpa", sdpa_mask=visible[..., : cache.length + 1])  # (B, 1, 1, length + 1)
    if cache.slot is not None:
        raise ValueError("a static KV cache takes one new token per row and no document_ids per forward")
    B, start = cache.batch_size, cache.length
    all_document_ids = cache.append_document_ids(document_ids, q_len)  # (B, start + T)
    if document_ids is not None or start > 0:  # a fresh single-document prefill stays plain causal
        document_ids = all_document_ids
    return build_attention_mask(backend, batch_size=B, q_len=q_len, device=device, document_ids=document_ids,
                                cache=cache)


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
    if T_q == 1 and n_rep > 1 and mask.sdpa_mask.shape[1:3] == (1, 1):
        # one query per row (decoding): fold each kv group's query heads into the query axis, no repeat_kv copy
        y = F.scaled_dot_product_attention(q.reshape(B, H // n_rep, n_rep, hd), k, v, attn_mask=mask.sdpa_mask,
                                           dropout_p=dropout_p)  # (B, H_kv, n_rep, hd)
        return y.reshape(B, H, 1, hd)
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
