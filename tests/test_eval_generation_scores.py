"""GenEval-style generation scores on hand-built scenes where the outcome of every check is known."""

from __future__ import annotations

import functools
import json

import pytest

from chameleon_lite.eval.generation_scores import (
    GENERATION_METRICS,
    SpatialRelation,
    aggregate_generation_scores,
    implied_relations,
    score_generated_images,
    score_generation,
    verdict,
)
from chameleon_lite.world.render import render_scene
from chameleon_lite.world.scene_parser import parse_scene
from chameleon_lite.world.scenes import Scene, SceneObject, WorldConfig


def obj(shape, color, row, col, size="large"):
    return SceneObject(shape, color, size, row, col)


RED_CIRCLE = obj("circle", "red", 0, 0)
BLUE_SQUARE = obj("square", "blue", 0, 2, "small")
INTENDED = Scene((RED_CIRCLE, BLUE_SQUARE))  # circle left of square, same row


def test_implied_relations_of_a_row():
    relations = {(r.subject.combo, r.relation, r.reference.combo) for r in implied_relations(INTENDED)}
    assert relations == {
        (("red", "circle"), "left", ("blue", "square")),
        (("blue", "square"), "right", ("red", "circle")),
    }
    with pytest.raises(ValueError):
        SpatialRelation(RED_CIRCLE, "behind", BLUE_SQUARE)


def test_perfect_generation():
    score = score_generation(INTENDED, list(INTENDED.objects))
    assert (score.precision, score.recall, score.matched) == (1.0, 1.0, 2)
    assert score.count_correct and score.attributes_correct and score.binding_correct
    assert (score.relations_total, score.relations_satisfied, score.relations_correct) == (2, 2, True)
    assert score.position_correct and score.exact_match and score.all_correct
    assert verdict(score) == "correct"


def test_swapped_positions_break_relations_only():
    score = score_generation(INTENDED, [obj("circle", "red", 0, 2), obj("square", "blue", 0, 0, "small")])
    assert score.count_correct and score.binding_correct and (score.precision, score.recall) == (1.0, 1.0)
    assert score.relations_satisfied == 0 and score.relations_correct is False
    assert not score.position_correct and not score.all_correct
    assert score.failed_relations == ["red circle left blue square", "blue square right red circle"]
    assert verdict(score) == "relations 0/2"


def test_swapped_colours_is_a_binding_error():
    score = score_generation(INTENDED, [obj("circle", "blue", 0, 0), obj("square", "red", 0, 2)])
    assert score.count_correct and score.attributes_correct
    assert not score.binding_correct and score.matched == 0 and score.precision == 0.0
    assert score.missing == ["blue square", "red circle"] and score.extra == ["blue circle", "red square"]
    assert score.relations_correct is False and not score.all_correct


def test_missing_and_extra_objects():
    missing = score_generation(INTENDED, [RED_CIRCLE])
    assert not missing.count_correct and (missing.precision, missing.recall) == (1.0, 0.5)
    assert missing.relations_correct is False  # the square the relations need is absent
    assert verdict(missing) == "1 objects, want 2; missing blue square; relations 0/2"
    extra = score_generation(INTENDED, [RED_CIRCLE, BLUE_SQUARE, obj("star", "green", 2, 2)])
    assert not extra.count_correct and not extra.binding_correct
    assert extra.precision == pytest.approx(2 / 3) and extra.recall == 1.0
    assert extra.relations_correct is True and not extra.all_correct and extra.extra == ["green star"]
    empty = score_generation(INTENDED, [])
    assert empty.precision is None and empty.recall == 0.0


def test_size_and_cells_are_separate_from_all_correct():
    resized = score_generation(INTENDED, [obj("circle", "red", 0, 0, "small"), BLUE_SQUARE])
    assert resized.all_correct and resized.position_correct and not resized.exact_match
    shifted = score_generation(INTENDED, [obj("circle", "red", 1, 0), obj("square", "blue", 1, 1)])
    assert shifted.all_correct and shifted.relations_correct and not shifted.position_correct
    assert verdict(shifted) == "correct (cells differ)"


def test_repeated_combos_need_two_distinct_objects():
    twins = Scene((obj("circle", "red", 0, 0), obj("circle", "red", 2, 2)))
    assert len(implied_relations(twins)) == 4  # left/above one way, right/below the other
    moved = score_generation(twins, [obj("circle", "red", 0, 1), obj("circle", "red", 1, 2)])
    assert moved.relations_correct is True and moved.binding_correct
    single = score_generation(twins, [obj("circle", "red", 1, 1)])
    assert single.relations_satisfied == 0  # one object cannot be left of itself


def test_explicit_relations_and_no_relations():
    stated = [SpatialRelation(RED_CIRCLE, "left", BLUE_SQUARE)]
    score = score_generation(INTENDED, [obj("circle", "red", 2, 0), obj("square", "blue", 0, 1)], relations=stated)
    assert (score.relations_total, score.relations_correct) == (1, True)
    alone = score_generation(Scene((RED_CIRCLE,)), [RED_CIRCLE])
    assert alone.relations_correct is None and alone.all_correct


def test_aggregate_means_and_counts():
    scores = [
        score_generation(INTENDED, list(INTENDED.objects)),  # all correct
        score_generation(INTENDED, [obj("circle", "blue", 0, 0), obj("square", "red", 0, 2)]),  # binding error
        score_generation(INTENDED, []),  # nothing drawn
        score_generation(Scene((RED_CIRCLE,)), [RED_CIRCLE]),  # single object: no relations
    ]
    table = aggregate_generation_scores(scores)
    assert set(table) == {"n_samples", *GENERATION_METRICS}
    assert table["n_samples"] == 4
    assert table["precision"] == {"mean": pytest.approx(2 / 3), "count": 3}  # empty generation excluded
    assert table["recall"] == {"mean": pytest.approx(0.5), "count": 4}
    assert table["count_correct"] == {"mean": 0.75, "count": 4}
    assert table["binding_correct"] == {"mean": 0.5, "count": 4}
    assert table["binding_given_attributes"] == {"mean": pytest.approx(2 / 3), "count": 3}
    assert table["relations_correct"] == {"mean": pytest.approx(1 / 3), "count": 3}
    assert table["all_correct"] == {"mean": 0.5, "count": 4}
    assert json.loads(json.dumps(table)) == table
    assert json.loads(json.dumps(scores[1].to_dict()))["missing"] == ["blue square", "red circle"]
    assert aggregate_generation_scores([])["all_correct"] == {"mean": None, "count": 0}


def test_score_generated_images_with_the_parser():
    world = WorldConfig(image_size=64)
    wrong = Scene((obj("circle", "red", 0, 2), obj("square", "blue", 0, 0, "small")))
    samples = [
        ("a red circle left of a small blue square", INTENDED, render_scene(INTENDED, 64)),
        ("a red circle left of a small blue square", INTENDED, render_scene(wrong, 64)),
    ]
    scores = score_generated_images(samples, functools.partial(parse_scene, config=world))
    assert [s.all_correct for s in scores] == [True, False]
    assert scores[0].exact_match and scores[0].caption == samples[0][0]
    assert scores[1].binding_correct and scores[1].relations_correct is False
    with pytest.raises(ValueError):
        score_generated_images(samples, functools.partial(parse_scene, config=world), relations=[None])
    with pytest.raises(ValueError):
        score_generation(INTENDED, ["red circle"])
