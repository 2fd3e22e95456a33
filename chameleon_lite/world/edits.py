"""Scene edits and interleaved "picture story" documents.

An edit changes exactly one object: ``move`` (to an empty cell), ``recolor`` (to another world colour),
``add`` (a new object in an empty cell) or ``remove``. Edits keep the world valid: one object per cell,
object count within ``[min_objects, max_objects]``, and no ``exclude_combos`` pair is ever created (so train
documents of a compositional split stay free of held-out combos).

A document alternates text and images::

    [{"text": caption}, {"image": scene}, {"text": edit_text}, {"image": edited_scene}, ...]

Images are ``Scene`` objects here; the shard writer renders them and stores PNG members.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from chameleon_lite.world.language import cell_name, describe, location_phrase, object_phrase, with_article
from chameleon_lite.world.scenes import SIZES, Combo, Scene, SceneObject, WorldConfig, validate_scene

EDIT_KINDS: tuple[str, ...] = ("move", "recolor", "add", "remove")


@dataclass(frozen=True)
class Edit:
    """One edit. ``before`` is the object edited (None for ``add``), ``after`` its new state (None for ``remove``)."""

    kind: str
    before: SceneObject | None
    after: SceneObject | None

    def __post_init__(self) -> None:
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"unknown edit kind {self.kind!r}; known: {EDIT_KINDS}")
        if (self.before is None) != (self.kind == "add") or (self.after is None) != (self.kind == "remove"):
            raise ValueError(f"edit {self.kind!r} has inconsistent before/after objects")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
        }


def possible_edit_kinds(scene: Scene, config: WorldConfig, exclude_combos: Iterable[Combo] = frozenset()) -> list[str]:
    """The edit kinds that can be applied to ``scene`` without breaking the world's rules."""
    excluded = frozenset(exclude_combos)
    kinds = []
    if scene.objects and scene.free_cells():
        kinds.append("move")
    if any(c != o.color and (c, o.shape) not in excluded for o in scene.objects for c in config.colors):
        kinds.append("recolor")
    if len(scene) < config.max_objects and scene.free_cells():
        kinds.append("add")
    if len(scene) > config.min_objects:
        kinds.append("remove")
    return kinds


def sample_edit(
    scene: Scene,
    rng: random.Random,
    config: WorldConfig,
    kind: str | None = None,
    exclude_combos: Iterable[Combo] = frozenset(),
) -> Edit:
    """A random valid edit of ``scene`` (of ``kind`` if given; ValueError if that kind is impossible here)."""
    excluded = frozenset(exclude_combos)
    validate_scene(scene, config, excluded)
    kinds = possible_edit_kinds(scene, config, excluded)
    if kind is None:
        if not kinds:
            raise ValueError("no edit is possible for this scene")
        kind = rng.choice(kinds)
    elif kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; known: {EDIT_KINDS}")
    elif kind not in kinds:
        raise ValueError(f"edit kind {kind!r} is impossible here (possible: {kinds})")

    if kind == "move":
        target = rng.choice(scene.objects)
        row, col = rng.choice(scene.free_cells())
        return Edit(kind, target, SceneObject(target.shape, target.color, target.size, row, col))
    if kind == "recolor":
        choices = [
            (o, c) for o in scene.objects for c in config.colors if c != o.color and (c, o.shape) not in excluded
        ]
        target, color = rng.choice(choices)
        return Edit(kind, target, SceneObject(target.shape, color, target.size, target.row, target.col))
    if kind == "add":
        row, col = rng.choice(scene.free_cells())
        combos = [c for c in config.all_combos() if c not in excluded]
        color, shape = rng.choice(combos)
        return Edit(kind, None, SceneObject(shape, color, rng.choice(SIZES), row, col))
    return Edit(kind, rng.choice(scene.objects), None)


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene after ``edit`` (ValueError if ``edit.before`` is not in the scene or the result is illegal)."""
    objects = list(scene.objects)
    if edit.before is not None:
        if edit.before not in objects:
            raise ValueError(f"edit target {edit.before} is not in the scene")
        objects.remove(edit.before)
    if edit.after is not None:
        objects.append(edit.after)
    return scene.replace_objects(objects)


def _reference(obj: SceneObject, scene: Scene, rng: random.Random) -> str:
    """A unique phrase for ``obj`` that always names its colour and shape ("large red circle in the center")."""
    options = [f"{obj.color} {obj.shape}"] if sum(o.combo == obj.combo for o in scene.objects) == 1 else []
    if sum(o.combo == obj.combo and o.size == obj.size for o in scene.objects) == 1:
        options.append(object_phrase(obj))
    if not options:
        options.append(f"{object_phrase(obj)} {location_phrase(obj.row, obj.col, scene.grid)}")
    return rng.choice(options)


def _to_cell(row: int, col: int, grid: int) -> str:
    name = cell_name(row, col, grid)
    return name if name.startswith("row") else f"the {name}"


def describe_edit(edit: Edit, scene: Scene, rng: random.Random) -> str:
    """Text for ``edit`` applied to ``scene`` (the scene before the edit), with varied phrasing."""
    if edit.kind == "add":
        thing = with_article(object_phrase(edit.after))
        where = location_phrase(edit.after.row, edit.after.col, scene.grid)
        text = rng.choice(
            [f"{thing} appears {where}.", f"Then someone adds {thing} {where}.", f"Next, {thing} is placed {where}."]
        )
        return text[0].upper() + text[1:]
    ref = _reference(edit.before, scene, rng)
    if edit.kind == "move":
        to = _to_cell(edit.after.row, edit.after.col, scene.grid)
        return rng.choice(
            [f"The {ref} moves to {to}.", f"Then the {ref} slides over to {to}.", f"Next, the {ref} is moved to {to}."]
        )
    if edit.kind == "recolor":
        new = edit.after.color
        return rng.choice(
            [
                f"The {ref} turns {new}.",
                f"Then the {ref} is painted {new}.",
                f"Now the {ref} changes its color to {new}.",
            ]
        )
    return rng.choice([f"The {ref} disappears.", f"Then the {ref} is removed.", f"Now the {ref} is taken away."])


def make_edit(
    scene: Scene,
    rng: random.Random,
    config: WorldConfig,
    kind: str | None = None,
    exclude_combos: Iterable[Combo] = frozenset(),
) -> tuple[str, Scene]:
    """Sample a valid edit of ``scene`` and return ``(edit_text, new_scene)``."""
    edit = sample_edit(scene, rng, config, kind, exclude_combos)
    return describe_edit(edit, scene, rng), apply_edit(scene, edit)


def make_document(
    scene: Scene,
    rng: random.Random,
    config: WorldConfig,
    n_edits: int = 1,
    exclude_combos: Iterable[Combo] = frozenset(),
) -> list[dict[str, Any]]:
    """An interleaved document: caption, image, then ``n_edits`` x (edit text, edited image)."""
    if n_edits < 0:
        raise ValueError(f"n_edits must be >= 0, got {n_edits}")
    segments: list[dict[str, Any]] = [{"text": describe(scene, rng)}, {"image": scene}]
    for _ in range(n_edits):
        text, scene = make_edit(scene, rng, config, exclude_combos=exclude_combos)
        segments += [{"text": text}, {"image": scene}]
    return segments
