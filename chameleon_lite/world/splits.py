"""Compositional train/val/test splits of the shapes world.

A few ``(colour, shape)`` combos are **held out**: train and val scenes never contain them (every colour and
every shape still appears, just not in those pairings), test scenes contain them in a controlled fraction, so
a model's accuracy on test scenes with held-out combos measures compositional generalisation.

``val_held_out`` is a second validation split, like CLEVR-CoGenT's valB: every scene is built around a held-out
combo. No weight ever sees it; it lets a choice made on validation (a stage-3 recipe, say) see the trade between
seen and novel objects that test measures. Choosing on it is what DomainBed calls test-domain ("oracle")
validation: the test scenes stay unread, the held-out combos do not stay unseen by the person choosing.

Seeds: split ``s`` of ``train``/``val``/``test`` with base seed ``k`` draws from the stream ``k * 3 + index(s)``
(train 0, val 1, test 2), so the three splits' streams are disjoint for every pair of base seeds.
``val_held_out``, added later, draws from the string seed ``"k/val_held_out"``: no integer stream, so the
three older splits (and every figure recorded on them) are as they were.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from chameleon_lite.world.scenes import Combo, Scene, WorldConfig, sample_scene

SPLITS: tuple[str, ...] = ("train", "val", "test", "val_held_out")
_INTEGER_STREAMS: tuple[str, ...] = ("train", "val", "test")  # the splits drawn from integer stream seeds

DEFAULT_HELD_OUT: frozenset[Combo] = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("green", "square"), ("yellow", "star")}
)


def split_seed(split: str, seed: int) -> int | str:
    """The stream seed of ``split`` for base ``seed`` (``random.Random`` takes either kind); distinct splits
    never share a stream seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if split not in _INTEGER_STREAMS:
        return f"{seed}/{split}"
    return seed * len(_INTEGER_STREAMS) + _INTEGER_STREAMS.index(split)


@dataclass(frozen=True)
class CompositionalSplit:
    """Held-out ``(colour, shape)`` combos of a world and samplers for its splits.

    ``test_held_out_fraction``: share of test scenes built around a held-out combo (one object with a random
    held-out combo; the others drawn from the whole world); the rest follow the train distribution.
    """

    held_out: frozenset[Combo] = DEFAULT_HELD_OUT
    config: WorldConfig = field(default_factory=WorldConfig)
    test_held_out_fraction: float = 0.5

    def __post_init__(self) -> None:
        held_out = frozenset(tuple(c) for c in self.held_out)
        object.__setattr__(self, "held_out", held_out)
        if not held_out:
            raise ValueError("held_out must name at least one (colour, shape) combo")
        world = set(self.config.all_combos())
        unknown = sorted(held_out - world)
        if unknown:
            raise ValueError(f"held-out combos {unknown} are not in the world")
        kept = world - held_out
        for color in self.config.colors:
            if not any(c == color for c, _ in kept):
                raise ValueError(f"colour {color!r} appears in no training combo; the split would not be compositional")
        for shape in self.config.shapes:
            if not any(s == shape for _, s in kept):
                raise ValueError(f"shape {shape!r} appears in no training combo; the split would not be compositional")
        if not 0.0 <= self.test_held_out_fraction <= 1.0:
            raise ValueError(f"test_held_out_fraction must be in [0, 1], got {self.test_held_out_fraction}")

    def held_out_in(self, scene: Scene) -> tuple[Combo, ...]:
        """The held-out combos present in ``scene`` (sorted; empty for every train/val scene, never empty for a
        val_held_out scene)."""
        return tuple(sorted(scene.combos() & self.held_out))

    def sampler(self, split: str, seed: int) -> SplitSampler:
        """A deterministic scene sampler for ``split`` (one of ``SPLITS``)."""
        return SplitSampler(self, split, seed)


class SplitSampler:
    """Scenes of one split. ``sample()`` -> Scene; ``sample_flagged()`` -> (Scene, held-out combos present)."""

    def __init__(self, split: CompositionalSplit, name: str, seed: int) -> None:
        self.split, self.name, self.seed = split, name, seed
        self._rng = random.Random(split_seed(name, seed))
        self._held_out = sorted(split.held_out)

    def sample(self) -> Scene:
        rng, config = self._rng, self.split.config
        if self.name == "val_held_out" or (self.name == "test" and rng.random() < self.split.test_held_out_fraction):
            return sample_scene(rng, config, require_combo=rng.choice(self._held_out))
        return sample_scene(rng, config, exclude_combos=self.split.held_out)

    def sample_flagged(self) -> tuple[Scene, tuple[Combo, ...]]:
        scene = self.sample()
        return scene, self.split.held_out_in(scene)

    def sample_many(self, n: int) -> list[Scene]:
        return [self.sample() for _ in range(n)]
