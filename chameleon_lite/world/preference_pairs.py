"""Preference pairs for stage 3 (DPO), built from a shapes world's exact ground truth, from its training split only.

A pair is one image, one prompt and two responses, the ``chosen`` one true and the ``rejected`` one false::

    pairs, summary = build_preference_pairs("data/shapes-32", pairs=4000, seed=0, answer_fn=my_arm_answers)
    write_preference_shards(pairs, "data/prefs")          # prefs-000000.tar: KEY.png + KEY.json
    pairs = read_preference_pairs("data/prefs/prefs-*.tar")

Three kinds, each from the scene the world stored with the sample (``meta["scene"]``):

- ``yes_no`` (existence, negation and any other question answered yes or no): the correct answer against the
  other one. These are the pairs that move a model's yes-rate, the POPE hallucination signature.
- ``answer`` (count, colour, shape, binding, spatial): the correct answer against the arm's own wrong greedy
  answer when ``answer_fn`` is given and the arm is wrong (source ``model``, on-policy as in RLHF-V / POVID);
  otherwise a wrong answer drawn from the answers the training split gives to that category (source ``sampled``).
- ``caption``: a true caption against a caption of the same template about a perturbed scene: an object added
  in a free cell (a hallucinated object), two objects' colours swapped (mis-bound attributes) or one object's
  shape changed. Both captions come from ``language.describe`` with the same random state, so they differ only
  where the scenes differ.

Scenes are taken in a seeded random order, each contributing its caption pair and all its question pairs, until
``pairs`` are made. Every record must say ``"split": "train"``: a validation or test scene is an error, so the
pairs never see what the comparison scores.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from chameleon_lite.data.readers import list_shards, pair_dataset, qa_dataset
from chameleon_lite.data.shards import write_shards
from chameleon_lite.tokenization.image_preprocessing import to_rgb
from chameleon_lite.world.language import describe
from chameleon_lite.world.questions import POPE_NEGATIVE_TYPES, existence_question, no_combo_question, normalize_answer
from chameleon_lite.world.scenes import Scene, SceneObject, WorldConfig
from chameleon_lite.world.shapes_world import load_world_spec

__all__ = ["PreferencePair", "PAIR_KINDS", "PAIRS_PREFIX", "EXTRA_EXISTENCE", "EXTRA_NEGATIVE_TYPES",
           "build_preference_pairs", "write_preference_shards", "read_preference_pairs", "perturb_scene"]

PAIR_KINDS = ("yes_no", "answer", "caption")
# the shipped recipe's extra existence questions, chosen on the validation splits val + val_held_out (docs/dpo.md):
# per scene 2 more (1 present, 1 absent) whose absent object shares a colour or a shape with one in the scene
# (POPE's adversarial)
EXTRA_EXISTENCE = 2
EXTRA_NEGATIVE_TYPES = ("adversarial",)
PAIRS_PREFIX = "prefs"
YES_NO = ("yes", "no")

AnswerFn = Callable[[Sequence[Image.Image], Sequence[str]], Sequence[str]]


@dataclass
class PreferencePair:
    """One preference pair. ``prompt`` is the question ("" for a caption pair, whose prompt is the image alone)."""

    image: Image.Image
    prompt: str
    chosen: str
    rejected: str
    kind: str  # one of PAIR_KINDS
    category: str  # the question's category, or "caption"
    source: str  # how ``rejected`` was made: flipped, model, sampled, added_object, swapped_colors, changed_shape
    scene_key: str

    def meta(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "image"}


def _check_train(meta: dict[str, Any], where: str) -> None:
    split = meta.get("split")
    if split != "train":
        raise ValueError(f"{where} is from split {split!r}: preference pairs are built from the training split only "
                         "(the comparison scores validation and test scenes)")


def perturb_scene(scene: Scene, rng: random.Random, shapes: Sequence[str], colors: Sequence[str]
                  ) -> tuple[Scene, str] | None:
    """A scene that differs from ``scene`` in one visible fact, and how: ``added_object`` (a new object in a free
    cell), ``swapped_colors`` (two objects of different colours and shapes trade colours) or ``changed_shape``
    (one object gets a shape it does not have). None when no perturbation applies (an empty scene on a full grid)."""
    options: list[str] = []
    if scene.free_cells():
        options.append("added_object")
    objs = list(scene.objects)
    swappable = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))
                 if objs[i].color != objs[j].color and objs[i].shape != objs[j].shape]
    if swappable:
        options.append("swapped_colors")
    if objs and len(shapes) > 1:
        options.append("changed_shape")
    if not options:
        return None
    how = rng.choice(options)
    if how == "added_object":
        row, col = rng.choice(scene.free_cells())
        color = rng.choice([c for c in colors if c != scene.background])
        size = rng.choice([o.size for o in objs] or ["large"])
        objs.append(SceneObject(rng.choice(list(shapes)), color, size, row, col))
    elif how == "swapped_colors":
        i, j = rng.choice(swappable)
        a, b = objs[i], objs[j]
        objs[i] = SceneObject(a.shape, b.color, a.size, a.row, a.col)
        objs[j] = SceneObject(b.shape, a.color, b.size, b.row, b.col)
    else:
        i = rng.randrange(len(objs))
        o = objs[i]
        objs[i] = SceneObject(rng.choice([s for s in shapes if s != o.shape]), o.color, o.size, o.row, o.col)
    return scene.replace_objects(objs), how


def _scene_of(meta: dict[str, Any], where: str) -> Scene:
    if "scene" not in meta:
        raise ValueError(f"{where} has no 'scene' in its json: preference pairs need the world's ground truth")
    return Scene.from_dict(meta["scene"])


def _asked_existence(scene: Scene, rng: random.Random, world: WorldConfig, exclude: frozenset,
                     asked: set[tuple[str, str]], negative_types: Sequence[str],
                     n: int, negated_twins: bool) -> list[tuple[str, str, str]]:
    """Up to ``n`` new existence questions about ``scene`` as ``(question, answer, category)``, in couples: one
    about a present combo ("yes") and one about an absent combo ("no") of a type drawn from ``negative_types`` that
    the scene was not asked about yet (``asked``), so the couples choose "yes" and "no" equally often. A scene has
    few present combos, so the "yes" question may repeat one; a couple without a new absent combo is dropped.
    ``negated_twins``: each question is followed by its negated twin ("Is it true that there is no ...?",
    category ``negation``, the other answer). Never about an ``exclude``d (held-out) combo."""
    out: list[tuple[str, str, str]] = []
    for _ in range(n // 2):
        present = existence_question(scene, rng, world, "positive", exclude)
        absent = None
        for pope_type in rng.sample(list(negative_types), len(negative_types)):
            draws = [existence_question(scene, rng, world, pope_type, exclude) for _ in range(8)]
            fresh = [qa for qa in draws if qa is not None and _combo(qa.program) not in asked]
            if fresh:
                absent = fresh[0]
                break
        if present is None or absent is None:
            break
        asked.add(_combo(absent.program))
        for qa in (present, absent):
            out.append((qa.question, qa.answer, "existence"))
            if negated_twins:
                twin = no_combo_question(scene, rng, world, _combo(qa.program))
                out.append((twin.question, twin.answer, twin.category))
    return out


def _combo(program: dict[str, Any]) -> tuple[str, str]:
    return program["where"]["color"], program["where"]["shape"]


def build_preference_pairs(raw: str | os.PathLike, *, pairs: int, seed: int = 0, answer_fn: AnswerFn | None = None,
                           batch_size: int = 32, kinds: Sequence[str] = PAIR_KINDS, balance_yes_no: bool = False,
                           extra_existence: int = EXTRA_EXISTENCE,
                           negative_types: Sequence[str] = EXTRA_NEGATIVE_TYPES,
                           negated_twins: bool = False) -> tuple[list[PreferencePair], dict[str, Any]]:
    """Up to ``pairs`` preference pairs from ``raw/train`` (a shapes world directory with ``world.yaml``).

    ``answer_fn(images, questions) -> answers``: the arm's greedy answers, used for the rejected side of
    ``answer`` pairs where they are wrong (see the module docstring). ``kinds``: which of ``PAIR_KINDS`` to make
    (all by default; the budget is then filled with those kinds only). ``balance_yes_no``: skip a yes/no pair
    whose chosen answer is already the more frequent one, so "yes" and "no" are chosen equally often (the world's
    binding questions are mostly answered "yes").

    ``extra_existence``: per scene, that many more existence questions asked of its ground truth as ``yes_no``
    pairs (source ``asked``; 0 = none), in couples of a present combo and a new absent one of a type in
    ``negative_types`` (POPE's random / popular / adversarial), never about a held-out combo. The defaults
    (``EXTRA_EXISTENCE`` adversarial) are the shipped recipe, chosen on the validation splits. ``negated_twins``:
    each extra question is followed by its negated twin ("Is it true that there is no ...?", category
    ``negation``, the other answer). Returns the pairs and a summary (counts by kind and source, scenes used,
    chosen yes/no).
    """
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"pairs must be a positive int, got {pairs!r}")
    kinds = tuple(kinds)
    if not kinds or any(k not in PAIR_KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {PAIR_KINDS}, got {kinds!r}")
    if extra_existence < 0 or not negative_types or any(t not in POPE_NEGATIVE_TYPES for t in negative_types):
        raise ValueError(f"need extra_existence >= 0 and negative_types a non-empty subset of {POPE_NEGATIVE_TYPES}, "
                         f"got {extra_existence!r} and {negative_types!r}")
    if extra_existence % 2:
        raise ValueError(f"extra_existence must be even (the questions come in couples of a present and an absent "
                         f"combo), got {extra_existence}")
    raw = Path(raw)
    spec = load_world_spec(raw)
    world, held_out = spec.world, frozenset(spec.split().held_out)
    rng = random.Random(seed)
    scenes: dict[str, dict[str, Any]] = {}  # scene_key -> {"caption": sample, "qa": [samples]}
    for s in pair_dataset(str(raw / "train" / "pairs-*.tar")):
        _check_train(s["meta"], f"pair {s['key']}")
        scenes.setdefault(s["key"], {"qa": []})["caption"] = s
    answers: dict[str, set[str]] = {}
    for s in qa_dataset(str(raw / "train" / "qa-*.tar")):
        _check_train(s["meta"], f"question {s['key']}")
        key = s["meta"].get("scene_key") or s["key"].rsplit("-q", 1)[0]
        scenes.setdefault(key, {"qa": []})["qa"].append(s)
        answers.setdefault(s["category"], set()).add(normalize_answer(s["answer"]))
    order = sorted(scenes)
    rng.shuffle(order)

    made: list[PreferencePair] = []
    chosen_yes_no = dict.fromkeys(YES_NO, 0)
    pending: list[tuple[int, dict[str, Any]]] = []  # answer pairs whose rejected side may come from the arm
    for key in order:
        if len(made) >= pairs:
            break
        entry = scenes[key]
        cap = entry.get("caption")
        if cap is not None and "caption" in kinds:
            scene = _scene_of(cap["meta"], f"pair {cap['key']}")
            changed = perturb_scene(scene, rng, world.shapes, world.colors)
            if changed is not None:
                template_seed = rng.random()  # both captions from the same template and object order
                chosen = describe(scene, random.Random(template_seed))
                rejected = describe(changed[0], random.Random(template_seed))
                if chosen != rejected:
                    made.append(PreferencePair(cap["image"], "", chosen, rejected, "caption", "caption",
                                               changed[1], key))
        if extra_existence and "yes_no" in kinds and cap is not None:
            scene = _scene_of(cap["meta"], f"pair {cap['key']}")
            asked = {_combo(q["meta"]["program"]) for q in entry["qa"]
                     if q["category"] == "existence" and "program" in q.get("meta", {})}
            for question, truth, category in _asked_existence(scene, rng, world, held_out, asked, negative_types,
                                                                 extra_existence, negated_twins):
                if len(made) >= pairs:
                    break
                chosen_yes_no[truth] += 1
                made.append(PreferencePair(cap["image"], question, truth, YES_NO[1 - YES_NO.index(truth)],
                                           "yes_no", category, "asked", key))
        for q in entry["qa"]:
            if len(made) >= pairs:
                break
            truth = normalize_answer(q["answer"])
            if truth in YES_NO:
                other = YES_NO[1 - YES_NO.index(truth)]
                if "yes_no" not in kinds or (balance_yes_no and chosen_yes_no[truth] > chosen_yes_no[other]):
                    continue
                chosen_yes_no[truth] += 1
                made.append(PreferencePair(q["image"], q["question"], truth, other,
                                           "yes_no", q["category"], "flipped", key))
                continue
            others = sorted(answers.get(q["category"], set()) - {truth})
            if not others or "answer" not in kinds:
                continue  # a category with one answer in the whole split has nothing to prefer against
            pending.append((len(made), q))
            made.append(PreferencePair(q["image"], q["question"], truth, rng.choice(others), "answer",
                                       q["category"], "sampled", key))
    if answer_fn is not None and pending:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            predicted = answer_fn([q["image"] for _, q in chunk], [q["question"] for _, q in chunk])
            for (i, _), guess in zip(chunk, predicted):
                guess = normalize_answer(guess)
                if guess and guess != made[i].chosen:
                    made[i].rejected, made[i].source = guess, "model"
    summary = {
        "pairs": len(made), "requested": pairs, "scenes": len({p.scene_key for p in made}),
        "by_kind": {k: sum(p.kind == k for p in made) for k in PAIR_KINDS},
        "by_source": {s: sum(p.source == s for p in made) for s in sorted({p.source for p in made})},
        "chosen_yes_no": chosen_yes_no,
    }
    return made, summary


def write_preference_shards(pairs: Sequence[PreferencePair], out_dir: str | os.PathLike, *, overwrite: bool = False,
                            max_count: int = 1000, progress: bool = False) -> list[Path]:
    """Write pairs as ``out_dir/prefs-NNNNNN.tar`` (``KEY.png`` and ``KEY.json`` with the pair's text fields);
    the same manifest rules as every shard writer (``data.shards.write_shards``)."""
    samples = ({"__key__": f"{i:07d}", "png": p.image, "json": p.meta()} for i, p in enumerate(pairs))
    return write_shards(samples, out_dir, prefix=PAIRS_PREFIX, max_count=max_count, progress=progress,
                        total=len(pairs), overwrite=overwrite)


def read_preference_pairs(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[PreferencePair]:
    """Pairs from ``prefs-*.tar`` shards, in shard order. Only ``.png`` and ``.json`` members are read (nothing
    is unpickled); a sample without both, or with a field missing, is a ``ValueError`` naming shard and key."""
    fields = ("prompt", "chosen", "rejected", "kind", "category", "source", "scene_key")
    out: list[PreferencePair] = []
    for shard in list_shards(urls):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                if ext in ("png", "json"):
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, parts in members.items():
            if set(parts) != {"png", "json"}:
                raise ValueError(f"{shard}: sample {key!r} lacks its {'png' if 'png' not in parts else 'json'}")
            meta = json.loads(parts["json"].decode("utf-8"))
            missing = [f for f in fields if not isinstance(meta.get(f), str)]
            if missing or meta["kind"] not in PAIR_KINDS:
                raise ValueError(f"{shard}: sample {key!r} is not a preference pair "
                                 f"(missing or bad {missing or 'kind'})")
            image, _ = to_rgb(Image.open(io.BytesIO(parts["png"])))
            out.append(PreferencePair(image, *(meta[f] for f in fields)))
    if not out:
        raise ValueError(f"no preference pairs in {urls!r} (make them with: chameleon-lite data preference-pairs)")
    return out
