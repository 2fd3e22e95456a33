"""``benchmarks/pope_ranking.py``: AUC, F1 at margin 0 and the best threshold's F1, against hand-computed cases."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pope_ranking.py"


@pytest.fixture(scope="module")
def ranking():
    spec = importlib.util.spec_from_file_location("pope_ranking", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_scores_of_a_hand_computed_case(ranking):
    margin = torch.tensor([2.0, 1.0, 0.5, -1.0])
    present = torch.tensor([True, False, True, False])
    s = ranking.ranking_scores(margin, present)
    # present 2 beats both absent, present 0.5 beats -1 only: 3 of 4 pairs
    assert s["auc"] == pytest.approx(0.75)
    # margin > 0 says yes to 2, 1, 0.5: tp 2, fp 1, fn 0 -> F1 4/5
    assert s["f1_at_zero"] == pytest.approx(0.8) and s["yes_rate_at_zero"] == pytest.approx(0.75)
    # thresholds: all yes 4/6, > -1 4/5, > 0.5 2/4, > 1 2/3, > 2 0
    assert s["best_f1"] == pytest.approx(0.8) and s["best_threshold"] == -1.0
    assert (s["n"], s["present"]) == (4, 2)


def test_ties_count_a_half_and_a_perfect_ranking_is_one(ranking):
    assert ranking.ranking_scores(torch.tensor([1.0, 1.0]), torch.tensor([True, False]))["auc"] == 0.5
    perfect = ranking.ranking_scores(torch.tensor([-3.0, -2.0, -5.0]), torch.tensor([True, True, False]))
    # every margin below 0: F1 0 at margin 0, but the best threshold separates them
    assert perfect["auc"] == 1.0 and perfect["f1_at_zero"] == 0.0 and perfect["best_f1"] == 1.0


def test_one_sided_questions_are_refused(ranking):
    with pytest.raises(ValueError, match="present and absent"):
        ranking.ranking_scores(torch.tensor([1.0, 2.0]), torch.tensor([True, True]))
