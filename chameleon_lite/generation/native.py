"""The generation engine: batched, KV-cached decoding of text and image codes from one decoder.

Three layers, each usable alone:

1. **Logits processors** (Chameleon's ``token_selector`` idea): small objects applied in order to the next-token
   logits of the rows that are in one modality. :class:`Temperature`, :class:`TopK`, :class:`TopP` are stateless
   ``(N, V) -> (N, V)`` maps; :class:`ModalityConstraint` is stateful (it tracks, per row, whether the row is
   inside an image and how many image tokens it has written) and masks what each row may emit next:

   - outside an image: text pieces and ``<sep>`` (plus ``<boi>`` in ``"interleaved"`` mode); never image codes,
     ``<eoi>``, ``<eol>`` or reserved control slots;
   - inside an image: only image codes until exactly ``h*w`` codes are written (with the bundle's ``use_eol`` an
     ``<eol>`` is forced after every row of ``w`` codes), then only ``<eoi>``; after ``<eoi>`` text resumes.

   Temperature 0 means greedy (argmax); text and image codes have separate temperature / top-k / top-p
   (:class:`SamplingParams`).

2. **Engine** (:func:`iter_generate_ids`, :func:`generate_ids`, in :mod:`chameleon_lite.generation.engine` and
   re-exported
   here): one KV cache, left-padded batched prefill, one token per step for the whole batch through the decoder's
   own forward (:mod:`chameleon_lite.generation.fast_decode`), batched classifier-free guidance, seeded sampling.

3. **High-level API** (:func:`generate`, :func:`stream`; ``ChameleonLite.generate`` / ``.stream`` delegate here):
   prompts made of strings and PIL images, built into the training formats of ``data/task_formats.py``, and
   outputs decoded back to strings and PIL images. Options come as one
   :class:`~chameleon_lite.generation.config.GenerationConfig`; the arm is :class:`NativeGenerator` (the
   :mod:`chameleon_lite.generation.generator` interface, which the baseline implements too).

Prompt formats (decisions where the training formats leave a choice):

- ``mode="text"``: one image and some text -> QA: ``<bos> I question <sep>`` (the image is put first whatever
  the segment order, as in training, and the text segments are joined with a space); one image alone ->
  captioning: ``<bos> I``; text only, or several images -> the segments in order after ``<bos>`` (a document
  continuation, no ``<sep>``).
- ``mode="image"``: ``<bos> caption <boi>``, then exactly ``h*w`` codes and ``<eoi>`` (image segments in the
  prompt are kept in order before the ``<boi>``). The CFG unconditional prompt is ``<bos> <boi>``, the format
  training used for a dropped caption. Generation stops after ``<eoi>``.
- ``mode="interleaved"``: the segments in order after ``<bos>``; the model may open images with ``<boi>``.

A prompt is a ``str``, a ``PIL.Image`` or a list of them (segments). ``generate(prompt)`` for ONE prompt returns
its list of output segments; a list whose items are themselves lists/tuples is a batch and returns one segment
list per prompt. An image left unfinished when ``max_new_tokens`` runs out (interleaved mode) is dropped from
the decoded segments (its ids are still in :func:`generate_ids`'s output). Image codes of prompt images are
cached by a hash of the image's pixels (:class:`ImageCodeCache`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image

from chameleon_lite.data.task_formats import generation_prompt
from chameleon_lite.generation.config import GenerationConfig
from chameleon_lite.generation.engine import DEFAULT_MAX_NEW_TEXT_TOKENS, generate_ids, iter_generate_ids
from chameleon_lite.generation.generator import PreparedGeneration, run_generate, run_stream, run_token_steps
from chameleon_lite.generation.image_code_cache import ImageCodeCache
from chameleon_lite.generation.sampling import (
    MODES,
    LogitsProcessor,
    ModalityConstraint,
    SamplingParams,
    Temperature,
    TopK,
    TopP,
    apply_processors,
    check_stop_ids,
)
from chameleon_lite.tokenization.image_preprocessing import check_image

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- prompts
Segment = str | Image.Image


def normalise_prompts(prompts: Any) -> tuple[list[list[Segment]], bool]:
    """-> (list of segment lists, whether the input was a single prompt)."""
    if isinstance(prompts, (str, Image.Image)):
        return [[prompts]], True
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts must be a str, a PIL.Image, a non-empty list of them (one prompt), or a "
                         f"non-empty list of such lists (a batch); got {type(prompts).__name__}")
    if all(isinstance(p, (str, Image.Image)) for p in prompts):
        return [list(prompts)], True
    batch = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, Image.Image)):
            batch.append([p])
        elif isinstance(p, (list, tuple)):
            batch.append(list(p))
        else:
            raise ValueError(f"prompts[{i}] must be a str, a PIL.Image or a list of them, got {type(p).__name__}")
    return batch, False


def check_segments(segments: Sequence[Segment], where: str = "prompt") -> list[Segment]:
    """The prompt's segments without blank strings (both arms build prompts from these).

    ValueError for a segment of another type, an empty prompt, or an image with a side of 0 pixels or an
    aspect ratio the training readers skip (:func:`~chameleon_lite.tokenization.image_preprocessing.check_image`),
    naming the segment.
    """
    for j, seg in enumerate(segments):
        if not isinstance(seg, (str, Image.Image)):
            raise ValueError(f"{where} segment {j} must be a str or a PIL.Image, got {type(seg).__name__}")
        if isinstance(seg, Image.Image):
            check_image(seg, f"{where} segment {j} (an image)")
    segments = [s for s in segments if not (isinstance(s, str) and not s.strip())]
    if not segments:
        raise ValueError(f"{where} is empty (no text and no image)")
    return segments


def build_prompt_ids(
    segments: Sequence[Segment], mode: str, bundle: Any, code_cache: ImageCodeCache | None = None, *,
    where: str = "prompt",
) -> list[int]:
    """Segments of one prompt -> prompt ids in the training format of ``mode`` (see the module docstring and
    ``data.task_formats.generation_prompt``, which the baseline's prompts share)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    vocab = bundle.vocab
    segments = check_segments(segments, where)
    images = [s for s in segments if isinstance(s, Image.Image)]
    if images and bundle.image_tokenizer is None:
        raise ValueError(f"{where} has an image but the tokenizer bundle has no image tokenizer")
    cache = code_cache if code_cache is not None else ImageCodeCache()
    codes = iter(cache.codes(images, bundle.image_tokenizer)) if images else iter(())

    def image_ids(image: Image.Image) -> list[int]:  # <boi> codes [<eol> per row] <eoi>
        return vocab.image_to_ids(next(codes), eol=bundle.use_eol).tolist()

    return generation_prompt(mode, segments, vocab, bundle.text.encode, image_ids)


# ---------------------------------------------------------------------------------------------- outputs
def _decode_image(ids: list[int], bundle: Any) -> Image.Image:
    vocab = bundle.vocab
    codes = [i for i in ids if vocab.is_image(i)]
    grid = vocab.ids_to_image(codes, bundle.image_grid)  # (h, w)
    if bundle.image_tokenizer is None:
        raise ValueError("the tokenizer bundle has no image tokenizer to decode generated images with")
    device = next(bundle.image_tokenizer.parameters()).device
    pixels = bundle.image_tokenizer.decode(grid[None].to(device))  # (1, C, H, W)
    return bundle.image_tokenizer.to_pil(pixels.cpu())[0]


def ids_to_segments(ids: Sequence[int], bundle: Any, *, in_image: bool = False) -> list[Segment]:
    """Generated ids -> segments: runs of text pieces decoded to ``str``, complete images decoded to PIL.

    Control ids other than ``<boi>``/``<eoi>`` (``<eos>``, ``<sep>``, ...) and an unfinished trailing image are
    dropped; empty text segments are left out. ``in_image``: the ids continue an image opened by the prompt.
    """
    vocab = bundle.vocab
    segments: list[Segment] = []
    text: list[int] = []
    image: list[int] | None = [] if in_image else None
    for i in ids:
        if image is not None:
            if i == vocab.eoi:
                segments.append(_decode_image(image, bundle))
                image = None
            else:
                image.append(i)
        elif i == vocab.boi:
            if text:
                segments.append(bundle.text.decode(text))
                text = []
            image = []
        elif vocab.is_text(i):
            text.append(i)
    if text:
        segments.append(bundle.text.decode(text))
    return [s for s in segments if not (isinstance(s, str) and s == "")]


# ---------------------------------------------------------------------------------------------- high-level API
class NativeGenerator:
    """The native arm's :class:`~chameleon_lite.generation.generator.Generator`: prompts of strings and images are
    built into
    the training formats, outputs decoded back to strings and images.

    Args:
        model: a ``ChameleonLite`` (anything with ``.decoder`` and ``.bundle``); its ``image_code_cache``
            attribute (an :class:`ImageCodeCache`), when present, is used unless ``code_cache`` is given.
        code_cache: codes of prompt images already encoded.
    """

    def __init__(self, model: Any, code_cache: ImageCodeCache | None = None) -> None:
        self.model, self.bundle = model, model.bundle
        self.code_cache = code_cache if code_cache is not None else getattr(model, "image_code_cache", None)

    def prepare(self, prompts: Any, config: GenerationConfig) -> PreparedGeneration:
        bundle, mode = self.bundle, config.mode
        max_new_tokens = config.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = bundle.image_tokens - 1 if mode == "image" else DEFAULT_MAX_NEW_TEXT_TOKENS
        # the vocabulary-dependent check (stop ids), before any prompt image is encoded
        stop_ids = check_stop_ids(config.stop_ids, bundle.vocab)
        batch, single = normalise_prompts(prompts)
        for i, p in enumerate(batch):  # every prompt is checked before any image of any prompt is encoded
            check_segments(p, "prompt" if single else f"prompts[{i}]")
        ids = [build_prompt_ids(p, mode, bundle, self.code_cache, where=f"prompts[{i}]" if not single else "prompt")
               for i, p in enumerate(batch)]  # all prompts are built (and so validated) before anything runs
        steps = iter_generate_ids(self.model.decoder, bundle.vocab, bundle.image_grid, ids, mode=mode,
                                  max_new_tokens=max_new_tokens, sampling=config.sampling, seed=config.seed,
                                  stop_ids=sorted(stop_ids), cfg_scale=config.cfg_scale, use_eol=bundle.use_eol,
                                  decode_step=config.decode_step)
        return PreparedGeneration(steps, len(ids), single)

    def decode(self, ids: Sequence[int], config: GenerationConfig) -> list[Segment]:
        return ids_to_segments(ids, self.bundle, in_image=config.mode == "image")

    def streamer(self, config: GenerationConfig) -> _SegmentStreamer:
        return _SegmentStreamer(self.bundle, in_image=config.mode == "image")


def generate(
    model: Any,
    prompts: Any,
    config: GenerationConfig | None = None,
    *,
    code_cache: ImageCodeCache | None = None,
    **options: Any,
) -> list[Segment] | list[list[Segment]]:
    """Generate text and/or images with a ``ChameleonLite`` (anything with ``.decoder`` and ``.bundle``).

    Args:
        model: the model; its ``image_code_cache`` attribute (an :class:`ImageCodeCache`), when present, is used
            unless ``code_cache`` is given.
        prompts: one prompt (a ``str``, a ``PIL.Image`` or a list of them) or a batch (a list of prompts at least
            one of which is a list/tuple).
        config: a :class:`~chameleon_lite.generation.config.GenerationConfig` (mode, budget, sampling, guidance,
            seed, stop ids, decode step; default greedy text).
        options: fields of ``GenerationConfig`` (``mode="image"``, ``temperature=0.7``, ...) replacing those of
            ``config``: a convenience, the config documents them.

    Returns:
        For one prompt its output segments (``str`` and ``PIL.Image``); for a batch one such list per prompt.

    Raises:
        ValueError / TypeError naming the argument (``GenerationConfig``'s checks; stop ids inside the vocabulary;
        prompt images with both sides >= 1 and an aspect ratio of at most 20). Everything is checked before
        anything runs.
    """
    return run_generate(NativeGenerator(model, code_cache), prompts, GenerationConfig.build(config, **options))


class _SegmentStreamer:
    """Turns one row's tokens into text deltas and whole images as they complete."""

    def __init__(self, bundle: Any, in_image: bool) -> None:
        self.bundle = bundle
        self.text: list[int] = []
        self.emitted = ""
        self.image: list[int] | None = [] if in_image else None

    def _flush_text(self, final: bool) -> list[Segment]:
        if not self.text:
            return []
        decoded = self.bundle.text.decode(self.text)
        out: list[Segment] = []
        # hold back while the tail may be a partial multi-byte character or the prefix was re-segmented
        if decoded.startswith(self.emitted) and (final or not decoded.endswith("\ufffd")):
            delta = decoded[len(self.emitted) :]
            if delta:
                out.append(delta)
            self.emitted = decoded
        if final:
            self.text, self.emitted = [], ""
        return out

    def push(self, token: int) -> list[Segment]:
        vocab = self.bundle.vocab
        if self.image is not None:
            if token == vocab.eoi:
                image, self.image = self.image, None
                return [_decode_image(image, self.bundle)]
            self.image.append(token)
            return []
        if token == vocab.boi:
            out = self._flush_text(final=True)
            self.image = []
            return out
        if vocab.is_text(token):
            self.text.append(token)
            return self._flush_text(final=False)
        return []

    def close(self) -> list[Segment]:
        return self._flush_text(final=True)


def stream(
    model: Any,
    prompts: Any,
    config: GenerationConfig | None = None,
    *,
    code_cache: ImageCodeCache | None = None,
    **options: Any,
) -> Iterator[Segment | tuple[int, Segment]]:
    """Like :func:`generate`, but yields output as it is produced.

    For one prompt it yields text pieces (``str`` deltas) and ``PIL.Image`` objects; for a batch it yields
    ``(prompt_index, piece)``. Joining consecutive text pieces gives exactly what :func:`generate` returns with
    the same config. Arguments are validated when this is called, before the first item is requested.
    """
    return run_stream(NativeGenerator(model, code_cache), prompts, GenerationConfig.build(config, **options))


def token_steps(model, prompts: Any, *, max_new_tokens: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The engine's steps of greedy text generation: one ``(tokens (B,), emitted (B,) bool)`` per decoded position,
    the first after prompt building, image encoding and prefill (what ``comparison.evaluate.measure_latency``
    times). Arguments are checked as in :func:`generate`."""
    return run_token_steps(NativeGenerator(model), prompts, max_new_tokens)


def join_stream(pieces: Sequence[Segment]) -> list[Segment]:
    """Merge consecutive text pieces of one prompt's stream into the segment list :func:`generate` returns."""
    out: list[Segment] = []
    for piece in pieces:
        if isinstance(piece, str) and out and isinstance(out[-1], str):
            out[-1] += piece
        else:
            out.append(piece)
    return out


__all__ = [
    "MODES",
    "GenerationConfig",
    "NativeGenerator",
    "ImageCodeCache",
    "LogitsProcessor",
    "ModalityConstraint",
    "SamplingParams",
    "Temperature",
    "TopK",
    "TopP",
    "apply_processors",
    "build_prompt_ids",
    "generate",
    "generate_ids",
    "ids_to_segments",
    "iter_generate_ids",
    "join_stream",
    "normalise_prompts",
    "stream",
    "token_steps",
]
