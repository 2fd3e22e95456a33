"""The decoder's building blocks: RMSNorm, Chameleon's per-head QK LayerNorm, RoPE, grouped-query attention,
SwiGLU and the block that wires them pre-norm or swin-norm (``decoder.py`` stacks them; its docstring lists the
features and where each comes from).

Each block also has an inference path for decode steps: ``prepare_weights`` concatenates a block's projections
once per generation call (q|k|v, gate|up; pre-norm folds the preceding norm's weight in) and ``project`` multiplies
by them, so a decode step makes one product where the training path makes several.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chameleon_lite.model.attention import AttentionMask, KVCache, attend
from chameleon_lite.model.config import DecoderConfig

QK_NORM_EPS = 1e-5  # Chameleon's per-head LayerNorm uses the nn.LayerNorm default, independent of norm_eps


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
