"""Visual question answering metrics: exact match per category, POPE, compositional held-out, chance levels.

Input is a list of ``QARecord`` (prediction, answer, category, optional POPE type and held-out flag), made
by any model through ``evaluate_qa_shards`` or by hand. Every function returns plain dicts of ``int``,
``float``, ``str`` or ``None`` that ``json.dumps`` accepts as they are.

Notable choices:

- **Exact match after normalisation** (``normalize_answer``): surrounding whitespace stripped, lowercased,
  trailing periods removed, inner runs of whitespace collapsed to one space. Nothing else: no number words
  to digits, no articles dropped, no synonyms, so ``"three"`` does not match ``"3"``. Short canonical
  answers are what the shapes world asks for; a model that does not produce them is wrong.
- **POPE** (``pope_metrics``): "yes" is the positive class. The ground truth is the normalised reference
  answer; a prediction counts as "yes" only if it normalises to exactly ``"yes"`` (anything else, including
  junk, counts as "no"; ``invalid`` counts predictions that are neither "yes" nor "no"). As in POPE's three
  settings, each negative type (``random``, ``popular``, ``adversarial``; the names of
  ``chameleon_lite.world.questions.POPE_NEGATIVE_TYPES``) is scored on **all positive questions plus the
  negatives of that type**; ``all`` pools every existence question. Precision/recall/F1 with no predicted
  (or no actual) positives are 0, not undefined.
- **Held-out vs seen** (``held_out_accuracy``, ``pope_by_held_out``): ``QARecord.held_out`` says whether the
  sample is about a compositional held-out case (for the shapes world: the scene contains a held-out (colour,
  shape) combo, the shard metadata ``held_out`` list is non-empty). Records with ``held_out=None`` are left out.
  POPE is also scored on each group alone: a model that never saw a held-out combo may deny one that is there
  (a false "no") while it no longer confirms absent objects (a false "yes"), and the pooled F1 mixes the two.
- **Chance = majority answer** (``majority_chance``): per category, the most frequent normalised answer of a
  reference list (e.g. the training answers of that category; ties go to the alphabetically first answer)
  and the accuracy that always answering it scores, on the evaluated records when given, else on the
  reference list itself. It is the floor a model that ignores the image (and the question beyond its
  category) reaches, not a uniform-guess rate.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from chameleon_lite.world.questions import POPE_NEGATIVE_TYPES, POPE_TYPES, normalize_answer

__all__ = [
    "EXISTENCE_CATEGORY",
    "QARecord",
    "accuracy",
    "accuracy_by_category",
    "answers_by_category",
    "evaluate_qa_shards",
    "held_out_accuracy",
    "pope_by_held_out",
    "is_correct",
    "majority_chance",
    "pope_metrics",
    "reference_answers_from_shards",
    "summarize_qa",
]

EXISTENCE_CATEGORY = "existence"
"""The category holding POPE-style "Is there a ...?" questions."""

Predictor = Callable[[list[Any], list[str]], Sequence[str]]


@dataclass(frozen=True)
class QARecord:
    """One answered question. ``pope_type`` only for existence questions; ``held_out`` (the scene holds a held-out
    combo) None when unknown; ``novel_object``: the question names a held-out combo that is in its scene (None
    when unknown)."""

    prediction: str
    answer: str
    category: str
    pope_type: str | None = None
    held_out: bool | None = None
    question: str = ""
    key: str = ""
    novel_object: bool | None = None

    def __post_init__(self) -> None:
        for name in ("prediction", "answer", "category", "question", "key"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"QARecord.{name} must be a str, got {type(getattr(self, name)).__name__}")
        if self.pope_type is not None and self.pope_type not in POPE_TYPES:
            raise ValueError(f"QARecord.pope_type {self.pope_type!r} is not one of {POPE_TYPES}")
        for name in ("held_out", "novel_object"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"QARecord.{name} must be a bool or None, got {getattr(self, name)!r}")

    @property
    def correct(self) -> bool:
        return is_correct(self.prediction, self.answer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QARecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


# ------------------------------------------------------------------------------------- exact match


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match of the normalised prediction and answer."""
    return normalize_answer(prediction) == normalize_answer(answer)


