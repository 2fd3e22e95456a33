"""Image preprocessing for the tokenizer: PIL images of any mode and size <-> square float tensors in [-1, 1].

One colour conversion for training data and prompts (:func:`to_rgb`, also what the shard readers of
:mod:`chameleon_lite.data.decoding` apply): transparent pixels are composited on **white**, 16/32-bit images are
scaled to 8 bits (PIL's own ``convert`` would clip them). Non-square images are made square by ``resize_mode``:
``"center_crop"`` (resize the short side, crop the centre) or ``"pad"`` (resize the long side, letterbox with the
config's ``pad_color``). :func:`check_image` is the check a prompt image gets (both sides >= 1, aspect ratio at
most :data:`MAX_ASPECT_RATIO`, the limit the shard readers skip training images beyond).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from chameleon_lite.tokenization.image_tokenizer_config import RESAMPLE_FILTERS, ImageTokenizerConfig

MAX_ASPECT_RATIO = 20.0  # long side / short side; the readers' default (data.decoding.ImageLimits) skips beyond
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, in training and in prompts
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _to_8bit(image: Image.Image) -> Image.Image | None:
    """A 16/32-bit integer or float image as 8-bit "L" (PIL's ``convert`` would clip it); None for other modes.

    16-bit data (``I;16*``, or ``I``/``F`` with values above 255) is scaled by 1/257; a float image with values in
    [0, 1] by 255.
    """
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return None
    values = np.asarray(image, dtype=np.float64)  # (H, W)
    peak = values.max(initial=0)
    if image.mode.startswith("I;16") or peak > 255:
        values = values / 257.0  # 16-bit range
    elif image.mode == "F" and peak <= 1.0:
        values = values * 255.0  # float in [0, 1]
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Any PIL mode -> RGB; returns ``(image, repair)`` with ``repair`` a short reason or None (already RGB).

    The single colour conversion of the package: the shard readers use it on training images and
    :func:`preprocess_images` on everything else (prompts included), so a prompt image is seen exactly as the
    same file would have been in training. Anything with alpha (RGBA, LA, PA, or a transparency key) is composited
    on white (:data:`ALPHA_BACKGROUND`); 16/32-bit images are scaled to 8 bits first.
    """
    grey = _to_8bit(image)
    if grey is not None:
        return grey.convert("RGB"), "high_bit_depth_to_rgb"
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), "alpha_on_white"
    if image.mode == "RGB":
        return image, None
    reason = {"CMYK": "cmyk_to_rgb", "L": "grey_to_rgb", "1": "grey_to_rgb", "P": "palette_to_rgb"}
    try:
        return image.convert("RGB"), reason.get(image.mode, "other_mode_to_rgb")
    except ValueError as err:  # PIL has no conversion for a few modes (HSV, ...)
        raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB: {err}") from None


def check_image(image: object, where: str = "image", max_aspect_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """``image`` itself if it is a PIL image with both sides >= 1 and an aspect ratio of at most
    ``max_aspect_ratio``; otherwise TypeError / ValueError naming ``where``."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"{where} must be a PIL.Image, got {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"{where} is {width}x{height} pixels: an image needs both sides >= 1")
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise ValueError(f"{where} is {width}x{height} pixels: aspect ratio {ratio:.1f} is above "
                         f"{max_aspect_ratio:g} (the data readers skip such images in training)")
    return image


def preprocess_images(images: Sequence[Image.Image], config: ImageTokenizerConfig) -> Tensor:
    """PIL images of any mode and size -> FloatTensor (B, C, image_size, image_size) in [-1, 1].

    Colours go through :func:`to_rgb` (transparent pixels on white, as in training); non-square images are made
    square by `config.resize_mode` ("center_crop": resize the short side and crop; "pad": resize the long side and
    letterbox with `config.pad_color`). ValueError for an image with a side of 0 pixels (naming its index).
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
        width, height = image.size
        if width < 1 or height < 1:
            raise ValueError(f"preprocess: image {index} is {width}x{height} pixels; an image needs both sides >= 1")
        image, _ = to_rgb(image)
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
