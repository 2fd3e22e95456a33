"""Raw image-text shards -> in-memory samples and batches for the encoder-projector baseline.

The baseline reads the SAME raw shards as the native arm's pre-tokenizer, but keeps images as pixels::

    samples = load_image_text_samples("data/shapes/train/*.tar", bundle, image_size=64)
    batch = vlm_batch(samples, [0, 1, 2], bundle.vocab)
    # {"images": (B, C, H, W) float in [-1, 1], "input_ids": (B, T), "loss_mask": (B, T) bool, "task": (B,)}

Row formats (``P`` = the ``<image>`` placeholder, ``Vocab.image_placeholder``, expanded by the model into the
projected visual tokens; the loss covers the tokens in ``[...]``): the native arm's documents of
:mod:`chameleon_lite.data.task_formats` with ``P`` for the image (``image_prefix`` and ``image_response``)::

    pair -> caption       <bos> P [caption <eos>]
    qa   -> qa            <bos> P question <sep> [answer <eos>]
         -> qa_per_image  <bos> P q_1 <sep> [a_1 <eos>] q_2 <sep> [a_2 <eos>] ..   (a row of ``qa_groups``)

Interleaved-document shards (``docs-*``) are not read: the baseline cannot write images, and its decoder
would only see their text. The native arm's generation documents have no counterpart either.

Notable design choices:

- **Everything in memory, decoded once, cached.** The shapes world is small (64x64 RGB: 12 KB an image);
  identical images (a scene's QA samples share its picture) are stored once, found by hashing their pixels.
  The result is cached in the package's cache directory (:mod:`chameleon_lite.data.cache`; never beside the
  shards) as ``baseline-<source>-<hash>.{npz,json}``, keyed by the shard paths, sizes and mtimes, the image size,
  tasks, sample limit and the bundle's text layout; no pickle is involved. An unwritable cache directory just
  means no cache. Entries are never pruned (several task selections of one shard set coexist).
- **Nothing dropped silently.** Unreadable samples are skipped by the shard readers and counted
  (``LoadReport.skipped``); the report is logged.
- **Contrastive batches** (encoder pretraining) carry captions only: ``text_ids`` (B, L) padded with the pad id,
  ``text_lengths`` (B,), and ``text_groups`` (B,) so that identical captions count as correct in retrieval.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from chameleon_lite.data import cache as data_cache
from chameleon_lite.data.pretokenize import shards_by_kind
from chameleon_lite.data.readers import pair_dataset, qa_dataset
from chameleon_lite.data.task_formats import image_prefix, image_response
from chameleon_lite.data.token_documents import QA_PER_IMAGE_MAX
from chameleon_lite.tokenization.bundle import TokenizerBundle
from chameleon_lite.tokenization.image_preprocessing import preprocess_images
from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig
from chameleon_lite.tokenization.vocab import Vocab

__all__ = ["TASKS", "ImageTextSamples", "LoadReport", "load_image_text_samples", "qa_groups", "vlm_batch",
           "contrastive_batch"]

logger = logging.getLogger(__name__)

TASKS = ("caption", "qa")
_KIND_TASK = {"pair": "caption", "qa": "qa"}
CACHE_VERSION = 1
_TEXT_FIELDS = ("prompt", "target", "keys", "categories", "questions", "answers", "meta")


@dataclass
class ImageTextSamples:
    """Samples with their images stored once.

    Attributes:
        images: ``(N_images, C, H, W)`` uint8.
        image_index: ``(S,)`` row of ``images`` of each sample.
        task: ``(S,)`` index into ``TASKS``.
        prompt: per sample, the text ids between the image and the target (question + ``<sep>``; empty for captions).
        target: per sample, the ids to predict (answer or caption, then ``<eos>``).
        keys, categories, questions, answers: per sample (``""`` where they do not apply).
        meta: per sample, the shard's json metadata (scene, held-out flags, POPE type ...).
    """

    images: torch.Tensor
    image_index: np.ndarray
    task: np.ndarray
    prompt: list[list[int]]
    target: list[list[int]]
    keys: list[str]
    categories: list[str]
    questions: list[str]
    answers: list[str]
    meta: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def indices(self, task: str) -> np.ndarray:
        """Sample indices of one task (``"caption"`` or ``"qa"``)."""
        return np.flatnonzero(self.task == TASKS.index(task))


@dataclass
class LoadReport:
    samples: dict[str, int]
    images: int
    skipped: int
    ignored_shards: list[str]


def _pixels(image, prep: ImageTokenizerConfig) -> np.ndarray:
    """A PIL image -> ``(C, H, W)`` uint8 at the configured size (no resampling when it already fits)."""
    size = prep.image_size
    if image.mode == "RGB" and image.size == (size, size):
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
    pixels = (preprocess_images([image], prep)[0] + 1.0) * 127.5  # (C, H, W) float holding exact integers
    return pixels.round().to(torch.uint8).numpy()


def _cache_files(shards: list[str], bundle: TokenizerBundle, image_size: int, tasks: Sequence[str],
                 max_samples: int | None, cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path] | None:
    stats = []
    for shard in shards:
        if "://" in shard:
            return None  # remote shards: nothing to key a cache on
        st = os.stat(shard)
        stats.append([os.path.abspath(shard), st.st_size, st.st_mtime_ns])
    key = json.dumps({"v": CACHE_VERSION, "shards": stats, "size": image_size, "tasks": list(tasks),
                      "max": max_samples, "bundle": bundle.name, "vocab": bundle.vocab.to_dict()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    try:
        directory = data_cache.owned_cache_dir(cache_dir)
    except OSError as err:
        logger.warning("no baseline data cache (cannot create the cache directory): %s", err)
        return None
    source = data_cache.source_key(*sorted(path for path, _, _ in stats))
    return (data_cache.cache_file(directory, "baseline", source, digest, ".npz"),
            data_cache.cache_file(directory, "baseline", source, digest, ".json"))


def _load_cache(files: tuple[Path, Path] | None) -> tuple[ImageTextSamples, LoadReport] | None:
    if files is None or not (files[0].is_file() and files[1].is_file()):
        return None
    try:
        with np.load(files[0], allow_pickle=False) as arrays:
            images, image_index, task = arrays["images"], arrays["image_index"], arrays["task"]
        text = json.loads(files[1].read_text(encoding="utf-8"))
        samples = ImageTextSamples(torch.from_numpy(images), image_index, task,
                                   **{name: text[name] for name in _TEXT_FIELDS})
        return samples, LoadReport(**text["report"])
    except (OSError, ValueError, KeyError) as err:
        logger.warning("ignoring unreadable baseline data cache %s: %s", files[0], err)
        return None


def _save_cache(files: tuple[Path, Path] | None, samples: ImageTextSamples, report: LoadReport) -> None:
    if files is None:
        return
    try:
        tmp = files[0].with_name(f".{files[0].stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, images=samples.images.numpy(), image_index=samples.image_index, task=samples.task)
        text = {name: getattr(samples, name) for name in _TEXT_FIELDS} | {"report": asdict(report)}
        tmp_json = files[1].with_name(f".{files[1].stem}.{os.getpid()}.tmp.json")
        tmp_json.write_text(json.dumps(text), encoding="utf-8")
        tmp_json.replace(files[1])
        tmp.replace(files[0])  # the npz last: it marks the cache complete
    except OSError as err:
        logger.warning("could not write the baseline data cache in %s: %s", files[0].parent, err)


def _pixel_key(pixels: np.ndarray) -> bytes:
    return hashlib.blake2b(pixels.tobytes(), digest_size=16).digest()


def load_image_text_samples(
    shards: str | Sequence[str],
    bundle: TokenizerBundle,
    *,
    image_size: int = 64,
    tasks: Sequence[str] = TASKS,
    max_samples: int | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[ImageTextSamples, LoadReport]:
    """Read pair (``caption``) and QA (``qa``) shards into memory, text tokenized with the bundle.

    Args:
        shards: shard paths or a pattern (``data/shapes/train/*.tar``); kinds are told apart by file name
            (``qa-*``, ``docs-*``, anything else is a pair shard).
        bundle: the tokenizer bundle (its text tokenizer and vocabulary).
        image_size: images are resized (center crop) to this square size.
        tasks: which tasks to read.
        max_samples: per task, keep at most this many (the first ones, in shard order).
        progress: show a progress bar.
        cache_dir: where the decoded samples are cached (default ``data.cache.default_cache_dir()``); nothing is
            written beside the shards.

    Raises:
        ValueError: an unknown task, or no sample at all.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks={list(tasks)} must be a non-empty subset of {TASKS}")
    vocab, text = bundle.vocab, bundle.text
    prep = ImageTokenizerConfig(image_size=image_size)
    groups = shards_by_kind(list(shards) if not isinstance(shards, str) else shards)
    read = [s for kind, ss in groups.items() if _KIND_TASK.get(kind) in tasks for s in ss]
    cache = _cache_files(read, bundle, image_size, tasks, max_samples, cache_dir) if read else None
    cached = _load_cache(cache)
    if cached is not None:
        logger.info("baseline data from %r: %s samples, %d distinct images (cached in %s)", shards,
                    cached[1].samples, cached[1].images, cache[0].parent)
        return cached
    ignored = [s for kind, ss in groups.items() if _KIND_TASK.get(kind) not in tasks for s in ss]
    image_rows: dict[bytes, int] = {}
    images: list[np.ndarray] = []
    out = ImageTextSamples(torch.empty(0), np.empty(0), np.empty(0), [], [], [], [], [], [], [])
    tasks_of: list[int] = []
    index_of: list[int] = []
    counts = dict.fromkeys(tasks, 0)
    skipped = 0
    bar = tqdm(desc="reading shards", unit=" samples", disable=not progress)
    for kind in ("pair", "qa"):
        task = _KIND_TASK[kind]
        if task not in tasks or kind not in groups:
            continue
        dataset = pair_dataset(groups[kind]) if kind == "pair" else qa_dataset(groups[kind])
        for sample in dataset:
            if max_samples is not None and counts[task] >= max_samples:
                break
            pixels = _pixels(sample["image"], prep)  # (C, H, W) uint8
            key = _pixel_key(pixels)
            if key not in image_rows:
                image_rows[key] = len(images)
                images.append(pixels)
            index_of.append(image_rows[key])
            tasks_of.append(TASKS.index(task))
            if task == "caption":
                caption = sample["text"].strip()
                context, response = image_response("caption", {"caption": text.encode(caption)}, vocab)
                out.prompt.append(context)
                out.target.append(response)
                out.questions.append("")
                out.answers.append(caption)
                out.categories.append("caption")
            else:
                fields = {"question": text.encode(sample["question"].strip()),
                          "answer": text.encode(sample["answer"].strip())}
                context, response = image_response("qa", fields, vocab)
                out.prompt.append(context)
                out.target.append(response)
                out.questions.append(sample["question"].strip())
                out.answers.append(sample["answer"].strip())
                out.categories.append(sample["category"])
            out.keys.append(sample["key"])
            out.meta.append(sample["meta"])
            counts[task] += 1
            bar.update(1)
        skipped += dataset.stats.n_skipped
    bar.close()
    if not out.keys:
        raise ValueError(f"no {'/'.join(tasks)} samples found in {shards!r}")
    out.images = torch.from_numpy(np.stack(images))  # (N_images, C, H, W) uint8
    out.image_index = np.asarray(index_of, np.int64)
    out.task = np.asarray(tasks_of, np.int8)
    report = LoadReport(samples=counts, images=len(images), skipped=skipped, ignored_shards=ignored)
    logger.info("baseline data from %r: %s samples, %d distinct images, %d skipped, %d shard(s) not read (%s)",
                shards, counts, len(images), skipped, len(ignored), "documents" if ignored else "none")
    _save_cache(cache, out, report)
    return out, report


def _images(samples: ImageTextSamples, indices: Sequence[int]) -> torch.Tensor:
    rows = torch.as_tensor(samples.image_index[np.asarray(indices, np.int64)])
    return samples.images[rows].float() / 127.5 - 1.0  # (B, C, H, W) in [-1, 1]


def qa_groups(samples: ImageTextSamples) -> list[list[int]]:
    """The QA samples about each distinct image (a scene's questions), in order of first appearance, in chunks of at
    most ``QA_PER_IMAGE_MAX`` (identical pictures of several scenes would otherwise make one very long row)."""
    groups: dict[int, list[int]] = {}
    for i in samples.indices("qa").tolist():
        groups.setdefault(int(samples.image_index[i]), []).append(i)
    return [g[j:j + QA_PER_IMAGE_MAX] for g in groups.values() for j in range(0, len(g), QA_PER_IMAGE_MAX)]


def vlm_batch(samples: ImageTextSamples, indices: Sequence[int | Sequence[int]], vocab: Vocab
              ) -> dict[str, torch.Tensor]:
    """Rows ``<bos> P prompt [target]`` right padded: ``images``, ``input_ids``, ``loss_mask`` (the target
    tokens, i.e. the positions whose token the model must predict), ``task``. An entry of ``indices`` may be a
    list of samples about one image (``qa_groups``): its row chains their prompts and targets after one ``P``."""
    rows, masks, firsts = [], [], []
    for entry in indices:
        group = [int(entry)] if isinstance(entry, (int, np.integer)) else [int(i) for i in entry]
        if len({int(samples.image_index[i]) for i in group}) != 1:
            raise ValueError(f"samples {group} of one row must share their image")
        head = image_prefix(TASKS[samples.task[group[0]]], {"image": [vocab.image_placeholder]}, vocab)  # <bos> P
        row, mask = head, [False] * len(head)
        for i in group:
            row += [*samples.prompt[i], *samples.target[i]]
            mask += [False] * len(samples.prompt[i]) + [True] * len(samples.target[i])
        rows.append(row)
        masks.append(mask)
        firsts.append(group[0])
    indices = firsts
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), vocab.pad, dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros(len(rows), T, dtype=torch.bool)  # (B, T)
    for b, (row, mask) in enumerate(zip(rows, masks)):
        input_ids[b, : len(row)] = torch.as_tensor(row)
        loss_mask[b, : len(mask)] = torch.as_tensor(mask)
    task = torch.as_tensor(samples.task[np.asarray(indices, np.int64)], dtype=torch.long)
    return {"images": _images(samples, indices), "input_ids": input_ids, "loss_mask": loss_mask, "task": task}


def contrastive_batch(samples: ImageTextSamples, indices: Sequence[int], vocab: Vocab) -> dict[str, torch.Tensor]:
    """Images with their captions: ``images``, ``text_ids`` (B, L) (caption + ``<eos>``, pad-padded),
    ``text_lengths`` (B,), ``text_groups`` (B,) (equal for identical captions within the batch)."""
    bad = [i for i in indices if samples.task[i] != TASKS.index("caption")]
    if bad:
        raise ValueError(f"contrastive batches need caption samples; sample {bad[0]} is {TASKS[samples.task[bad[0]]]}")
    texts = [samples.target[i] for i in indices]
    L = max(len(t) for t in texts)
    text_ids = torch.full((len(texts), L), vocab.pad, dtype=torch.long)  # (B, L)
    for b, t in enumerate(texts):
        text_ids[b, : len(t)] = torch.as_tensor(t)
    groups: dict[tuple[int, ...], int] = {}
    text_groups = torch.as_tensor([groups.setdefault(tuple(t), len(groups)) for t in texts])  # (B,)
    return {"images": _images(samples, indices), "text_ids": text_ids,
            "text_lengths": torch.as_tensor([len(t) for t in texts]), "text_groups": text_groups}