def _score(correct: int, total: int) -> dict[str, Any]:
    return {"correct": correct, "total": total, "accuracy": correct / total if total else None}


def accuracy(records: Iterable[QARecord]) -> dict[str, Any]:
    """``{"correct", "total", "accuracy"}`` over all records (accuracy None when there are none)."""
    records = list(records)
    return _score(sum(r.correct for r in records), len(records))


def accuracy_by_category(records: Iterable[QARecord]) -> dict[str, dict[str, Any]]:
    """``{category: {"correct", "total", "accuracy"}}`` for every category present, in order of first appearance."""
    groups: dict[str, list[QARecord]] = defaultdict(list)
    for record in records:
        groups[record.category].append(record)
    return {category: accuracy(group) for category, group in groups.items()}


# ------------------------------------------------------------------------------------------- POPE


def _binary_scores(labels: Sequence[bool], predicted: Sequence[bool], invalid: int) -> dict[str, Any]:
    tp = sum(y and p for y, p in zip(labels, predicted))
    fp = sum(p and not y for y, p in zip(labels, predicted))
    fn = sum(y and not p for y, p in zip(labels, predicted))
    tn = len(labels) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    total = len(labels)
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "total": total,
        "accuracy": (tp + tn) / total if total else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_rate": (tp + fp) / total if total else None,
        "invalid": invalid,
    }


def _pope_scores(records: Sequence[QARecord]) -> dict[str, Any]:
    labels = [normalize_answer(r.answer) == "yes" for r in records]
    predictions = [normalize_answer(r.prediction) for r in records]
    invalid = sum(p not in ("yes", "no") for p in predictions)
    return _binary_scores(labels, [p == "yes" for p in predictions], invalid)


def pope_metrics(records: Iterable[QARecord], category: str = EXISTENCE_CATEGORY) -> dict[str, dict[str, Any]]:
    """POPE scores of the ``category`` records: ``{"random" | "popular" | "adversarial" | "all": scores}``.

    Each negative type is scored on all ``positive`` records plus that type's negatives (see module docstring);
    a type with no negatives is omitted. Scores: ``tp, fp, tn, fn, total, accuracy, precision, recall, f1,
    yes_rate`` (fraction of "yes" predictions) and ``invalid`` (predictions neither "yes" nor "no"). Records
    without a ``pope_type`` only count in ``all``. Returns ``{}`` if there are no such records.
    """
    existence = [r for r in records if r.category == category]
    if not existence:
        return {}
    positives = [r for r in existence if r.pope_type == "positive"]
    result: dict[str, dict[str, Any]] = {}
    for pope_type in POPE_NEGATIVE_TYPES:
        negatives = [r for r in existence if r.pope_type == pope_type]
        if negatives:
            result[pope_type] = _pope_scores(positives + negatives)
    result["all"] = _pope_scores(existence)
    return result


# ------------------------------------------------------------------------------- held out, chance


def pope_by_held_out(records: Iterable[QARecord], category: str = EXISTENCE_CATEGORY) -> dict[str, dict[str, Any]]:
    """POPE scores (as ``pope_metrics``' ``all``) of the ``category`` records in ``seen`` and ``held_out`` scenes
    separately; a group without records is omitted, and records with ``held_out=None`` are left out."""
    existence = [r for r in records if r.category == category and r.held_out is not None]
    groups = {"seen": [r for r in existence if not r.held_out], "held_out": [r for r in existence if r.held_out]}
    return {name: _pope_scores(group) for name, group in groups.items() if group}


