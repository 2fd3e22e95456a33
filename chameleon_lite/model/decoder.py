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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from chameleon_lite.model.attention import (
    BACKENDS,
    AttentionMask,
    KVCache,
    attend,
    build_attention_mask,
    cache_attention_mask,
    resolve_backend,
)

log = logging.getLogger(__name__)

QK_NORM_EPS = 1e-5  # Chameleon's per-head LayerNorm uses the nn.LayerNorm default, independent of norm_eps
IGNORE_INDEX = -100


@dataclass
class DecoderConfig:
    """Shape and switches of the decoder. Plain types only (round-trips through ``asdict``/OmegaConf/CLI).

    Args:
        vocab_size: logical vocabulary size (``Vocab.size``).
        pad_vocab_to_multiple_of: embedding/output rows are padded to a multiple of this (see ``padded_vocab_size``).
        d_model: residual width.
        n_layers: number of transformer blocks.
        n_heads: query heads; ``head_dim = d_model // n_heads`` (must be even for RoPE).
        n_kv_heads: key/value heads (grouped-query attention); ``None`` means ``n_heads``. Must divide ``n_heads``.
        mlp_hidden: SwiGLU hidden width; ``None`` derives Llama's ``2/3 * 4 * d_model`` rounded up to
            ``mlp_multiple_of``.
        mlp_multiple_of: rounding for the derived ``mlp_hidden``.
        max_seq_len: longest sequence (incl. cached tokens) one forward may see.
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        qk_norm: per-head LayerNorm on q and k before RoPE.
        swin_norm: Chameleon's swin-norm ordering instead of pre-norm.
        z_loss_weight: weight of the z-loss; read by the training code and passed to ``next_token_loss``.
        dropout: attention-probability and residual dropout.
        tie_embeddings: share the input embedding and the output projection.
        attention_backend: ``"auto"``, ``"sdpa"``, ``"xformers"`` or ``"flex"`` (see
        ``chameleon_lite.model.attention``).
        init_std: std of the normal init.
        gradient_checkpointing: recompute each block in the backward pass (training only).
    """

    vocab_size: int = 1024
    pad_vocab_to_multiple_of: int = 64
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    mlp_hidden: int | None = None
    mlp_multiple_of: int = 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = True
    swin_norm: bool = False
    z_loss_weight: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = False
    attention_backend: str = "auto"
    init_std: float = 0.02
    gradient_checkpointing: bool = False

    @classmethod
    def from_name(cls, name: str, **overrides: object) -> DecoderConfig:
        """The decoder preset ``name`` (``chameleon_lite.model.presets``) with ``overrides`` (litgpt's idea)."""
        from chameleon_lite.model.presets import preset
        return cls(**{**preset(name), **overrides})

    def __post_init__(self) -> None:
        for name in ("vocab_size", "pad_vocab_to_multiple_of", "d_model", "n_layers", "n_heads", "mlp_multiple_of",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must be >= 1 and divide n_heads={self.n_heads}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (d_model / n_heads) must be even for RoPE")
        if self.mlp_hidden is None:
            hidden = int(2 * 4 * self.d_model / 3)
            self.mlp_hidden = self.mlp_multiple_of * math.ceil(hidden / self.mlp_multiple_of)
        if self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden={self.mlp_hidden} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.z_loss_weight < 0:
            raise ValueError(f"z_loss_weight={self.z_loss_weight} must be >= 0")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r} must be one of {BACKENDS}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to_multiple_of
        return m * math.ceil(self.vocab_size / m)


# ---------------------------------------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, statistics in fp32 (as Llama/Chameleon); see :func:`rms_norm`."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


_EPS_TENSORS: dict[tuple, torch.Tensor] = {}


