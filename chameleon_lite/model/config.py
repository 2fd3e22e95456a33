"""``DecoderConfig``: the shape and switches of the decoder both arms share (``decoder.py`` builds it, ``layers.py``
its blocks, ``presets.py`` names a few)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from chameleon_lite.model.attention import BACKENDS


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
