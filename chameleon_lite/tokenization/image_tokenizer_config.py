"""The VQ image tokenizer's settings (``ImageTokenizerConfig``) and the names they may take.

Its own module so the autoencoder, the preprocessing and the tokenizer all read it without importing each other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

__all__ = ["ENCODERS", "QUANTIZERS", "RESAMPLE_FILTERS", "RESIZE_MODES", "ImageTokenizerConfig"]

RESIZE_MODES = ("center_crop", "pad")
RESAMPLE_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
QUANTIZERS = ("vq", "fsq", "lfq")
ENCODERS = ("conv", "patch")
DEFAULT_CODEBOOK_SIZE = 1024

@dataclass
class ImageTokenizerConfig:
    """Settings of a VQ image tokenizer. Plain types only, so it round-trips through `asdict` and OmegaConf.

    Args:
        image_size: side of the square images the tokenizer reads and writes, in pixels.
        in_channels: 3 (RGB) or 1 (grayscale).
        base_channels: width of the first encoder level; level i has `base_channels * channel_mult[i]` channels.
        channel_mult: width multiplier per resolution level; `len - 1` stride-2 steps, so the downsampling factor
            is `2 ** (len(channel_mult) - 1)` and must be 4, 8 or 16.
        num_res_blocks: residual blocks per level (encoder and decoder).
        encoder: "conv" (VQGAN's: residual blocks, GroupNorm, overlapping receptive fields) or "patch": every latent
            is a function of its own `f x f` pixel patch only (a kernel = stride = f convolution, then a per-patch
            residual MLP of `num_res_blocks + 1` layers, no normalisation across the image), so identical patches
            always get identical codes. For images whose content is aligned with the code grid; the decoder is the
            same either way.
        mid_block: add ResBlock -> (attention) -> ResBlock at the latent resolution.
        mid_attention: put single-head self-attention in the mid block (ignored without `mid_block`).
        latent_dim: channels of the encoder output fed to the quantizer (and of the decoder input).
        quantizer: "vq" (VectorQuantize, EMA codebook), "fsq" (finite scalar quantization) or "lfq" (lookup-free).
        codebook_size: number of codes. vq: any size >= 2 (None -> 1024); lfq: a power of 2 (None -> 1024);
            fsq: derived as `prod(fsq_levels)` (an explicit value must agree).
        fsq_levels: levels per FSQ dimension, each >= 3 (e.g. [8, 5, 5, 5] -> 1000 codes).
        codebook_dim: vq only: look codes up in a lower-dimensional space (factorised codes, ViT-VQGAN);
            None = `latent_dim`.
        kmeans_init: vq: initialise the codebook with k-means on the first training batch.
        kmeans_iters: vq: k-means iterations for that initialisation.
        decay: vq: EMA decay of the codebook statistics.
        threshold_ema_dead_code: vq: replace codes whose EMA usage count per batch falls below this by random
            encoder outputs of the current batch (0 disables).
        use_cosine_sim: vq: l2-normalise codes and inputs (cosine-similarity lookup).
        rotation_trick: vq: pass gradients through the quantizer with the rotation trick instead of plain STE.
        commitment_weight: weight of the commitment loss (vq and lfq).
        lfq_entropy_weight: lfq: weight of the entropy (code diversity) auxiliary loss.
        resize_mode: how `preprocess` makes non-square images square: "center_crop" or "pad".
        pad_color: RGB colour (0-255) for "pad" letterboxing and for compositing transparent pixels.
        resample: PIL filter for resizing: "nearest", "bilinear", "bicubic" or "lanczos".
    """

    image_size: int = 64
    in_channels: int = 3
    base_channels: int = 16
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    num_res_blocks: int = 1
    encoder: str = "conv"
    mid_block: bool = True
    mid_attention: bool = False
    latent_dim: int = 64
    quantizer: str = "vq"
    codebook_size: int | None = None
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    codebook_dim: int | None = None
    kmeans_init: bool = True
    kmeans_iters: int = 10
    decay: float = 0.9
    threshold_ema_dead_code: float = 2.0
    use_cosine_sim: bool = False
    rotation_trick: bool = True
    commitment_weight: float = 0.25
    lfq_entropy_weight: float = 0.1
    resize_mode: str = "center_crop"
    pad_color: list[int] = field(default_factory=lambda: [0, 0, 0])
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        self.channel_mult = [int(m) for m in self.channel_mult]
        self.fsq_levels = [int(level) for level in self.fsq_levels]
        self.pad_color = [int(c) for c in self.pad_color]
        for name in ("image_size", "base_channels", "num_res_blocks", "latent_dim", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {self.channel_mult}")
        if self.downsample_factor not in (4, 8, 16):
            raise ValueError(
                f"channel_mult {self.channel_mult} gives downsampling factor {self.downsample_factor}; "
                "use 3, 4 or 5 levels for a factor of 4, 8 or 16"
            )
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by the downsampling factor {self.downsample_factor}"
            )
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.quantizer == "fsq":
            if not self.fsq_levels or any(level < 3 for level in self.fsq_levels):
                raise ValueError(f"fsq_levels must be a non-empty list of ints >= 3, got {self.fsq_levels}")
            product = math.prod(self.fsq_levels)
            if self.codebook_size is not None and self.codebook_size != product:
                raise ValueError(
                    f"codebook_size {self.codebook_size} disagrees with fsq_levels {self.fsq_levels} "
                    f"(product {product}); leave codebook_size unset for fsq"
                )
            self.codebook_size = product
        else:
            if self.codebook_size is None:
                self.codebook_size = DEFAULT_CODEBOOK_SIZE
            if self.codebook_size < 2:
                raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
            if self.quantizer == "lfq" and self.codebook_size & (self.codebook_size - 1):
                raise ValueError(f"lfq needs a power-of-2 codebook_size, got {self.codebook_size}")
        if self.codebook_dim is not None and self.codebook_dim < 1:
            raise ValueError(f"codebook_dim must be None or >= 1, got {self.codebook_dim}")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")
        if self.threshold_ema_dead_code < 0 or self.commitment_weight < 0 or self.lfq_entropy_weight < 0:
            raise ValueError("threshold_ema_dead_code, commitment_weight and lfq_entropy_weight must be >= 0")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if len(self.pad_color) != 3 or any(not 0 <= c <= 255 for c in self.pad_color):
            raise ValueError(f"pad_color must be 3 ints in [0, 255], got {self.pad_color}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample must be one of {tuple(RESAMPLE_FILTERS)}, got {self.resample!r}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the code grid of one image."""
        side = self.image_size // self.downsample_factor
        return side, side

    @property
    def num_codes(self) -> int:
        """Codes per image, `h * w` (the image's length in a token sequence, without <boi>/<eoi>)."""
        h, w = self.grid
        return h * w

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (all values are ints, floats, strs, bools, None or lists of ints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageTokenizerConfig:
        """Build from a dict, rejecting unknown keys with a ValueError that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ImageTokenizerConfig keys: {unknown}")
        return cls(**values)
