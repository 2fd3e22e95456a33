"""Words about shapes-world scenes: number words, plurals, cell names, object and referring phrases, and captions.

``describe`` writes a scene's caption; the question generators of ``questions.py`` build their questions from the
same phrases (``refer``: a referring expression that is always unique in the scene).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from chameleon_lite.world.programs import RELATIONS, relation_holds, select
from chameleon_lite.world.scenes import Scene, SceneObject

__all__ = [
    "RELATION_PHRASES",
    "cell_name",
    "describe",
    "location_phrase",
    "number_word",
    "object_phrase",
    "plural",
    "refer",
    "with_article",
]

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PLURALS = {"cross": "crosses"}
RELATION_PHRASES = {  # how a relation of programs.RELATIONS is said, in captions and questions
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}


# ----------------------------------------------------------------------------------------------- words


def plural(shape: str) -> str:
    return _PLURALS.get(shape, shape + "s")


def number_word(n: int) -> str:
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def cell_name(row: int, col: int, grid: int) -> str:
    """Name of a cell: "top left", "center", ... for 2x2 and 3x3 grids, else "row 2, column 3" (1-based)."""
    if grid == 3:
        name = f"{('top', 'middle', 'bottom')[row]} {('left', 'middle', 'right')[col]}"
        return "center" if name == "middle middle" else name
    if grid == 2:
        return f"{('top', 'bottom')[row]} {('left', 'right')[col]}"
    return f"row {row + 1}, column {col + 1}"


def location_phrase(row: int, col: int, grid: int) -> str:
    """ "in the top left", "in the center", "in row 2, column 3"."""
    name = cell_name(row, col, grid)
    return f"in {name}" if name.startswith("row") else f"in the {name}"


def object_phrase(obj: SceneObject) -> str:
    """ "small red circle"."""
    return f"{obj.size} {obj.color} {obj.shape}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


# ------------------------------------------------------------------------------ referring expressions

_ATTRIBUTE_SETS = (
    ("shape",),
    ("color",),
    ("size",),
    ("color", "shape"),
    ("size", "shape"),
    ("size", "color"),
    ("size", "color", "shape"),
)


def _ref_phrase(where: Mapping[str, Any], grid: int) -> str:
    words = [where[k] for k in ("size", "color") if k in where] + [where.get("shape", "object")]
    phrase = " ".join(words)
    if "row" in where:
        phrase += " " + location_phrase(where["row"], where["col"], grid)
    return phrase


def refer(
    obj: SceneObject, scene: Scene, rng: random.Random, attrs: Iterable[str] = ("size", "color", "shape")
) -> tuple[dict[str, Any], str] | None:
    """A unique reference to ``obj`` using only ``attrs`` (``"position"`` allows its cell): ``(where, phrase)``.

    Picks at random among the unique attribute combinations (so "the circle" and "the large red circle"
    both occur); falls back to the cell when allowed; None if no unique reference exists.
    """
    allowed = set(attrs)
    unique = []
    for names in _ATTRIBUTE_SETS:
        if set(names) <= allowed:
            where = {name: getattr(obj, name) for name in names}
            if len(select(scene, where)) == 1:
                unique.append(where)
    if "position" in allowed:
        position = {"row": obj.row, "col": obj.col}
        unique.append(position)
        if "shape" in allowed:
            unique.append({"shape": obj.shape, **position})
    if not unique:
        return None
    where = rng.choice(unique)
    return where, _ref_phrase(where, scene.grid)


# ------------------------------------------------------------------------------------------ captions


def _relation_sentence(scene: Scene, rng: random.Random) -> str | None:
    if len(scene) < 2:
        return None
    a, b = rng.sample(scene.objects, 2)
    true_relations = [r for r in RELATIONS if relation_holds(a, b, r)]
    ref_a, ref_b = refer(a, scene, rng), refer(b, scene, rng)
    if not true_relations or ref_a is None or ref_b is None:
        return None
    relation = rng.choice(true_relations)
    return f"The {ref_a[1]} is {rng.choice(RELATION_PHRASES[relation])} the {ref_b[1]}."


def describe(scene: Scene, rng: random.Random) -> str:
    """A caption naming every object with its size, colour, shape and cell, plus sometimes a relation.

    The caption determines the scene exactly (each object's cell is named), so it can condition generation.
    """
    objects = list(scene.objects)
    if not objects:
        return rng.choice(["An empty picture.", f"A plain {scene.background} background with nothing on it."])
    if rng.random() < 0.5:
        rng.shuffle(objects)
    n = len(objects)
    items = [f"{with_article(object_phrase(o))} {location_phrase(o.row, o.col, scene.grid)}" for o in objects]
    noun = "object" if n == 1 else "objects"
    templates = [
        lambda: _capitalize(_join(items)) + ".",
        lambda: f"There {'is' if n == 1 else 'are'} {number_word(n)} {noun}: {_join(items)}.",
        lambda: f"An image of {_join(items)}.",
        lambda: (
            f"{_capitalize(number_word(n))} {'shape' if n == 1 else 'shapes'} on a {scene.background} "
            f"background: {_join(items)}."
        ),
        lambda: " ".join(
            f"{_capitalize(location_phrase(o.row, o.col, scene.grid))} there is {with_article(object_phrase(o))}."
            for o in objects
        ),
        lambda: (
            f"A picture with {n} {noun}. "
            + " ".join(
                f"{_capitalize(with_article(object_phrase(o)))} is {location_phrase(o.row, o.col, scene.grid)}."
                for o in objects
            )
        ),
    ]
    caption = rng.choice(templates)()
    if rng.random() < 0.5:
        relation = _relation_sentence(scene, rng)
        if relation:
            caption += " " + relation
    return caption
