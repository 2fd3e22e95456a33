"""The small interface each arm implements for generation, and the one driver that runs any of them.

An arm (the native model: ``generation.NativeGenerator``; the encoder-projector baseline:
``baseline_generation.BaselineGenerator``) turns prompts and a :class:`~chameleon_lite.generation.config.
GenerationConfig` into the engine's token steps (:meth:`Generator.prepare`), and one row's new ids back into output
segments (:meth:`Generator.decode`, :meth:`Generator.streamer`). :func:`run_generate`, :func:`run_stream` and
:func:`run_token_steps` drive any generator, so ``generate``, ``stream``, ``token_steps`` (what
``comparison.evaluate.measure_latency`` times) and the comparison treat both arms alike; nothing calls another
module's private functions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from chameleon_lite.generation.config import GenerationConfig

__all__ = ["Generator", "PreparedGeneration", "RowStreamer", "run_generate", "run_stream", "run_token_steps"]


@dataclass
class PreparedGeneration:
    """A validated, started call: the engine's steps (``(tokens (B,), emitted (B,) bool)`` each, lazily run), the
    number of prompts and whether a single prompt (not a batch) was given."""

    steps: Iterator[tuple[torch.Tensor, torch.Tensor]]
    n_prompts: int
    single: bool


class RowStreamer(Protocol):
    """Turns one row's tokens into output pieces as they come (text deltas, whole images)."""

    def push(self, token: int) -> list[Any]: ...

    def close(self) -> list[Any]: ...


class Generator(Protocol):
    """What an arm implements so the generic driver can run it."""

    def prepare(self, prompts: Any, config: GenerationConfig) -> PreparedGeneration:
        """Check everything (config against the vocabulary, prompts, images), build the prompts and return the
        engine's steps; nothing is decoded until the steps are iterated."""
        ...

    def decode(self, ids: Sequence[int], config: GenerationConfig) -> list[Any]:
        """One row's new ids -> its output segments (``str`` and, for the native arm, ``PIL.Image``)."""
        ...

    def streamer(self, config: GenerationConfig) -> RowStreamer:
        """A fresh streamer for one row."""
        ...


def run_generate(generator: Generator, prompts: Any, config: GenerationConfig) -> list:
    """All output segments: one list for a single prompt, one list per prompt for a batch."""
    prepared = generator.prepare(prompts, config)
    new_ids: list[list[int]] = [[] for _ in range(prepared.n_prompts)]
    for tokens, emitted in prepared.steps:
        for b in torch.nonzero(emitted).flatten().tolist():
            new_ids[b].append(int(tokens[b]))
    outputs = [generator.decode(ids, config) for ids in new_ids]
    return outputs[0] if prepared.single else outputs


def run_stream(generator: Generator, prompts: Any, config: GenerationConfig) -> Iterator[Any]:
    """Output pieces as they are produced: pieces for a single prompt, ``(prompt_index, piece)`` for a batch.
    Everything is checked when this is called, before the first piece is requested."""
    prepared = generator.prepare(prompts, config)
    return _pieces(generator, prepared, config)


def _pieces(generator: Generator, prepared: PreparedGeneration, config: GenerationConfig) -> Iterator[Any]:
    streamers = [generator.streamer(config) for _ in range(prepared.n_prompts)]
    for tokens, emitted in prepared.steps:
        for b in torch.nonzero(emitted).flatten().tolist():
            for piece in streamers[b].push(int(tokens[b])):
                yield piece if prepared.single else (b, piece)
    for b, streamer in enumerate(streamers):
        for piece in streamer.close():
            yield piece if prepared.single else (b, piece)


def run_token_steps(generator: Generator, prompts: Any, max_new_tokens: int | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The engine's steps of greedy text generation, the first after prompt building, image encoding and prefill."""
    return generator.prepare(prompts, GenerationConfig(max_new_tokens=max_new_tokens)).steps