def novel_object_recall(records: Iterable[QARecord], category: str = EXISTENCE_CATEGORY) -> dict[str, Any]:
    """How many present objects of a held-out combo the model confirms: ``{confirmed, total, recall}`` over the
    POPE-positive ``category`` records with ``novel_object=True`` (recall None when there are none).

    POPE on scenes with a held-out combo mixes two things: denying absent objects (hallucination) and confirming
    an object of a combination never seen in training (compositional generalisation). This is the second alone."""
    asked = [r for r in records if r.category == category and r.pope_type == "positive" and r.novel_object]
    confirmed = sum(normalize_answer(r.prediction) == "yes" for r in asked)
    return {"confirmed": confirmed, "total": len(asked), "recall": confirmed / len(asked) if asked else None}


def held_out_accuracy(records: Iterable[QARecord]) -> dict[str, Any]:
    """Accuracy on compositional held-out vs seen records, overall and per category.

    ``{"held_out": {correct, total, accuracy}, "seen": {...}, "by_category": {cat: {"held_out": ..., "seen": ...}}}``;
    records with ``held_out=None`` are ignored (accuracy None for an empty group).
    """
    flagged = [r for r in records if r.held_out is not None]
    held = [r for r in flagged if r.held_out]
    seen = [r for r in flagged if not r.held_out]
    categories = list(dict.fromkeys(r.category for r in flagged))
    return {
        "held_out": accuracy(held),
        "seen": accuracy(seen),
        "by_category": {
            c: {
                "held_out": accuracy(r for r in held if r.category == c),
                "seen": accuracy(r for r in seen if r.category == c),
            }
            for c in categories
        },
    }


def answers_by_category(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """``[(category, answer), ...]`` -> ``{category: [answer, ...]}`` (e.g. from training samples)."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for category, answer in pairs:
        grouped[category].append(answer)
    return dict(grouped)


def majority_chance(
    reference_answers: Mapping[str, Iterable[str]], records: Iterable[QARecord] | None = None
) -> dict[str, dict[str, Any]]:
    """Majority-answer chance level per category (see module docstring).

    ``reference_answers``: ``{category: answers}``, typically the training answers. Returns
    ``{category: {"majority_answer", "chance", "reference_total", "evaluated_total"}}`` where ``chance`` is the
    accuracy of always giving the majority answer: on ``records`` of that category when given (categories
    without evaluated records get ``chance`` None), else on the reference answers themselves
    (``evaluated_total`` is then the reference count).
    """
    evaluated: dict[str, list[QARecord]] | None = None
    if records is not None:
        evaluated = defaultdict(list)
        for record in records:
            evaluated[record.category].append(record)
    result: dict[str, dict[str, Any]] = {}
    for category, answers in reference_answers.items():
        counts = Counter(normalize_answer(a) for a in answers)
        if not counts:
            raise ValueError(f"majority_chance: no reference answers for category {category!r}")
        majority, top = min(counts.items(), key=lambda item: (-item[1], item[0]))
        reference_total = sum(counts.values())
        if evaluated is None:
            chance, evaluated_total = top / reference_total, reference_total
        else:
            group = evaluated.get(category, [])
            hits = sum(normalize_answer(r.answer) == majority for r in group)
            chance, evaluated_total = (hits / len(group) if group else None), len(group)
        result[category] = {
            "majority_answer": majority,
            "chance": chance,
            "reference_total": reference_total,
            "evaluated_total": evaluated_total,
        }
    return result


def summarize_qa(
    records: Sequence[QARecord], reference_answers: Mapping[str, Iterable[str]] | None = None
) -> dict[str, Any]:
    """Everything above in one JSON-ready dict: ``overall``, ``by_category``, ``pope``, ``pope_held_out``,
    ``novel_objects``, ``held_out`` and, with ``reference_answers``, ``chance`` (majority answer on these records)."""
    summary: dict[str, Any] = {
        "overall": accuracy(records),
        "by_category": accuracy_by_category(records),
        "pope": pope_metrics(records),
        "pope_held_out": pope_by_held_out(records),
        "novel_objects": novel_object_recall(records),
        "held_out": held_out_accuracy(records),
    }
    if reference_answers is not None:
        summary["chance"] = majority_chance(reference_answers, records)
    return summary


# ------------------------------------------------------------------------------------- from shards


def _held_out_flag(meta: Mapping[str, Any]) -> bool | None:
    """``meta["held_out"]``: a bool as is; a list (the shapes world's held-out combos in the scene) -> non-empty."""
    value = meta.get("held_out")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)):
        return len(value) > 0
    raise ValueError(f"QA metadata 'held_out' must be a bool or a list, got {value!r}")


