"""The one id space shared by text pieces, control tokens and image codes.

Layout (no gaps, no overlaps)::

    [0 .. n_text)                          sentencepiece pieces (incl. its own unk/bos/eos/pad and byte pieces)
    [n_text .. n_text + n_special)         control tokens: <boi> <eoi> <eol> <sep>, then reserved slots
    [image_offset .. image_offset + K)     image codes: id = image_offset + code, K = codebook size

Control tokens have no text form that the text tokenizer can produce: they sit above the sentencepiece range,
so encoding the literal string ``"<boi>"`` yields ordinary pieces. An image in a sequence is
``<boi> c_0 ... c_{h*w-1} <eoi>`` in row-major order; the grid ``(h, w)`` comes from the tokenizer bundle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from chameleon_lite.tokenization.text_tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

CONTROL_TOKENS: tuple[str, ...] = ("<boi>", "<eoi>", "<eol>", "<sep>")


@dataclass(frozen=True)
class Vocab:
    """Named ids and ranges of the unified vocabulary.

    Args:
        n_text: number of sentencepiece pieces.
        codebook_size: number of image codes.
        n_reserved: spare control slots after the named ones (so new controls don't shift image ids).
    """

    n_text: int
    codebook_size: int
    n_reserved: int = 4
    control_tokens: tuple[str, ...] = field(default=CONTROL_TOKENS)

    def __post_init__(self) -> None:
        if self.n_text <= PAD_ID:
            raise ValueError(f"n_text={self.n_text} must exceed the sentencepiece specials (unk/bos/eos/pad)")
        if self.codebook_size < 1:
            raise ValueError(f"codebook_size={self.codebook_size} must be >= 1")
        if self.n_reserved < 0:
            raise ValueError(f"n_reserved={self.n_reserved} must be >= 0")
        object.__setattr__(self, "control_tokens", tuple(self.control_tokens))
        missing = [t for t in CONTROL_TOKENS if t not in self.control_tokens]
        if missing:
            raise ValueError(f"control_tokens must include {missing}")
        if len(set(self.control_tokens)) != len(self.control_tokens):
            raise ValueError(f"control_tokens has duplicates: {self.control_tokens}")

    # ------------------------------------------------------------------ ranges
    @property
    def n_special(self) -> int:
        return len(self.control_tokens) + self.n_reserved

    @property
    def image_offset(self) -> int:
        return self.n_text + self.n_special

    @property
    def size(self) -> int:
        """Total number of ids (the decoder's logical vocabulary size)."""
        return self.image_offset + self.codebook_size

    def __len__(self) -> int:
        return self.size

    @property
    def text_ids(self) -> range:
        return range(0, self.n_text)

    @property
    def special_ids(self) -> range:
        return range(self.n_text, self.image_offset)

    @property
    def image_ids(self) -> range:
        return range(self.image_offset, self.size)

    # ------------------------------------------------------------------ named ids
    def control_id(self, name: str) -> int:
        try:
            return self.n_text + self.control_tokens.index(name)
        except ValueError:
            raise ValueError(f"unknown control token {name!r}; known: {self.control_tokens}") from None

    @property
    def boi(self) -> int:
        return self.control_id("<boi>")

    @property
    def eoi(self) -> int:
        return self.control_id("<eoi>")

    @property
    def eol(self) -> int:
        return self.control_id("<eol>")

    @property
    def sep(self) -> int:
        return self.control_id("<sep>")

    @property
    def image_placeholder(self) -> int:
        """The encoder-projector baseline's ``<image>`` placeholder: the first reserved control slot.

        Like every control id it cannot be produced from text; the baseline replaces each occurrence by the
        projected features of one image (the native model never uses it).
        """
        if self.n_reserved < 1:
            raise ValueError("the vocabulary has no reserved control slot for the <image> placeholder (n_reserved=0)")
        return self.n_text + len(self.control_tokens)

    bos, eos, pad, unk = BOS_ID, EOS_ID, PAD_ID, UNK_ID

    def token_name(self, i: int) -> str:
        """A readable name for non-text ids (``<boi>``, ``<reserved_2>``, ``<img_17>``); text ids give ``<text_N>``."""
        self._check_id(i)
        if i < self.n_text:
            return f"<text_{i}>"
        if i < self.image_offset:
            k = i - self.n_text
            n_named = len(self.control_tokens)
            return self.control_tokens[k] if k < n_named else f"<reserved_{k - n_named}>"
        return f"<img_{i - self.image_offset}>"

    # ------------------------------------------------------------------ predicates (ints or tensors)
    def is_text(self, ids):
        return _in_range(ids, 0, self.n_text)

    def is_special(self, ids):
        return _in_range(ids, self.n_text, self.image_offset)

    def is_image(self, ids):
        return _in_range(ids, self.image_offset, self.size)

    # ------------------------------------------------------------------ logit masks
    def mask(self, *, text: bool = False, image: bool = False, extra: Sequence[int] = ()) -> torch.Tensor:
        """Boolean mask of shape ``(size,)``: True where a logit is allowed."""
        m = torch.zeros(self.size, dtype=torch.bool)
        if text:
            m[: self.n_text] = True
        if image:
            m[self.image_offset :] = True
        for i in extra:
            self._check_id(i)
            m[i] = True
        return m

    def text_mask(self) -> torch.Tensor:
        """Only text pieces allowed (shape ``(size,)``)."""
        return self.mask(text=True)

    def image_mask(self) -> torch.Tensor:
        """Only image codes allowed (shape ``(size,)``)."""
        return self.mask(image=True)

    # ------------------------------------------------------------------ images <-> ids
    def image_to_ids(self, codes: torch.Tensor, *, wrap: bool = True, eol: bool = False) -> torch.Tensor:
        """Codes ``(..., h, w)`` -> ids ``(..., [1 +] h*w [+ 1])``, row-major, wrapped in ``<boi> ... <eoi>``.

        The one place the image framing is written: with ``eol`` (a bundle's ``use_eol``) an ``<eol>`` ends each
        row, ``(..., [1 +] h*(w+1) [+ 1])``.
        """
        codes = torch.as_tensor(codes)
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"image codes must be integers, got {codes.dtype}")
        if codes.dim() < 2:
            raise ValueError(f"image codes must have shape (..., h, w), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            bad = codes[(codes < 0) | (codes >= self.codebook_size)][0].item()
            raise ValueError(f"image code {bad} is outside the codebook [0, {self.codebook_size})")
        body = codes.long() + self.image_offset  # (..., h, w)
        if eol:
            body = torch.cat([body, body.new_full((*body.shape[:-1], 1), self.eol)], dim=-1)  # (..., h, w+1)
        flat = body.flatten(-2)  # (..., h*w) or (..., h*(w+1))
        if not wrap:
            return flat
        boi = flat.new_full((*flat.shape[:-1], 1), self.boi)
        eoi = flat.new_full((*flat.shape[:-1], 1), self.eoi)
        return torch.cat([boi, flat, eoi], dim=-1)

    def ids_to_image(self, ids: torch.Tensor | Sequence[int], grid: tuple[int, int]) -> torch.Tensor:
        """Ids of one image (with or without ``<boi>``/``<eoi>``) -> codes ``(h, w)``; raises on anything else."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() and ids[0] == self.boi:
            ids = ids[1:]
        if ids.numel() and ids[-1] == self.eoi:
            ids = ids[:-1]
        h, w = grid
        if ids.numel() != h * w:
            raise ValueError(f"expected {h * w} image codes for a {h}x{w} grid, got {ids.numel()}")
        not_image = ~self.is_image(ids)
        if not_image.any():
            bad = int(ids[not_image][0])
            raise ValueError(f"id {bad} ({self._describe(bad)}) is not an image code")
        return (ids - self.image_offset).view(h, w)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return {
            "n_text": self.n_text,
            "codebook_size": self.codebook_size,
            "n_reserved": self.n_reserved,
            "control_tokens": list(self.control_tokens),
            # derived, written for readers of the YAML; checked on load
            "image_offset": self.image_offset,
            "size": self.size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        d = dict(d)
        derived = {k: d.pop(k) for k in ("image_offset", "size") if k in d}
        vocab = cls(**{k: (tuple(v) if k == "control_tokens" else v) for k, v in d.items()})
        for k, v in derived.items():
            if getattr(vocab, k) != v:
                raise ValueError(f"vocab {k}={v} disagrees with the layout it describes ({getattr(vocab, k)})")
        return vocab

    # ------------------------------------------------------------------ helpers
    def _check_id(self, i: int) -> None:
        if not 0 <= int(i) < self.size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.size})")

    def _describe(self, i: int) -> str:
        return self.token_name(i) if 0 <= i < self.size else "out of range"


def _in_range(ids, lo: int, hi: int):
    if isinstance(ids, torch.Tensor):
        return (ids >= lo) & (ids < hi)
    return lo <= int(ids) < hi
