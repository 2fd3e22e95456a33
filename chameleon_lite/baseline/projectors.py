"""Projectors of the baseline arm: vision features ``(B, N, d_in)`` -> decoder input embeddings ``(B, N_out, d_out)``.

Notable features:

- ``LinearProjector``: one ``Linear`` (LLaVA-1.0); ``N_out = N``.
- ``MLPProjector``: ``Linear -> GELU -> Linear`` (LLaVA-1.5), hidden width ``round(hidden_mult * d_out)``;
  ``N_out = N``.
- ``ResamplerProjector``: perceiver resampler (Flamingo / Qwen-VL style): features are projected to ``d_out``;
  ``n_queries`` learned queries cross-attend to them through ``n_layers`` layers of pre-norm cross-attention + GELU
  MLP (width ``4 * d_out``), then a final LayerNorm; ``N_out = n_queries`` whatever ``N``. There are no positions
  on the keys, so the output is invariant to the order of the input patches (spatial layout reaches it only
  through what the encoder wrote into each feature).
- Every projector has ``num_output_tokens(n_in)`` (visual tokens per image the decoder will see) and a
  ``reset_parameters(generator=None)``: same seed, same weights. Linear and MLP keep PyTorch's ``nn.Linear`` init
  (uniform ``+-1/sqrt(fan_in)``), as LLaVA, which builds its projector fresh; with a truncated normal 0.02 the
  two small matrices of the MLP start near a saddle and stage 1 (projector-only training) barely moves. The
  resampler uses the package's transformer init (truncated normal 0.02, zero biases, unit norms; its output is
  LayerNormed anyway).
- ``build_projector(config, d_in, d_out)`` picks the class from the typed config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import repeat
from torch import nn

from chameleon_lite.baseline.vision_encoder import (
    MLP,
    MultiHeadAttention,
    check_positive_int,
    init_transformer_weights_,
    trunc_normal_init_,
)

PROJECTOR_KINDS = ("linear", "mlp", "resampler")
RESAMPLER_MLP_RATIO = 4
RESAMPLER_NORM_EPS = 1e-6


@dataclass
class ProjectorConfig:
    """Which projector and its shape (``d_in``/``d_out`` come from the encoder and decoder at build time).

    Args:
        kind: ``"linear"``, ``"mlp"`` or ``"resampler"``.
        n_queries: resampler only: learned queries = visual tokens per image.
        n_layers: resampler only: cross-attention layers.
        n_heads: resampler only: attention heads (must divide ``d_out``; checked at build time).
        hidden_mult: mlp only: hidden width = ``round(hidden_mult * d_out)`` (1.0 = LLaVA-1.5).
    """

    kind: str = "linear"
    n_queries: int = 16
    n_layers: int = 2
    n_heads: int = 4
    hidden_mult: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in PROJECTOR_KINDS:
            raise ValueError(f"kind={self.kind!r} must be one of {PROJECTOR_KINDS}")
        for name in ("n_queries", "n_layers", "n_heads"):
            check_positive_int(name, getattr(self, name))
        if not self.hidden_mult > 0:
            raise ValueError(f"hidden_mult={self.hidden_mult} must be > 0")


def torch_default_linear_init_(linear: nn.Linear, generator: torch.Generator | None = None) -> None:
    """``nn.Linear``'s own init (weight and bias uniform in ``+-1/sqrt(fan_in)``), with an optional generator."""
    bound = 1.0 / math.sqrt(linear.in_features)
    nn.init.uniform_(linear.weight, -bound, bound, generator=generator)
    if linear.bias is not None:
        nn.init.uniform_(linear.bias, -bound, bound, generator=generator)


def _check_features(x: torch.Tensor, d_in: int) -> None:
    if x.dim() != 3 or x.shape[-1] != d_in:
        raise ValueError(f"features must have shape (B, N, {d_in}), got {tuple(x.shape)}")


