"""Captioning metrics: corpus BLEU-1..4 and CIDEr-D, numerically equal to the COCO caption evaluation code.

Both follow the pure-Python scorers of ``pycocoevalcap`` (the maintained packaging of coco-caption) line by
line, so numbers are comparable with published captioning results computed on the same tokens:

- ``corpus_bleu`` = ``pycocoevalcap.bleu.Bleu(4)``: n-gram counts of each candidate clipped by the maximum
  count of that n-gram in any one of its references; counts summed over the corpus; BLEU-n is the geometric
  mean of the clipped precisions of orders 1..n, with the same smoothing constants (``1e-15`` added to the
  matches, ``1e-9`` to the totals, so an order with no match gives ~0 instead of a crash); brevity penalty
  ``exp(1 - r/c)`` when the candidate corpus is shorter than the reference corpus, where each candidate's
  reference length is the **closest** reference length (ties go to the shorter reference).
- ``cider_d`` = ``pycocoevalcap.cider.Cider`` (coco-caption's CIDEr is the CIDEr-D variant): per order
  n = 1..4, tf-idf vectors with document frequency counted over the references of the evaluated corpus
  (a sample's references count once per n-gram), idf = ``log(N) - log(max(1, df))``; similarity of candidate
  and reference = ``sum min(v_cand, v_ref) * v_ref / (|v_cand| |v_ref|)`` (candidate counts clipped by the
  reference's), times a Gaussian length penalty ``exp(-delta^2 / (2 sigma^2))`` with ``sigma = 6``; averaged
  over orders and references, times 10; the corpus score is the mean over samples. As in the reference code,
  "length" for the penalty is the number of bigrams of a sentence (words - 1 unless empty), so ``delta`` is
  the difference in word counts (an empty sentence scores 0 anyway). With a single sample every reference
  n-gram has idf 0 and CIDEr-D is 0: it needs a corpus.

Tokenisation (``tokenize_caption``) replaces COCO's Java PTB tokenizer with something simple and documented:
lowercase, every character that is neither a word character nor whitespace (punctuation, symbols) becomes a
space, split on whitespace. Scores are therefore equal to pycocoevalcap's when it is fed the same tokens
(space-joined), not necessarily when it runs its own tokenizer on raw text.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["caption_scores", "cider_d", "corpus_bleu", "tokenize_caption"]

_PUNCTUATION = re.compile(r"[^\w\s]|_")
_MATCH_SMOOTHING = 1e-15  # pycocoevalcap BleuScorer "tiny"
_TOTAL_SMOOTHING = 1e-9  # pycocoevalcap BleuScorer "small"

Ngram = tuple[str, ...]


def tokenize_caption(text: str) -> list[str]:
    """Lowercase, turn punctuation and symbols (anything not a letter, digit or space) into spaces, split.

    ``"The red circle is left of the blue square."`` -> ``["the", "red", "circle", ..., "square"]``;
    ``"top-left"`` -> ``["top", "left"]``.
    """
    if not isinstance(text, str):
        raise ValueError(f"tokenize_caption: expected a str, got {type(text).__name__}")
    return _PUNCTUATION.sub(" ", text.lower()).split()


def _ngram_counts(tokens: Sequence[str], max_n: int) -> Counter[Ngram]:
    counts: Counter[Ngram] = Counter()
    for k in range(1, max_n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


def _tokenized_corpus(
    candidates: Sequence[str], references: Sequence[Sequence[str] | str], name: str
) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Validate a (candidates, references) corpus and tokenise it. A bare str reference means one reference."""
    if isinstance(candidates, str):
        raise ValueError(f"{name}: candidates must be a sequence of captions, not a single str")
    if len(candidates) != len(references):
        raise ValueError(f"{name}: {len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError(f"{name}: empty corpus")
    cand_tokens, ref_tokens = [], []
    for i, (candidate, refs) in enumerate(zip(candidates, references)):
        if not isinstance(candidate, str):
            raise ValueError(f"{name}: candidate {i} is a {type(candidate).__name__}, expected str")
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"{name}: sample {i} has no references")
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f"{name}: references of sample {i} must be strings")
        cand_tokens.append(tokenize_caption(candidate))
        ref_tokens.append([tokenize_caption(r) for r in refs])
    return cand_tokens, ref_tokens


