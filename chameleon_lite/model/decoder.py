"""The early-fusion decoder shared by the native model and the baseline VLM.

One Llama-style transformer reads and writes a single id space (text pieces, control tokens and VQ image
codes). Its math matches Hugging Face ``ChameleonModel`` so weights port both ways (see ``hf_port.py``).

Notable features:

- RMSNorm (computed in fp32), rotary position embeddings (``rotate_half`` layout), SwiGLU MLP, no biases.
- Grouped-query attention (``n_kv_heads`` divides ``n_heads``).
- QK-norm (switch ``qk_norm``): a LayerNorm over ``head_dim`` with its own weight and bias per head, applied
  to q and k BEFORE RoPE, exactly as Chameleon (eps fixed at 1e-5 as there).
- Swin-norm (switch ``swin_norm``): ``h = x + norm(attn(x)); out = h + norm(mlp(h))`` instead of pre-norm.
- z-loss (``next_token_loss``): ``mean(logsumexp(logits)^2)`` keeps the softmax normaliser near 0.
- Dropout on attention probabilities and on each residual branch.
- Vocabulary padded to a multiple (``pad_vocab_to_multiple_of``) for fast matmuls; padded logit columns are
  filled with the dtype's most negative finite value, so they never win and get zero probability (finite
  rather than ``-inf`` so ``p * log p`` stays 0 instead of NaN).
- Optional tied input/output embeddings.
- Packed sequences: ``document_ids`` restrict causal attention to each document; positions come from the
  caller (``attention.positions_from_document_ids`` derives restarting positions).
- Input ids or input embeddings (the baseline arm feeds projected image features).
- KV cache (``attention.KVCache``) for incremental decoding; gradient checkpointing per block.
- Attention backend (``"auto" | "sdpa" | "xformers" | "flex"``) resolved once per device type and logged.
- Init: ``normal(0, init_std)`` everywhere, residual output projections scaled by ``1/sqrt(2 * n_layers)``.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from chameleon_lite.model.attention import (
    KVCache,
    build_attention_mask,
    cache_attention_mask,
    resolve_backend,
)
from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.layers import (
    Block,
    PerHeadLayerNorm,
    RMSNorm,
    RotaryEmbedding,
    eps_tensor,
    inv_rms,
    prepare_weights,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------- the decoder
class Decoder(nn.Module):
    """Token ids (or embeddings) -> next-token logits ``(B, T, padded_vocab_size)``."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._backend: tuple[str, str] | None = None  # (device type, resolved backend)
        self._rope_table: tuple[tuple, torch.Tensor] | None = None  # (key, (max_seq_len, 2 hd) cos | signed sin)

    def reset_parameters(self) -> None:
        """normal(0, init_std) for every matrix; the residual output projections get std / sqrt(2 * n_layers)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (RMSNorm, PerHeadLayerNorm)):
                nn.init.ones_(module.weight)
                if isinstance(module, PerHeadLayerNorm):
                    nn.init.zeros_(module.bias)
        for block in self.layers:
            for proj in (block.attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))

    # ------------------------------------------------------------------ accessors
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ``ids`` ``(B, T) -> (B, T, d_model)``."""
        return self.embed_tokens(ids)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` leaves out the embedding table and the (untied) output head."""
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once by parameters()
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def new_cache(self, batch_size: int, max_len: int | None = None, *, device=None, dtype=None,
                  prepare_weights: bool = False) -> KVCache:
        """An empty KV cache for ``batch_size`` rows and up to ``max_len`` (default ``max_seq_len``) tokens.

        ``prepare_weights``: the cache also carries inference copies of the blocks' concatenated projection
        weights (:func:`project`; ~3 ms and one copy of the block weights for the benchmark's 5.8M-parameter
        decoder), which forwards with this cache read while grad is off: decode steps get faster, and the copies
        live as long as the cache (one generation call), so weights changed later are never served stale.
        """
        weight = self.embed_tokens.weight
        c = self.config
        cache = KVCache(c.n_layers, batch_size, c.n_kv_heads, c.head_dim, max_len or c.max_seq_len,
                        device=device or weight.device, dtype=dtype or weight.dtype)
        if prepare_weights:
            cache.weights = [block.prepare_weights() for block in self.layers]
        return cache

    def attention_backend(self, device: torch.device) -> str:
        """The backend used on ``device`` (resolved once per device type and logged)."""
        if self._backend is None or self._backend[0] != device.type:
            backend = resolve_backend(self.config.attention_backend, device)
            log.info("decoder attention backend: %s (requested %r, device %s)",
                     backend, self.config.attention_backend, device.type)
            self._backend = (device.type, backend)
        return self._backend[1]

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ``cos`` and signed ``sin`` (see :func:`apply_rotary`) of ``position_ids`` ``(B, T)``, each
        ``(B, 1, T, hd)`` (broadcast over heads), gathered from a table of every position below ``max_seq_len``
        (built once per device and dtype from ``self.rotary``, outside any inference mode so training can use it)."""
        inv_freq = self._modules["rotary"]._buffers["inv_freq"]  # no nn.Module.__getattr__ per step
        key = (inv_freq.device, dtype, inv_freq.data_ptr(), inv_freq._version)
        if self._rope_table is None or self._rope_table[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                positions = torch.arange(self.config.max_seq_len, device=inv_freq.device)[None]  # (1, P)
                cos, sin = self.rotary(positions, dtype)  # (1, P, hd) each
                half = self.config.head_dim // 2
                sin_signed = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)  # (P, hd)
                self._rope_table = (key, torch.cat((cos[0], sin_signed), dim=1))  # (P, 2 hd)
        cos_sin = torch.embedding(self._rope_table[1], position_ids)  # (B, T, 2 hd): a row gather, one op
        return cos_sin.unsqueeze(1).chunk(2, dim=-1)  # (B, 1, T, hd) each

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        columns: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Logits for every position: training, prefill and single-token decoding are this one function.

        Args:
            input_ids: ``(B, T)`` token ids; exactly one of ``input_ids`` / ``inputs_embeds``.
            inputs_embeds: ``(B, T, d_model)`` input embeddings (e.g. ``embed(ids)`` with image features spliced in).
            position_ids: ``(B, T)`` RoPE positions; default ``cache.length + 0..T-1``. For packed rows pass
                positions restarting per document.
            document_ids: ``(B, T)`` ints; attention is causal AND within the same document.
            cache: a ``KVCache``; the new tokens' keys/values are written at slots ``cache.length ..`` and
                ``cache.length`` advances by T. ``T == 1`` without ``document_ids`` is a decode step: the token
                continues its row's last document. A static cache (:meth:`KVCache.make_static`) gives every decode
                step the same shapes (CUDA graphs: ``chameleon_lite.generation.static_decode``).
            columns: ``(lo, hi)``: compute only logit columns ``[lo, hi)`` (the output head is the largest matrix;
                a caller that masks all other columns anyway skips most of it).

        Returns:
            ``(B, T, padded_vocab_size)`` (or ``(B, T, hi - lo)``); columns ``>= vocab_size`` hold the dtype's
            minimum.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
            x = torch.embedding(self._modules["embed_tokens"].weight, input_ids)  # (B, T, d); F.embedding's op
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.d_model:
                shape = tuple(inputs_embeds.shape)
                raise ValueError(f"inputs_embeds must be (B, T, {self.config.d_model}), got {shape}")
            x = inputs_embeds
        B, T, _ = x.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_len:
            limit = self.config.max_seq_len
            raise ValueError(f"sequence of {start} cached + {T} new tokens exceeds max_seq_len={limit}")
        for name, ids in (("position_ids", position_ids), ("document_ids", document_ids)):
            if ids is not None and ids.shape != (B, T):
                raise ValueError(f"{name} has shape {tuple(ids.shape)}, expected {(B, T)}")
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=x.device).expand(B, T)  # (B, T)
        backend = self.attention_backend(x.device)
        if cache is None:
            mask = build_attention_mask(backend, batch_size=B, q_len=T, device=x.device, document_ids=document_ids)
        else:
            if cache.batch_size != B:
                raise ValueError(f"cache was made for batch size {cache.batch_size}, got {B}")
            mask = cache_attention_mask(backend, cache, q_len=T, device=x.device, document_ids=document_ids)
        rope = self.rope(position_ids, x.dtype)  # (B, 1, T, hd) each

        if cache is not None and cache.weights is not None and not torch.is_grad_enabled():
            # inference with the cache's weight copies: (B T, d) rows, no module hooks to run
            x = x.reshape(B * T, -1)
            for block, prepared in zip(self._modules["layers"], cache.weights):
                x = block.forward(x, rope, mask, cache, prepared)
            cache.advance(T)
            # the output head's copy pays off over many decode steps; a prefill reads the parameter itself (a
            # copy of the whole head there costs more than its one product saves)
            if T > 1:
                return self.logits(x, columns).view(B, T, -1)
            return self.logits(x, columns, cache.head_weights).view(B, T, -1)
        use_checkpoint = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for block in self.layers:
            if use_checkpoint:
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.logits(x, columns)

    def logits(self, x: torch.Tensor, columns: tuple[int, int] | None = None,
               prepared: dict[tuple[int, int], torch.Tensor] | None = None) -> torch.Tensor:
        """Final norm and output head of the last hidden states ``x`` ``(..., d)``: all padded columns, or only
        ``columns=(lo, hi)``.

        ``prepared`` (a cache's ``head_weights``, read while grad is off): the head rows of each ``columns`` value
        asked for are copied into it once, transposed and with the final norm's weight folded in (see
        :func:`prepare_weights`), and read from there by later calls.
        """
        V, padded = self.config.vocab_size, self.config.padded_vocab_size
        lo, hi = (0, padded) if columns is None else columns
        if not 0 <= lo < hi <= padded:
            raise ValueError(f"columns={columns} must satisfy 0 <= lo < hi <= {padded}")
        if prepared is not None and not torch.is_grad_enabled():
            weight = prepared.get((lo, hi))
            if weight is None:
                weight = prepared[(lo, hi)] = prepare_weights([self.lm_head.weight[lo:hi]], self.norm.weight)
            r = inv_rms(x, eps_tensor(self.norm.eps, x.device, x.dtype))  # (..., 1)
            # (..., hi - lo): 1/rms scales the (fewer) outputs
            logits = (torch.mm(x, weight) if x.dim() == 2 else torch.matmul(x, weight)).mul_(r)
        else:
            weight = self.lm_head.weight if (lo, hi) == (0, padded) else self.lm_head.weight[lo:hi]
            logits = F.linear(self.norm(x), weight)  # (..., hi - lo)
        if hi > V:
            logits = mask_padded_logits(logits, V - lo)
        return logits


def mask_padded_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set columns ``>= vocab_size`` to the dtype's most negative finite value (out of place)."""
    padded = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size  # (V_padded,)
    return logits.masked_fill(padded, torch.finfo(logits.dtype).min)


# ---------------------------------------------------------------------------------------------- loss
def next_token_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    z_loss_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Weighted cross-entropy plus z-loss over the counted tokens.

    Args:
        logits: ``(B, T, V)`` (padded columns allowed: they hold a huge negative value).
        targets: ``(B, T)`` already aligned with ``logits`` (``targets[:, t]`` is the token that follows
            input ``t``); ``-100`` marks tokens that do not count.
        weights: optional ``(B, T)`` per-token weights (a 0/1 loss mask or per-modality weights). A token
            counts when its target is not ``-100`` and its weight is > 0.
        z_loss_weight: multiplier of ``z_loss``.

    Returns:
        dict with ``loss = ce + z_loss_weight * z_loss`` (scalar, differentiable); ``ce`` = weighted mean
        ``sum(w * ce_t) / sum(w)`` over counted tokens; ``z_loss`` = unweighted mean of
        ``logsumexp(logits_t)^2`` over counted tokens; ``ce_sum`` = ``sum(w * ce_t)`` and ``weight_sum`` (for
        exact averaging across micro-batches/ranks); ``n_tokens`` (counted tokens) and ``accuracy`` (argmax
        hits among counted tokens, detached). With no counted token every value is 0.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    if weights is not None and weights.shape != targets.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must match targets {tuple(targets.shape)}")
    logits32 = logits.float().reshape(-1, logits.shape[-1])  # (N, V)
    flat_targets = targets.reshape(-1)  # (N,)
    counted = flat_targets != IGNORE_INDEX  # (N,)
    w = counted.float() if weights is None else weights.reshape(-1).float() * counted
    counted = counted & (w > 0)
    ce_tok = F.cross_entropy(logits32, flat_targets, ignore_index=IGNORE_INDEX, reduction="none")  # (N,)
    lse = torch.logsumexp(logits32, dim=-1)  # (N,)
    n_tokens = counted.sum()
    weight_sum = w.sum()
    ce_sum = (w * ce_tok).sum()
    ce = torch.where(weight_sum > 0, ce_sum / weight_sum.clamp(min=1e-12), ce_sum * 0.0)
    z_loss = (lse.square() * counted).sum() / n_tokens.clamp(min=1)
    with torch.no_grad():
        hits = (logits32.argmax(-1) == flat_targets) & counted
        accuracy = hits.sum() / n_tokens.clamp(min=1)
    return {
        "loss": ce + z_loss_weight * z_loss,
        "ce": ce,
        "z_loss": z_loss,
        "ce_sum": ce_sum,
        "weight_sum": weight_sum,
        "n_tokens": n_tokens,
        "accuracy": accuracy,
    }
