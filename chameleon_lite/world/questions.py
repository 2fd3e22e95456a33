"""Questions about shapes-world scenes, with exact ground truth (the captions and phrases are ``language.py``'s).

Every question carries a small **program** (a JSON-able dict, see ``programs.py``) that ``answer_question``
evaluates against the scene; answers are never read back from the question string. Answers are short and
canonical: digits for counts (``"3"``), colour names, shape names, ``"yes"``/``"no"``.

Question categories (``CATEGORIES``):

- ``count``     how many objects / red objects / circles / large red circles (0 allowed).
- ``color``     colour of an object referred to without its colour (by shape, size, or cell).
- ``shape``     shape of an object referred to without its shape (by colour, size, or cell).
- ``binding``   questions whose answer depends on which attributes sit on the *same* object, always asked in
  scenes with at least two colours and two shapes, with foils taken from other objects:
  "Is the circle blue?" (blue is on the square), "Is the red object a square?",
  "Which is red, the circle or the square?".
- ``spatial``   "Is the red circle left of the blue square?", "What shape is above the green star?",
  "How many objects are right of the circle?" Relations use grid cells: left of iff col < col, above iff row < row.
- ``negation``  "Is it true that there is no red square?" (yes iff none), "How many objects are not red?",
  "What shape is the object that is not blue?" (only when exactly one is not blue).
- ``existence`` "Is there a red square?" with POPE-style types (``pope_type``): ``positive`` (a present
  (colour, shape) combo) and three kinds of absent combo:
  ``random`` (uniform over absent combos of the world), ``popular`` (among the most probable absent combos
  under the world's sampling distribution: every absent combo whose probability is at least the
  ``POPULAR_TOP_K``-th highest absent probability, so ties are included; with ``frequency_skew=0`` this is
  every absent combo), ``adversarial`` (absent combos sharing a colour or a shape with a present object).

Referring expressions ("the large circle", "the object in the top left") are always unique in the scene.
``exclude_combos`` (held-out pairs of a compositional split) are never mentioned as a combo in any text.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from chameleon_lite.world.language import RELATION_PHRASES, plural, refer, with_article
from chameleon_lite.world.programs import RELATIONS, answer_question, relation_holds, select
from chameleon_lite.world.scenes import SIZES, Combo, Scene, WorldConfig

__all__ = [
    "CATEGORIES",
    "POPE_NEGATIVE_TYPES",
    "POPE_TYPES",
    "POPULAR_TOP_K",
    "QA",
    "existence_question",
    "make_questions",
    "no_combo_question",
    "normalize_answer",
]

CATEGORIES: tuple[str, ...] = ("count", "color", "shape", "binding", "spatial", "negation", "existence")
POPE_TYPES: tuple[str, ...] = ("positive", "random", "popular", "adversarial")
POPE_NEGATIVE_TYPES: tuple[str, ...] = POPE_TYPES[1:]
POPULAR_TOP_K = 3


# ---------------------------------------------------------------------------------------- questions


@dataclass
class QA:
    """One question about a scene. ``program`` recomputes ``answer`` with ``answer_question``."""

    question: str
    answer: str
    category: str
    pope_type: str | None = None
    program: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.answer,
            "category": self.category,
            "pope_type": self.pope_type,
            "program": self.program,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QA:
        return cls(
            data["question"], data["answer"], data["category"], data.get("pope_type"), dict(data.get("program", {}))
        )


@dataclass
class _Context:
    scene: Scene
    rng: random.Random
    config: WorldConfig
    exclude: frozenset[Combo]

    def qa(self, question: str, program: dict[str, Any], category: str, pope_type: str | None = None) -> QA:
        return QA(question, answer_question(self.scene, program), category, pope_type, program)

    def allowed(self, color: str, shape: str) -> bool:
        return (color, shape) not in self.exclude


def _count_question(ctx: _Context) -> QA | None:
    rng, scene = ctx.rng, ctx.scene
    source = rng.choice(scene.objects) if scene.objects and rng.random() < 0.75 else None
    color = source.color if source else rng.choice(ctx.config.colors)
    shape = source.shape if source else rng.choice(ctx.config.shapes)
    size = source.size if source else rng.choice(SIZES)
    kind = rng.choice(["all", "color", "shape", "size", "color_shape"])
    if kind == "color_shape" and not ctx.allowed(color, shape):
        kind = "color"
    if kind == "all":
        where, text = (
            {},
            rng.choice(
                [
                    "How many objects are there?",
                    "How many shapes are in the image?",
                    "Count the objects in the picture.",
                ]
            ),
        )
    elif kind == "color":
        where = {"color": color}
        text = rng.choice([f"How many {color} objects are there?", f"How many {color} shapes can you see?"])
    elif kind == "shape":
        where = {"shape": shape}
        text = rng.choice([f"How many {plural(shape)} are there?", f"How many {plural(shape)} are in the image?"])
    elif kind == "size":
        where = {"size": size}
        text = rng.choice([f"How many {size} objects are there?", f"How many {size} shapes are in the picture?"])
    else:
        where = {"color": color, "shape": shape}
        text = rng.choice([f"How many {color} {plural(shape)} are there?", f"Count the {color} {plural(shape)}."])
    return ctx.qa(text, {"op": "count", "where": where}, "count")


def _attribute_question(ctx: _Context, attr: str) -> QA | None:
    """``color`` or ``shape`` question about an object referred to without that attribute."""
    objects = list(ctx.scene.objects)
    ctx.rng.shuffle(objects)
    other = [a for a in ("size", "color", "shape") if a != attr] + ["position"]
    for obj in objects:
        ref = refer(obj, ctx.scene, ctx.rng, other)
        if ref is None:
            continue
        where, phrase = ref
        if attr == "color":
            templates = [
                f"What color is the {phrase}?",
                f"What is the colour of the {phrase}?",
                f"Which colour does the {phrase} have?",
            ]
        else:
            templates = [
                f"What shape is the {phrase}?",
                f"What is the shape of the {phrase}?",
                f"Which shape is the {phrase}?",
            ]
        return ctx.qa(ctx.rng.choice(templates), {"op": "query", "attr": attr, "where": where}, attr)
    return None


def _binding_question(ctx: _Context) -> QA | None:
    rng, scene = ctx.rng, ctx.scene
    if len({o.color for o in scene.objects}) < 2 or len({o.shape for o in scene.objects}) < 2:
        return None
    form = rng.choice(["verify_color", "verify_shape", "choose"])
    objects = list(scene.objects)
    rng.shuffle(objects)
    want_yes = rng.random() < 0.5
    for obj in objects:
        if form == "choose":
            others = [o for o in objects if o.shape != obj.shape and o.color != obj.color]
            if not others:
                continue
            other = rng.choice(others)
            ref_a, ref_b = refer(obj, scene, rng, ("size", "shape")), refer(other, scene, rng, ("size", "shape"))
            if ref_a is None or ref_b is None or not ctx.allowed(obj.color, other.shape):
                continue
            first, second = (ref_a, ref_b) if rng.random() < 0.5 else (ref_b, ref_a)
            text = rng.choice(
                [
                    f"Which is {obj.color}, the {first[1]} or the {second[1]}?",
                    f"Which one is {obj.color}: the {first[1]} or the {second[1]}?",
                ]
            )
            program = {"op": "choose", "attr": "shape", "options": [first[0], second[0]], "where": {"color": obj.color}}
            return ctx.qa(text, program, "binding")
        attr, refer_by = ("color", ("size", "shape")) if form == "verify_color" else ("shape", ("size", "color"))
        ref = refer(obj, scene, rng, refer_by)
        if ref is None:
            continue
        foils = sorted({getattr(o, attr) for o in objects if getattr(o, attr) != getattr(obj, attr)})
        if attr == "color":
            foils = [c for c in foils if ctx.allowed(c, obj.shape)]
        else:
            foils = [s for s in foils if ctx.allowed(obj.color, s)]
        value = getattr(obj, attr) if want_yes or not foils else rng.choice(foils)
        where, phrase = ref
        if attr == "color":
            text = rng.choice([f"Is the {phrase} {value}?", f"Is the {phrase} colored {value}?"])
        else:
            text = rng.choice(
                [f"Is the {phrase} {with_article(value)}?", f"Is the {phrase} shaped like {with_article(value)}?"]
            )
        return ctx.qa(text, {"op": "verify", "where": where, "attr": attr, "value": value}, "binding")
    return None


def _spatial_question(ctx: _Context) -> QA | None:
    rng, scene = ctx.rng, ctx.scene
    if len(scene) < 2:
        return None
    form = rng.choice(["relate", "relate", "query_relative", "count_relative"])
    refs = {o: refer(o, scene, rng) for o in scene.objects}
    referable = [o for o in scene.objects if refs[o] is not None]
    if form == "relate":
        if len(referable) < 2:
            return None
        a, b = rng.sample(referable, 2)
        want_yes = rng.random() < 0.5
        candidates = [r for r in RELATIONS if relation_holds(a, b, r) == want_yes] or list(RELATIONS)
        relation = rng.choice(candidates)
        text = rng.choice(
            [
                f"Is the {refs[a][1]} {rng.choice(RELATION_PHRASES[relation])} the {refs[b][1]}?",
                f"Is the {refs[a][1]} located {rng.choice(RELATION_PHRASES[relation])} the {refs[b][1]}?",
            ]
        )
        return ctx.qa(text, {"op": "relate", "a": refs[a][0], "b": refs[b][0], "relation": relation}, "spatial")
    if not referable:
        return None
    ref = rng.choice(referable)
    relation = rng.choice(RELATIONS)
    phrase = rng.choice(RELATION_PHRASES[relation])
    if form == "count_relative":
        text = rng.choice(
            [
                f"How many objects are {phrase} the {refs[ref][1]}?",
                f"How many shapes are there {phrase} the {refs[ref][1]}?",
            ]
        )
        return ctx.qa(text, {"op": "count_relative", "relation": relation, "ref": refs[ref][0]}, "spatial")
    options = [
        (b, r)
        for b in referable
        for r in RELATIONS
        if sum(relation_holds(o, b, r) for o in scene.objects if o != b) == 1
    ]
    if not options:
        return None
    ref, relation = rng.choice(options)
    phrase = rng.choice(RELATION_PHRASES[relation])
    attr = rng.choice(["color", "shape"])
    if attr == "shape":
        text = rng.choice(
            [
                f"What shape is {phrase} the {refs[ref][1]}?",
                f"What is the shape of the object {phrase} the {refs[ref][1]}?",
            ]
        )
    else:
        text = rng.choice(
            [
                f"What color is the object {phrase} the {refs[ref][1]}?",
                f"What colour is the shape {phrase} the {refs[ref][1]}?",
            ]
        )
    program = {"op": "query_relative", "attr": attr, "relation": relation, "ref": refs[ref][0]}
    return ctx.qa(text, program, "spatial")


def _no_combo_qa(ctx: _Context, color: str, shape: str) -> QA:
    text = ctx.rng.choice(
        [f"Is it true that there is no {color} {shape}?", f"Is it correct that the image has no {color} {shape}?"]
    )
    return ctx.qa(text, {"op": "not_exists", "where": {"color": color, "shape": shape}}, "negation")


def no_combo_question(scene: Scene, rng: random.Random, config: WorldConfig, combo: Combo) -> QA:
    """The negated twin of an existence question: "Is it true that there is no <colour> <shape>?" (``negation``),
    answered "yes" exactly when "Is there a <colour> <shape>?" is answered "no"."""
    return _no_combo_qa(_Context(scene, rng, config, frozenset()), *combo)


def _negation_question(ctx: _Context) -> QA | None:
    rng, scene, config = ctx.rng, ctx.scene, ctx.config
    form = rng.choice(["no_combo", "none_color", "count_not", "query_not"])
    if form == "no_combo":
        present = sorted(scene.combos() - ctx.exclude)
        absent = [c for c in config.all_combos() if c not in scene.combos() and c not in ctx.exclude]
        pool = present if (rng.random() < 0.5 and present) or not absent else absent
        if not pool:
            return None
        return _no_combo_qa(ctx, *rng.choice(pool))
    if form == "none_color":
        color = rng.choice(config.colors)
        text = rng.choice(
            [f"Is it true that none of the objects is {color}?", f"Is it true that there are no {color} objects?"]
        )
        return ctx.qa(text, {"op": "not_exists", "where": {"color": color}}, "negation")
    attr = rng.choice(["color", "shape"])
    value = getattr(rng.choice(scene.objects), attr) if scene.objects else rng.choice(config.colors)
    if form == "count_not":
        text = (
            rng.choice([f"How many objects are not {value}?", f"How many shapes are not {value}?"])
            if attr == "color"
            else rng.choice(
                [f"How many objects are not {plural(value)}?", f"How many objects are not {with_article(value)}?"]
            )
        )
        return ctx.qa(text, {"op": "count", "where": {}, "where_not": {attr: value}}, "negation")
    not_matching = select(scene, None, {attr: value})
    if len(not_matching) != 1:
        return None
    asked = "shape" if attr == "color" else "color"
    negated = value if attr == "color" else with_article(value)
    text = rng.choice(
        [
            f"What {asked} is the object that is not {negated}?",
            f"Which {asked} does the only object that is not {negated} have?",
        ]
    )
    return ctx.qa(text, {"op": "query", "attr": asked, "where": {}, "where_not": {attr: value}}, "negation")


def _absent_combos(ctx: _Context, pope_type: str) -> list[Combo]:
    present = ctx.scene.combos()
    absent = [c for c in ctx.config.all_combos() if c not in present and c not in ctx.exclude]
    if pope_type == "random" or not absent:
        return absent
    if pope_type == "popular":
        probabilities = ctx.config.combo_probabilities(ctx.exclude)
        ranked = sorted((probabilities[c] for c in absent), reverse=True)
        cutoff = ranked[min(POPULAR_TOP_K, len(ranked)) - 1] * (1 - 1e-9)
        return [c for c in absent if probabilities[c] >= cutoff]
    if pope_type == "adversarial":
        colors = {o.color for o in ctx.scene.objects}
        shapes = {o.shape for o in ctx.scene.objects}
        return [c for c in absent if c[0] in colors or c[1] in shapes]
    raise ValueError(f"unknown POPE type {pope_type!r}; known: {POPE_TYPES}")


def existence_question(
    scene: Scene, rng: random.Random, config: WorldConfig, pope_type: str, exclude_combos: Iterable[Combo] = frozenset()
) -> QA | None:
    """One "Is there a <colour> <shape>?" question of the given POPE type, or None if no combo qualifies."""
    ctx = _Context(scene, rng, config, frozenset(exclude_combos))
    if pope_type == "positive":
        pool = sorted(scene.combos() - ctx.exclude)
    else:
        pool = _absent_combos(ctx, pope_type)
    if not pool:
        return None
    color, shape = rng.choice(pool)
    thing = with_article(f"{color} {shape}")
    text = rng.choice(
        [
            f"Is there {thing}?",
            f"Is there {thing} in the image?",
            f"Does the picture contain {thing}?",
            f"Can you see {thing}?",
        ]
    )
    return ctx.qa(text, {"op": "exists", "where": {"color": color, "shape": shape}}, "existence", pope_type)


def _category_question(ctx: _Context, category: str, want_positive: bool) -> QA | None:
    if category == "count":
        return _count_question(ctx)
    if category in ("color", "shape"):
        return _attribute_question(ctx, category)
    if category == "binding":
        return _binding_question(ctx)
    if category == "spatial":
        return _spatial_question(ctx)
    if category == "negation":
        return _negation_question(ctx)
    if category == "existence":
        types = ["positive"] if want_positive else ctx.rng.sample(POPE_NEGATIVE_TYPES, len(POPE_NEGATIVE_TYPES))
        for pope_type in types:
            qa = existence_question(ctx.scene, ctx.rng, ctx.config, pope_type, ctx.exclude)
            if qa is not None:
                return qa
        return None
    raise ValueError(f"unknown question category {category!r}; known: {CATEGORIES}")


def make_questions(
    scene: Scene,
    rng: random.Random,
    config: WorldConfig,
    n: int | None = None,
    exclude_combos: Iterable[Combo] = frozenset(),
    categories: Iterable[str] = CATEGORIES,
) -> list[QA]:
    """Questions about ``scene`` with exact answers.

    ``n=None``: one question per applicable category, and for ``existence`` one positive plus one negative
    (POPE type drawn at random among those available), so yes/no stays balanced. ``n=k``: up to ``k``
    distinct questions, categories visited round-robin in a shuffled order (fewer if the scene runs out).

    The list comes back in a random order (``rng``): training puts all questions about an image into one document
    (``qa_per_image``), and a fixed order (count first, the positive existence question before the negative one)
    let a model answer by position instead of by looking: it learned "the first existence question is a yes".
    """
    ctx = _Context(scene, rng, config, frozenset(exclude_combos))
    categories = tuple(categories)
    unknown = set(categories) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown question categories {sorted(unknown)}; known: {CATEGORIES}")
    questions: list[QA] = []
    if n is None:
        for category in categories:
            for want_positive in (True, False) if category == "existence" else (True,):
                qa = _category_question(ctx, category, want_positive)
                if qa is not None:
                    questions.append(qa)
        rng.shuffle(questions)
        return questions
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seen: set[str] = set()
    existence_calls = 0
    for _ in range(2 * n + 5):  # rounds; each visits every category once
        if len(questions) >= n:
            break
        order = list(categories)
        rng.shuffle(order)
        for category in order:
            if len(questions) >= n:
                break
            want_positive = existence_calls % 2 == 0
            existence_calls += category == "existence"
            qa = _category_question(ctx, category, want_positive)
            if qa is not None and qa.question not in seen:
                seen.add(qa.question)
                questions.append(qa)
    rng.shuffle(questions)
    return questions


def normalize_answer(text: str) -> str:
    """``"  Yes. "`` -> ``"yes"``: strip, lowercase, drop trailing periods, collapse inner whitespace."""
    if not isinstance(text, str):
        raise ValueError(f"normalize_answer: expected a str, got {type(text).__name__}")
    return " ".join(text.strip().lower().rstrip(".").split())
