"""The shapes world: vocabulary, scenes and seeded scene sampling.

A scene is a handful of coloured shapes on a plain background, one object per cell of a coarse
``grid x grid`` layout. Because positions are cells, spatial relations are unambiguous:

- ``A left of B``  iff ``A.col < B.col``;  ``A right of B`` iff ``A.col > B.col``
- ``A above B``    iff ``A.row < B.row``;  ``A below B``    iff ``A.row > B.row``

Notable choices:

- Everything that defines the world (shapes, colours, sizes, how big a size is) lives here, so the
  renderer, the language generator and the scene parser agree by construction.
- ``Scene`` stores its objects in canonical row-major order, so two equal scenes compare equal and
  serialise to the same JSON.
- Colours and shapes are sampled with a mild popularity skew (``WorldConfig.frequency_skew``): the i-th
  colour/shape of the config has probability proportional to ``(i + 1) ** -skew``. This gives POPE's
  "popular" negatives a meaning (see ``combo_probabilities``); ``frequency_skew=0`` is uniform.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
"""Every shape the renderer and the parser know (all reliably told apart at 64x64 for both sizes)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 125, 15),
    "yellow": (250, 225, 30),
    "green": (35, 165, 60),
    "cyan": (20, 190, 210),
    "blue": (35, 70, 220),
    "purple": (135, 45, 185),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
"""Named colours (sRGB). Any of them may be the background or an object colour, never both in one world."""

SIZES: tuple[str, ...] = ("small", "large")

SIZE_EXTENT: dict[str, float] = {"small": 0.45, "large": 0.8}
"""Side of an object's bounding box as a fraction of the cell side (one geometry shared by render and parser)."""

DEFAULT_OBJECT_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
DEFAULT_BACKGROUND = "white"

Combo = tuple[str, str]
"""A ``(colour, shape)`` pair, the unit of compositional splits and existence questions."""


