"""ViT image encoder of the baseline arm (the "encoder" in encoder + projector).

Images are float ``(B, C, H, W)`` in ``[-1, 1]`` (the package's pixel convention, see ``image_preprocessing``).

Notable features:

- Patch embedding by a strided ``Conv2d``; patches are flattened row-major (``(h w)``), like the VQ code grid.
- Positions: ``"learned"`` (a parameter) or ``"sincos"`` (fixed 2-D sin-cos of MAE, a non-persistent buffer
  recomputed from the config, so it is neither trained nor saved). Optional CLS token (position vector 0 for
  sin-cos, as MAE).
- Pre-norm blocks: LayerNorm, multi-head attention through ``F.scaled_dot_product_attention``, GELU MLP,
  dropout on attention probabilities and residual branches; a final LayerNorm.
- ``forward`` returns the patch tokens of ``feature_layer`` (the hidden states after each block, indexed like
  Hugging Face's ``hidden_states[1:]``: ``-1`` = last block, ``-2`` = second to last, LLaVA's choice). These are
  raw residual-stream states, without the final LayerNorm (as HF CLIP's ``hidden_states``), and only the blocks up
  to ``feature_layer`` are run. ``pooled`` = final block + final LayerNorm, CLS token or mean over patches
  (the image embedding of contrastive pretraining).
- Init (``reset_parameters``): truncated normal (std 0.02, cut at 2 std) for every matrix, the patch kernel and
  learned embeddings; zero biases; unit LayerNorms. Same seed -> same weights.

The generic blocks (``MultiHeadAttention``, ``MLP``, ``TransformerBlock``) are reused by the text encoder
(``contrastive.py``) and the resampler projector (``projectors.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

POS_EMBEDS = ("learned", "sincos")
INIT_STD = 0.02


@dataclass
class ViTConfig:
    """Shape of the ViT. Plain types only (round-trips through ``asdict``/OmegaConf/LightningCLI).

    Args:
        image_size: side of the square input images (pixels).
        patch_size: side of a patch; must divide ``image_size``.
        channels: input channels.
        d_model: token width.
        n_layers: number of transformer blocks.
        n_heads: attention heads; must divide ``d_model``.
        mlp_ratio: MLP hidden width = ``round(mlp_ratio * d_model)``.
        pos_embed: ``"learned"`` or ``"sincos"`` (fixed 2-D sinusoidal; ``d_model`` must be divisible by 4).
        use_cls: prepend a learned CLS token (dropped from ``forward``'s features; ``pooled`` returns it).
        feature_layer: which block's output ``forward`` returns, Python-indexed over the ``n_layers`` block
            outputs (``-1`` last, ``-2`` second to last, ``0`` first); must lie in ``[-n_layers, n_layers)``.
        dropout: attention-probability and residual dropout.
        norm_eps: LayerNorm epsilon.
    """

    image_size: int = 64
    patch_size: int = 8
    channels: int = 3
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 6
    mlp_ratio: float = 4.0
    pos_embed: str = "learned"
    use_cls: bool = False
    feature_layer: int = -2
    dropout: float = 0.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "channels", "d_model", "n_layers", "n_heads"):
            check_positive_int(name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed={self.pos_embed!r} must be one of {POS_EMBEDS}")
        if self.pos_embed == "sincos" and self.d_model % 4:
            raise ValueError(f"d_model={self.d_model} must be divisible by 4 for pos_embed='sincos'")
        if not isinstance(self.feature_layer, int) or not -self.n_layers <= self.feature_layer < self.n_layers:
            raise ValueError(f"feature_layer={self.feature_layer!r} must be an int in "
                             f"[{-self.n_layers}, {self.n_layers}) for n_layers={self.n_layers}")
        if self.mlp_ratio <= 0 or self.mlp_hidden < 1:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} must be > 0 (and give an MLP width >= 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be > 0")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def mlp_hidden(self) -> int:
        return round(self.mlp_ratio * self.d_model)

    @property
    def feature_depth(self) -> int:
        """Number of blocks run by ``forward`` (``feature_layer`` as a 1-based block count)."""
        return self.feature_layer % self.n_layers + 1


def check_positive_int(name: str, value) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")


# ---------------------------------------------------------------------------------------------- building blocks
def sincos_2d_position_embedding(grid_size: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (MAE) for a row-major ``grid_size x grid_size`` grid -> ``(grid_size**2, dim)``.

    The first half of the channels encodes the row, the second half the column; each half is
    ``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = temperature ** (-i / (dim / 4))``.
    """
    if dim % 4:
        raise ValueError(f"dim={dim} must be divisible by 4 for 2-D sin-cos positions")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (g, g) each

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (g*g, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (g*g, dim/2)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()  # (g*g, dim)


def trunc_normal_init_(tensor: torch.Tensor, std: float = INIT_STD, generator: torch.Generator | None = None) -> None:
    """Truncated normal ``N(0, std)`` cut at ``+-2 std`` (in place)."""
    nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std, generator=generator)


def init_transformer_weights_(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Standard init of every ``Linear``/``Conv2d``/``Embedding``/``LayerNorm`` inside ``module`` (in place)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            trunc_normal_init_(m.weight, generator=generator)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (self- or cross-) through ``F.scaled_dot_product_attention``, no positions."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` ``(B, T, d)`` attends to ``context`` ``(B, S, d)`` (default ``x``); ``key_mask`` ``(B, S)`` bool,
        True = the key takes part. Returns ``(B, T, d)``."""
        context = x if context is None else context
        q = rearrange(self.q_proj(x), "b t (h e) -> b h t e", h=self.n_heads)  # (B, H, T, hd)
        k = rearrange(self.k_proj(context), "b s (h e) -> b h s e", h=self.n_heads)  # (B, H, S, hd)
        v = rearrange(self.v_proj(context), "b s (h e) -> b h s e", h=self.n_heads)  # (B, H, S, hd)
        attn_mask = None if key_mask is None else rearrange(key_mask, "b s -> b 1 1 s")  # (B, 1, 1, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, hd)
        return self.out_proj(rearrange(y, "b h t e -> b t (h e)"))  # (B, T, d)


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm encoder block: ``h = x + attn(ln(x)); out = h + mlp(ln(h))`` (bidirectional, optional key mask)."""

    def __init__(self, d_model: int, n_heads: int, mlp_hidden: int, dropout: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.mlp_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.mlp = MLP(d_model, mlp_hidden)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:  # x: (B, T, d)
        h = x + self.resid_dropout(self.attn(self.attn_norm(x), key_mask=key_mask))
        return h + self.resid_dropout(self.mlp(self.mlp_norm(h)))


# ---------------------------------------------------------------------------------------------- the encoder
class VisionEncoder(nn.Module):
    """Images ``(B, C, H, W)`` in ``[-1, 1]`` -> patch features ``(B, num_patches, d_model)`` of ``feature_layer``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Conv2d(c.channels, c.d_model, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model)) if c.use_cls else None
        n_tokens = c.num_patches + self.num_prefix_tokens
        if c.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, c.d_model))
        else:
            table = sincos_2d_position_embedding(c.grid_size, c.d_model)  # (N, d)
            if c.use_cls:
                table = torch.cat([torch.zeros(1, c.d_model), table], dim=0)  # CLS gets the zero vector
            self.register_buffer("pos_embed", table[None], persistent=False)  # (1, n_tokens, d)
        self.embed_dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(c.d_model, c.n_heads, c.mlp_hidden, c.dropout, c.norm_eps) for _ in range(c.n_layers)
        )
        self.norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Truncated normal (std 0.02) matrices, patch kernel, CLS and learned positions; zero biases; unit norms."""
        init_transformer_weights_(self, generator)
        if self.cls_token is not None:
            trunc_normal_init_(self.cls_token, generator=generator)
        if isinstance(self.pos_embed, nn.Parameter):
            trunc_normal_init_(self.pos_embed, generator=generator)

    # ------------------------------------------------------------------ accessors
    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    @property
    def num_prefix_tokens(self) -> int:
        """1 with a CLS token, else 0."""
        return int(self.config.use_cls)

    @property
    def feature_dim(self) -> int:
        return self.config.d_model

    # ------------------------------------------------------------------ forward
    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        expected = (c.channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings ``(B, prefix + N, d)`` (the input of block 0)."""
        self._check_images(images)
        x = rearrange(self.patch_embed(images), "b d h w -> b (h w) d")  # (B, N, d), row-major patches
        if self.cls_token is not None:
            x = torch.cat([repeat(self.cls_token, "1 1 d -> b 1 d", b=x.shape[0]), x], dim=1)  # (B, 1 + N, d)
        return self.embed_dropout(x + self.pos_embed.to(x.dtype))

    def hidden_states(self, images: torch.Tensor, n_blocks: int | None = None) -> list[torch.Tensor]:
        """Outputs of the first ``n_blocks`` blocks (default all), each ``(B, prefix + N, d)``, CLS included."""
        n_blocks = self.config.n_layers if n_blocks is None else n_blocks
        if not 0 <= n_blocks <= self.config.n_layers:
            raise ValueError(f"n_blocks={n_blocks} must be in [0, {self.config.n_layers}]")
        x = self.embed(images)
        states = []
        for block in self.blocks[:n_blocks]:
            x = block(x)
            states.append(x)
        return states

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens of block ``feature_layer`` ``(B, num_patches, d_model)`` (no final norm, CLS dropped)."""
        x = self.embed(images)  # (B, prefix + N, d)
        for block in self.blocks[: self.config.feature_depth]:
            x = block(x)
        return x[:, self.num_prefix_tokens:]  # (B, N, d)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """One vector per image ``(B, d_model)``: last block, final norm, then CLS (``use_cls``) or patch mean."""
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)  # (B, prefix + N, d)
        if self.cls_token is not None:
            return x[:, 0]
        return x.mean(dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

