"""Logits processing for generation: sampling settings, temperature / top-k / top-p, and the modality constraint.

:func:`check_generation_args` is the one argument check of the generation config, shared by both arms'
``generate`` (native and encoder-projector baseline) and the engine: finite numbers (no ``bool`` where a number is
expected), an integer seed that ``torch.Generator.manual_seed`` takes as given, integer stop ids inside the
vocabulary. :class:`SamplingParams` checks its own fields the same way.

Small composable objects (Chameleon's ``token_selector`` idea) applied in order to next-token logits. The
stateless ones map ``(N, V) -> (N, V)``; :class:`ModalityConstraint` tracks per row whether it is inside an image
and how many codes it has written, and masks what each row may emit next (see :mod:`chameleon_lite.generation.native`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from chameleon_lite.tokenization.vocab import Vocab

MODES: tuple[str, ...] = ("text", "image", "interleaved")
# torch.Generator.manual_seed takes [-2**63, 2**64) and maps a negative seed to seed + 2**64 (so -1 and 2**64 - 1
# would be the same stream); only the non-negative part is accepted, where each seed is its own stream
MAX_SEED = 2**64 - 1
# guided logits are uncond + cfg_scale * (cond - uncond) in float32: far beyond any useful weight (1 .. ~10) the
# product overflows to inf and 0 * inf gives NaN, so the weight is capped well below that
MAX_CFG_SCALE = 1e6


# ---------------------------------------------------------------------------------------------- argument checks
def _is_bool(value: object) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool is not a bool subclass


def check_number(name: str, value: object, *, minimum: float | None = None, exclusive_minimum: bool = False,
                 maximum: float | None = None, what: str = "") -> float:
    """``value`` as a float if it is a finite real number (not a bool) inside the bounds; else TypeError (not a
    number) or ValueError (NaN, infinite or out of range), each naming ``name``."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a number{what}, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}={value!r} must be a finite number{what}")
    if minimum is not None and (number <= minimum if exclusive_minimum else number < minimum):
        raise ValueError(f"{name}={value!r} must be {'>' if exclusive_minimum else '>='} {minimum:g}{what}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name}={value!r} must be <= {maximum:g}{what}")
    return number


def check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None,
              what: str = "") -> int:
    """``value`` as an int if it is an integer (not a bool, not a float such as 1.0) in ``[minimum, maximum]``;
    else TypeError / ValueError naming ``name``."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an int{what}, got {type(value).__name__}")
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        bounds = f"in [{minimum}, {maximum}]" if minimum is not None and maximum is not None else (
            f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise ValueError(f"{name}={value!r} must be an int {bounds}{what}")
    return number


def check_seed(seed: object) -> int:
    """An integer seed in ``[0, MAX_SEED]`` (the range where ``torch.Generator.manual_seed`` keeps every seed
    distinct); ``1.5`` or ``True`` is a TypeError, ``-1`` or ``2**70`` a ValueError."""
    return check_int("seed", seed, minimum=0, maximum=MAX_SEED, what=" (a torch.Generator seed: 0 .. 2**64 - 1)")


def check_stop_ids(stop_ids: object, vocab: Vocab) -> frozenset[int]:
    """Stop ids as a set: an iterable (not a string) of ints inside ``[0, vocab.size)``."""
    if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, Iterable):
        raise TypeError(f"stop_ids={stop_ids!r} must be a list of token ids, got {type(stop_ids).__name__}")
    items = stop_ids.tolist() if hasattr(stop_ids, "tolist") else list(stop_ids)  # tensors, numpy arrays
    if not isinstance(items, list):  # a 0-dim tensor or array
        raise TypeError(f"stop_ids={stop_ids!r} must be a list of token ids, got a single value")
    return frozenset(check_int(f"stop_ids[{i}]", s, minimum=0, maximum=vocab.size - 1,
                               what=f" (a token id of the {vocab.size}-token vocabulary)")
                     for i, s in enumerate(items))


def check_cfg_scale(cfg_scale: object) -> float:
    """Classifier-free guidance weight: a finite number in ``[1, MAX_CFG_SCALE]`` (1 = no guidance)."""
    return check_number("cfg_scale", cfg_scale, minimum=1, maximum=MAX_CFG_SCALE, what=" (1 = no guidance)")


def check_generation_args(vocab: Vocab, *, sampling: SamplingParams | None = None, seed: object = 0,
                          stop_ids: object = (), cfg_scale: object = 1.0,
                          max_new_tokens: object = None) -> tuple[int, frozenset[int], float]:
    """The one check of a generation config, for both arms: returns ``(seed, stop ids, cfg_scale)``.

    ``sampling`` must be a :class:`SamplingParams` (which checked its own numbers) or None; ``max_new_tokens``, when
    not None, a positive int. Raises TypeError / ValueError naming the argument; nothing is run before.
    """
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    if max_new_tokens is not None:
        check_int("max_new_tokens", max_new_tokens, minimum=1, what=" (a positive int)")
    return check_seed(seed), check_stop_ids(stop_ids, vocab), check_cfg_scale(cfg_scale)


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
        """Check every field (finite numbers, no bools; TypeError / ValueError naming the field) and store
        them as plain ``float`` / ``int``."""
        for prefix in ("", "image_"):
            t, k, p = (getattr(self, prefix + n) for n in ("temperature", "top_k", "top_p"))
            t = check_number(f"{prefix}temperature", t, minimum=0, what=" (0 = greedy)")
            k = check_int(f"{prefix}top_k", k, minimum=0, what=" (0 = off)")
            p = check_number(f"{prefix}top_p", p, minimum=0, exclusive_minimum=True, maximum=1,
                             what=" (it must lie in (0, 1])")
            for name, value in (("temperature", t), ("top_k", k), ("top_p", p)):
                object.__setattr__(self, prefix + name, value)

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
        temperature = check_number("temperature", temperature)
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 here (0 means greedy, handled by the sampler)")
        self.temperature = float(temperature)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        # shifted by the row maximum and divided in float64: any finite temperature > 0 gives no NaN (a tiny one
        # leaves 0 for the best token and -inf for the rest, i.e. greedy; in float32 it would round to 0 and
        # 0 / 0 = NaN, or overflow to inf - inf in the softmax)
        top = logits.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).min)  # (N, 1)
        return ((logits - top).double() / self.temperature).to(logits.dtype)  # (N, V)


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
