"""Streaming, fault-tolerant readers for webdataset shards (image-caption pairs, QA, interleaved documents).

::

    ds = pair_dataset("data/train-{000000..000009}.tar", shuffle_shards=True, shuffle_buffer=1000, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    for sample in loader: ...          # {"key", "image": PIL RGB, "text", "meta"}
    print(ds.stats)                    # ReadStats: good count, skips and repairs by reason, all workers summed

Pipeline per pass (built with webdataset): shard list -> seeded shard shuffle (optional, identical on every
rank) -> split by node (rank) -> split by DataLoader worker -> tar members grouped into raw samples ->
seeded buffer shuffle of the raw bytes (optional) -> decode + validate + repair here -> yield.

Notable design choices:

- **No shuffling by default.** ``shuffle_shards`` and ``shuffle_buffer`` are opt-in and always seeded
  (``seed``, default 0, combined with the epoch from ``set_epoch``; the buffer seed also includes rank and
  worker id). For a fixed rank/worker layout the order is identical run to run; with another worker count
  the same samples come out in another order.
- **Node split:** explicit ``rank``/``world_size`` arguments win; otherwise webdataset's
  ``pytorch_worker_info`` (env ``RANK``/``WORLD_SIZE``, else ``torch.distributed`` when initialised). The
  main process also records its rank when the dataset is pickled into spawn-started workers (which do not
  see the parent's process group). Ranks get disjoint shard subsets (``shards[rank::world_size]``) and
  DataLoader workers split their rank's shards again, so use at least ``world_size * num_workers`` shards;
  with uneven division some ranks see more samples (equalise shard counts for DDP).
- **Robust decoding.** Every raw sample is either yielded (possibly repaired) or skipped, and both are
  counted by reason (``SKIP_REASONS``, ``REPAIR_REASONS``); nothing bad crashes the reader, nothing good is
  dropped. A sample is counted once, under the first problem found (cheap checks run before image decoding).
  Exceptions raised by a user ``image_transform`` are bugs and propagate.
- **Images:** decoded, validated and repaired by :mod:`chameleon_lite.data.decoding` (see there).
- **Counters across processes.** Counts live in a small shared-memory array created with the dataset, so
  increments made in DataLoader worker processes (fork or spawn) are visible in the main process:
  ``ds.stats`` after the loop is the total over all workers of this process. Counts accumulate over passes
  until ``reset_stats()``; with several ranks each process has its own (sum ``stats.as_dict()`` with
  ``all_reduce`` if needed). Each pass also logs its own summary at its end from the process that ran it
  (one line per worker); ``ds.log_summary()`` logs the totals from the main process.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch.utils.data
import webdataset as wds
from PIL import Image

from chameleon_lite.data.decoding import (
    REPAIR_REASONS,
    SKIP_REASONS,
    ImageLimits,
    SkipSample,
    decode_image,
    decode_json_object,
    decode_utf8,
    image_member,
)
from chameleon_lite.data.read_stats import COUNTER_NAMES, ReadStats, SharedCounts

__all__ = [
    "SKIP_REASONS",
    "REPAIR_REASONS",
    "ImageLimits",
    "ReaderConfig",
    "ReadStats",
    "ShardDataset",
    "SkipSample",
    "decode_image",
    "list_shards",
    "pair_dataset",
    "qa_dataset",
    "interleaved_dataset",
]

logger = logging.getLogger(__name__)

# Image member extensions, in the order a pair/QA sample's image is looked for.


# --------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class ReaderConfig:
    """Order and partitioning of a streaming pass. Defaults: file order, no shuffling, rank from the env."""

    shuffle_shards: bool = False
    shuffle_buffer: int = 0  # raw samples held for the buffer shuffle; 0 = off
    seed: int = 0
    rank: int | None = None  # explicit node split; None = from env/torch.distributed
    world_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.shuffle_buffer, int) or self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be an int >= 0, got {self.shuffle_buffer!r}")
        if (self.rank is None) != (self.world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if self.world_size is not None and not (self.world_size >= 1 and 0 <= self.rank < self.world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank} world_size={self.world_size}")


# ----------------------------------------------------------------------------------------- shard lists


def _is_remote(url: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", url) is not None  # pipe:, http://, s3://, file:, ...


def list_shards(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a shard specification to a list of shard URLs/paths, checking local files exist.

    Accepts a brace pattern (``"d/train-{000000..000099}.tar"``, several joined by ``::``, ``${VAR}`` from
    ``WDS_VAR`` env as in webdataset), a glob (``"d/*.tar"``, sorted), a directory (its ``*.tar``, sorted), a
    remote URL (``pipe:``, ``http://``, ... passed through unchecked), or a list of any of these.

    Raises:
        ValueError: nothing given, a missing local file, a pattern/directory matching nothing, or a shard
            listed twice (it would be read twice per epoch).
    """
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    if not items:
        raise ValueError("no shards given")
    shards: list[str] = []
    missing: list[str] = []
    for item in items:
        for piece in wds.shardlists.expand_urls(os.fspath(item)):
            if _is_remote(piece):
                shards.append(piece)
            elif Path(piece).is_dir():
                found = sorted(str(p) for p in Path(piece).glob("*.tar"))
                if not found:
                    raise ValueError(f"no *.tar shards in directory {piece}")
                shards.extend(found)
            elif glob.has_magic(piece):
                found = sorted(glob.glob(piece))
                if not found:
                    raise ValueError(f"shard pattern {piece!r} matches no files")
                shards.extend(found)
            elif Path(piece).is_file():
                shards.append(piece)
            else:
                missing.append(piece)
    if missing:
        raise ValueError(f"{len(missing)} shard file(s) not found, e.g. {missing[:3]}")
    if not shards:
        raise ValueError(f"shard specification {urls!r} expands to nothing")
    seen: set[str] = set()
    duplicates = [s for s in shards if s in seen or seen.add(s)]
    if duplicates:
        raise ValueError(f"shard(s) listed more than once: {duplicates[:3]}")
    return shards


