"""BLEU and CIDEr-D against values from the maintained implementation (pycocoevalcap).

Reference values were produced with pycocoevalcap 1.2 (pure-Python Bleu and Cider scorers, fed the
pre-tokenised strings below, no PTB tokenizer) in a throwaway venv:

    python3 -m venv /tmp/cocoeval && /tmp/cocoeval/bin/pip install pycocoevalcap
    /tmp/cocoeval/bin/python -c "
    from pycocoevalcap.bleu.bleu import Bleu; from pycocoevalcap.cider.cider import Cider
    gts = {i: r for i, r in enumerate(REFS)}; res = {i: [c] for i, c in enumerate(CANDS)}
    print(Bleu(4).compute_score(gts, res, verbose=0)[0], Cider().compute_score(gts, res))"

(once per corpus below, with CANDS/REFS = that corpus's candidates and references).
"""

from __future__ import annotations

import json
import math

import pytest

from chameleon_lite.eval.captioning import caption_scores, cider_d, corpus_bleu, tokenize_caption

CORPORA = {
    "shapes": (
        [
            "a red circle in the top left",
            "two objects a blue square and a green star",
            "a small yellow triangle",
            "there is a large purple diamond in the center and a red cross",
        ],
        [
            ["a small red circle in the top left", "a red circle top left"],
            ["two objects a blue square in the center and a green star", "a blue square and a green star"],
            ["a small yellow triangle in the bottom right", "one small yellow triangle"],
            ["a large purple diamond in the center", "a purple diamond and a red cross in the center of the image"],
        ],
    ),
    "clipping": (  # repeated candidate words (clipping), a one-word candidate, shorter-than-reference corpus
        ["the the the the red red", "blue square blue square blue square blue square", "green"],
        [
            ["the red circle", "a red circle is here"],
            ["a blue square", "the blue square on the left of the picture"],
            ["a green star", "green star"],
        ],
    ),
    "tie_and_long": (  # 6 tokens vs references of 5 and 7 (closest-length tie -> shorter)
        ["a b c d e f", "x y z w v u t s r q p"],
        [["a b c d e", "a b c d e f g"], ["x y z", "x y z w v u t s r q p o n m"]],
    ),
    "edge": (  # an empty and a one-word candidate, a much longer reference (length penalty)
        ["", "red", "a blue square", "a green star"],
        [["a red circle"], ["red"], ["a blue square", "blue square"], ["a green star on the left of the picture"]],
    ),
}

# pycocoevalcap 1.2 output (see module docstring)
COCO_BLEU = {
    "shapes": [0.939393939365473, 0.9177228644606148, 0.8910473782060181, 0.843128148069321],
    "clipping": [0.31183566163562787, 0.2205011109565087, 1.6568741900415325e-06, 4.802378780959328e-09],
    "tie_and_long": [0.8890097652981863, 0.8890097652947, 0.8890097652904986, 0.8890097652852894],
    "edge": [0.27645304655057795, 0.27645304653576797, 0.27645304650779357, 0.008742212931221318],
}
COCO_CIDER = {
    "shapes": (5.451934851998587, [6.162685913271249, 7.041867228184609, 5.036356226253931, 3.566830040284556]),
    "clipping": (1.0436605429472874, [0.8281170500830871, 0.5950544598892059, 1.7078101188695693]),
    "tie_and_long": (6.6249292579381045, [8.738983099380098, 4.510875416496111]),
    "edge": (2.5891458290563074, [0.0, 2.5, 5.841389732101819, 2.01519358412341]),
}


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_bleu_matches_pycocoevalcap(name):
    candidates, references = CORPORA[name]
    bleu = corpus_bleu(candidates, references)
    for k, expected in enumerate(COCO_BLEU[name], start=1):
        assert bleu[f"bleu_{k}"] == pytest.approx(expected, abs=1e-6, rel=1e-6)


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_cider_d_matches_pycocoevalcap(name):
    candidates, references = CORPORA[name]
    expected_mean, expected_per_sample = COCO_CIDER[name]
    result = cider_d(candidates, references)
    assert result["cider_d"] == pytest.approx(expected_mean, abs=1e-6)
    assert result["per_sample"] == pytest.approx(expected_per_sample, abs=1e-6)


def test_bleu_hand_computed_brevity_and_clipping():
    # candidate "the the the" vs reference "the cat": unigram matches clipped to 1 of 3; closest ref length 2 < 3
    bleu = corpus_bleu(["the the the"], [["the cat"]], max_n=1)
    assert bleu["precisions"] == [pytest.approx(1 / 3)]
    assert bleu["brevity_penalty"] == 1.0
    assert bleu["bleu_1"] == pytest.approx(1 / 3, rel=1e-6)
    # shorter candidate: BP = exp(1 - r/c) with the closest reference (4, not 9)
    short = corpus_bleu(["a b c"], [["a b c d", "a b c d e f g h i"]], max_n=1)
    assert short["reference_length"] == 4
    assert short["bleu_1"] == pytest.approx(math.exp(1 - 4 / 3), rel=1e-6)


def test_perfect_candidates_score_one_bleu_and_positive_cider():
    refs = [["a red circle on the left"], ["two blue squares at the top"], ["a green star in the center"]]
    cands = [r[0] for r in refs]
    assert corpus_bleu(cands, refs)["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    # identical candidate and reference: tf-idf cosine 1 for every order, no length penalty -> 10 per sample
    assert cider_d(cands, refs)["cider_d"] == pytest.approx(10.0, abs=1e-9)


def test_tokenisation_lowercases_and_drops_punctuation():
    assert tokenize_caption("The Red circle, top-left.") == ["the", "red", "circle", "top", "left"]
    raw = caption_scores(["A Red circle in the TOP left!"], [["a red circle in the top left."]])
    clean = caption_scores(["a red circle in the top left"], [["a red circle in the top left"]])
    assert raw == clean


def test_caption_scores_is_json_ready():
    candidates, references = CORPORA["shapes"]
    scores = caption_scores(candidates, references)
    assert set(scores) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider_d", "n_samples"}
    assert json.loads(json.dumps(scores)) == scores
    assert scores["cider_d"] == pytest.approx(COCO_CIDER["shapes"][0], abs=1e-6)


@pytest.mark.parametrize(
    "candidates, references",
    [
        ([], []),
        (["a"], [["a"], ["b"]]),
        (["a"], [[]]),
        ("a red circle", ["a red circle"]),
        ([3], [["a"]]),
    ],
)
def test_bad_corpora_raise(candidates, references):
    with pytest.raises(ValueError):
        corpus_bleu(candidates, references)
    with pytest.raises(ValueError):
        cider_d(candidates, references)
