"""Question programs: the ground truth behind every shapes-world question.

A program is a small JSON-able dict; ``answer_question(scene, program)`` evaluates it on a ``Scene`` and returns
the canonical answer (digits for counts, colour/shape names, ``"yes"``/``"no"``). Filters (``where``) are dicts
over ``shape``, ``color``, ``size``, ``row``, ``col``; an empty filter matches every object.

Ops::

    {"op": "count", "where": {...}, "where_not": {...}}            -> "3"
    {"op": "exists" | "not_exists", "where": {...}}               -> "yes" / "no"
    {"op": "query", "attr": "color", "where": {...}, "where_not"}  -> attribute of the unique match
    {"op": "verify", "where": {...}, "attr": "color", "value": "red"}
    {"op": "choose", "attr": "shape", "options": [{...}, {...}], "where": {"color": "red"}}
    {"op": "relate", "a": {...}, "b": {...}, "relation": "left"}
    {"op": "query_relative", "attr": "shape", "relation": "above", "ref": {...}}
    {"op": "count_relative", "relation": "right", "ref": {...}}

Relations use grid cells: ``left``/``right`` compare columns, ``above``/``below`` compare rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from chameleon_lite.world.scenes import Scene, SceneObject

RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")


def matches(obj: SceneObject, where: Mapping[str, Any]) -> bool:
    """True iff ``obj`` has every attribute value in ``where`` (keys: shape, color, size, row, col)."""
    return all(getattr(obj, key) == value for key, value in where.items())


def select(
    scene: Scene, where: Mapping[str, Any] | None = None, where_not: Mapping[str, Any] | None = None
) -> list[SceneObject]:
    """Objects matching ``where`` and not matching ``where_not`` (an empty filter matches everything)."""
    return [o for o in scene.objects if matches(o, where or {}) and not (where_not and matches(o, where_not))]


def relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """Whether ``a`` is ``relation`` of ``b`` (left/right compare columns, above/below compare rows)."""
    if relation == "left":
        return a.col < b.col
    if relation == "right":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise ValueError(f"unknown relation {relation!r}; known: {RELATIONS}")


def _unique(scene: Scene, where: Mapping[str, Any], where_not: Mapping[str, Any] | None = None) -> SceneObject:
    found = select(scene, where, where_not)
    if len(found) != 1:
        raise ValueError(f"reference {dict(where)} (not {where_not}) matches {len(found)} objects, need exactly 1")
    return found[0]


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def answer_question(scene: Scene, program: Mapping[str, Any]) -> str:
    """Evaluate a question program on ``scene`` and return the canonical answer string.

    Ops: ``count`` (where, where_not), ``exists`` / ``not_exists`` (where), ``query`` (attr, where, where_not),
    ``verify`` (where, attr, value), ``choose`` (attr, options: list of wheres, where), ``relate`` (a, b,
    relation), ``query_relative`` / ``count_relative`` (attr, relation, ref). Raises ValueError if a reference
    is not unique or the op is unknown.
    """
    op = program.get("op")
    where = program.get("where", {})
    if op == "count":
        return str(len(select(scene, where, program.get("where_not"))))
    if op == "exists":
        return _yes_no(bool(select(scene, where)))
    if op == "not_exists":
        return _yes_no(not select(scene, where))
    if op == "query":
        return str(getattr(_unique(scene, where, program.get("where_not")), program["attr"]))
    if op == "verify":
        return _yes_no(getattr(_unique(scene, where), program["attr"]) == program["value"])
    if op == "choose":
        options = [_unique(scene, option) for option in program["options"]]
        chosen = [o for o in options if matches(o, where)]
        if len(chosen) != 1:
            raise ValueError(f"choose: {len(chosen)} options match {where}, need exactly 1")
        return str(getattr(chosen[0], program["attr"]))
    if op == "relate":
        return _yes_no(relation_holds(_unique(scene, program["a"]), _unique(scene, program["b"]), program["relation"]))
    if op in ("query_relative", "count_relative"):
        ref = _unique(scene, program["ref"])
        related = [o for o in scene.objects if o != ref and relation_holds(o, ref, program["relation"])]
        if op == "count_relative":
            return str(len(related))
        if len(related) != 1:
            raise ValueError(f"query_relative: {len(related)} objects are {program['relation']} of {ref}, need 1")
        return str(getattr(related[0], program["attr"]))
    raise ValueError(f"unknown question op {op!r}")
