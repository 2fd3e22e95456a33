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

2. **Engine** (:func:`iter_generate_ids`, :func:`generate_ids`): one KV cache preallocated for
   ``rows x (longest prompt + max_new_tokens)``; all prompts are prefilled in ONE forward with LEFT padding (pad
   slots carry their own document id, so real tokens never attend to them, and positions start at 0 at each
   prompt's first real token); then one token per step for the whole batch. A row finishes on ``<eos>`` or a stop
   id (outside images), or after ``<eoi>`` in ``"image"`` mode; finished rows keep being fed a pad token (the
   batch stays static, their output is frozen) and the loop ends when every row is done. Randomness comes from a
   ``torch.Generator`` seeded per call. Classifier-free guidance runs the conditional and unconditional streams
   as the two halves of one ``2B``-row batch (one forward per step); on image-code steps the logits are
   ``uncond + cfg_scale * (cond - uncond)``; the sampled token is fed to both halves.

3. **High-level API** (:func:`generate`, :func:`stream`; ``ChameleonLite.generate`` / ``.stream`` delegate here):
   prompts made of strings and PIL images, built into the training formats of ``data/token_documents.py``, and
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
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from chameleon_lite.image_code_cache import ImageCodeCache
from chameleon_lite.sampling import (
    MODES,
    LogitsProcessor,
    ModalityConstraint,
    SamplingParams,
    Temperature,
    TopK,
    TopP,
    apply_processors,
)
from chameleon_lite.vocab import Vocab

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TEXT_TOKENS = 64


# ---------------------------------------------------------------------------------------------- the engine
@dataclass
class _Batch:
    ids: torch.Tensor  # (R, L) left-padded prompt ids
    document_ids: torch.Tensor  # (R, L) 1 on pad slots, 0 on real tokens
    position_ids: torch.Tensor  # (R, L) 0.. from each prompt's first real token
    lengths: torch.Tensor  # (R,) real prompt lengths


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> _Batch:
    longest = max(len(p) for p in prompts)
    rows = len(prompts)
    ids = torch.full((rows, longest), pad_id, dtype=torch.long)
    document_ids = torch.ones(rows, longest, dtype=torch.long)
    position_ids = torch.zeros(rows, longest, dtype=torch.long)
    for r, prompt in enumerate(prompts):
        n = len(prompt)
        ids[r, longest - n :] = torch.tensor(list(prompt), dtype=torch.long)
        document_ids[r, longest - n :] = 0
        position_ids[r, longest - n :] = torch.arange(n)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return _Batch(ids.to(device), document_ids.to(device), position_ids.to(device), lengths.to(device))


def _check_prompt_ids(prompts: Any, vocab: Vocab, what: str) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"{what} must be a non-empty list of id lists")
    checked = []
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        if not ids:
            raise ValueError(f"{what}[{i}] is empty")
        bad = [t for t in ids if not 0 <= t < vocab.size]
        if bad:
            raise ValueError(f"{what}[{i}] has id {bad[0]} outside the vocabulary [0, {vocab.size})")
        checked.append(ids)
    return checked


