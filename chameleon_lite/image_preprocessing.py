"""Image preprocessing for the tokenizer: PIL images of any mode and size <-> square float tensors in [-1, 1].

Transparent pixels are composited onto the config's ``pad_color``; 16/32-bit images are scaled to 8 bits (PIL's
own ``convert`` would clip them); non-square images are made square by ``resize_mode``: ``"center_crop"`` (resize
the short side, crop the centre) or ``"pad"`` (resize the long side, letterbox with ``pad_color``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

if TYPE_CHECKING:
    from chameleon_lite.image_tokenizer import ImageTokenizerConfig

RESIZE_MODES = ("center_crop", "pad")
RESAMPLE_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _to_8bit_mode(image: Image.Image) -> Image.Image:
    """Bring 16/32-bit integer and float images into 8-bit "L" before colour conversion (PIL would clip them)."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0  # 16-bit range
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0  # float in [0, 1]
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def preprocess_images(images: Sequence[Image.Image], config: ImageTokenizerConfig) -> Tensor:
    """PIL images of any mode and size -> FloatTensor (B, C, image_size, image_size) in [-1, 1].

    Transparent pixels are composited onto `config.pad_color`; non-square images are made square by
    `config.resize_mode` ("center_crop": resize the short side and crop; "pad": resize the long side and letterbox).
    """
    if isinstance(images, Image.Image):
        raise ValueError("preprocess expects a list of PIL images, got a single image; wrap it in a list")
    if len(images) == 0:
        raise ValueError("preprocess got an empty list of images")
    size = config.image_size
    background = tuple(config.pad_color)
    resample = RESAMPLE_FILTERS[config.resample]
    arrays = []
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"preprocess expects PIL images; item {index} is {type(image).__name__}")
        image = _to_8bit_mode(image)
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            image = Image.alpha_composite(canvas, rgba).convert("RGB")
        else:
            image = image.convert("RGB")
        width, height = image.size
        if config.resize_mode == "center_crop":
            scale = size / min(width, height)
            new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
            image = image.resize((new_w, new_h), resample=resample)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        else:
            scale = size / max(width, height)
            new_w, new_h = max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale)))
            canvas = Image.new("RGB", (size, size), background)
            canvas.paste(image.resize((new_w, new_h), resample=resample), ((size - new_w) // 2, (size - new_h) // 2))
            image = canvas
        if config.in_channels == 1:
            image = image.convert("L")
        array = np.asarray(image, dtype=np.uint8).reshape(size, size, config.in_channels)
        arrays.append(array)
    batch = torch.from_numpy(np.stack(arrays))  # (B, H, W, C) uint8
    return rearrange(batch, "b h w c -> b c h w").float() / 127.5 - 1.0


def to_pil(images: Tensor) -> list[Image.Image]:
    """FloatTensor (B, C, H, W) or (C, H, W) in [-1, 1] (values outside are clamped) -> list of RGB / L images."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"to_pil expects (B, C, H, W) or (C, H, W) with C in (1, 3), got shape {tuple(images.shape)}")
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    pixels = rearrange(pixels, "b c h w -> b h w c").numpy()
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p[..., 0], mode="L") for p in pixels]
    return [Image.fromarray(p, mode="RGB") for p in pixels]
