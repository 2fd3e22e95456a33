"""GenEval-style scoring of text -> image generation with a scene parser.

For each generated image, the caller supplies the **intended** scene (the one the prompt describes) and a
parse function (e.g. ``functools.partial(parse_scene, config=world)``) that reads objects back from the
pixels. Scoring compares the two object lists; it never looks at the caption text.

Per sample (``GenerationScore``):

- ``precision`` / ``recall``: multiset matching on ``(colour, shape)`` pairs: matched = size of the multiset
  intersection; precision = matched / generated objects, recall = matched / intended objects (None when the
  denominator is 0: nothing generated, or an empty prompt).
- ``count_correct``: as many generated objects as intended.
- ``attributes_correct``: the multisets of colours and of shapes both equal the intended ones (pairing ignored).
- ``binding_correct``: the multiset of ``(colour, shape)`` pairs equals the intended one (every colour sits
  on the right shape; implies count, precision = recall = 1 and ``attributes_correct``). The aggregate also
  reports binding **given** correct attributes: when the right colours and shapes are drawn, are they paired
  correctly? (That isolates binding errors from missing attributes.)
- ``relations_correct``: spatial relations. By default every relation that holds between two intended
  objects (left/right by column, above/below by row, ``chameleon_lite.world.programs.RELATIONS``) is checked;
  shapes-world captions name each object's cell, so every such relation is stated, including the explicit
  "The X is left of the Y." sentence ``describe`` sometimes adds. Callers that know which relations a prompt
  states may pass them instead (``SpatialRelation``). A relation between A and B holds in the generated
  image if some generated object with A's ``(colour, shape)`` and a different one with B's stand in that
  relation (GenEval's rule: any detected pair). None when there is nothing to check (fewer than two
  intended objects, or no relation between them).
- ``position_correct``: every intended ``(colour, shape)`` sits in its intended cell and nothing else is
  drawn (cells exact; stricter than relations).
- ``exact_match``: parsed objects equal the intended ones including size and cell.
- ``all_correct``: ``count_correct and binding_correct and relations_correct is not False`` (the checks a
  GenEval prompt of this kind asks for; position and size are reported separately).

``aggregate_generation_scores`` turns per-sample scores into ``{metric: {"mean", "count"}}``: the mean over
the samples where the metric applies (booleans as 0/1) and how many those are.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from chameleon_lite.world.programs import RELATIONS, relation_holds
from chameleon_lite.world.scenes import Scene, SceneObject

__all__ = [
    "GENERATION_METRICS",
    "GenerationScore",
    "SpatialRelation",
    "aggregate_generation_scores",
    "implied_relations",
    "score_generated_images",
    "score_generation",
    "verdict",
]

Objects = Scene | Sequence[SceneObject]
ParseFn = Callable[[Any], Objects]

GENERATION_METRICS: tuple[str, ...] = (
    "precision",
    "recall",
    "count_correct",
    "attributes_correct",
    "binding_correct",
    "binding_given_attributes",
    "relations_correct",
    "relation_accuracy",
    "position_correct",
    "exact_match",
    "all_correct",
)
"""Keys of ``aggregate_generation_scores`` (besides ``n_samples``), in report order."""


@dataclass(frozen=True)
class SpatialRelation:
    """A relation "``subject`` is ``relation`` of ``reference``" between two intended objects."""

    subject: SceneObject
    relation: str
    reference: SceneObject

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; known: {RELATIONS}")

    def describe(self) -> str:
        subject, reference = _combo_name(self.subject.combo), _combo_name(self.reference.combo)
        return f"{subject} {self.relation} {reference}"


@dataclass
class GenerationScore:
    """Checks of one generated image against its intended scene (see module docstring for definitions)."""

    n_intended: int
    n_generated: int
    matched: int
    precision: float | None
    recall: float | None
    count_correct: bool
    attributes_correct: bool
    binding_correct: bool
    relations_total: int
    relations_satisfied: int
    relations_correct: bool | None
    position_correct: bool
    exact_match: bool
    all_correct: bool
    missing: list[str] = field(default_factory=list)  # intended "colour shape" not generated (multiset difference)
    extra: list[str] = field(default_factory=list)  # generated "colour shape" not intended
    failed_relations: list[str] = field(default_factory=list)
    caption: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _objects(value: Objects, name: str) -> list[SceneObject]:
    objects = list(value.objects) if isinstance(value, Scene) else list(value)
    for obj in objects:
        if not isinstance(obj, SceneObject):
            raise ValueError(f"{name} must be a Scene or a sequence of SceneObject, got a {type(obj).__name__} inside")
    return objects


def _combo_name(combo: tuple[str, str]) -> str:
    return f"{combo[0]} {combo[1]}"


def implied_relations(intended: Objects) -> list[SpatialRelation]:
    """Every relation that holds between two distinct intended objects (ordered pairs, all of ``RELATIONS``)."""
    objects = _objects(intended, "intended")
    return [
        SpatialRelation(a, relation, b)
        for i, a in enumerate(objects)
        for j, b in enumerate(objects)
        if i != j
        for relation in RELATIONS
        if relation_holds(a, b, relation)
    ]


def _relation_satisfied(relation: SpatialRelation, generated: list[SceneObject]) -> bool:
    subjects = [i for i, o in enumerate(generated) if o.combo == relation.subject.combo]
    references = [j for j, o in enumerate(generated) if o.combo == relation.reference.combo]
    return any(
        i != j and relation_holds(generated[i], generated[j], relation.relation) for i in subjects for j in references
    )


def score_generation(
    intended: Objects,
    generated: Objects,
    relations: Sequence[SpatialRelation] | None = None,
    caption: str = "",
) -> GenerationScore:
    """Score the parsed objects of one generated image against the intended scene.

    ``relations``: the relations to check (default: ``implied_relations(intended)``). ``caption`` is only
    stored with the score (for report grids).
    """
    want = _objects(intended, "intended")
    got = _objects(generated, "generated")
    want_combos, got_combos = Counter(o.combo for o in want), Counter(o.combo for o in got)
    matched = sum((want_combos & got_combos).values())
    count_correct = len(got) == len(want)
    attributes_correct = Counter(o.color for o in want) == Counter(o.color for o in got) and Counter(
        o.shape for o in want
    ) == Counter(o.shape for o in got)
    binding_correct = want_combos == got_combos
    checked = implied_relations(want) if relations is None else list(relations)
    failed = [r for r in checked if not _relation_satisfied(r, got)]
    relations_correct = None if not checked else not failed
    placed = Counter((o.combo, o.cell) for o in want) == Counter((o.combo, o.cell) for o in got)
    exact = Counter(want) == Counter(got)  # SceneObject is frozen (hashable): shape, colour, size and cell
    return GenerationScore(
        n_intended=len(want),
        n_generated=len(got),
        matched=matched,
        precision=matched / len(got) if got else None,
        recall=matched / len(want) if want else None,
        count_correct=count_correct,
        attributes_correct=attributes_correct,
        binding_correct=binding_correct,
        relations_total=len(checked),
        relations_satisfied=len(checked) - len(failed),
        relations_correct=relations_correct,
        position_correct=placed,
        exact_match=exact,
        all_correct=count_correct and binding_correct and relations_correct is not False,
        missing=sorted(_combo_name(c) for c in (want_combos - got_combos).elements()),
        extra=sorted(_combo_name(c) for c in (got_combos - want_combos).elements()),
        failed_relations=[r.describe() for r in failed],
        caption=caption,
    )


def score_generated_images(
    samples: Iterable[tuple[str, Objects, Any]],
    parse: ParseFn,
    relations: Sequence[Sequence[SpatialRelation] | None] | None = None,
) -> list[GenerationScore]:
    """Parse and score ``(caption, intended scene, generated image)`` triples.

    ``parse(image)`` returns the generated objects (a ``Scene`` or a list of ``SceneObject``), e.g.
    ``functools.partial(parse_scene, config=world)``. ``relations``: optional per-sample relation lists
    (None entries = implied relations).
    """
    samples = list(samples)
    if relations is not None and len(relations) != len(samples):
        raise ValueError(f"score_generated_images: {len(relations)} relation lists for {len(samples)} samples")
    scores = []
    for i, sample in enumerate(samples):
        if len(sample) != 3:
            raise ValueError(f"score_generated_images: sample {i} must be (caption, intended scene, image)")
        caption, intended, image = sample
        stated = relations[i] if relations is not None else None
        scores.append(score_generation(intended, parse(image), stated, caption=caption))
    return scores


def verdict(score: GenerationScore) -> str:
    """A one-line human reading of a score for image grids: ``"correct"`` or what went wrong."""
    if score.all_correct:
        return "correct" if score.position_correct else "correct (cells differ)"
    problems = []
    if not score.count_correct:
        problems.append(f"{score.n_generated} objects, want {score.n_intended}")
    if score.missing:
        problems.append("missing " + ", ".join(score.missing))
    if score.extra:
        problems.append("extra " + ", ".join(score.extra))
    if score.relations_correct is False:
        problems.append(f"relations {score.relations_satisfied}/{score.relations_total}")
    return "; ".join(problems)


def _mean(values: list[float]) -> dict[str, Any]:
    return {"mean": sum(values) / len(values) if values else None, "count": len(values)}


def aggregate_generation_scores(scores: Iterable[GenerationScore]) -> dict[str, Any]:
    """``{"n_samples": N, metric: {"mean": float | None, "count": int}}`` for every ``GENERATION_METRICS`` key.

    ``count`` is the number of samples where the metric applies: precision needs generated objects, recall
    intended ones, relation metrics some relation to check, ``binding_given_attributes`` correct attributes.
    ``relation_accuracy`` is the mean per-sample fraction of satisfied relations.
    """
    scores = list(scores)
    table: dict[str, Any] = {"n_samples": len(scores)}
    table["precision"] = _mean([s.precision for s in scores if s.precision is not None])
    table["recall"] = _mean([s.recall for s in scores if s.recall is not None])
    for name in ("count_correct", "attributes_correct", "binding_correct"):
        table[name] = _mean([float(getattr(s, name)) for s in scores])
    table["binding_given_attributes"] = _mean([float(s.binding_correct) for s in scores if s.attributes_correct])
    with_relations = [s for s in scores if s.relations_correct is not None]
    table["relations_correct"] = _mean([float(s.relations_correct) for s in with_relations])
    table["relation_accuracy"] = _mean([s.relations_satisfied / s.relations_total for s in with_relations])
    for name in ("position_correct", "exact_match", "all_correct"):
        table[name] = _mean([float(getattr(s, name)) for s in scores])
    return table
