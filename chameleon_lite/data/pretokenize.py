"""Pre-tokenization: raw shards (pairs, QA, interleaved documents) -> token shards the native trainer reads.

Images are encoded once, in batches, by the bundle's VQ tokenizer; text is encoded by its sentencepiece model.
DataLoader worker processes decode and preprocess images and encode text in parallel; the main process runs the
batched VQ encoder. Each output sample is one ``KEY.json`` holding ids and codes as plain integer lists::

    {"kind": "pair", "tokens": [{"image": [c_0, ..., c_{h*w-1}]}, {"text": [ids]}], "meta": {...}}
    {"kind": "qa", "tokens": [{"image": [...]}], "question": [ids], "answer": [ids], "category": "count", ...}
    {"kind": "doc", "tokens": [{"text": [ids]}, {"image": [...]}, {"text": [ids]}, {"image": [...]}, ...]}

Codes are raw VQ codes in ``[0, codebook_size)`` (not vocabulary ids): the vocabulary offset is applied when
sequences are built, so token shards stay valid if control slots are added. ``OUT/tokens.yaml`` records the
bundle (name, grid, codebook, vocabulary size) so the trainer can refuse shards made with another tokenizer.

``OUT`` is a data directory (issue 14): the shards and ``tokens.yaml`` are listed in ``OUT/manifest.json``, a rerun
replaces only what that manifest lists, and a ``tokens.yaml`` or ``{pairs,qa,docs}-NNNNNN.tar`` that the package did
not write is refused with ``FileExistsError`` before anything is tokenized.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from chameleon_lite.data.readers import interleaved_dataset, list_shards, pair_dataset, qa_dataset
from chameleon_lite.data.shards import DATA_KIND, check_shard_names, write_shards
from chameleon_lite.safe_io import check_listed, load_plain_yaml, record_files, remove_listed
from chameleon_lite.tokenization.bundle import TokenizerBundle
from chameleon_lite.tokenization.image_tokenizer import preprocess_images

RECORD_FILE = "tokens.yaml"
KINDS = ("pair", "qa", "doc")


_PREFIX_KIND = {"qa": "qa", "docs": "doc"}
_KIND_PREFIX = {"pair": "pairs", "qa": "qa", "doc": "docs"}
_KNOWN_MAX = 8192  # codes of recently seen images kept for reuse


def shard_kind(shard: str) -> str:
    """``qa`` for ``qa-*.tar``, ``doc`` for ``docs-*.tar``, else ``pair`` (img2dataset's ``00000.tar`` included)."""
    return _PREFIX_KIND.get(Path(shard).name.split("-")[0], "pair")


def shards_by_kind(shards: str | list[str]) -> dict[str, list[str]]:
    """Expand a shard pattern and group the shards by :func:`shard_kind`, keeping their order."""
    groups: dict[str, list[str]] = {}
    for shard in list_shards(shards):
        groups.setdefault(shard_kind(shard), []).append(shard)
    return groups


def token_record(bundle: TokenizerBundle) -> dict[str, Any]:
    """What ``tokens.yaml`` says about the bundle that made a set of token shards (checked by the trainer)."""
    return {
        "bundle": bundle.name,
        "image_grid": list(bundle.image_grid),
        "codebook_size": bundle.vocab.codebook_size,
        "vocab_size": bundle.vocab.size,
        "n_text": bundle.vocab.n_text,
    }


class _Prepared(IterableDataset):
    """Raw samples -> text ids + preprocessed image tensors (runs in DataLoader workers)."""

    def __init__(self, shards: list[str], kind: str, bundle: TokenizerBundle):
        self.kind = kind
        self.text = bundle.text
        self.image_config = bundle.image_tokenizer.config
        reader = {"pair": pair_dataset, "qa": qa_dataset, "doc": interleaved_dataset}[kind]
        self.source = reader(shards)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for s in self.source:
            out: dict[str, Any] = {"key": s["key"], "kind": self.kind}
            if self.kind == "doc":
                images = [seg for seg in s["segments"] if not isinstance(seg, str)]
                out["layout"] = [("text", self.text.encode(seg)) if isinstance(seg, str) else ("image", None)
                                 for seg in s["segments"]]
            else:
                images = [s["image"]]
                out["meta"] = s["meta"]
                if self.kind == "pair":
                    out["layout"] = [("image", None), ("text", self.text.encode(s["text"]))]
                else:
                    out["layout"] = [("image", None)]
                    out["qa"] = {
                        "question": self.text.encode(s["question"]),
                        "answer": self.text.encode(s["answer"]),
                        "category": s["category"],
                    }
            out["pixels"] = preprocess_images(images, self.image_config)  # (n_images, C, H, W)
            yield out


@dataclass
class TokenizeStats:
    samples: int = 0
    images: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def _encode_pending(model, pending: list[dict[str, Any]], known: dict[bytes, list[int]]) -> Iterator[dict[str, Any]]:
    """Encode the images of ``pending`` samples in one VQ batch and yield the finished token samples.

    Identical images (a scene's QA samples share its picture) are encoded once: ``known`` maps a hash of the
    preprocessed pixels to codes and carries over between batches (cleared when it grows past ``_KNOWN_MAX``).
    Batched encoding gives the codes of one-at-a-time encoding, so this changes nothing but the time.
    """
    pixels = torch.cat([p["pixels"] for p in pending])  # (N, C, H, W)
    keys = [hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest() for image in pixels]
    todo = list(dict.fromkeys(k for k in keys if k not in known))  # unique, in order
    if todo:
        rows = [keys.index(k) for k in todo]
        batch = pixels[rows].to(next(model.parameters()).device)  # (n_new, C, H, W)
        if len(known) + len(todo) > _KNOWN_MAX:  # forget older images, never the ones this batch still needs
            needed = {k: known[k] for k in keys if k in known}
            known.clear()
            known.update(needed)
        known.update(zip(todo, model.encode(batch).flatten(1).tolist()))  # n_new x (h*w)
    codes = [known[k] for k in keys]
    k = 0
    for p in pending:
        segments = []
        for kind, ids in p["layout"]:
            if kind == "image":
                segments.append({"image": codes[k]})
                k += 1
            else:
                segments.append({"text": ids})
        record: dict[str, Any] = {"kind": p["kind"], "tokens": segments}
        if "qa" in p:
            record.update(p["qa"])
        if "meta" in p:
            record["meta"] = p["meta"]
        yield {"__key__": p["key"], "json": record}


def tokenize_shards(
    bundle: TokenizerBundle,
    shards: str,
    out: str | Path,
    *,
    batch_size: int = 256,
    num_workers: int = 2,
    shard_size: int = 5000,
    progress: bool = True,
) -> TokenizeStats:
    """Pre-tokenize ``shards`` (pairs, QA and docs, told apart by file name) into ``out``; returns throughput."""
    if bundle.image_tokenizer is None:
        raise ValueError(f"bundle {bundle.name!r} has no image tokenizer; train one first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    groups = shards_by_kind(shards)
    # refused before any work: a tokens.yaml or shard of ours to replace that the package did not write
    check_listed(out, [RECORD_FILE], kind=DATA_KIND)
    for kind in groups:
        check_shard_names(out, _KIND_PREFIX[kind])
    _check_record(bundle, out)
    remove_listed(out, [RECORD_FILE], kind=DATA_KIND)  # the record marks a finished directory: written last
    total = TokenizeStats()
    for kind, shard_list in groups.items():
        stats = _tokenize_kind(bundle, kind, shard_list, out, batch_size, num_workers, shard_size, progress)
        total.samples += stats.samples
        total.images += stats.images
        total.seconds += stats.seconds
    _write_record(bundle, out)
    return total


def _tokenize_kind(bundle, kind, shard_list, out, batch_size, num_workers, shard_size, progress) -> TokenizeStats:
    model = bundle.image_tokenizer.eval()
    workers = min(num_workers, len(shard_list))  # a worker without a shard would idle
    loader = DataLoader(_Prepared(shard_list, kind, bundle), batch_size=None, num_workers=workers)
    stats = TokenizeStats()
    start = time.perf_counter()

    def records() -> Iterator[dict[str, Any]]:
        pending: list[dict[str, Any]] = []
        known: dict[bytes, list[int]] = {}
        n_images = 0
        for sample in chain(loader, [None]):  # None: flush what is pending at the end
            if sample is not None:
                pending.append(sample)
                n_images += sample["pixels"].shape[0]
            if pending and (sample is None or n_images >= batch_size):
                stats.images += n_images
                stats.samples += len(pending)
                yield from _encode_pending(model, pending, known)
                pending, n_images = [], 0

    write_shards(records(), out, prefix=_KIND_PREFIX[kind], max_count=shard_size, progress=progress, overwrite=True)
    stats.seconds = time.perf_counter() - start
    return stats


def _check_record(bundle: TokenizerBundle, out: Path) -> None:
    """Refuse to write into a token directory finished with another tokenizer."""
    path = out / RECORD_FILE
    if path.exists():
        existing = load_plain_yaml(path)  # never interpolated
        if existing != token_record(bundle):
            raise ValueError(f"{path} was written with another tokenizer ({existing}); use a fresh --out directory")


def _write_record(bundle: TokenizerBundle, out: Path) -> None:
    """Write ``tokens.yaml``; ``tokenize_shards`` does so only once every shard is written, so a directory
    with a record is complete (an interrupted run leaves none, and readers refuse the directory)."""
    out.mkdir(parents=True, exist_ok=True)
    check_listed(out, [RECORD_FILE], kind=DATA_KIND)  # never over a tokens.yaml the package did not write
    _check_record(bundle, out)
    tmp = out / f".{RECORD_FILE}.tmp-{secrets.token_hex(6)}"
    try:
        OmegaConf.save(OmegaConf.create(token_record(bundle)), tmp)
        record_files(out, add=[RECORD_FILE], kind=DATA_KIND)  # listed before it is in place
        os.replace(tmp, out / RECORD_FILE)
    finally:
        tmp.unlink(missing_ok=True)