# ------------------------------------------------------------------------------------------ decoding


def _derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``; stable across runs (str seeding of random.Random does not use hash())."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


class _PairDecoder:
    """raw sample -> ``{"key", "image", "text", "meta"}``."""

    kind = "pair"

    def __init__(self, require_text: bool = True):
        self.require_text = require_text

    def __call__(self, raw: Mapping[str, Any], limits: ImageLimits) -> tuple[dict[str, Any], list[str]]:
        image_bytes = image_member(raw)
        repairs: list[str] = []
        text = ""
        if "txt" in raw:
            try:
                text = decode_utf8(raw["txt"])
            except SkipSample:
                if self.require_text:
                    raise
                repairs.append("invalid_utf8")
        if self.require_text and not text.strip():
            raise SkipSample("missing_text")
        meta: dict[str, Any] = {}
        if "json" in raw:
            try:
                meta = decode_json_object(raw["json"])
            except SkipSample:
                repairs.append("invalid_json")
        image, image_repairs = decode_image(image_bytes, limits)
        return {"key": raw["__key__"], "image": image, "text": text, "meta": meta}, repairs + image_repairs


class _QADecoder:
    """raw sample -> ``{"key", "image", "question", "answer", "category", "meta"}``."""

    kind = "qa"

    def __call__(self, raw: Mapping[str, Any], limits: ImageLimits) -> tuple[dict[str, Any], list[str]]:
        image_bytes = image_member(raw)
        if "json" not in raw:
            raise SkipSample("missing_json")
        meta = decode_json_object(raw["json"])
        for name in ("question", "answer"):
            if not isinstance(meta.get(name), str) or not meta[name].strip():
                raise SkipSample("missing_field", f"no usable {name!r}")
        category = meta.get("category")
        image, repairs = decode_image(image_bytes, limits)
        sample = {
            "key": raw["__key__"],
            "image": image,
            "question": meta["question"],
            "answer": meta["answer"],
            "category": category if isinstance(category, str) else "",
            "meta": meta,
        }
        return sample, repairs


