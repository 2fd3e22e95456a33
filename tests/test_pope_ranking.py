"""``eval/pope_ranking.py``: AUC, F1 at margin 0 and the best threshold's F1, against hand-computed cases; and the
report's lines about them."""

import pytest
import torch

from chameleon_lite.eval import pope_ranking as ranking


def test_scores_of_a_hand_computed_case():
    margin = torch.tensor([2.0, 1.0, 0.5, -1.0])
    present = torch.tensor([True, False, True, False])
    s = ranking.ranking_scores(margin, present)
    # present 2 beats both absent, present 0.5 beats -1 only: 3 of 4 pairs
    assert s["auc"] == pytest.approx(0.75)
    # margin > 0 says yes to 2, 1, 0.5: tp 2, fp 1, fn 0 -> F1 4/5
    assert s["f1_at_zero"] == pytest.approx(0.8) and s["yes_rate_at_zero"] == pytest.approx(0.75)
    # thresholds: all yes 4/6, > -1 4/5, > 0.5 2/4, > 1 2/3, > 2 0
    assert s["best_f1"] == pytest.approx(0.8) and s["best_threshold"] == -1.0
    assert (s["total"], s["present"]) == (4, 2)


def test_ties_count_a_half_and_a_perfect_ranking_is_one():
    assert ranking.ranking_scores(torch.tensor([1.0, 1.0]), torch.tensor([True, False]))["auc"] == 0.5
    perfect = ranking.ranking_scores(torch.tensor([-3.0, -2.0, -5.0]), torch.tensor([True, True, False]))
    # every margin below 0: F1 0 at margin 0, but the best threshold separates them
    assert perfect["auc"] == 1.0 and perfect["f1_at_zero"] == 0.0 and perfect["best_f1"] == 1.0


def test_one_sided_questions_are_refused():
    with pytest.raises(ValueError, match="present and absent"):
        ranking.ranking_scores(torch.tensor([1.0, 2.0]), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="differ in length"):
        ranking.ranking_scores(torch.tensor([1.0, 2.0]), torch.tensor([True]))


def test_the_report_states_each_arms_auc_by_scene():
    from chameleon_lite.comparison.report import _pope_ranking_lines

    margin, present = torch.tensor([2.0, 1.0, 0.5, -1.0]), torch.tensor([True, False, True, False])
    scores = ranking.ranking_scores(margin, present)
    metrics = {"arms": {"native": {"per_seed": [{"qa": {"pope_ranking": {"all": scores, "seen": scores}}}]},
                        "baseline": {"per_seed": [{"qa": {"pope_ranking": {"all": scores}}}]}}}
    lines = _pope_ranking_lines(metrics)
    native = "- native: AUC 0.750; scenes of seen combos 0.750; best-threshold F1 80.0 % at a yes-rate of 75.0 %."
    assert native in lines
    assert "- baseline: AUC 0.750; best-threshold F1 80.0 % at a yes-rate of 75.0 %." in lines
    metrics["arms"]["baseline"]["per_seed"][0]["qa"]["pope_ranking"] = {}  # not measured for one arm: no lines
    assert _pope_ranking_lines(metrics) == []
