"""The convolutional autoencoder around the VQ tokenizer's quantizer (VQGAN family, Esser et al. 2021).

Residual blocks with GroupNorm + SiLU, strided-conv downsampling, nearest-upsample + conv upsampling, and an
optional mid block (ResBlock [-> single-head self-attention] -> ResBlock) at the latent resolution. No attention
at high resolution: it is slow on CPU and flat-colour images do not need it. Widths and depth come from an
``ImageTokenizerConfig`` (``base_channels``, ``channel_mult``, ``num_res_blocks``, ``mid_block``, ``latent_dim``).
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of `channels` below that."""
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1-projected) skip connection."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map (VQGAN's mid-block attention)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution (no checkerboard artefacts)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(config: ImageTokenizerConfig, channels: int) -> nn.Sequential:
    if not config.mid_block:
        return nn.Sequential()
    attention = [AttnBlock(channels)] if config.mid_attention else []
    return nn.Sequential(ResBlock(channels, channels), *attention, ResBlock(channels, channels))


class ConvEncoder(nn.Module):
    """(B, C, H, W) pixels -> (B, latent_dim, H/f, W/f) continuous latents."""

    def __init__(self, config: ImageTokenizerConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        channels = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(channels, width))
                channels = width
            if level < len(widths) - 1:
                blocks.append(Downsample(channels))
        self.blocks = nn.Sequential(*blocks)
        self.mid = _mid_block(config, channels)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, config.latent_dim, 3, padding=1)

    def forward(self, images: Tensor) -> Tensor:
        x = self.blocks(self.conv_in(images))  # (B, C_last, h, w)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, latent_dim, h, w)


class PatchEncoder(nn.Module):
    """(B, C, H, W) pixels -> (B, latent_dim, H/f, W/f), each latent a function of its own f x f patch only.

    A kernel = stride = f convolution (patchify, as a ViT), then ``num_res_blocks + 1`` residual per-patch layers
    (SiLU -> 1x1 conv) and a 1x1 projection to ``latent_dim``. No receptive field overlaps a neighbouring patch and
    no normalisation mixes positions, so two identical patches always get the same latent, hence the same code:
    on images laid out on the code grid, a code is a property of what is in its cell, not of the neighbours.
    """

    def __init__(self, config: ImageTokenizerConfig) -> None:
        super().__init__()
        f = config.downsample_factor
        width = config.base_channels * config.channel_mult[-1]
        self.patchify = nn.Conv2d(config.in_channels, width, f, stride=f)
        self.layers = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(config.num_res_blocks + 1))
        self.conv_out = nn.Conv2d(width, config.latent_dim, 1)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patchify(images)  # (B, width, h, w)
        for layer in self.layers:
            x = x + layer(F.silu(x))  # (B, width, h, w), per patch
        return self.conv_out(F.silu(x))  # (B, latent_dim, h, w)


class ImageDecoder(nn.Module):
    """(B, latent_dim, h, w) quantized latents -> (B, C, h*f, w*f) pixels (unbounded)."""

    def __init__(self, config: ImageTokenizerConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in reversed(config.channel_mult)]
        channels = widths[0]
        self.conv_in = nn.Conv2d(config.latent_dim, channels, 3, padding=1)
        self.mid = _mid_block(config, channels)
        blocks: list[nn.Module] = []
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(channels, width))
                channels = width
            if level < len(widths) - 1:
                blocks.append(Upsample(channels))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, config.in_channels, 3, padding=1)

    def forward(self, latents: Tensor) -> Tensor:
        x = self.mid(self.conv_in(latents))  # (B, C_last, h, w)
        x = self.blocks(x)  # (B, C_first, H, W)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, C, H, W)
