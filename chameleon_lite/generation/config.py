"""The one public generation config: every option of a generation call, defined and documented once.

``ChameleonLite.generate`` / ``.stream``, ``chameleon_lite.generation.native.generate`` / ``stream``, the baseline's
``generate`` / ``stream``, ``chameleon-lite generate`` and the comparison all take a :class:`GenerationConfig`
(the old keyword arguments of ``generate``/``stream`` remain as a convenience: they are the config's field names
and build one, see :meth:`GenerationConfig.build`). Each arm turns it into engine calls through its generator
(:mod:`chameleon_lite.generation.generator`).

Checks that need no vocabulary (types, ranges, mode/guidance consistency) run when the config is made; stop ids are
checked against the model's vocabulary when a call starts, before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from chameleon_lite.generation.sampling import MODES, SamplingParams, check_cfg_scale, check_int, check_seed

DECODE_STEPS: tuple[str, ...] = ("auto", "fast", "static", "cuda_graph")

__all__ = ["DECODE_STEPS", "GenerationConfig"]


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate: output mode, budget, sampling per modality, guidance, seed, stop ids, decode step.

    Args:
        mode: ``"text"``, ``"image"`` or ``"interleaved"`` (prompt formats: ``chameleon_lite.generation.native``). The
            encoder-projector baseline writes text only (``"text"``).
        max_new_tokens: new tokens per prompt at most; None: 64 for text/interleaved, exactly one image
            (``h*w`` codes, ``<eoi>``) for ``"image"``.
        temperature, top_k, top_p: text sampling; ``temperature=0`` is greedy (the default), ``top_k=0`` and
            ``top_p=1`` switch those filters off.
        image_temperature, image_top_k, image_top_p: the same for image codes (default: sampling at temperature 1).
        cfg_scale: classifier-free guidance weight for ``mode="image"`` (``>= 1``; 1 = off).
        seed: seeds the ``torch.Generator`` of the call (same seed and inputs, same output); an int in
            ``[0, 2**64 - 1]``.
        stop_ids: extra ids that end a row when emitted outside an image (``<eos>`` always does).
        decode_step: how each decode step runs: ``"auto"`` (= ``"fast"``), ``"fast"`` (the decoder's forward,
            eager), ``"static"`` (the same forward on a static KV cache, eager) or ``"cuda_graph"`` (that static
            forward captured as CUDA graphs and replayed; CUDA only). All compute the same function.

    Raises:
        TypeError / ValueError naming the field (finite numbers, no bools, an integer seed in range, a known mode
        and decode step, guidance only with ``mode="image"``).
    """

    mode: str = "text"
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    image_temperature: float = 1.0
    image_top_k: int = 0
    image_top_p: float = 1.0
    cfg_scale: float = 1.0
    seed: int = 0
    stop_ids: Sequence[int] = ()
    decode_step: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        if self.decode_step not in DECODE_STEPS:
            raise ValueError(f"decode_step={self.decode_step!r} must be one of {DECODE_STEPS}")
        if self.max_new_tokens is not None:
            check_int("max_new_tokens", self.max_new_tokens, minimum=1, what=" (a positive int)")
        sampling = self.sampling  # checks the six sampling numbers (SamplingParams)
        for name in ("temperature", "top_k", "top_p", "image_temperature", "image_top_k", "image_top_p"):
            object.__setattr__(self, name, getattr(sampling, name))
        object.__setattr__(self, "seed", check_seed(self.seed))
        object.__setattr__(self, "cfg_scale", check_cfg_scale(self.cfg_scale))
        if self.cfg_scale != 1 and self.mode != "image":
            raise ValueError(f"cfg_scale={self.cfg_scale} needs mode='image' (guidance applies to image generation)")

    @property
    def sampling(self) -> SamplingParams:
        """The temperature / top-k / top-p of both modalities, as the engine takes them."""
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.image_temperature, self.image_top_k,
                              self.image_top_p)

    @classmethod
    def build(cls, config: GenerationConfig | None = None, **options: Any) -> GenerationConfig:
        """``config`` (default: the defaults) with the given fields replaced; an unknown name is a TypeError."""
        if config is not None and not isinstance(config, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unexpected generation option(s) {unknown}; GenerationConfig has "
                            f"{[f.name for f in fields(cls)]}")
        if config is None:
            return cls(**options)
        return replace(config, **options) if options else config
