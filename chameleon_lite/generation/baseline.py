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
from chameleon_lite.generation.config import GenerationConfig
from chameleon_lite.generation.generator import PreparedGeneration, run_generate, run_stream, run_token_steps
from chameleon_lite.generation.native import (
    DEFAULT_MAX_NEW_TEXT_TOKENS,
    check_segments,
    iter_generate_ids,
    normalise_prompts,
)
from chameleon_lite.generation.sampling import check_stop_ids
from chameleon_lite.tokenization.image_preprocessing import preprocess_images
from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig

__all__ = ["BaselineGenerator", "build_baseline_prompt", "generate", "stream", "token_steps"]

Segment = str | Image.Image


def build_baseline_prompt(segments: Sequence[Segment], model: Any, where: str = "prompt") -> tuple[list[int], list]:
    """Segments -> (ids with one placeholder per image, the images in order): the native text mode's prompt
    (``data.task_formats.generation_prompt``) with the placeholder for each image's ids."""
    vocab = model.bundle.vocab
    segments = check_segments(segments, where)
    images = [s for s in segments if isinstance(s, Image.Image)]
    ids = generation_prompt("text", segments, vocab, model.bundle.text.encode, lambda _: [vocab.image_placeholder])
    return ids, images


class BaselineGenerator:
    """The baseline's :class:`~chameleon_lite.generation.generator.Generator`: text mode only, prompts prefilled from
    the
    projected visual tokens (``prompt_embeds``), outputs decoded to text."""

    def __init__(self, model: Any) -> None:
        if model.bundle is None:
            raise ValueError("the model has no tokenizer bundle; load it with BaselineVLM.from_pretrained")
        self.model, self.bundle = model, model.bundle

    @torch.inference_mode()
    def prepare(self, prompts: Any, config: GenerationConfig) -> PreparedGeneration:
        if config.mode != "text":
            raise ValueError(f"mode={config.mode!r}: the encoder-projector baseline only generates text (mode='text')")
        model, bundle = self.model, self.bundle
        max_new_tokens = config.max_new_tokens if config.max_new_tokens is not None else DEFAULT_MAX_NEW_TEXT_TOKENS
        stop_ids = check_stop_ids(config.stop_ids, bundle.vocab)  # before the vision encoder runs
        batch, single = normalise_prompts(prompts)
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
        steps = iter_generate_ids(model.decoder, bundle.vocab, bundle.image_grid, ids_list, mode="text",
                                  max_new_tokens=max_new_tokens, sampling=config.sampling, seed=config.seed,
                                  stop_ids=sorted(stop_ids), prompt_embeds=embeds_list,
                                  decode_step=config.decode_step)
        return PreparedGeneration(steps, len(built), single)

    def decode(self, ids: Sequence[int], config: GenerationConfig) -> list[str]:
        return [_decode_text(ids, self.bundle)]

    def streamer(self, config: GenerationConfig) -> _TextStreamer:
        return _TextStreamer(self.bundle)


def generate(model: Any, prompts: Any, config: GenerationConfig | None = None, **options: Any) -> list:
    """Text answers/captions for one prompt (a list of ``str``/``PIL.Image`` segments) or a batch of them.

    ``config``: a :class:`~chameleon_lite.generation.config.GenerationConfig` (default greedy text); ``options``
    are its field names, replacing those of ``config``. Returns ``[text]`` for one prompt, or one ``[text]`` list
    per prompt for a batch (the same shape as the native ``generate``). ``mode`` must be ``"text"``: the baseline
    cannot write images. Arguments and prompt images get the native arm's checks (``GenerationConfig``,
    ``generation.check_segments``): TypeError / ValueError naming the argument, before anything runs.
    """
    return run_generate(BaselineGenerator(model), prompts, GenerationConfig.build(config, **options))


def token_steps(model: Any, prompts: Any, *, max_new_tokens: int | None = None) -> Iterator:
    """The engine's steps of greedy text generation (``(tokens (B,), emitted (B,) bool)`` per decoded position),
    the first after prompt building, image encoding and prefill; as ``chameleon_lite.generation.native.token_steps``."""
    return run_token_steps(BaselineGenerator(model), prompts, max_new_tokens)


def _decode_text(ids: Sequence[int], bundle: Any) -> str:
    return bundle.text.decode([i for i in ids if bundle.vocab.is_text(i) and i != bundle.vocab.eos])


def stream(model: Any, prompts: Any, config: GenerationConfig | None = None,
           **options: Any) -> Iterator[str | tuple[int, str]]:
    """Yield text as it is decoded: ``str`` deltas for one prompt, ``(row, delta)`` for a batch.

    Arguments are validated when this is called, before the first item is requested (as the native ``stream``).
    """
    return run_stream(BaselineGenerator(model), prompts, GenerationConfig.build(config, **options))


class _TextStreamer:
    """One row's text deltas as its tokens come (a partial multi-byte piece is held back until complete)."""

    def __init__(self, bundle: Any) -> None:
        self.bundle, self.ids, self.shown = bundle, [], ""

    def push(self, token: int) -> list[str]:
        self.ids.append(token)
        text = _decode_text(self.ids, self.bundle)
        if text.startswith(self.shown) and len(text) > len(self.shown) and not text.endswith("\ufffd"):
            delta, self.shown = text[len(self.shown):], text
            return [delta]
        return []

    def close(self) -> list[str]:
        text = _decode_text(self.ids, self.bundle)
        if text != self.shown and text.startswith(self.shown):
            return [text[len(self.shown):]]
        return []
