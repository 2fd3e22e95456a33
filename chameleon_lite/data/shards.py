"""Writing webdataset tar shards in the layout img2dataset produces.

A sample is a dict: ``{"__key__": "000042", "png": PIL.Image | bytes, "txt": str, "json": dict}`` becomes the
tar members ``000042.png``, ``000042.txt``, ``000042.json``. An interleaved document is
``{"__key__": k, "json": {"segments": [{"text": ...}, {"image": "0.png"}, ...]}, "0.png": img, ...}`` and
becomes ``k.json``, ``k.0.png``, ... (webdataset splits the key at the first dot, so ``0.png`` is the member
name the reader sees).

Notable choices:

- Encoding is ours, not webdataset's auto-encoder, so bytes are deterministic: PIL images go to PNG
  (``png``) or JPEG (``jpg``/``jpeg``, quality ``jpeg_quality``) or WebP (``webp``, lossless); dicts/lists under
  ``json`` go to UTF-8 JSON with sorted keys (NaN/inf rejected: they are not JSON); ``str`` to UTF-8; ``bytes``
  are written as given (already-encoded images from elsewhere pass through untouched). Tar headers carry a
  fixed mtime/owner, so writing the same samples twice gives byte-identical shards.
- ``webdataset.TarWriter`` writes each tar; rotation (``max_count`` samples per shard) is done here rather
  than with ``ShardWriter`` so that each shard is written under a temporary name and renamed when complete:
  a crash never leaves a truncated ``*.tar`` that a later glob would pick up, and no empty shard is created
  when there are no samples.
- Keys are validated (non-empty ``str``, no ``.`` or ``/``, unique within one call) because webdataset groups
  members by the text before the first dot: a dotted key silently splits one sample into two.
- Members named ``__xxx__`` (webdataset metadata such as ``__url__`` on a sample that was read back) are
  not written.
- Nothing that the package did not write is deleted or overwritten (issue 14): each shard is listed in
  ``OUT/manifest.json`` (kind ``data``; ``safe_io.record_files``) before it is renamed into place, the manifest
  accumulates over prefixes (``pairs``, ``qa`` and ``docs`` share a directory), ``overwrite=True`` deletes only the
  listed ``{prefix}-NNNNNN.tar`` files, and a ``{prefix}-NNNNNN.tar`` that no manifest lists is refused with
  ``FileExistsError`` before anything is written (``check_shard_names``).
"""

from __future__ import annotations

import io
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from chameleon_lite.safe_io import check_listed, record_files, remove_listed

__all__ = ["write_shards", "encode_sample", "check_shard_names", "IMAGE_EXTENSIONS", "DATA_KIND"]

DATA_KIND = "data"  # the manifest kind of data directories: shards and their records (tokens.yaml, world.yaml)

# Image member extensions and the PIL format each is encoded to.
IMAGE_EXTENSIONS: dict[str, str] = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
# JPEG can store only these modes; PNG refuses a few exotic ones and PIL raises a clear error for those.
_JPEG_MODES = ("RGB", "L", "CMYK")
_TAR_MTIME = 0.0  # fixed header timestamp -> reproducible shard bytes


def _validate_key(key: Any) -> str:
    """Return ``key`` if it is a usable webdataset sample key, else raise ValueError."""
    if not isinstance(key, str):
        raise ValueError(f"sample '__key__' must be a str, got {type(key).__name__}")
    if not key.strip():
        raise ValueError("sample '__key__' must be non-empty")
    if "." in key:
        raise ValueError(f"sample '__key__' {key!r} contains '.': webdataset splits keys at the first dot")
    if "/" in key:
        raise ValueError(f"sample '__key__' {key!r} contains '/': keys must be flat names, not paths")
    return key