def corpus_bleu(
    candidates: Sequence[str], references: Sequence[Sequence[str] | str], max_n: int = 4
) -> dict[str, float | int | list[float]]:
    """Corpus-level BLEU-1..``max_n`` of ``candidates[i]`` against ``references[i]`` (one or more strings each).

    Returns ``{"bleu_1": ..., "bleu_<max_n>": ..., "precisions": [clipped precision per order],
    "brevity_penalty", "candidate_length", "reference_length", "n_samples"}`` (lengths in tokens, summed).
    """
    if max_n < 1:
        raise ValueError(f"corpus_bleu: max_n must be >= 1, got {max_n}")
    cand_tokens, ref_tokens = _tokenized_corpus(candidates, references, "corpus_bleu")
    matches = [0] * max_n
    totals = [0] * max_n
    candidate_length = reference_length = 0
    for cand, refs in zip(cand_tokens, ref_tokens):
        max_ref_counts: Counter[Ngram] = Counter()
        for ref in refs:
            max_ref_counts |= _ngram_counts(ref, max_n)  # elementwise max
        for ngram, count in _ngram_counts(cand, max_n).items():
            matches[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        for k in range(max_n):
            totals[k] += max(0, len(cand) - k)
        candidate_length += len(cand)
        reference_length += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]  # closest, ties -> shorter
    ratio = (candidate_length + _MATCH_SMOOTHING) / (reference_length + _TOTAL_SMOOTHING)
    brevity_penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    result: dict[str, float | int | list[float]] = {}
    product = 1.0
    for k in range(max_n):
        product *= (matches[k] + _MATCH_SMOOTHING) / (totals[k] + _TOTAL_SMOOTHING)
        result[f"bleu_{k + 1}"] = product ** (1.0 / (k + 1)) * brevity_penalty
    result["precisions"] = [m / t if t else 0.0 for m, t in zip(matches, totals)]
    result["brevity_penalty"] = brevity_penalty
    result["candidate_length"] = candidate_length
    result["reference_length"] = reference_length
    result["n_samples"] = len(cand_tokens)
    return result


def _tfidf(
    counts: Counter[Ngram], document_frequency: Counter[Ngram], log_n_docs: float, max_n: int
) -> tuple[list[dict[Ngram, float]], list[float], int]:
    """Per-order tf-idf vectors, their norms, and the sentence "length" (number of bigrams, as the reference code)."""
    vectors: list[dict[Ngram, float]] = [{} for _ in range(max_n)]
    norms = [0.0] * max_n
    length = 0
    for ngram, tf in counts.items():
        order = len(ngram) - 1
        weight = tf * (log_n_docs - math.log(max(1.0, document_frequency[ngram])))
        vectors[order][ngram] = weight
        norms[order] += weight * weight
        if order == 1:
            length += tf
    return vectors, [math.sqrt(x) for x in norms], length


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str] | str], max_n: int = 4, sigma: float = 6.0
) -> dict[str, float | int | list[float]]:
    """Corpus CIDEr-D: ``{"cider_d": mean over samples, "per_sample": [score per sample], "n_samples"}``.

    Document frequencies come from the references of this corpus, so the score of a sample depends on the
    rest of the corpus (as in COCO evaluation); compare arms on the same reference corpus only.
    """
    if max_n < 1:
        raise ValueError(f"cider_d: max_n must be >= 1, got {max_n}")
    if sigma <= 0:
        raise ValueError(f"cider_d: sigma must be > 0, got {sigma}")
    cand_tokens, ref_tokens = _tokenized_corpus(candidates, references, "cider_d")
    cand_counts = [_ngram_counts(c, max_n) for c in cand_tokens]
    ref_counts = [[_ngram_counts(r, max_n) for r in refs] for refs in ref_tokens]
    document_frequency: Counter[Ngram] = Counter()
    for refs in ref_counts:
        document_frequency.update({ngram for counts in refs for ngram in counts})
    log_n_docs = math.log(len(cand_tokens))
    per_sample: list[float] = []
    for cand, refs in zip(cand_counts, ref_counts):
        vec_c, norm_c, len_c = _tfidf(cand, document_frequency, log_n_docs, max_n)
        total = [0.0] * max_n
        for ref in refs:
            vec_r, norm_r, len_r = _tfidf(ref, document_frequency, log_n_docs, max_n)
            penalty = math.exp(-((len_c - len_r) ** 2) / (2 * sigma**2))
            for k in range(max_n):
                value = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_c[k].items())
                if norm_c[k] != 0 and norm_r[k] != 0:
                    value /= norm_c[k] * norm_r[k]
                total[k] += value * penalty
        per_sample.append(10.0 * (sum(total) / max_n) / len(refs))
    return {"cider_d": sum(per_sample) / len(per_sample), "per_sample": per_sample, "n_samples": len(per_sample)}


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, float | int]:
    """The captioning row of a report: ``{"bleu_1", ..., "bleu_4", "cider_d", "n_samples"}`` (JSON-ready)."""
    bleu = corpus_bleu(candidates, references)
    cider = cider_d(candidates, references)
    scores: dict[str, float | int] = {f"bleu_{k}": float(bleu[f"bleu_{k}"]) for k in range(1, 5)}
    scores["cider_d"] = float(cider["cider_d"])
    scores["n_samples"] = int(bleu["n_samples"])
    return scores
