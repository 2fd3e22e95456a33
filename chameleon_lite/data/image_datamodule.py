"""Images from webdataset pair shards, as tensors, for training and evaluating the VQ image tokenizer."""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader

from chameleon_lite.data.readers import ShardDataset, list_shards, pair_dataset
from chameleon_lite.tokenization.image_tokenizer import preprocess_images
from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig

MAKE_DATA_HINT = "chameleon-lite data shapes --out data/shapes"


class EpochDataLoader(DataLoader):
    """A DataLoader over a :class:`ShardDataset` that starts each pass with the next epoch's shuffle seed.

    Lightning calls ``iter()`` once per epoch, in the main process, before worker processes are forked, so the
    epoch set here reaches every worker. The number of passes started is saved with the datamodule's state.
    """

    def __init__(self, dataset: ShardDataset, *args, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.passes = 0

    def __iter__(self):
        self.dataset.set_epoch(self.passes)
        self.passes += 1
        return super().__iter__()


def _image_to_tensor(image, config: ImageTokenizerConfig) -> torch.Tensor:
    return preprocess_images([image], config)[0]  # (C, H, W) in [-1, 1]


def _collate_images(samples: list[dict]) -> dict[str, torch.Tensor | list[str]]:
    return {"image": torch.stack([s["image"] for s in samples]), "key": [s["key"] for s in samples]}


class ImageShardDataModule(L.LightningDataModule):
    """Batches ``{"image": FloatTensor (B, 3, H, W) in [-1, 1], "key": list[str]}`` from image–caption shards.

    Args:
        train_shards: shard pattern (brace pattern, glob or directory) for training images.
        val_shards: shard pattern for validation images.
        image_size: side of the square images fed to the tokenizer.
        resize_mode: ``"center_crop"`` or ``"pad"`` for non-square images (see ``preprocess_images``).
        batch_size: training batch size; ``val_batch_size`` defaults to it.
        num_workers: DataLoader worker processes.
        shuffle_buffer: samples held for the seeded buffer shuffle of training data (0 = file order).
        seed: shuffling seed.
    """

    def __init__(
        self,
        train_shards: str = "data/shapes/train/pairs-*.tar",
        val_shards: str = "data/shapes/val/pairs-*.tar",
        image_size: int = 64,
        resize_mode: str = "center_crop",
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.image_config = ImageTokenizerConfig(image_size=image_size, resize_mode=resize_mode)
        self._train_loader: EpochDataLoader | None = None
        self._resume_passes = 0

    def _dataset(self, shards: str, *, train: bool) -> ShardDataset:
        try:
            list_shards(shards)
        except ValueError as err:
            raise FileNotFoundError(f"no image shards at {shards!r} ({err}); make them with: {MAKE_DATA_HINT}") from err
        return pair_dataset(
            shards,
            shuffle_shards=train,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            seed=self.seed,
            image_transform=partial(_image_to_tensor, config=self.image_config),
            require_text=False,  # the tokenizer needs images only
        )

    def _loader(self, dataset: ShardDataset, batch_size: int) -> EpochDataLoader:
        return EpochDataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=_collate_images,
            persistent_workers=False,
        )

    def train_dataloader(self) -> EpochDataLoader:
        self._train_loader = self._loader(self._dataset(self.train_shards, train=True), self.batch_size)
        self._train_loader.passes = self._resume_passes
        return self._train_loader

    def val_dataloader(self) -> EpochDataLoader:
        return self._loader(self._dataset(self.val_shards, train=False), self.val_batch_size)

    def state_dict(self) -> dict:
        return {"train_passes": self._train_loader.passes if self._train_loader is not None else 0}

    def load_state_dict(self, state: dict) -> None:
        self._resume_passes = int(state.get("train_passes", 0))
