"""The package's own cache directory for derived data (parsed token documents, decoded baseline samples).

Caches never go beside their inputs: a shard directory may be read-only, shared, or simply not ours to write in.
They go to ONE directory the package owns:

- ``cache_dir`` when a caller passes one, else ``$CHAMELEON_LITE_CACHE``, else ``$XDG_CACHE_HOME/chameleon_lite``,
  else ``~/.cache/chameleon_lite``;
- a directory the package creates (or finds empty) gets a ``CACHEDIR.TAG`` (the standard cache-directory tag, which
  backup tools skip) naming chameleon_lite; that tag is what marks it as the package's;
- every cache file is named ``<kind>-<source>-<content>.<ext>``: ``source`` hashes where the data came from (the
  token directory, the shard list), ``content`` the inputs' sizes, mtimes and settings;
- pruning (:func:`prune_stale`) removes only files of the same ``kind`` and ``source`` with another ``content``
  hash (this package's earlier caches of the same input), and only in a directory that carries the tag. In a
  directory without it (a caller's own ``cache_dir`` that already held files) the package adds its files and
  deletes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

__all__ = ["CACHE_ENV", "TAG_FILE", "cache_file", "default_cache_dir", "owned_cache_dir", "prune_stale", "source_key"]

logger = logging.getLogger(__name__)

CACHE_ENV = "CHAMELEON_LITE_CACHE"
TAG_FILE = "CACHEDIR.TAG"
# https://bford.info/cachedir/: the first line is fixed by the spec, the rest is free
_TAG = "Signature: 8a477f597d28d172789f06886806bc55\n# chameleon_lite cache: derived data, safe to delete.\n"
_NAME = re.compile(r"^(?P<kind>[a-z]+)-(?P<source>[0-9a-f]{12})-(?P<content>[0-9a-f]{16,40})(?P<ext>(\.[a-z]+)+)$")


def default_cache_dir() -> Path:
    """``$CHAMELEON_LITE_CACHE``, else ``$XDG_CACHE_HOME/chameleon_lite``, else ``~/.cache/chameleon_lite``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "chameleon_lite"


def owned_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory (``cache_dir`` or :func:`default_cache_dir`), created if needed; tagged as the
    package's when it is created here or found empty. Raises OSError when it cannot be created."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    tag = directory / TAG_FILE
    if not tag.exists() and not any(directory.iterdir()):
        tmp = directory / f".{TAG_FILE}.{os.getpid()}.tmp"
        tmp.write_text(_TAG, encoding="utf-8")
        os.replace(tmp, tag)
    return directory


def is_owned(directory: Path) -> bool:
    """Whether ``directory`` carries this package's cache tag."""
    try:
        return (directory / TAG_FILE).read_text(encoding="utf-8") == _TAG
    except OSError:
        return False


def source_key(*parts: object) -> str:
    """A 12-hex-digit key of where cached data came from (e.g. the absolute path of a token directory)."""
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()[:12]


def cache_file(directory: Path, kind: str, source: str, content: str, ext: str) -> Path:
    """``directory / f"{kind}-{source}-{content}{ext}"`` (``kind`` lower-case letters, ``content`` 16-40 hex)."""
    path = directory / f"{kind}-{source}-{content}{ext}"
    if not _NAME.match(path.name):
        raise ValueError(f"not a cache file name this package writes: {path.name!r}")
    return path


def prune_stale(keep: Path) -> list[Path]:
    """Delete this package's earlier caches of the same input as ``keep`` (same kind and source, other content
    hash, same extension); only in a tagged directory. Returns what was deleted."""
    match = _NAME.match(keep.name)
    if match is None or not is_owned(keep.parent):
        return []
    removed = []
    for path in keep.parent.glob(f"{match['kind']}-{match['source']}-*{match['ext']}"):
        other = _NAME.match(path.name)
        if path != keep and other is not None and other["ext"] == match["ext"] and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info("removed %d stale cache file(s) of %s in %s", len(removed), match["kind"], keep.parent)
    return removed