def _novel_object_flag(meta: Mapping[str, Any]) -> bool | None:
    """Whether the question's program names (by colour and shape) one of the held-out combos listed as in its
    scene (the shapes world's ``meta["program"]["where"]`` and ``meta["held_out"]``); None without both."""
    program, held = meta.get("program"), meta.get("held_out")
    where = program.get("where") if isinstance(program, Mapping) else None
    if not isinstance(where, Mapping) or not isinstance(held, (list, tuple)):
        return None
    if not ("color" in where and "shape" in where):
        return False
    return [where["color"], where["shape"]] in [list(c) for c in held]


def evaluate_qa_shards(
    urls: Any,
    predict: Predictor,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    image_transform: Callable[[Any], Any] | None = None,
) -> list[QARecord]:
    """Answer every question of webdataset QA shards with ``predict`` and return the records, in shard order.

    ``urls``: anything ``chameleon_lite.data.readers.qa_dataset`` accepts. ``predict(images, questions)``
    receives a batch of images (PIL RGB, or ``image_transform``'s output) and question strings and must return
    one answer string per question; it never sees the reference answers. ``limit`` caps the number of samples.
    ``pope_type`` and ``held_out`` come from each sample's json metadata when present.
    """
    from chameleon_lite.data.readers import qa_dataset  # torch/webdataset only when shards are read

    if batch_size < 1:
        raise ValueError(f"evaluate_qa_shards: batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"evaluate_qa_shards: limit must be >= 0, got {limit}")
    records: list[QARecord] = []
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        answers = predict([s["image"] for s in batch], [s["question"] for s in batch])
        if isinstance(answers, str) or len(answers) != len(batch):
            got = "a str" if isinstance(answers, str) else f"{len(answers)} answers"
            raise ValueError(f"evaluate_qa_shards: predict returned {got} for a batch of {len(batch)} questions")
        for sample, prediction in zip(batch, answers):
            if not isinstance(prediction, str):
                raise ValueError(f"evaluate_qa_shards: predict returned a {type(prediction).__name__}, expected str")
            meta = sample["meta"]
            pope_type = meta.get("pope_type")
            records.append(
                QARecord(
                    prediction=prediction,
                    answer=sample["answer"],
                    category=sample["category"],
                    pope_type=pope_type if isinstance(pope_type, str) else None,
                    held_out=_held_out_flag(meta),
                    question=sample["question"],
                    key=sample["key"],
                    novel_object=_novel_object_flag(meta),
                )
            )
        batch.clear()

    if limit == 0:
        return records
    for sample in qa_dataset(urls, image_transform=image_transform):
        batch.append(sample)
        if len(batch) == batch_size:
            flush()
        if limit is not None and len(records) + len(batch) >= limit:
            break
    if batch:
        flush()
    return records


def reference_answers_from_shards(urls: Any, limit: int | None = None) -> dict[str, list[str]]:
    """``{category: [answer, ...]}`` of QA shards (e.g. the training split), for ``majority_chance``."""
    from chameleon_lite.data.readers import qa_dataset

    pairs = []
    for i, sample in enumerate(qa_dataset(urls)):
        if limit is not None and i >= limit:
            break
        pairs.append((sample["category"], sample["answer"]))
    return answers_by_category(pairs)