def eps_tensor(eps: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``eps`` as a 0-d tensor in the statistics dtype of ``dtype`` (fp64 for fp64, else fp32; ``addcmul`` takes no
    Python scalar as its base), made once per device and dtype outside any inference mode."""
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    key = (eps, device, stats_dtype)
    tensor = _EPS_TENSORS.get(key)
    if tensor is None:
        with torch.inference_mode(False):
            tensor = _EPS_TENSORS[key] = torch.tensor(eps, device=device, dtype=stats_dtype)
    return tensor


def inv_rms(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """RMSNorm's ``rsqrt(mean(x^2) + eps)`` over the last axis of ``x``, ``(..., 1)`` in ``eps``'s dtype (the
    statistics dtype, see :func:`rms_norm`; ``eps`` from :func:`eps_tensor`).

    ``mean(x^2)`` is computed as ``|x|^2 / d`` from one ``vector_norm``: three ops for the statistics instead of
    ``pow`` + ``sum`` + ``div`` + ``add`` + ``rsqrt`` (at decode sizes the per-op cost is the cost).
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=eps.dtype)  # (..., 1)
    return torch.addcmul(eps, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()  # (..., 1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` over its last axis, statistics in fp32 (fp64 for fp64 ``x``); ``weight=None`` leaves the
    scale out (a caller that folded it into the next projection). See :func:`inv_rms`."""
    r = inv_rms(x, eps_tensor(eps, x.device, x.dtype))  # (..., 1) in the statistics dtype
    stats_dtype = r.dtype
    if x.dtype == stats_dtype:
        y = x * r
        return y if weight is None else y * weight
    y = (x.to(stats_dtype) * r).to(x.dtype)
    return y if weight is None else weight * y


class PerHeadLayerNorm(nn.Module):
    """LayerNorm over ``head_dim`` with a separate weight and bias per head (Chameleon's QK-norm)."""

    def __init__(self, n_heads: int, head_dim: int, eps: float = QK_NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, H, hd)
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight + self.bias


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary position ids (``rotate_half`` layout: frequencies repeated twice)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (hd/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(..., hd)`` by RoPE: ``x * cos + rotate_half(x) * sin``, with ``rotate_half(x)`` written as
    ``roll(x, hd/2) * sign`` and the sign carried by ``sin_signed`` (``[-sin, sin]`` halves, see
    :meth:`Decoder.rope`); ``cos``/``sin_signed`` broadcast against ``x``."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


def project(x: torch.Tensor, weights: list[torch.Tensor], prepared: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, cat(weights))``: one product for several projections of the same input (q|k|v, gate|up).

    ``prepared`` is ``cat(weights)`` ready-made (:func:`prepare_weights`, carried by a KV cache made with
    ``Decoder.new_cache(prepare_weights=True)``, read only while grad is off), transposed and contiguous:
    ``x @ W^T`` is MKL's fastest orientation for the few rows of a decode step (about half the time of
    ``F.linear`` there). Without it the weights are concatenated on every call, so gradients reach the parameters.
    """
    if prepared is None:
        return F.linear(x, weights[0] if len(weights) == 1 else torch.cat(weights))
    return torch.matmul(x, prepared)  # prepared: (d_in, d_out)


def prepare_weights(weights: list[torch.Tensor], input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The ready-made concatenation :func:`project` reads (a plain tensor, usable inside and outside inference
    mode). ``input_scale`` ``(d_in,)`` multiplies its input columns: a pre-norm block folds its RMSNorm weight
    into the next projection, ``(w * x) @ W^T == x @ (W * w)^T``, one op less per norm."""
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.cat(weights) if len(weights) > 1 else weights[0].clone()
        if input_scale is not None:
            weight = weight * input_scale
        return weight.t().contiguous()  # (d_in, d_out)


class Attention(nn.Module):
    """Grouped-query self-attention with optional QK-norm; reads/writes a ``KVCache`` when given one.

    q, k and v come from one product with the concatenated projection weights (see :func:`project`); QK-norm
    and RoPE then run once over the q and k heads together.
    """

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.dropout = config.dropout
        d, hd = config.d_model, config.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        self.q_norm = PerHeadLayerNorm(self.n_heads, hd) if config.qk_norm else nn.Identity()
        self.k_norm = PerHeadLayerNorm(self.n_kv_heads, hd) if config.qk_norm else nn.Identity()
        self.qk_norm, self.qk_eps = config.qk_norm, QK_NORM_EPS

    def prepare_weights(self, input_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Copies of the concatenated weights for inference (see :func:`prepare_weights`)."""
        qkv = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
        prepared = {"qkv": prepare_weights(qkv, input_scale), "o": prepare_weights([self.o_proj.weight])}
        if self.qk_norm:
            with torch.inference_mode(False), torch.no_grad():
                prepared["qk_weight"] = torch.cat([self.q_norm.weight, self.k_norm.weight])[:, None]  # (H + Hkv, 1, hd)
                prepared["qk_bias"] = torch.cat([self.q_norm.bias, self.k_norm.bias])[:, None]
        return prepared

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: KVCache | None = None,
        prepared: dict[str, torch.Tensor] | None = None,
        residual: torch.Tensor | None = None,
        x_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention of ``x`` ``(B, T, d)``, or with ``prepared`` (see :func:`project`) of ``x`` ``(B T, d)``.

        With ``prepared`` only (inference): ``x_scale`` ``(B T, 1)`` multiplies the rows of ``x`` (a pre-norm
        block's ``1/rms``, applied to the product's output: ``(r x) @ W == r (x @ W)`` for a per-row scalar), and
        ``residual`` ``(B T, d)`` is added to the output in the output projection's ``addmm``.
        """
        B, _, T, _ = rope[0].shape  # (B, 1, T, hd)
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if prepared is None:
            qkv = project(x, [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        else:
            qkv = torch.mm(x, prepared["qkv"])  # see project
            if x_scale is not None:
                qkv.mul_(x_scale)
        if T == 1:  # (B, 1, H + 2Hkv, hd) and (B, H + 2Hkv, 1, hd) share one layout: one view op
            qkv = qkv.view(B, H + 2 * Hkv, 1, hd)
        else:
            qkv = qkv.view(B, T, H + 2 * Hkv, hd).transpose(1, 2)  # (B, H + 2Hkv, T, hd)
        qk, v = qkv.narrow(1, 0, H + Hkv), qkv.narrow(1, H + Hkv, Hkv)  # (B, H + Hkv, T, hd), (B, Hkv, T, hd)
        if self.qk_norm:
            if prepared is None:
                norm_weight = torch.cat([self.q_norm.weight, self.k_norm.weight])[:, None]  # (H + Hkv, 1, hd)
                norm_bias = torch.cat([self.q_norm.bias, self.k_norm.bias])[:, None]
            else:
                norm_weight, norm_bias = prepared["qk_weight"], prepared["qk_bias"]
            qk = torch.addcmul(norm_bias, torch.layer_norm(qk, (hd,), None, None, self.qk_eps), norm_weight)
        qk = apply_rotary(qk, *rope)  # rope: (B, 1, T, hd) each
        q, k = qk.narrow(1, 0, H), qk.narrow(1, H, Hkv)  # (B, H, T, hd), (B, Hkv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, T_k, hd)
        y = attend(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, hd)
        if prepared is None:
            y = y.reshape(B, T, H * hd) if T == 1 else y.transpose(1, 2).reshape(B, T, H * hd)
            return project(y, [self.o_proj.weight])  # (B, T, d)
        y = y.reshape(B, H * hd) if T == 1 else y.transpose(1, 2).reshape(B * T, H * hd)  # (B T, H hd)
        if residual is None:
            return torch.mm(y, prepared["o"])  # (B T, d)
        return torch.addmm(residual, y, prepared["o"])  # (B T, d)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, gate and up from one product (see :func:`project`)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def prepare_weights(self, input_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Copies of the concatenated weights for inference (see :func:`prepare_weights`)."""
        return {"gate_up": prepare_weights([self.gate_proj.weight, self.up_proj.weight], input_scale),
                "down": prepare_weights([self.down_proj.weight])}

    def forward(self, x: torch.Tensor, prepared: dict[str, torch.Tensor] | None = None,
                residual: torch.Tensor | None = None, x_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, d) -> (B, T, d)``; with ``prepared`` (see :func:`project`) ``(B T, d) -> (B T, d)``, and
        ``residual``/``x_scale`` as in :meth:`Attention.forward`."""
        if prepared is None:
            gate, up = project(x, [self.gate_proj.weight, self.up_proj.weight]).chunk(2, dim=-1)  # (B, T, hidden)
            return project(F.silu(gate) * up, [self.down_proj.weight])  # (B, T, d)
        gate_up = torch.mm(x, prepared["gate_up"])  # (B T, 2 hidden), see project
        if x_scale is not None:
            gate_up.mul_(x_scale)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate).mul_(up)  # (B T, hidden)
        if residual is None:
            return torch.mm(hidden, prepared["down"])
        return torch.addmm(residual, hidden, prepared["down"])  # (B T, d)


class Block(nn.Module):
    """One transformer block: pre-norm (Llama) or swin-norm (Chameleon-34B) ordering."""

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.swin_norm = config.swin_norm
        self.attn = Attention(config, layer_idx)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden)
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.layer_idx, self.eps, self.dropout = layer_idx, config.norm_eps, config.dropout

    def prepare_weights(self) -> dict[str, torch.Tensor]:
        """This block's inference weight copies (see :func:`prepare_weights`); pre-norm folds the norm weights
        into the projections that follow them. ``"eps"``: the norms' eps as a tensor (see :func:`inv_rms`)."""
        attn_scale = None if self.swin_norm else self.attn_norm.weight
        mlp_scale = None if self.swin_norm else self.mlp_norm.weight
        weight = self.attn_norm.weight
        return {**self.attn.prepare_weights(attn_scale), **self.mlp.prepare_weights(mlp_scale),
                "eps": eps_tensor(self.eps, weight.device, weight.dtype)}

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                cache: KVCache | None = None, prepared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``x`` ``(B, T, d)``; with ``prepared`` (this block's entry of a cache's weight copies, read while grad is
        off, see :func:`project`) ``x`` is ``(B T, d)``."""
        if prepared is not None and not self.swin_norm and not (self.training and self.dropout > 0):
            # pre-norm, inference: the norm weights are folded into the projections, their 1/rms scales the
            # products' outputs and the residual adds inside the output projections
            eps, modules = prepared["eps"], self._modules  # _modules: no nn.Module.__getattr__ per step
            h = modules["attn"].forward(x, rope, mask, cache, prepared, x, inv_rms(x, eps))
            return modules["mlp"].forward(h, prepared, h, inv_rms(h, eps))
        drop = self.resid_dropout if self.training and self.dropout > 0 else _identity
        if self.swin_norm:
            attn, mlp = (self.attn, self.mlp) if prepared is None else (self.attn.forward, self.mlp.forward)
            h = x + drop(rms_norm(attn(x, rope, mask, cache, prepared), self.attn_norm.weight, self.eps))
            return h + drop(rms_norm(mlp(h, prepared), self.mlp_norm.weight, self.eps))
        if prepared is not None:  # pre-norm with residual dropout: the norm weights are folded in
            h = x + drop(self.attn.forward(rms_norm(x, None, self.eps), rope, mask, cache, prepared))
            return h + drop(self.mlp.forward(rms_norm(h, None, self.eps), prepared))
        h = x + drop(self.attn(rms_norm(x, self.attn_norm.weight, self.eps), rope, mask, cache))
        return h + drop(self.mlp(rms_norm(h, self.mlp_norm.weight, self.eps)))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


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