@dataclass(frozen=True)
class SceneObject:
    """One shape in one grid cell."""

    shape: str
    color: str
    size: str
    row: int
    col: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known shapes: {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; known colours: {tuple(COLORS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; known sizes: {SIZES}")
        for name in ("row", "col"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SceneObject.{name} must be a non-negative int, got {value!r}")

    @property
    def combo(self) -> Combo:
        """The ``(colour, shape)`` pair of this object."""
        return (self.color, self.shape)

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "row": self.row, "col": self.col}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SceneObject:
        missing = {"shape", "color", "size", "row", "col"} - set(data)
        if missing:
            raise ValueError(f"SceneObject dict lacks keys {sorted(missing)}")
        return cls(str(data["shape"]), str(data["color"]), str(data["size"]), int(data["row"]), int(data["col"]))


@dataclass(frozen=True)
class Scene:
    """An immutable scene: objects in canonical row-major order, at most one per cell."""

    objects: tuple[SceneObject, ...]
    grid: int = 3
    background: str = DEFAULT_BACKGROUND

    def __post_init__(self) -> None:
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"Scene.grid must be a positive int, got {self.grid!r}")
        if self.background not in COLORS:
            raise ValueError(f"unknown background colour {self.background!r}")
        objects = tuple(self.objects)
        for obj in objects:
            if not isinstance(obj, SceneObject):
                raise ValueError(f"Scene.objects must hold SceneObject, got {type(obj).__name__}")
            if obj.row >= self.grid or obj.col >= self.grid:
                raise ValueError(f"object {obj} lies outside the {self.grid}x{self.grid} grid")
            if obj.color == self.background:
                raise ValueError(f"object {obj} has the background colour {self.background!r} (it would be invisible)")
        cells = [obj.cell for obj in objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {sorted(cells)}")
        object.__setattr__(self, "objects", tuple(sorted(objects, key=lambda o: o.cell)))

    def __len__(self) -> int:
        return len(self.objects)

    def at(self, row: int, col: int) -> SceneObject | None:
        """The object in cell ``(row, col)``, or None."""
        for obj in self.objects:
            if obj.row == row and obj.col == col:
                return obj
        return None

    def free_cells(self) -> list[tuple[int, int]]:
        """Empty cells, row-major."""
        used = {obj.cell for obj in self.objects}
        return [(r, c) for r in range(self.grid) for c in range(self.grid) if (r, c) not in used]

    def combos(self) -> frozenset[Combo]:
        """The set of ``(colour, shape)`` pairs present."""
        return frozenset(obj.combo for obj in self.objects)

    def replace_objects(self, objects: Iterable[SceneObject]) -> Scene:
        """A new scene with the same grid and background and these objects."""
        return Scene(tuple(objects), self.grid, self.background)

    def to_dict(self) -> dict[str, Any]:
        return {"grid": self.grid, "background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scene:
        if "objects" not in data:
            raise ValueError("Scene dict lacks key 'objects'")
        objects = tuple(SceneObject.from_dict(o) for o in data["objects"])
        return cls(objects, int(data.get("grid", 3)), str(data.get("background", DEFAULT_BACKGROUND)))


@dataclass
class WorldConfig:
    """What a world may contain. Lists given for ``shapes``/``colors`` (e.g. from YAML) become tuples.

    ``frequency_skew`` sets the popularity of colours and shapes: the i-th entry of ``colors`` (and of
    ``shapes``) is drawn with probability proportional to ``(i + 1) ** -frequency_skew``; 0 = uniform.
    """

    min_objects: int = 1
    max_objects: int = 6
    grid: int = 3
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = DEFAULT_OBJECT_COLORS
    background: str = DEFAULT_BACKGROUND
    image_size: int = 64
    frequency_skew: float = 0.3

    def __post_init__(self) -> None:
        self.shapes = tuple(self.shapes)
        self.colors = tuple(self.colors)
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.max_objects > self.grid * self.grid:
            raise ValueError(
                f"max_objects={self.max_objects} cannot fit a {self.grid}x{self.grid} grid (one object per cell)"
            )
        if not self.shapes or len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"shapes must be non-empty and distinct, got {self.shapes}")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown shapes {unknown}; known shapes: {SHAPES}")
        if not self.colors or len(set(self.colors)) != len(self.colors):
            raise ValueError(f"colors must be non-empty and distinct, got {self.colors}")
        unknown = [c for c in (*self.colors, self.background) if c not in COLORS]
        if unknown:
            raise ValueError(f"unknown colours {unknown}; known colours: {tuple(COLORS)}")
        if self.background in self.colors:
            raise ValueError(f"background {self.background!r} is also an object colour (objects would be invisible)")
        if self.image_size < 8 * self.grid:
            raise ValueError(
                f"image_size={self.image_size} too small for a {self.grid}x{self.grid} grid (need >= 8/cell)"
            )
        if self.frequency_skew < 0:
            raise ValueError(f"frequency_skew must be >= 0, got {self.frequency_skew}")

    def all_combos(self) -> list[Combo]:
        """Every ``(colour, shape)`` pair of this world, colour-major."""
        return [(c, s) for c in self.colors for s in self.shapes]

    def color_weights(self) -> list[float]:
        return [(i + 1) ** -self.frequency_skew for i in range(len(self.colors))]

    def shape_weights(self) -> list[float]:
        return [(i + 1) ** -self.frequency_skew for i in range(len(self.shapes))]

    def combo_probabilities(self, exclude_combos: Iterable[Combo] = ()) -> dict[Combo, float]:
        """Exact probability that a sampled object has each allowed ``(colour, shape)`` (sums to 1)."""
        excluded = set(exclude_combos)
        weights = {
            (c, s): wc * ws
            for c, wc in zip(self.colors, self.color_weights())
            for s, ws in zip(self.shapes, self.shape_weights())
            if (c, s) not in excluded
        }
        total = sum(weights.values())
        if total <= 0:
            raise ValueError("every (colour, shape) combo is excluded")
        return {combo: w / total for combo, w in weights.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_objects": self.min_objects,
            "max_objects": self.max_objects,
            "grid": self.grid,
            "shapes": list(self.shapes),
            "colors": list(self.colors),
            "background": self.background,
            "image_size": self.image_size,
            "frequency_skew": self.frequency_skew,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorldConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown WorldConfig keys {sorted(unknown)}")
        return cls(**data)


def validate_scene(scene: Scene, config: WorldConfig, exclude_combos: Iterable[Combo] = ()) -> None:
    """Raise ValueError unless ``scene`` is a legal scene of ``config``'s world (and avoids ``exclude_combos``)."""
    if scene.grid != config.grid:
        raise ValueError(f"scene grid {scene.grid} != config grid {config.grid}")
    if scene.background != config.background:
        raise ValueError(f"scene background {scene.background!r} != config background {config.background!r}")
    if not config.min_objects <= len(scene) <= config.max_objects:
        raise ValueError(f"scene has {len(scene)} objects, outside [{config.min_objects}, {config.max_objects}]")
    excluded = set(exclude_combos)
    for obj in scene.objects:
        if obj.shape not in config.shapes or obj.color not in config.colors:
            raise ValueError(f"object {obj} uses a shape or colour outside the world")
        if obj.combo in excluded:
            raise ValueError(f"object {obj} is an excluded combo {obj.combo}")


@dataclass
class SceneSampler:
    """Seeded, deterministic scene sampler: the same ``(config, seed, ...)`` gives the same scene sequence.

    ``exclude_combos``: ``(colour, shape)`` pairs that never appear. ``require_combo``: every scene contains
    at least one object with this pair (other objects are free, apart from ``exclude_combos``).
    """

    config: WorldConfig
    seed: int
    exclude_combos: frozenset[Combo] = field(default_factory=frozenset)
    require_combo: Combo | None = None

    def __post_init__(self) -> None:
        self.exclude_combos = frozenset(tuple(c) for c in self.exclude_combos)
        if self.require_combo is not None:
            self.require_combo = tuple(self.require_combo)
            color, shape = self.require_combo
            if color not in self.config.colors or shape not in self.config.shapes:
                raise ValueError(f"require_combo {self.require_combo} is not in the world")
            if self.require_combo in self.exclude_combos:
                raise ValueError(f"require_combo {self.require_combo} is also excluded")
        probabilities = self.config.combo_probabilities(self.exclude_combos)
        self._combos = list(probabilities)
        self._combo_weights = list(probabilities.values())
        self._rng = random.Random(self.seed)

    def sample(self) -> Scene:
        """The next scene of this sampler's stream."""
        return _sample_scene(self._rng, self.config, self._combos, self._combo_weights, self.require_combo)

    def sample_many(self, n: int) -> list[Scene]:
        return [self.sample() for _ in range(n)]


def _sample_scene(
    rng: random.Random, config: WorldConfig, combos: list[Combo], weights: list[float], require_combo: Combo | None
) -> Scene:
    n_objects = rng.randint(config.min_objects, config.max_objects)
    all_cells = [(r, c) for r in range(config.grid) for c in range(config.grid)]
    cells = rng.sample(all_cells, n_objects)
    chosen = rng.choices(combos, weights=weights, k=n_objects)
    if require_combo is not None:
        chosen[0] = require_combo
    objects = [
        SceneObject(shape=shape, color=color, size=rng.choice(SIZES), row=r, col=c)
        for (color, shape), (r, c) in zip(chosen, cells)
    ]
    return Scene(tuple(objects), config.grid, config.background)


def sample_scene(
    rng: random.Random,
    config: WorldConfig,
    exclude_combos: Iterable[Combo] = frozenset(),
    require_combo: Combo | None = None,
) -> Scene:
    """One scene drawn with ``rng`` (same rules as ``SceneSampler``; use the sampler for streams)."""
    probabilities = config.combo_probabilities(exclude_combos)
    if require_combo is not None and tuple(require_combo) not in probabilities:
        raise ValueError(f"require_combo {require_combo} is not in the world or is excluded")
    return _sample_scene(
        rng,
        config,
        list(probabilities),
        list(probabilities.values()),
        tuple(require_combo) if require_combo is not None else None,
    )