def _encode_image(image: Any, ext: str, name: str, jpeg_quality: int) -> bytes:
    """Encode a PIL image or a uint8 array to the format named by ``ext``."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(
                f"member {name!r}: arrays must be uint8 (H, W), (H, W, 3) or (H, W, 4), "
                f"got {image.dtype} {image.shape}"
            )
        image = Image.fromarray(image)
    fmt = IMAGE_EXTENSIONS[ext]
    options: dict[str, Any] = {}
    if fmt == "JPEG":
        if image.mode not in _JPEG_MODES:
            raise ValueError(
                f"member {name!r}: cannot write a {image.mode} image as JPEG (no alpha/palette); "
                f"convert it to RGB first or use a .png member"
            )
        options = {"quality": jpeg_quality}
    elif fmt == "WEBP":
        options = {"lossless": True}
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt, **options)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"member {name!r}: cannot encode {image.mode} image as {fmt}: {exc}") from exc
    return buffer.getvalue()


def _encode_member(value: Any, name: str, jpeg_quality: int) -> bytes:
    """Encode one member value to bytes according to the extension at the end of ``name``."""
    ext = name.rsplit(".", 1)[-1].lower()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (Image.Image, np.ndarray)):
        if ext not in IMAGE_EXTENSIONS:
            raise ValueError(
                f"member {name!r} holds an image but its extension is not one of {sorted(IMAGE_EXTENSIONS)}"
            )
        return _encode_image(value, ext, name, jpeg_quality)
    if ext == "json":
        if not isinstance(value, (dict, list)):
            raise ValueError(f"member {name!r} must be a dict or list (or bytes), got {type(value).__name__}")
        try:
            text = json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"member {name!r} is not JSON-serialisable: {exc}") from exc
        return text.encode("utf-8")
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode("utf-8")
    raise ValueError(f"member {name!r}: don't know how to encode a {type(value).__name__}")


def _check_segments(sample: dict[str, Any], key: str) -> None:
    """For an interleaved document, check every ``{"image": name}`` segment has its member."""
    meta = sample.get("json")
    if not isinstance(meta, dict) or "segments" not in meta:
        return
    segments = meta["segments"]
    if not isinstance(segments, list):
        raise ValueError(f"sample {key!r}: json 'segments' must be a list, got {type(segments).__name__}")
    for i, segment in enumerate(segments):
        if not isinstance(segment, dict) or len(segment) != 1 or not ({"text", "image"} & segment.keys()):
            raise ValueError(f"sample {key!r}: segment {i} must be {{'text': str}} or {{'image': name}}, got {segment}")
        if "image" in segment and (not isinstance(segment["image"], str) or segment["image"] not in sample):
            raise ValueError(f"sample {key!r}: segment {i} refers to image member {segment['image']!r}, not in sample")


def encode_sample(sample: dict[str, Any], jpeg_quality: int = 95) -> dict[str, Any]:
    """Validate a sample dict and encode every member to bytes.

    Returns ``{"__key__": key, name: bytes, ...}`` ready for ``webdataset.TarWriter(encoder=False)``.
    Raises ValueError naming the problem (bad key, unknown member type, JPEG with alpha, ...).
    """
    if not isinstance(sample, dict):
        raise ValueError(f"a sample must be a dict, got {type(sample).__name__}")
    if "__key__" not in sample:
        raise ValueError(f"sample has no '__key__' (members: {sorted(sample)})")
    key = _validate_key(sample["__key__"])
    _check_segments(sample, key)
    encoded: dict[str, Any] = {"__key__": key}
    for name, value in sample.items():
        if name == "__key__" or (name.startswith("__") and name.endswith("__")):
            continue  # webdataset metadata (__url__, __local_path__, ...) is not data
        if not isinstance(name, str) or not name or name.startswith("_") or "/" in name:
            raise ValueError(f"sample {key!r}: bad member name {name!r} (non-empty, no leading '_', no '/')")
        encoded[name] = _encode_member(value, name, jpeg_quality)
    if len(encoded) == 1:
        raise ValueError(f"sample {key!r} has no members to write")
    return encoded


def _is_shard_name(name: str, prefix: str) -> bool:
    """``{prefix}-NNNNNN.tar`` (any number of digits), the names ``write_shards`` gives its shards."""
    number = name[len(prefix) + 1 : -len(".tar")]
    return name.startswith(f"{prefix}-") and name.endswith(".tar") and number.isdigit() and number.isascii()


def _existing_shards(out_dir: Path, prefix: str) -> list[Path]:
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if _is_shard_name(p.name, prefix))


def check_shard_names(out_dir: str | os.PathLike, prefix: str) -> list[Path]:
    """Refuse (``FileExistsError``, naming it) a ``{prefix}-NNNNNN.tar`` in ``out_dir`` that its manifest does not
    list, i.e. that the package did not write; returns the existing ``{prefix}-*.tar`` files (all listed)."""
    out_dir = Path(out_dir)
    existing = _existing_shards(out_dir, prefix)
    check_listed(out_dir, [p.name for p in existing], kind=DATA_KIND)
    return existing


class _RotatingTarWriter:
    """Writes ``{prefix}-{index:06d}.tar`` files of at most ``max_count`` samples, each listed in the manifest and
    renamed into place only once complete."""

    def __init__(self, out_dir: Path, prefix: str, max_count: int):
        self.out_dir = out_dir
        self.prefix = prefix
        self.max_count = max_count
        self.written: list[Path] = []
        self._file: io.BufferedWriter | None = None
        self._tar: wds.TarWriter | None = None
        self._tmp_path: Path | None = None
        self._count = 0

    def _shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def _open(self) -> None:
        # a hidden, unique name opened exclusively: never a file of someone else's, never picked up by *.tar
        self._tmp_path = self.out_dir / f".{self._shard_path(len(self.written)).name}.tmp-{secrets.token_hex(6)}"
        self._file = open(self._tmp_path, "xb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=_TAR_MTIME)
        self._count = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        final = self._shard_path(len(self.written))
        if final.exists() or final.is_symlink():  # write_shards removed ours: someone else made this one meanwhile
            self._tmp_path.unlink()
            self._tar = self._file = self._tmp_path = None
            raise FileExistsError(f"{final} appeared while shards were being written; refusing to overwrite it")
        record_files(self.out_dir, add=[final.name], kind=DATA_KIND)  # listed before it exists: never unlisted
        os.replace(self._tmp_path, final)
        self.written.append(final)
        self._tar = self._file = self._tmp_path = None

    def write(self, encoded: dict[str, Any]) -> None:
        if self._tar is not None and self._count >= self.max_count:
            self._finish()
        if self._tar is None:
            self._open()
        self._tar.write(encoded)
        self._count += 1

    def close(self) -> None:
        self._finish()

    def abort(self) -> None:
        """Drop the shard being written (after an error); completed shards stay."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            finally:
                self._tmp_path.unlink(missing_ok=True)
                self._tar = self._file = self._tmp_path = None


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    max_count: int = 1000,
    progress: bool = True,
    total: int | None = None,
    *,
    jpeg_quality: int = 95,
    overwrite: bool = False,
) -> list[Path]:
    """Write samples to ``out_dir/{prefix}-000000.tar``, ``-000001.tar``, ... (``max_count`` samples each).

    Args:
        samples: dicts in img2dataset layout (see the module docstring). PIL images / uint8 arrays are
            encoded by the member's extension; ``bytes`` are written as given.
        out_dir: created if missing.
        prefix: shard name prefix, e.g. ``"train"`` -> ``train-000000.tar``.
        max_count: samples per shard (the last shard may hold fewer).
        progress: show a tqdm bar.
        total: number of samples for the bar (taken from ``len(samples)`` when available).
        jpeg_quality: quality for ``jpg``/``jpeg`` members given as images.
        overwrite: if False (default) raise when ``{prefix}-*.tar`` files already exist in ``out_dir`` (stale
            shards from an earlier, larger run would otherwise be read too); if True delete them first. Only
            shards that ``out_dir/manifest.json`` lists (an earlier ``write_shards`` wrote them) are ever deleted
            or replaced; each new shard is added to that manifest, which keeps the other prefixes' entries.

    Returns:
        The paths written, in order. No file is written for an empty ``samples``.

    Raises:
        ValueError: a bad sample (key, member, type) or argument, or existing shards without ``overwrite``.
            The shard being written when the error happens is removed; completed shards stay.
        FileExistsError: a ``{prefix}-NNNNNN.tar`` in ``out_dir`` that the manifest does not list (the package
            did not write it), whatever ``overwrite`` says; nothing is written or deleted.
    """
    if not isinstance(max_count, int) or max_count < 1:
        raise ValueError(f"max_count must be a positive int, got {max_count!r}")
    if not isinstance(prefix, str) or not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a non-empty file name prefix without '/', got {prefix!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = check_shard_names(out_dir, prefix)  # FileExistsError for a shard the package did not write
    if existing and not overwrite:
        raise ValueError(
            f"{len(existing)} shard(s) named {prefix}-*.tar already exist in {out_dir} "
            f"(e.g. {existing[0].name}); pass overwrite=True to replace them"
        )
    listed = check_listed(out_dir, [], kind=DATA_KIND)
    remove_listed(out_dir, sorted(n for n in listed if _is_shard_name(n, prefix)), kind=DATA_KIND)
    if total is None and hasattr(samples, "__len__"):
        total = len(samples)  # type: ignore[arg-type]

    writer = _RotatingTarWriter(out_dir, prefix, max_count)
    seen_keys: set[str] = set()
    bar = tqdm(samples, total=total, disable=not progress, unit="sample", desc=f"writing {prefix} shards")
    try:
        for sample in bar:
            encoded = encode_sample(sample, jpeg_quality=jpeg_quality)
            key = encoded["__key__"]
            if key in seen_keys:
                raise ValueError(f"duplicate sample key {key!r}: keys must be unique")
            seen_keys.add(key)
            writer.write(encoded)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return writer.written