class _PerTokenProjector(nn.Module):
    """Shared by the projectors that map each visual token on its own (N tokens in, N out)."""

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's ``nn.Linear`` init (see the module docstring)."""
        for linear in self.modules():
            if isinstance(linear, nn.Linear):
                torch_default_linear_init_(linear, generator)

    def num_output_tokens(self, n_in: int) -> int:
        check_positive_int("n_in", n_in)
        return n_in


class LinearProjector(_PerTokenProjector):
    """``(B, N, d_in) -> (B, N, d_out)`` by one ``Linear``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        check_positive_int("d_in", d_in)
        check_positive_int("d_out", d_out)
        self.d_in, self.d_out = d_in, d_out
        self.proj = nn.Linear(d_in, d_out)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features(x, self.d_in)
        return self.proj(x)  # (B, N, d_out)


class MLPProjector(_PerTokenProjector):
    """``(B, N, d_in) -> (B, N, d_out)`` by ``Linear -> GELU -> Linear`` (LLaVA-1.5's ``mlp2x_gelu``)."""

    def __init__(self, d_in: int, d_out: int, hidden: int) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("d_out", d_out), ("hidden", hidden)):
            check_positive_int(name, value)
        self.d_in, self.d_out = d_in, d_out
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_out)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features(x, self.d_in)
        return self.fc2(self.act(self.fc1(x)))  # (B, N, d_out)


class ResamplerLayer(nn.Module):
    """``q = q + xattn(ln(q), ln(feats)); q = q + mlp(ln(q))``."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(d_model, eps=RESAMPLER_NORM_EPS)
        self.context_norm = nn.LayerNorm(d_model, eps=RESAMPLER_NORM_EPS)
        self.attn = MultiHeadAttention(d_model, n_heads)
        self.mlp_norm = nn.LayerNorm(d_model, eps=RESAMPLER_NORM_EPS)
        self.mlp = MLP(d_model, RESAMPLER_MLP_RATIO * d_model)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        # queries: (B, Q, d), features: (B, N, d)
        queries = queries + self.attn(self.query_norm(queries), context=self.context_norm(features))
        return queries + self.mlp(self.mlp_norm(queries))  # (B, Q, d)


class ResamplerProjector(nn.Module):
    """``(B, N, d_in) -> (B, n_queries, d_out)``: learned queries cross-attend to the projected features."""

    def __init__(self, d_in: int, d_out: int, n_queries: int, n_layers: int, n_heads: int) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("d_out", d_out), ("n_queries", n_queries), ("n_layers", n_layers),
                            ("n_heads", n_heads)):
            check_positive_int(name, value)
        if d_out % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_out={d_out}")
        self.d_in, self.d_out, self.n_queries = d_in, d_out, n_queries
        self.input_proj = nn.Linear(d_in, d_out)
        self.queries = nn.Parameter(torch.zeros(n_queries, d_out))
        self.layers = nn.ModuleList(ResamplerLayer(d_out, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_out, eps=RESAMPLER_NORM_EPS)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        init_transformer_weights_(self, generator)
        trunc_normal_init_(self.queries, generator=generator)

    def num_output_tokens(self, n_in: int) -> int:
        check_positive_int("n_in", n_in)
        return self.n_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features(x, self.d_in)
        features = self.input_proj(x)  # (B, N, d_out)
        queries = repeat(self.queries, "q d -> b q d", b=x.shape[0]).to(features.dtype)  # (B, Q, d_out)
        for layer in self.layers:
            queries = layer(queries, features)
        return self.norm(queries)  # (B, Q, d_out)


def build_projector(config: ProjectorConfig, d_in: int, d_out: int) -> nn.Module:
    """The projector ``config.kind`` from encoder width ``d_in`` to decoder width ``d_out``."""
    if config.kind == "linear":
        return LinearProjector(d_in, d_out)
    if config.kind == "mlp":
        return MLPProjector(d_in, d_out, hidden=max(1, round(config.hidden_mult * d_out)))
    if config.kind == "resampler":
        return ResamplerProjector(d_in, d_out, config.n_queries, config.n_layers, config.n_heads)
    raise ValueError(f"kind={config.kind!r} must be one of {PROJECTOR_KINDS}")  # config was mutated after init
