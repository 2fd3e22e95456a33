"""Text generation for the encoder-projector baseline, on the native arm's engine (``generation.iter_generate_ids``).

Prompts are built like the native arm's text mode, with the ``<image>`` placeholder where the native model has
``<boi> codes <eoi>``: one image and some text is a question, ``<bos> P question <sep>``; anything else is
``<bos>`` followed by the segments in order (an image alone asks for its caption). The placeholders are expanded
into the projected visual tokens and the engine prefills from those embeddings (``prompt_embeds``); decoding is
text mode (image codes and control tokens banned), greedy by default, stopping at ``<eos>``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image

from chameleon_lite.data.task_formats import generation_prompt
from chameleon_lite.generation.native import (
    DEFAULT_MAX_NEW_TEXT_TOKENS,
    _normalise_prompts,
    check_segments,
    iter_generate_ids,
)
from chameleon_lite.generation.sampling import SamplingParams, check_generation_args
from chameleon_lite.tokenization.image_preprocessing import preprocess_images
from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig

__all__ = ["build_baseline_prompt", "generate", "stream", "token_steps"]

Segment = str | Image.Image


def build_baseline_prompt(segments: Sequence[Segment], model: Any, where: str = "prompt") -> tuple[list[int], list]:
    """Segments -> (ids with one placeholder per image, the images in order): the native text mode's prompt
    (``data.task_formats.generation_prompt``) with the placeholder for each image's ids."""
    vocab = model.bundle.vocab
    segments = check_segments(segments, where)
    images = [s for s in segments if isinstance(s, Image.Image)]
    ids = generation_prompt("text", segments, vocab, model.bundle.text.encode, lambda _: [vocab.image_placeholder])
    return ids, images


@torch.inference_mode()
def _prepare(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_ids):
    if model.bundle is None:
        raise ValueError("the model has no tokenizer bundle; load it with BaselineVLM.from_pretrained")
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TEXT_TOKENS
    sampling = SamplingParams(temperature, top_k, top_p)
    # the native arm's argument check (sampling.check_generation_args), before the vision encoder runs
    seed, stop_ids, _ = check_generation_args(model.bundle.vocab, sampling=sampling, seed=seed, stop_ids=stop_ids,
                                              max_new_tokens=max_new_tokens)
    batch, single = _normalise_prompts(prompts)
    for i, p in enumerate(batch):  # every prompt (its images included) is checked before any image is encoded
        check_segments(p, "prompt" if single else f"prompts[{i}]")
    built = [build_baseline_prompt(p, model, where="prompt" if single else f"prompts[{i}]")
             for i, p in enumerate(batch)]
    prep = ImageTokenizerConfig(image_size=model.config.vit.image_size)
    ids_list, embeds_list = [], []
    for ids, images in built:
        pixels = preprocess_images(images, prep).to(model.device) if images else None  # (n, C, H, W)
        ids_t = torch.as_tensor([ids], device=model.device)  # (1, T)
        embeds, expanded, _, _ = model.embed_inputs(ids_t, pixels)  # (1, T', d), (1, T')
        ids_list.append(expanded[0].tolist())
        embeds_list.append(embeds[0])
    bundle = model.bundle
    steps = iter_generate_ids(model.decoder, bundle.vocab, bundle.image_grid, ids_list, mode="text",
                              max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids,
                              prompt_embeds=embeds_list)
    return steps, len(built), single


def generate(
    model: Any,
    prompts: Any,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    mode: str = "text",
) -> list:
    """Text answers/captions for one prompt (a list of ``str``/``PIL.Image`` segments) or a batch of them.

    Returns ``[text]`` for one prompt, or one ``[text]`` list per prompt for a batch (the same shape as the native
    ``generate``). ``mode`` exists for API symmetry and must be ``"text"``: the baseline cannot write images.
    Arguments and prompt images get the native arm's checks (``sampling.check_generation_args``,
    ``generation.check_segments``): TypeError / ValueError naming the argument, before anything runs.
    """
    if mode != "text":
        raise ValueError(f"mode={mode!r}: the encoder-projector baseline only generates text (mode='text')")
    steps, n, single = _prepare(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_ids)
    new_ids: list[list[int]] = [[] for _ in range(n)]
    for tokens, emitted in steps:
        for b in torch.nonzero(emitted).flatten().tolist():
            new_ids[b].append(int(tokens[b]))
    outputs = [[_decode_text(ids, model.bundle)] for ids in new_ids]
    return outputs[0] if single else outputs


def token_steps(model: Any, prompts: Any, *, max_new_tokens: int | None = None) -> Iterator:
    """The engine's steps of greedy text generation (``(tokens (B,), emitted (B,) bool)`` per decoded position),
    the first after prompt building, image encoding and prefill; as ``chameleon_lite.generation.native.token_steps``."""
    steps, _, _ = _prepare(model, prompts, max_new_tokens, 0.0, 0, 1.0, 0, ())
    return steps


def _decode_text(ids: Sequence[int], bundle: Any) -> str:
    return bundle.text.decode([i for i in ids if bundle.vocab.is_text(i) and i != bundle.vocab.eos])


def stream(model: Any, prompts: Any, **kwargs: Any) -> Iterator[str | tuple[int, str]]:
    """Yield text as it is decoded: ``str`` deltas for one prompt, ``(row, delta)`` for a batch.

    Arguments are validated when this is called, before the first item is requested (as the native ``stream``).
    """
    mode = kwargs.pop("mode", "text")
    if mode != "text":
        raise ValueError(f"mode={mode!r}: the encoder-projector baseline only generates text (mode='text')")
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_ids")
    defaults = (None, 0.0, 0, 1.0, 0, ())
    unknown = set(kwargs) - set(names)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
    args = [kwargs.get(k, d) for k, d in zip(names, defaults)]
    steps, n, single = _prepare(model, prompts, *args)
    return _stream_text(model, steps, n, single)


def _stream_text(model: Any, steps: Iterator, n: int, single: bool) -> Iterator[str | tuple[int, str]]:
    ids: list[list[int]] = [[] for _ in range(n)]
    shown = [""] * n
    for tokens, emitted in steps:
        for b in torch.nonzero(emitted).flatten().tolist():
            ids[b].append(int(tokens[b]))
            text = _decode_text(ids[b], model.bundle)
            if text.startswith(shown[b]) and len(text) > len(shown[b]) and not text.endswith("\ufffd"):
                delta, shown[b] = text[len(shown[b]):], text
                yield delta if single else (b, delta)
    for b in range(n):  # whatever a partial multi-byte piece held back
        text = _decode_text(ids[b], model.bundle)
        if text != shown[b] and text.startswith(shown[b]):
            yield text[len(shown[b]):] if single else (b, text[len(shown[b]):])
