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

2. **Engine** (:func:`iter_generate_ids`, :func:`generate_ids`, in :mod:`chameleon_lite.generation.engine`
   and re-exported here): one KV cache, left-padded batched prefill, one token per step for the whole batch through
   the lean decode step of :mod:`chameleon_lite.generation.fast_decode`,
   batched classifier-free guidance, seeded sampling.

3. **High-level API** (:func:`generate`, :func:`stream`; ``ChameleonLite.generate`` / ``.stream`` delegate here):
   prompts made of strings and PIL images, built into the training formats of ``data/task_formats.py``, and
   outputs decoded back to strings and PIL images.

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
from chameleon_lite.generation.engine import DEFAULT_MAX_NEW_TEXT_TOKENS, generate_ids, iter_generate_ids
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
    check_generation_args,
)
from chameleon_lite.tokenization.image_preprocessing import check_image

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- prompts
Segment = str | Image.Image


def _normalise_prompts(prompts: Any) -> tuple[list[list[Segment]], bool]:
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
def _prepare(model, prompts, mode, max_new_tokens, temperature, top_k, top_p, image_temperature, image_top_k,
             image_top_p, cfg_scale, seed, stop_ids, code_cache, decode_step="auto"):
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    sampling = SamplingParams(temperature, top_k, top_p, image_temperature, image_top_k, image_top_p)
    bundle = model.bundle
    if max_new_tokens is None:
        max_new_tokens = bundle.image_tokens - 1 if mode == "image" else DEFAULT_MAX_NEW_TEXT_TOKENS
    # the shared check (both arms, and the engine again): before any prompt image is encoded
    seed, stop_ids, cfg_scale = check_generation_args(bundle.vocab, sampling=sampling, seed=seed, stop_ids=stop_ids,
                                                      cfg_scale=cfg_scale, max_new_tokens=max_new_tokens)
    if cfg_scale != 1 and mode != "image":
        raise ValueError(f"cfg_scale={cfg_scale} needs mode='image' (guidance applies to image generation)")
    batch, single = _normalise_prompts(prompts)
    for i, p in enumerate(batch):  # every prompt is checked before any image of any prompt is encoded
        check_segments(p, "prompt" if single else f"prompts[{i}]")
    cache = code_cache if code_cache is not None else getattr(model, "image_code_cache", None)
    ids = [build_prompt_ids(p, mode, bundle, cache, where=f"prompts[{i}]" if not single else "prompt")
           for i, p in enumerate(batch)]  # all prompts are built (and so validated) before anything runs
    steps = iter_generate_ids(model.decoder, bundle.vocab, bundle.image_grid, ids, mode=mode,
                              max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids,
                              cfg_scale=cfg_scale, use_eol=bundle.use_eol, decode_step=decode_step)
    return steps, ids, single


def generate(
    model: Any,
    prompts: Any,
    *,
    mode: str = "text",
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    image_temperature: float = 1.0,
    image_top_k: int = 0,
    image_top_p: float = 1.0,
    cfg_scale: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    code_cache: ImageCodeCache | None = None,
    decode_step: str = "auto",
) -> list[Segment] | list[list[Segment]]:
    """Generate text and/or images with a ``ChameleonLite`` (anything with ``.decoder`` and ``.bundle``).

    Args:
        model: the model; its ``image_code_cache`` attribute (an :class:`ImageCodeCache`), when present, is used
            unless ``code_cache`` is given.
        prompts: one prompt (a ``str``, a ``PIL.Image`` or a list of them) or a batch (a list of prompts at least
            one of which is a list/tuple).
        mode: ``"text"``, ``"image"`` or ``"interleaved"`` (prompt formats: module docstring).
        max_new_tokens: budget per prompt; default 64 for text/interleaved, exactly one image for ``"image"``.
        temperature, top_k, top_p: text sampling (default greedy).
        image_temperature, image_top_k, image_top_p: image-code sampling (default temperature 1).
        cfg_scale: classifier-free guidance for ``mode="image"`` (``>= 1``).
        seed: seed of this call's generator (an int in ``[0, 2**64 - 1]``).
        stop_ids: extra ids that end a text (``<eos>`` always does); ints inside the vocabulary.
        decode_step: ``"auto"`` / ``"fast"`` / ``"static"`` / ``"cuda_graph"`` (see :func:`generate_ids`).

    Returns:
        For one prompt its output segments (``str`` and ``PIL.Image``); for a batch one such list per prompt.

    Raises:
        ValueError / TypeError naming the argument (``sampling.check_generation_args``: finite numbers, no bools,
        an integer seed in range, integer stop ids inside the vocabulary; prompt images with both sides >= 1 and
        an aspect ratio of at most 20). Everything is checked before anything runs.
    """
    steps, ids, single = _prepare(model, prompts, mode, max_new_tokens, temperature, top_k, top_p,
                                  image_temperature, image_top_k, image_top_p, cfg_scale, seed, stop_ids, code_cache,
                                  decode_step)
    new_ids: list[list[int]] = [[] for _ in ids]
    for tokens, emitted in steps:
        for b in torch.nonzero(emitted).flatten().tolist():
            new_ids[b].append(int(tokens[b]))
    outputs = [ids_to_segments(out, model.bundle, in_image=mode == "image") for out in new_ids]
    return outputs[0] if single else outputs


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
    *,
    mode: str = "text",
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    image_temperature: float = 1.0,
    image_top_k: int = 0,
    image_top_p: float = 1.0,
    cfg_scale: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    code_cache: ImageCodeCache | None = None,
    decode_step: str = "auto",
) -> Iterator[Segment | tuple[int, Segment]]:
    """Like :func:`generate`, but yields output as it is produced.

    For one prompt it yields text pieces (``str`` deltas) and ``PIL.Image`` objects; for a batch it yields
    ``(prompt_index, piece)``. Joining consecutive text pieces gives exactly what :func:`generate` returns with
    the same arguments. Arguments are validated when this is called, before the first item is requested.
    """
    steps, ids, single = _prepare(model, prompts, mode, max_new_tokens, temperature, top_k, top_p,
                                  image_temperature, image_top_k, image_top_p, cfg_scale, seed, stop_ids, code_cache,
                                  decode_step)
    return _stream_pieces(model.bundle, steps, len(ids), single, mode == "image")


def token_steps(model, prompts: Any, *, max_new_tokens: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The engine's steps of greedy text generation: one ``(tokens (B,), emitted (B,) bool)`` per decoded position,
    the first after prompt building, image encoding and prefill (what ``comparison.evaluate.measure_latency``
    times). Arguments are checked as in :func:`generate`."""
    steps, _, _ = _prepare(model, prompts, "text", max_new_tokens, 0.0, 0, 1.0, 1.0, 0, 1.0, 1.0, 0, (), None)
    return steps


def _stream_pieces(bundle, steps, n_rows: int, single: bool, in_image: bool) -> Iterator[Segment | tuple]:
    streamers = [_SegmentStreamer(bundle, in_image) for _ in range(n_rows)]
    for tokens, emitted in steps:
        for b in torch.nonzero(emitted).flatten().tolist():
            for piece in streamers[b].push(int(tokens[b])):
                yield piece if single else (b, piece)
    for b, streamer in enumerate(streamers):
        for piece in streamer.close():
            yield piece if single else (b, piece)


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
    "stream",
    "token_steps",
]