def iter_generate_ids(
    decoder: torch.nn.Module,
    vocab: Vocab,
    grid: tuple[int, int],
    prompts: Sequence[Sequence[int]],
    *,
    mode: str = "text",
    max_new_tokens: int = DEFAULT_MAX_NEW_TEXT_TOKENS,
    sampling: SamplingParams | None = None,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    cfg_scale: float = 1.0,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    use_eol: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Decode step by step; yields ``(tokens (B,), emitted (B,) bool)`` once per step.

    ``emitted[b]`` is False for rows that had already finished (their ``tokens`` entry is meaningless). All
    arguments are validated before anything runs (see :func:`generate_ids` for their meaning).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    sampling = sampling if sampling is not None else SamplingParams()
    if not isinstance(cfg_scale, (int, float)) or not cfg_scale >= 1:
        raise ValueError(f"cfg_scale={cfg_scale!r} must be >= 1 (1 = no guidance)")
    prompts = _check_prompt_ids(prompts, vocab, "prompts")
    stop = {int(s) for s in stop_ids} | {vocab.eos}
    constraint = ModalityConstraint(vocab, grid, mode, use_eol)
    states = []
    for i, prompt in enumerate(prompts):
        in_image, count = constraint.scan(prompt)
        if mode == "text" and in_image:
            raise ValueError(f"prompts[{i}] ends inside an image (after <boi>) but mode='text' cannot write codes")
        if mode == "image":
            if not in_image:
                raise ValueError(f"prompts[{i}] must end inside an image (with <boi>) in mode='image'")
            needed = constraint.body_len - count + 1
            if max_new_tokens < needed:
                raise ValueError(f"max_new_tokens={max_new_tokens} is too small: prompts[{i}] needs {needed} more "
                                 f"tokens to finish its image (codes and <eoi>)")
        states.append(in_image)
    use_cfg = cfg_scale != 1 or uncond_prompts is not None
    if use_cfg:
        if mode != "image":
            raise ValueError(f"classifier-free guidance (cfg_scale={cfg_scale}) needs mode='image', got {mode!r}")
        if uncond_prompts is None:
            uncond_prompts = [[vocab.bos, vocab.boi]] * len(prompts)
        uncond_prompts = _check_prompt_ids(uncond_prompts, vocab, "uncond_prompts")
        if len(uncond_prompts) != len(prompts):
            raise ValueError(f"uncond_prompts has {len(uncond_prompts)} prompts, prompts has {len(prompts)}")
        for i, prompt in enumerate(uncond_prompts):
            if constraint.scan(prompt) != constraint.scan(prompts[i]):
                raise ValueError(f"uncond_prompts[{i}] must end at the same point of an image as prompts[{i}]")
    all_prompts = list(prompts) + (list(uncond_prompts) if use_cfg else [])
    longest = max(len(p) for p in all_prompts)
    max_seq_len = decoder.config.max_seq_len
    if longest + max_new_tokens > max_seq_len:
        raise ValueError(f"longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"max_seq_len={max_seq_len}")
    return _decode_loop(decoder, vocab, constraint, prompts, all_prompts, max_new_tokens, sampling, seed, stop,
                        float(cfg_scale), use_cfg, mode)


@torch.inference_mode()
def _decode_loop(decoder, vocab, constraint, prompts, all_prompts, max_new_tokens, sampling, seed, stop, cfg_scale,
                 use_cfg, mode) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    device = decoder.embed_tokens.weight.device
    B, R = len(prompts), len(all_prompts)  # R = 2B with guidance
    V = vocab.size
    batch = _left_pad(all_prompts, vocab.pad, device)
    longest = batch.ids.shape[1]
    cache = decoder.new_cache(R, longest + max_new_tokens, device=device)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    constraint.reset(prompts, device)
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    text_chain, image_chain = sampling.processors(image=False), sampling.processors(image=True)
    greedy_text, greedy_image = sampling.greedy(image=False), sampling.greedy(image=True)

    logits = decoder(batch.ids, position_ids=batch.position_ids, document_ids=batch.document_ids, cache=cache)
    logits = logits[:, -1, :V].float()  # (R, V)
    next_positions = batch.lengths.clone()  # (R,)
    active = torch.ones(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        in_image = constraint.in_image.clone()  # (B,) modality of the token about to be sampled
        if use_cfg:
            cond, uncond = logits[:B], logits[B:]
            guided = uncond + cfg_scale * (cond - uncond)
            logits = torch.where(in_image[:, None], guided, cond)  # (B, V)
        logits = constraint(logits)  # (B, V)
        logits = torch.where(in_image[:, None], apply_processors(logits, image_chain),
                             apply_processors(logits, text_chain))
        probs = logits.softmax(dim=-1)  # (B, V)
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        argmax = logits.argmax(dim=-1)  # (B,)
        greedy = torch.where(in_image, torch.tensor(greedy_image, device=device),
                             torch.tensor(greedy_text, device=device))
        tokens = torch.where(greedy, argmax, sampled)  # (B,)
        tokens = torch.where(active, tokens, torch.full_like(tokens, vocab.pad))
        yield tokens, active.clone()

        constraint.advance(tokens)
        finished = ~in_image & torch.isin(tokens, stop_ids)
        if mode == "image":
            finished |= in_image & (tokens == vocab.eoi)
        active = active & ~finished
        if not active.any() or step == max_new_tokens - 1:
            return
        feed = torch.cat([tokens, tokens]) if use_cfg else tokens  # (R,)
        logits = decoder(feed[:, None], position_ids=next_positions[:, None], cache=cache)[:, -1, :V].float()
        next_positions += 1


def generate_ids(
    decoder: torch.nn.Module,
    vocab: Vocab,
    grid: tuple[int, int],
    prompts: Sequence[Sequence[int]],
    *,
    mode: str = "text",
    max_new_tokens: int = DEFAULT_MAX_NEW_TEXT_TOKENS,
    sampling: SamplingParams | None = None,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    cfg_scale: float = 1.0,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    use_eol: bool = False,
) -> list[list[int]]:
    """Generate continuations of id prompts; returns the new ids of each prompt (its stop token included).

    Args:
        decoder: a ``Decoder`` (put it in eval mode: dropout is not switched off here).
        vocab: the unified vocabulary (named ids, ranges).
        grid: ``(h, w)`` codes per image.
        prompts: one list of ids per row, any lengths (left padded internally).
        mode: ``"text"`` (image codes and ``<boi>`` banned), ``"image"`` (each prompt must end inside an image,
            i.e. with ``<boi>``; exactly ``h*w`` codes then ``<eoi>``, then the row stops) or ``"interleaved"``.
        max_new_tokens: new tokens per row at most.
        sampling: text and image temperature / top-k / top-p (default: plain sampling at temperature 1).
        seed: seeds the ``torch.Generator`` of this call (same seed, same inputs -> same output).
        stop_ids: ids that end a row when emitted outside an image (``<eos>`` always does).
        cfg_scale: classifier-free guidance weight (``>= 1``; mode ``"image"`` only).
        uncond_prompts: the unconditional stream's prompts (default ``<bos> <boi>`` each); passing them turns the
            guided path on even at ``cfg_scale == 1``.
        use_eol: images carry ``<eol>`` after each row of codes.

    Raises:
        ValueError: a bad parameter (named), an empty or out-of-vocabulary prompt, or a prompt + budget longer
            than ``max_seq_len``. Everything is checked before any forward runs.
    """
    steps = iter_generate_ids(decoder, vocab, grid, prompts, mode=mode, max_new_tokens=max_new_tokens,
                              sampling=sampling, seed=seed, stop_ids=stop_ids, cfg_scale=cfg_scale,
                              uncond_prompts=uncond_prompts, use_eol=use_eol)
    outputs: list[list[int]] = [[] for _ in prompts]
    for tokens, emitted in steps:
        for b in torch.nonzero(emitted).flatten().tolist():
            outputs[b].append(int(tokens[b]))
    return outputs


# ---------------------------------------------------------------------------------------------- images <-> codes
def _image_ids(codes: torch.Tensor, vocab: Vocab, use_eol: bool) -> list[int]:
    """Codes ``(h, w)`` -> ``<boi> codes [<eol> per row] <eoi>`` as a list."""
    body = codes.long() + vocab.image_offset  # (h, w)
    if use_eol:
        body = torch.cat([body, body.new_full((body.shape[0], 1), vocab.eol)], dim=1)  # (h, w + 1)
    return [vocab.boi, *body.flatten().tolist(), vocab.eoi]


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


def build_prompt_ids(
    segments: Sequence[Segment], mode: str, bundle: Any, code_cache: ImageCodeCache | None = None, *,
    where: str = "prompt",
) -> list[int]:
    """Segments of one prompt -> prompt ids in the training format of ``mode`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    vocab = bundle.vocab
    for j, seg in enumerate(segments):
        if not isinstance(seg, (str, Image.Image)):
            raise ValueError(f"{where} segment {j} must be a str or a PIL.Image, got {type(seg).__name__}")
    segments = [s for s in segments if not (isinstance(s, str) and not s.strip())]
    if not segments:
        raise ValueError(f"{where} is empty (no text and no image)")
    images = [s for s in segments if isinstance(s, Image.Image)]
    if images and bundle.image_tokenizer is None:
        raise ValueError(f"{where} has an image but the tokenizer bundle has no image tokenizer")
    cache = code_cache if code_cache is not None else ImageCodeCache()
    codes = iter(cache.codes(images, bundle.image_tokenizer)) if images else iter(())

    def encode(seg: Segment) -> list[int]:
        if isinstance(seg, str):
            return bundle.text.encode(seg.strip())
        return _image_ids(next(codes), vocab, bundle.use_eol)

    texts = [s for s in segments if isinstance(s, str)]
    if mode == "text" and len(images) == 1 and texts:  # QA: image first, question, <sep>
        image_ids = encode(images[0])
        return [vocab.bos, *image_ids, *bundle.text.encode(" ".join(t.strip() for t in texts)), vocab.sep]
    ids = [vocab.bos]
    for seg in segments:
        ids.extend(encode(seg))
    if mode == "image":
        ids.append(vocab.boi)
    return ids


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
             image_top_p, cfg_scale, seed, stop_ids, code_cache):
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    sampling = SamplingParams(temperature, top_k, top_p, image_temperature, image_top_k, image_top_p)
    if not isinstance(cfg_scale, (int, float)) or not cfg_scale >= 1:
        raise ValueError(f"cfg_scale={cfg_scale!r} must be >= 1 (1 = no guidance)")
    if cfg_scale != 1 and mode != "image":
        raise ValueError(f"cfg_scale={cfg_scale} needs mode='image' (guidance applies to image generation)")
    bundle = model.bundle
    if max_new_tokens is None:
        max_new_tokens = bundle.image_tokens - 1 if mode == "image" else DEFAULT_MAX_NEW_TEXT_TOKENS
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    batch, single = _normalise_prompts(prompts)
    cache = code_cache if code_cache is not None else getattr(model, "image_code_cache", None)
    ids = [build_prompt_ids(p, mode, bundle, cache, where=f"prompts[{i}]" if not single else "prompt")
           for i, p in enumerate(batch)]  # all prompts are built (and so validated) before anything runs
    steps = iter_generate_ids(model.decoder, bundle.vocab, bundle.image_grid, ids, mode=mode,
                              max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids,
                              cfg_scale=cfg_scale, use_eol=bundle.use_eol)
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
        seed: seed of this call's generator.
        stop_ids: extra ids that end a text (``<eos>`` always does).

    Returns:
        For one prompt its output segments (``str`` and ``PIL.Image``); for a batch one such list per prompt.
    """
    steps, ids, single = _prepare(model, prompts, mode, max_new_tokens, temperature, top_k, top_p,
                                  image_temperature, image_top_k, image_top_p, cfg_scale, seed, stop_ids, code_cache)
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
) -> Iterator[Segment | tuple[int, Segment]]:
    """Like :func:`generate`, but yields output as it is produced.

    For one prompt it yields text pieces (``str`` deltas) and ``PIL.Image`` objects; for a batch it yields
    ``(prompt_index, piece)``. Joining consecutive text pieces gives exactly what :func:`generate` returns with
    the same arguments. Arguments are validated when this is called, before the first item is requested.
    """
    steps, ids, single = _prepare(model, prompts, mode, max_new_tokens, temperature, top_k, top_p,
                                  image_temperature, image_top_k, image_top_p, cfg_scale, seed, stop_ids, code_cache)
    return _stream_pieces(model.bundle, steps, len(ids), single, mode == "image")


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
]
