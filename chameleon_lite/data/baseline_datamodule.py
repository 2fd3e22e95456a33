"""LightningDataModule of the encoder-projector baseline: raw shards in memory, seeded shuffled batches.

``format="vlm"`` gives ``vlm_batch`` dicts (captions and/or QA, loss on the text that follows the image);
``format="contrastive"`` gives ``contrastive_batch`` dicts (captions only) for the encoder's pretraining.
Training batches come from a seeded random permutation per epoch (``drop_last``), so a run is reproducible and
"samples seen" is exactly ``steps * batch_size``; validation is a fixed seeded subset of ``val_samples``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from chameleon_lite.data.baseline_data import (
    TASKS,
    ImageTextSamples,
    contrastive_batch,
    load_image_text_samples,
    qa_groups,
    vlm_batch,
)
from chameleon_lite.model.model_dir import resolve_bundle_path
from chameleon_lite.tokenization.bundle import TokenizerBundle, load_bundle

__all__ = ["BaselineDataModule"]

FORMATS = ("vlm", "contrastive")


class _Indices(Dataset):
    """Rows of a loader: sample indices, or lists of them (the questions about one image)."""

    def __init__(self, indices: Sequence[int | list[int]]) -> None:
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> int | list[int]:
        entry = self.indices[i]
        return entry if isinstance(entry, list) else int(entry)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                           window: int = 50) -> list[list[int]]:
    """Seeded batches of row indices with similar lengths (the rows of a batch are padded to the longest).

    A random permutation is cut into windows of ``window * batch_size`` rows, each window is sorted by length and
    cut into batches, and the batches are shuffled; an incomplete last batch is dropped (as ``drop_last``). Every
    row is used at most once and the order is a pure function of the generator's seed.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for start in range(0, len(order), window * batch_size):
        chunk = sorted(order[start:start + window * batch_size], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk) - batch_size + 1, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _collate(indices: list, samples: ImageTextSamples, bundle: TokenizerBundle, fmt: str) -> dict:
    make = vlm_batch if fmt == "vlm" else contrastive_batch
    return make(samples, indices, bundle.vocab)


class BaselineDataModule(L.LightningDataModule):
    """Batches of images (pixels) and text for the baseline.

    Args:
        train_shards: raw shards (pattern or list), e.g. ``data/shapes/train/*.tar``.
        val_shards: validation shards (None: no validation).
        tokenizer: tokenizer bundle directory (text tokenizer and vocabulary; its VQ model is not loaded).
        image_size: images are resized to this square size (the ViT's ``image_size``).
        tasks: ``caption`` and/or ``qa`` (``format="contrastive"`` always reads captions only).
        format: ``"vlm"`` or ``"contrastive"``.
        batch_size: training rows per batch.
        val_batch_size: validation rows per batch (default ``batch_size``).
        val_samples: size of the fixed validation subset (all when larger).
        max_train_samples: per task, read at most this many training samples (None: all).
        qa_per_image: a training row holds every question about one image (``qa_groups``: the image is read
            once for all of them) instead of one question; a row then counts as that many samples
            (``samples_per_row``). Validation rows keep one question each (the evaluation format).
        seed: seeds the epoch permutations and the validation subset.
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        tokenizer: str = "tokenizers/shapes-64",
        image_size: int = 64,
        tasks: Sequence[str] = TASKS,
        format: str = "vlm",
        batch_size: int = 32,
        val_batch_size: int | None = None,
        val_samples: int = 512,
        max_train_samples: int | None = None,
        qa_per_image: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format={format!r} must be one of {FORMATS}")
        tasks = ("caption",) if format == "contrastive" else tuple(tasks)
        if not tasks or any(t not in TASKS for t in tasks):
            raise ValueError(f"tasks={list(tasks)} must be a non-empty subset of {TASKS}")
        if batch_size < 1 or val_samples < 1:
            raise ValueError(f"batch_size={batch_size} and val_samples={val_samples} must be >= 1")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.tokenizer = str(tokenizer)
        self.image_size, self.tasks, self.format = image_size, tasks, format
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.val_samples, self.max_train_samples, self.seed = val_samples, max_train_samples, seed
        self.qa_per_image = bool(qa_per_image) and format == "vlm"
        self._bundle: TokenizerBundle | None = None
        self.train_data: ImageTextSamples | None = None
        self.val_data: ImageTextSamples | None = None
        self.epochs_started = 0

    @property
    def bundle(self) -> TokenizerBundle:
        if self._bundle is None:
            self._bundle = load_bundle(resolve_bundle_path(self.tokenizer), load_image_tokenizer=False)
        return self._bundle

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is None and stage in (None, "fit"):
            self.train_data, _ = load_image_text_samples(self.train_shards, self.bundle, image_size=self.image_size,
                                                         tasks=self.tasks, max_samples=self.max_train_samples)
        if self.val_data is None and self.val_shards is not None:
            self.val_data, _ = load_image_text_samples(self.val_shards, self.bundle, image_size=self.image_size,
                                                       tasks=self.tasks)

    def _loader(self, data: ImageTextSamples, indices: np.ndarray, batch_size: int, *, shuffle: bool) -> DataLoader:
        collate = partial(_collate, samples=data, bundle=self.bundle, fmt=self.format)
        if not shuffle:
            return DataLoader(_Indices(indices), batch_size=batch_size, shuffle=False, collate_fn=collate)
        generator = torch.Generator().manual_seed(self.seed + self.epochs_started)
        if not self.qa_per_image:
            return DataLoader(_Indices(indices), batch_size=batch_size, shuffle=True, drop_last=True,
                              generator=generator, collate_fn=collate)
        lengths = [sum(len(data.prompt[i]) + len(data.target[i]) for i in (r if isinstance(r, list) else [r]))
                   for r in indices]
        batches = length_grouped_batches(lengths, batch_size, generator)
        return DataLoader(_Indices(indices), batch_sampler=batches, collate_fn=collate)

    def train_rows(self) -> list[int | list[int]]:
        """The training rows of one epoch, in data order: sample indices, or per-image question lists."""
        if self.train_data is None:
            self.setup("fit")
        if not self.qa_per_image:
            return list(range(len(self.train_data)))
        captions = self.train_data.indices("caption").tolist() if "caption" in self.tasks else []
        return [*captions, *qa_groups(self.train_data)]

    @property
    def samples_per_row(self) -> float:
        """Mean samples per training row (1 unless ``qa_per_image``)."""
        rows = self.train_rows()
        return sum(len(r) if isinstance(r, list) else 1 for r in rows) / len(rows)

    def train_dataloader(self) -> DataLoader:
        indices = self.train_rows()
        if len(indices) < self.batch_size:
            raise ValueError(f"{len(indices)} training samples are fewer than batch_size={self.batch_size}")
        loader = self._loader(self.train_data, indices, self.batch_size, shuffle=True)
        self.epochs_started += 1
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            return []
        if self.val_data is None:
            self.setup("validate")
        rng = np.random.default_rng(self.seed)
        n = len(self.val_data)
        indices = np.sort(rng.permutation(n)[: self.val_samples]) if n > self.val_samples else np.arange(n)
        return self._loader(self.val_data, indices, self.val_batch_size, shuffle=False)

    def state_dict(self) -> dict:
        return {"epochs_started": self.epochs_started}

    def load_state_dict(self, state: dict) -> None:
        self.epochs_started = int(state.get("epochs_started", 0))
