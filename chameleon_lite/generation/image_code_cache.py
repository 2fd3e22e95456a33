"""Visual-token cache: prompts that repeat an image (same pixels) reuse its VQ codes instead of re-encoding it."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image


class ImageCodeCache:
    """Image codes of prompt images keyed by a SHA-256 of the image's mode, size and pixel bytes (LRU)."""

    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._codes: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(image: Image.Image) -> str:
        digest = hashlib.sha256(f"{image.mode}|{image.size}|".encode())
        digest.update(image.tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self._codes)

    def codes(self, images: Sequence[Image.Image], image_tokenizer: Any) -> list[torch.Tensor]:
        """Codes ``(h, w)`` (CPU, long) of each image; only images not seen before go through the VQ encoder."""
        keys = [self.key(im) for im in images]
        todo = {k: im for k, im in zip(keys, images) if k not in self._codes}
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            pixels = image_tokenizer.preprocess(list(todo.values()))  # (N, C, H, W)
            for k, codes in zip(todo, image_tokenizer.encode(pixels).cpu()):
                self._codes[k] = codes
        result = []
        for k in keys:
            self._codes.move_to_end(k)
            result.append(self._codes[k])
        while len(self._codes) > self.max_entries:
            self._codes.popitem(last=False)
        return result
