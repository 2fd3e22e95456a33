"""Evaluate one trained arm (native ``ChameleonLite`` or ``BaselineVLM``) on held-out shards.

Everything goes through the models' public ``generate`` API and the generic evaluation functions of
``chameleon_lite.eval``: QA from any webdataset of (image, question, answer, category), captions from any pair
shards, text-to-image from any (caption, intended scene) pairs plus a parser. Nothing reads answers into a model.
The one exception is the POPE ranking (``pope_margins``), which scores the two candidate answers "yes" and "no"
with the model's forward, as stage 3 scores responses.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from chameleon_lite.data.readers import pair_dataset, qa_dataset
from chameleon_lite.eval.captioning import caption_scores
from chameleon_lite.eval.generation_scores import aggregate_generation_scores, score_generation, verdict
from chameleon_lite.eval.pope_ranking import ranking_scores
from chameleon_lite.eval.understanding import evaluate_qa_shards, summarize_qa
from chameleon_lite.generation.config import GenerationConfig
from chameleon_lite.world.scenes import Scene

__all__ = ["answer_questions", "evaluate_qa", "evaluate_pope_ranking", "pope_margins", "evaluate_captions",
           "evaluate_text_to_image", "evaluate_text_to_image_retrieval", "generate_images", "measure_latency",
           "peak_memory_mb", "PeakMemory", "vq_ceiling"]

logger = logging.getLogger(__name__)


def _batched(items: Sequence[Any], n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def answer_questions(model: Any, images: Sequence[Image.Image], questions: Sequence[str],
                     max_new_tokens: int = 12) -> list[str]:
    """Greedy answers of either arm to ``[image, question]`` prompts (one batch)."""
    outputs = model.generate([[image, question] for image, question in zip(images, questions)],
                             GenerationConfig(max_new_tokens=max_new_tokens))
    return [" ".join(s for s in out if isinstance(s, str)).strip() for out in outputs]


def evaluate_qa(model: Any, shards: str, *, limit: int | None, batch_size: int = 32,
                reference_answers: dict[str, list[str]] | None = None, progress: bool = True) -> dict[str, Any]:
    """Accuracy per category, POPE, held-out vs seen (``summarize_qa``) plus the records themselves."""
    bar = tqdm(total=limit, desc="QA", unit=" questions", disable=not progress)

    def predict(images, questions):
        answers = answer_questions(model, images, questions)
        bar.update(len(answers))
        return answers

    records = evaluate_qa_shards(shards, predict, batch_size=batch_size, limit=limit)
    bar.close()
    summary = summarize_qa(records, reference_answers)
    summary["records"] = [r.to_dict() for r in records]
    return summary


@torch.no_grad()
def pope_margins(model: Any, samples: Sequence[dict[str, Any]], batch_size: int = 32) -> torch.Tensor:
    """``log p("yes") - log p("no")`` ``(N,)`` of either arm for each ``{"image", "question"}`` sample: each answer
    is scored after the question as stage 3 scores a response (``lit_preference.response_rows``: the answer's
    tokens and ``<eos>``), in eval mode (the model's mode is restored)."""
    from chameleon_lite.training.lit_preference import response_rows, sequence_logps
    from chameleon_lite.world.preference_pairs import PreferencePair

    was_training = model.training
    model.eval()
    out = []
    try:
        for chunk in _batched(samples, batch_size):
            pairs = [PreferencePair(s["image"], s["question"], "yes", "no", "yes_no", "existence", "pope",
                                    str(s.get("key", ""))) for s in chunk]
            yes = sequence_logps(model, response_rows(model, pairs, "chosen"))  # (B,)
            no = sequence_logps(model, response_rows(model, pairs, "rejected"))  # (B,)
            out.append((yes - no).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def evaluate_pope_ranking(model: Any, shards: str, records: Sequence[dict[str, Any]], *,
                          batch_size: int = 32) -> dict[str, Any]:
    """``eval.pope_ranking.ranking_scores`` of the POPE questions among ``records`` (``evaluate_qa``'s, so the very
    questions the report scores), as ``{"all", "seen", "held_out"}`` (scenes without / with a held-out combo; a
    group without both present and absent objects is left out). ``{}`` when no record is a POPE question."""
    from chameleon_lite.world.questions import normalize_answer

    wanted = {r["key"]: r for r in records if r.get("pope_type") is not None}
    samples = []
    for sample in qa_dataset(shards) if wanted else ():
        if sample["key"] in wanted:
            samples.append(sample)
            if len(samples) == len(wanted):
                break
    if not samples:
        return {}
    margin = pope_margins(model, samples, batch_size)  # (N,)
    truth = [wanted[s["key"]] for s in samples]
    present = torch.tensor([normalize_answer(r["answer"]) == "yes" for r in truth])  # (N,)
    groups = {"all": torch.ones(len(truth), dtype=torch.bool),
              "seen": torch.tensor([r.get("held_out") is False for r in truth]),
              "held_out": torch.tensor([r.get("held_out") is True for r in truth])}
    return {name: ranking_scores(margin[mask], present[mask]) for name, mask in groups.items()
            if present[mask].any() and (~present[mask]).any()}


def evaluate_captions(model: Any, shards: str, *, limit: int, batch_size: int = 32,
                      progress: bool = True) -> dict[str, Any]:
    """BLEU-4 and CIDEr-D of greedy captions (prompt: the image alone) against the shards' captions."""
    samples = list(islice(pair_dataset(shards), limit))
    if not samples:
        raise ValueError(f"no image-caption pairs in {shards!r}")
    candidates: list[str] = []
    for batch in tqdm(list(_batched(samples, batch_size)), desc="captions", disable=not progress):
        outputs = model.generate([[s["image"]] for s in batch], GenerationConfig(max_new_tokens=64))
        candidates += [" ".join(x for x in out if isinstance(x, str)).strip() for out in outputs]
    scores = caption_scores(candidates, [[s["text"].strip()] for s in samples])
    scores["examples"] = [{"key": s["key"], "reference": s["text"].strip(), "generated": c}
                          for s, c in list(zip(samples, candidates))[:8]]
    return scores


def _intended(sample: dict[str, Any]) -> Scene:
    return Scene.from_dict(sample["meta"]["scene"])


def evaluate_text_to_image(model: Any, shards: str, parse: Callable[[Image.Image], Any], *, limit: int,
                           cfg_scale: float, image_temperature: float = 1.0, seed: int = 0, batch_size: int = 16,
                           progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate an image for each caption and score it against the caption's scene with ``parse``.

    Returns the GenEval-style table (``aggregate_generation_scores``) and per-sample rows (caption, verdict,
    image) for the example grid. Image codes are sampled at ``image_temperature`` (0 = greedy) with guidance
    ``cfg_scale``.
    """
    samples = [s for s in islice(pair_dataset(shards), limit) if "scene" in s["meta"]]
    images = generate_images(model, [s["text"].strip() for s in samples], cfg_scale=cfg_scale,
                             image_temperature=image_temperature, seed=seed, batch_size=batch_size, progress=progress)
    scores, rows = [], []
    for sample, image in zip(samples, images):
        score = score_generation(_intended(sample), parse(image), caption=sample["text"].strip())
        scores.append(score)
        rows.append({"caption": sample["text"].strip(), "verdict": verdict(score), "image": image,
                     "passed": bool(score.all_correct)})
    return aggregate_generation_scores(scores), rows


def generate_images(model: Any, captions: Sequence[str], *, cfg_scale: float, image_temperature: float, seed: int,
                    batch_size: int, progress: bool = True) -> list[Image.Image]:
    """One image per caption from the native arm's public ``generate`` (image mode), batch ``b`` seeded ``seed + b``."""
    images: list[Image.Image] = []
    for b, batch in enumerate(tqdm(list(_batched(list(captions), batch_size)), desc="text->image",
                                   disable=not progress)):
        config = GenerationConfig(mode="image", cfg_scale=cfg_scale, image_temperature=image_temperature, seed=seed + b)
        outputs = model.generate([[c] for c in batch], config)
        for caption, out in zip(batch, outputs):
            found = [x for x in out if isinstance(x, Image.Image)]
            if not found:
                raise RuntimeError(f"image mode returned no image for caption {caption!r}")
            images.append(found[0])
    return images


def _group_key(sample: dict[str, Any], key: str | None) -> Any:
    """The caption's own text, or the value of a dotted json field (``"extra.label"``) that groups captions."""
    if key is None:
        return sample["text"].strip()
    value: Any = sample["meta"]
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"pair {sample['key']!r} has no json field {key!r} (eval.r_precision_key)")
        value = value[part]
    return json.dumps(value, sort_keys=True)


def evaluate_text_to_image_retrieval(model: Any, shards: str, scorer: Any, *, limit: int, r: int,
                                     key: str | None = None, cfg_scale: float, image_temperature: float = 1.0,
                                     seed: int = 0, batch_size: int = 16, progress: bool = True
                                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Text->image scored by R-precision (``eval.r_precision``) where no scene parser can judge the images.

    The first ``limit`` test captions become images; each is ranked against ``r - 1`` captions of other groups
    (``key``: the caption text, or a json field such as a class label) from the whole test split by ``scorer`` (a
    contrastive image-text model trained on the training data). The same score for the real test images and for
    their VQ reconstructions is the ceiling. ``r`` is capped at the number of distinct groups. Returns the scores
    (``generated``, ``real``, ``vq_reconstruction``) and per-sample rows for the example grid.
    """
    from chameleon_lite.eval.r_precision import r_precision

    pool = list(pair_dataset(shards))
    samples = pool[:limit]
    if not samples:
        raise ValueError(f"no image-caption pairs in {shards!r}")
    pool_keys = [_group_key(s, key) for s in pool]
    first = {k: i for i, k in reversed(list(enumerate(pool_keys)))}  # one caption per group: its first
    groups = sorted(first.values())
    r = min(r, len(groups))
    if r < 2:
        raise ValueError(f"R-precision needs at least 2 distinct caption groups in {shards!r}, found {len(groups)}")
    images = generate_images(model, [s["text"].strip() for s in samples], cfg_scale=cfg_scale,
                             image_temperature=image_temperature, seed=seed, batch_size=batch_size, progress=progress)
    own_keys = pool_keys[: len(samples)]
    own_emb = scorer.embed_texts([s["text"].strip() for s in samples])  # (N, E)
    pool_emb = scorer.embed_texts([pool[i]["text"].strip() for i in groups])  # (G, E)
    group_keys = [pool_keys[i] for i in groups]
    recon = vq_reconstructions(model.bundle.image_tokenizer, [s["image"] for s in samples])
    scores = {}
    for name, pictures in (("generated", images), ("real", [s["image"] for s in samples]),
                           ("vq_reconstruction", recon)):
        scores[name] = r_precision(scorer.embed_images(pictures), own_emb, pool_emb, own_keys=own_keys,
                                   pool_keys=group_keys, r=r, seed=seed)
    hits = scores["generated"]["per_image"]
    rows = [{"caption": s["text"].strip(), "verdict": "retrieves its caption" if h else f"not first of {r}",
             "image": im, "passed": bool(h)} for s, im, h in zip(samples, images, hits)]
    result = {"scorer": "r_precision", "r": r, "key": key or "caption",
              **{name: {k: v for k, v in s.items() if k != "per_image"} for name, s in scores.items()}}
    return result, rows


def vq_reconstructions(tokenizer: Any, images: Sequence[Image.Image]) -> list[Image.Image]:
    """Each image encoded to codes and decoded back by the VQ ``tokenizer`` (on the tokenizer's device)."""
    from chameleon_lite.tokenization.image_preprocessing import preprocess_images

    with torch.inference_mode():
        pixels = preprocess_images(list(images), tokenizer.config)  # (N, C, H, W)
        pixels = pixels.to(next(tokenizer.parameters()).device)  # where the model (and its tokenizer) lives
        return tokenizer.to_pil(tokenizer.decode(tokenizer.encode(pixels)))


def vq_ceiling(bundle: Any, shards: str, parse: Callable[[Image.Image], Any], *, limit: int
               ) -> tuple[dict[str, Any], list[tuple[Image.Image, Image.Image]]]:
    """The same scoring on VQ reconstructions of the real images: the best any generator over these codes can do."""
    samples = [s for s in islice(pair_dataset(shards), limit) if "scene" in s["meta"]]
    recon = vq_reconstructions(bundle.image_tokenizer, [s["image"] for s in samples])
    scores = [score_generation(_intended(s), parse(r), caption=s["text"]) for s, r in zip(samples, recon)]
    return aggregate_generation_scores(scores), [(s["image"], r) for s, r in zip(samples, recon)]


def measure_latency(model: Any, image: Image.Image, new_tokens: int = 48, repeats: int = 3) -> dict[str, Any]:
    """Time to first token (prompt building, image encoding, prefill, first sample) and decode tokens/s after it,
    for a greedy caption of ``image`` (median of ``repeats``; decoding stops at ``<eos>``)."""
    ttft, rates, counts = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        steps = model.token_steps([image], max_new_tokens=new_tokens)  # either arm, one public method
        next(steps)
        first = time.perf_counter()
        n = sum(1 for _ in steps)
        end = time.perf_counter()
        ttft.append(first - start)
        counts.append(n)
        if n:
            rates.append(n / (end - first))
    return {"ttft_s": statistics.median(ttft), "decode_tokens_per_s": statistics.median(rates) if rates else None,
            "decoded_tokens": int(statistics.median(counts))}


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated (when CUDA is used) or the process's peak resident memory so far, in MiB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class PeakMemory:
    """Peak memory while a block runs: CUDA peak allocation (stats reset on entry) or, on CPU, the largest resident
    set size sampled every ``interval`` s from ``/proc/self/statm`` (Linux; elsewhere the process's lifetime peak).

    ::

        with PeakMemory() as mem:
            train()
        mem.peak_mb
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss_mb(self) -> float | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page / 2**20
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self._rss_mb()
            if rss is not None:
                self.peak_mb = max(self.peak_mb, rss)

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        rss = self._rss_mb()
        if rss is not None:
            self.peak_mb = rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._rss_mb() or 0.0)
        else:
            self.peak_mb = peak_memory_mb()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