class _InterleavedDecoder:
    """raw sample -> ``{"key", "segments": [str | PIL.Image, ...]}``; any bad image skips the document."""

    kind = "interleaved"

    def __call__(self, raw: Mapping[str, Any], limits: ImageLimits) -> tuple[dict[str, Any], list[str]]:
        if "json" not in raw:
            raise SkipSample("missing_json")
        segments = decode_json_object(raw["json"]).get("segments")
        if not isinstance(segments, list) or not segments:
            raise SkipSample("invalid_segments", "'segments' missing, empty or not a list")
        plan: list[tuple[str, str]] = []  # ("text", text) | ("image", member name)
        for i, segment in enumerate(segments):
            if isinstance(segment, dict) and len(segment) == 1 and isinstance(segment.get("text"), str):
                plan.append(("text", segment["text"]))
            elif isinstance(segment, dict) and len(segment) == 1 and isinstance(segment.get("image"), str):
                member = segment["image"].lower()  # webdataset lower-cases member suffixes
                if member not in raw:
                    raise SkipSample("missing_image", f"segment {i} names {segment['image']!r}")
                plan.append(("image", member))
            else:
                raise SkipSample("invalid_segments", f"segment {i} is {segment!r}")
        repairs: list[str] = []
        decoded: list[str | Image.Image] = []
        for kind, value in plan:
            if kind == "text":
                decoded.append(value)
            else:
                image, image_repairs = decode_image(raw[value], limits)
                repairs += image_repairs
                decoded.append(image)
        return {"key": raw["__key__"], "segments": decoded}, repairs


# ------------------------------------------------------------------------------------------- dataset


