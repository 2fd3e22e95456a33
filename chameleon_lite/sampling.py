"""Logits processing for generation: sampling settings, temperature / top-k / top-p, and the modality constraint.

Small composable objects (Chameleon's ``token_selector`` idea) applied in order to next-token logits. The
stateless ones map ``(N, V) -> (N, V)``; :class:`ModalityConstraint` tracks per row whether it is inside an image
and how many codes it has written, and masks what each row may emit next (see :mod:`chameleon_lite.generation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chameleon_lite.vocab import Vocab

MODES: tuple[str, ...] = ("text", "image", "interleaved")


# ---------------------------------------------------------------------------------------------- sampling settings
@dataclass(frozen=True)
class SamplingParams:
    """Temperature / top-k / top-p for text tokens and, separately, for image codes.

    ``temperature == 0`` is greedy (argmax); ``top_k == 0`` and ``top_p == 1`` switch those filters off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    image_temperature: float = 1.0
    image_top_k: int = 0
    image_top_p: float = 1.0

    def __post_init__(self) -> None:
        for prefix in ("", "image_"):
            t, k, p = (getattr(self, prefix + n) for n in ("temperature", "top_k", "top_p"))
            if not isinstance(t, (int, float)) or t != t or t < 0:
                raise ValueError(f"{prefix}temperature={t!r} must be a number >= 0 (0 = greedy)")
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise ValueError(f"{prefix}top_k={k!r} must be an int >= 0 (0 = off)")
            if not isinstance(p, (int, float)) or not 0 < p <= 1:
                raise ValueError(f"{prefix}top_p={p!r} must lie in (0, 1]")

    def processors(self, image: bool) -> list[LogitsProcessor]:
        """The temperature/top-k/top-p chain for text (``image=False``) or image-code rows."""
        prefix = "image_" if image else ""
        t, k, p = (getattr(self, prefix + n) for n in ("temperature", "top_k", "top_p"))
        chain: list[LogitsProcessor] = []
        if t > 0 and t != 1:
            chain.append(Temperature(t))
        if k > 0:
            chain.append(TopK(k))
        if p < 1:
            chain.append(TopP(p))
        return chain

    def greedy(self, image: bool) -> bool:
        return (self.image_temperature if image else self.temperature) == 0


# ---------------------------------------------------------------------------------------------- logits processors
class LogitsProcessor:
    """A map ``logits (N, V) -> logits (N, V)``; disallowed tokens hold ``-inf``."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Temperature(LogitsProcessor):
    """Divide logits by ``temperature`` (> 0; greedy decoding is handled by the sampler, not here)."""

    def __init__(self, temperature: float) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 here (0 means greedy, handled by the sampler)")
        self.temperature = float(temperature)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature


class TopK(LogitsProcessor):
    """Keep the ``k`` largest logits of each row (ties at the k-th value are kept)."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"top_k={k} must be >= 1")
        self.k = int(k)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.k >= logits.shape[-1]:
            return logits
        kth = logits.topk(self.k, dim=-1).values[..., -1:]  # (N, 1)
        return logits.masked_fill(logits < kth, float("-inf"))


class TopP(LogitsProcessor):
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``p`` (>= 1 token)."""

    def __init__(self, p: float) -> None:
        if not 0 < p <= 1:
            raise ValueError(f"top_p={p} must lie in (0, 1]")
        self.p = float(p)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.p >= 1:
            return logits
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (N, V) probability of strictly more likely tokens
        drop_sorted = mass_before >= self.p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        return logits.masked_fill(drop, float("-inf"))


def apply_processors(logits: torch.Tensor, processors: Sequence[LogitsProcessor]) -> torch.Tensor:
    """Apply ``processors`` in order to ``logits`` ``(N, V)``."""
    for processor in processors:
        logits = processor(logits)
    return logits


class ModalityConstraint:
    """Which ids each row may emit next, given whether it is inside an image (state kept per row).

    Args:
        vocab: the unified vocabulary.
        grid: ``(h, w)`` image codes per image.
        mode: ``"text"`` (no images), ``"image"`` or ``"interleaved"`` (``<boi>`` allowed in text).
        use_eol: images carry an ``<eol>`` after each row of ``w`` codes (the bundle's ``use_eol``).
    """

    def __init__(self, vocab: Vocab, grid: tuple[int, int], mode: str, use_eol: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {MODES}")
        self.vocab, self.mode, self.use_eol = vocab, mode, use_eol
        self.h, self.w = (int(x) for x in grid)
        self.body_len = self.h * self.w + (self.h if use_eol else 0)  # tokens between <boi> and <eoi>
        self.text_allowed = vocab.mask(text=True, extra=[vocab.sep] + ([vocab.boi] if mode == "interleaved" else []))
        self.code_allowed = vocab.image_mask()
        self.eoi_only = vocab.mask(extra=[vocab.eoi])
        self.eol_only = vocab.mask(extra=[vocab.eol])
        self.in_image = torch.zeros(0, dtype=torch.bool)  # (B,)
        self.count = torch.zeros(0, dtype=torch.long)  # (B,) tokens written since the row's <boi>

    # ------------------------------------------------------------------ state
    def scan(self, ids: Sequence[int]) -> tuple[bool, int]:
        """The (in_image, count) state after reading ``ids``; raises on an over-long image."""
        in_image, count = False, 0
        for i in ids:
            if in_image:
                if i == self.vocab.eoi:
                    in_image, count = False, 0
                else:
                    count += 1
                    if count > self.body_len:
                        raise ValueError(f"an image in the prompt has more than {self.body_len} tokens before <eoi>")
            elif i == self.vocab.boi:
                in_image, count = True, 0
        return in_image, count

    def reset(self, prompts: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> None:
        """Start the per-row state from the end of each prompt."""
        states = [self.scan(p) for p in prompts]
        self.in_image = torch.tensor([s[0] for s in states], dtype=torch.bool, device=device)
        self.count = torch.tensor([s[1] for s in states], dtype=torch.long, device=device)
        for name in ("text_allowed", "code_allowed", "eoi_only", "eol_only"):
            setattr(self, name, getattr(self, name).to(device))

    def advance(self, tokens: torch.Tensor) -> None:
        """Update the state with the tokens ``(B,)`` just emitted."""
        closing = self.in_image & (tokens == self.vocab.eoi)
        opening = ~self.in_image & (tokens == self.vocab.boi)
        self.count = torch.where(self.in_image & ~closing, self.count + 1, torch.zeros_like(self.count))
        self.in_image = (self.in_image & ~closing) | opening

    # ------------------------------------------------------------------ masking
    def allowed(self) -> torch.Tensor:
        """Boolean ``(B, V)``: True where a row may emit the id next."""
        count = self.count[:, None]  # (B, 1)
        image_rows = torch.where(count >= self.body_len, self.eoi_only, self.code_allowed)  # (B, V)
        if self.use_eol:
            at_eol = (count < self.body_len) & ((count + 1) % (self.w + 1) == 0)  # (B, 1)
            image_rows = torch.where(at_eol, self.eol_only, image_rows)
        return torch.where(self.in_image[:, None], image_rows, self.text_allowed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask ``logits`` ``(B, V)`` of all rows with ``-inf`` where not allowed."""
        return logits.masked_fill(~self.allowed(), float("-inf"))