class ShardDataset(torch.utils.data.IterableDataset):
    """A streaming ``IterableDataset`` over webdataset shards with counted skips/repairs.

    Build one with ``pair_dataset``, ``qa_dataset`` or ``interleaved_dataset``. Works with
    ``DataLoader(ds, batch_size=None, num_workers=N)`` (or a ``collate_fn`` that handles PIL images).
    Attributes: ``shards`` (all shard URLs, before any split), ``config``, ``limits``, ``epoch``.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        decoder: _PairDecoder | _QADecoder | _InterleavedDecoder,
        config: ReaderConfig = ReaderConfig(),
        limits: ImageLimits = ImageLimits(),
        image_transform: Callable[[Image.Image], Any] | None = None,
    ):
        super().__init__()
        self.shards = list_shards(urls)
        self.decoder = decoder
        self.config = config
        self.limits = limits
        self.image_transform = image_transform
        self.epoch = 0
        self._counts = SharedCounts(COUNTER_NAMES)
        self._parent_node: tuple[int, int] | None = None

    # ---- public helpers

    @property
    def stats(self) -> ReadStats:
        """Counts so far (all passes since creation or ``reset_stats``, all DataLoader workers of this process)."""
        return ReadStats.from_counts(self._counts.values())

    def reset_stats(self) -> None:
        self._counts.reset()

    def log_summary(self, level: int = logging.INFO) -> ReadStats:
        """Log (and return) the accumulated counts from the calling process."""
        stats = self.stats
        logger.log(level, "%s reader, %d shard(s): %s", self.decoder.kind, len(self.shards), stats.summary())
        return stats

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle permutation of an epoch (call in the main process before iterating; with
        ``persistent_workers=True`` workers keep the epoch they were started with)."""
        self.epoch = int(epoch)

    def shards_for(self, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards one (rank, worker) reads in the current epoch, in reading order."""
        shards = list(self.shards)
        if self.config.shuffle_shards:
            random.Random(_derive_seed(self.config.seed, "shards", self.epoch)).shuffle(shards)
        return shards[rank::world_size][worker::num_workers]

    # ---- iteration

    def _node(self) -> tuple[int, int]:
        if self.config.rank is not None:
            return self.config.rank, self.config.world_size
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        if world_size == 1 and self._parent_node is not None:
            return self._parent_node  # spawn-started worker: the parent knew its rank
        return rank, world_size

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.config.rank is None and torch.utils.data.get_worker_info() is None:
            rank, world_size, _, _ = wds.utils.pytorch_worker_info()
            if world_size > 1:
                state["_parent_node"] = (rank, world_size)
        return state

    def _count(self, local: dict[str, int], name: str, n: int = 1) -> None:
        self._counts.add(name, n)
        local[name] = local.get(name, 0) + n

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size = self._node()
        _, _, worker, num_workers = wds.utils.pytorch_worker_info()
        config = self.config
        local: dict[str, int] = {}
        current = {"url": None}
        failed_urls: set[str] = set()

        def open_shards(source):  # like webdataset's url_opener, but closes each shard after reading it
            for item in source:
                current["url"] = item["url"]
                try:
                    stream = wds.gopen(item["url"])
                except Exception as exc:
                    on_tar_error(exc)
                    continue
                try:
                    yield dict(item, stream=stream)
                finally:
                    stream.close()

        def on_tar_error(exc: Exception) -> bool:
            if current["url"] not in failed_urls:
                failed_urls.add(current["url"])
                self._count(local, "skip/tar_error")
                logger.warning("%s reader: error reading shard %s: %r", self.decoder.kind, current["url"], exc)
            return True  # keep going with the next member/shard

        shard_seed = _derive_seed(config.seed, "shards", self.epoch) if config.shuffle_shards else None
        stages: list[Any] = [
            wds.SimpleShardList(self.shards, seed=shard_seed),  # same permutation on every rank
            lambda source: islice(source, rank, None, world_size),  # node split (explicit or detected rank)
            wds.split_by_worker,
            open_shards,
            lambda streams: wds.tariterators.tar_file_expander(streams, handler=on_tar_error),
            lambda files: wds.tariterators.group_by_keys(files, handler=on_tar_error),
        ]
        if config.shuffle_buffer > 0:
            rng = random.Random(_derive_seed(config.seed, "samples", self.epoch, rank, worker))
            stages.append(wds.shuffle(config.shuffle_buffer, initial=config.shuffle_buffer, rng=rng))
        my_shards = len(self.shards[rank::world_size][worker::num_workers])
        if my_shards == 0:
            logger.warning(
                "%s reader: rank %d/%d worker %d/%d has no shards (%d shards in total); use more shards",
                self.decoder.kind, rank, world_size, worker, num_workers, len(self.shards),
            )
        raw_samples = iter(wds.DataPipeline(*stages))
        try:
            for raw in raw_samples:
                try:
                    sample, repairs = self.decoder(raw, self.limits)
                except SkipSample as skip:
                    self._count(local, f"skip/{skip.reason}")
                    key, url = raw.get("__key__"), raw.get("__url__")
                    logger.debug("skip %s in %s: %s %s", key, url, skip.reason, skip.detail)
                    continue
                self._count(local, "good")
                for repair in repairs:
                    self._count(local, f"repair/{repair}")
                if self.image_transform is not None:
                    sample = self._transform(sample)
                yield sample
        finally:
            raw_samples.close()  # closes the open shard now, also when the consumer stops early
            stats = ReadStats.from_counts(local)
            logger.log(
                logging.WARNING if stats.n_skipped else logging.INFO,
                "%s reader pass (epoch %d, rank %d/%d, worker %d/%d, %d shard(s)): %s",
                self.decoder.kind, self.epoch, rank, world_size, worker, num_workers, my_shards, stats.summary(),
            )

    def _transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        if "image" in sample:
            sample["image"] = self.image_transform(sample["image"])
        if "segments" in sample:
            sample["segments"] = [s if isinstance(s, str) else self.image_transform(s) for s in sample["segments"]]
        return sample


# ------------------------------------------------------------------------------------------ factories

_FACTORY_ARGS_DOC = """
    Args:
        urls: shards: brace pattern, glob, directory, list (see ``list_shards``).
        shuffle_shards: shuffle the shard order each epoch (seeded; same order on every rank).
        shuffle_buffer: size of the seeded sample shuffle buffer (raw bytes); 0 = no sample shuffle.
        seed: base seed for both shuffles (combined with ``set_epoch``'s epoch, rank and worker id).
        rank, world_size: explicit node split; by default from env ``RANK``/``WORLD_SIZE`` or torch.distributed.
        image_transform: callable applied to each decoded PIL RGB image (e.g. resize + to tensor).
        limits: ``ImageLimits`` (max pixels, max aspect ratio) checked before decoding.
"""


def _make(urls, decoder, shuffle_shards, shuffle_buffer, seed, rank, world_size, image_transform, limits):
    config = ReaderConfig(shuffle_shards, shuffle_buffer, seed, rank, world_size)
    return ShardDataset(urls, decoder, config, limits or ImageLimits(), image_transform)


def pair_dataset(
    urls: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    shuffle_shards: bool = False,
    shuffle_buffer: int = 0,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    image_transform: Callable[[Image.Image], Any] | None = None,
    limits: ImageLimits | None = None,
    require_text: bool = True,
) -> ShardDataset:
    """Image-caption pairs: yields ``{"key": str, "image": PIL RGB, "text": str, "meta": dict}``.

    ``text`` is the ``.txt`` member as stored (UTF-8, not stripped); ``meta`` the ``.json`` object or ``{}``
    (an unparseable json is a repair, not a skip: the pair itself is fine). With ``require_text=False``
    (image-only use) a missing/empty/undecodable caption gives ``text=""`` instead of a skip.
    """
    decoder = _PairDecoder(require_text=require_text)
    return _make(urls, decoder, shuffle_shards, shuffle_buffer, seed, rank, world_size, image_transform, limits)


def qa_dataset(
    urls: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    shuffle_shards: bool = False,
    shuffle_buffer: int = 0,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    image_transform: Callable[[Image.Image], Any] | None = None,
    limits: ImageLimits | None = None,
) -> ShardDataset:
    """Visual QA: yields ``{"key", "image", "question", "answer", "category", "meta"}``.

    From ``.json`` = ``{"question": str, "answer": str, "category": str, ...}``; question and answer are
    required (else skipped as ``missing_field``), ``category`` defaults to ``""``; ``meta`` is the whole json.
    """
    decoder = _QADecoder()
    return _make(urls, decoder, shuffle_shards, shuffle_buffer, seed, rank, world_size, image_transform, limits)


def interleaved_dataset(
    urls: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    shuffle_shards: bool = False,
    shuffle_buffer: int = 0,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    image_transform: Callable[[Image.Image], Any] | None = None,
    limits: ImageLimits | None = None,
) -> ShardDataset:
    """Interleaved documents: yields ``{"key", "segments": [str | PIL RGB image, ...]}`` in document order.

    From ``.json`` = ``{"segments": [{"text": ...}, {"image": "0.png"}, ...]}`` plus members ``KEY.0.png``...
    A document with a missing or bad image is skipped whole (dropping one image would change its meaning).
    """
    decoder = _InterleavedDecoder()
    return _make(urls, decoder, shuffle_shards, shuffle_buffer, seed, rank, world_size, image_transform, limits)


for _factory in (pair_dataset, qa_dataset, interleaved_dataset):
    _factory.__doc__ = (_factory.__doc__ or "") + _FACTORY_ARGS_DOC
