"""Safe reading and writing of the directories the package makes and the YAML files it reads from disk.

Two rules, both from issue 14 ("Nothing lost, nothing leaked"):

* **Writers never delete what they did not write.** Every directory written through ``write_dir`` (model
  directories, baseline directories, tokenizer bundles, vision encoders) carries ``manifest.json``, which lists
  the files the package wrote there. Writing into an existing directory is allowed when it is empty or carries
  such a manifest; then only the listed files are replaced (and only listed files that the new version no longer
  has are removed), everything else in the directory is left as it is. Any other non-empty directory is refused
  with ``FileExistsError``. New files are built in a temporary sibling directory and renamed into place, so every
  file is always complete; a new directory is renamed into place whole.
* **YAML read from disk is data, not code.** ``load_plain_yaml`` parses with ``yaml.safe_load`` (no Python
  objects), refuses anchors/aliases (they can expand exponentially) and refuses any ``${...}`` OmegaConf
  interpolation, naming the file and the key: a downloaded model directory or bundle must not be able to read
  environment variables or call resolvers. ``OmegaConf`` only ever sees the checked plain data. Training recipes
  (``chameleon-lite fit --config``) are the user's own files and keep their ``${...}``; they do not come here.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "ACCUMULATING_KINDS",
    "MANIFEST_FILE",
    "check_listed",
    "check_no_interpolation",
    "check_writable_dir",
    "load_plain_yaml",
    "load_structured_yaml",
    "manifest_kind",
    "read_manifest",
    "record_files",
    "remove_listed",
    "save_structured_yaml",
    "write_dir",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "chameleon_lite-manifest"
MANIFEST_VERSION = 1
ACCUMULATING_KINDS = ("data", "compare", "learning_curve")
"""Manifest kinds of directories that several writers fill one named file at a time (``record_files``): data
directories (shards, ``tokens.yaml``, ``world.yaml``), ``compare`` and ``learning_curve`` output directories.
``write_dir`` (which replaces a whole directory) refuses them."""
_INTERPOLATION = "${"
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- YAML
class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses ``*alias`` references (a few aliases can expand to gigabytes)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not accepted in this file", event.start_mark
            )
        return super().compose_node(parent, index)


def check_no_interpolation(data: Any, source: str | Path, *, writing: bool = False) -> None:
    """Raise ``ValueError`` naming ``source`` and the key when a key or string value of ``data`` holds ``${``.

    ``data`` is plain YAML data (dicts, lists, scalars). ``writing`` only changes the wording of the message.
    """
    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and _INTERPOLATION in key:
                    _refuse(source, here, key, writing)
                walk(value, here)
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")
        elif isinstance(node, str) and _INTERPOLATION in node:
            _refuse(source, where or "<top level>", node, writing)

    walk(data, "")


def _refuse(source: str | Path, key: str, value: str, writing: bool) -> None:
    what = "cannot write" if writing else "refusing to read"
    raise ValueError(
        f"{source}: {what} {key}={value!r}: '${{' marks an OmegaConf interpolation, and files read from disk are "
        "never interpolated (a downloaded file must not read environment variables or call resolvers); "
        "remove the '${'"
    )


def load_plain_yaml(file: str | Path) -> Any:
    """Parse ``file`` as plain YAML data, with no interpolation; ``ValueError`` names the file and the problem.

    Refused: unreadable or non-UTF-8 bytes, YAML syntax errors, Python-object tags (``yaml.safe_load``),
    anchors/aliases, nesting too deep to parse, and ``${...}`` anywhere (key named).
    """
    file = Path(file)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text: {err}") from err
    loader = None
    try:
        loader = _NoAliasLoader(text)  # the constructor already rejects unprintable characters
        loader.name = str(file)  # marks in syntax errors name the file, not "<unicode string>"
        data = loader.get_single_data()
    except yaml.YAMLError as err:
        raise ValueError(f"{file} is not valid YAML: {err}") from err
    except RecursionError as err:
        raise ValueError(f"{file} is nested too deeply to be a config file") from err
    finally:
        if loader is not None:
            loader.dispose()
    check_no_interpolation(data, file)
    return data


def load_structured_yaml(file: str | Path, schema: type[T], *, section: str | None = None) -> T:
    """``file`` (or its top-level ``section``) validated against the dataclass ``schema``, never interpolated.

    Unknown keys, wrong types and values the dataclass rejects raise ``ValueError`` naming the file.
    """
    file = Path(file)
    data = load_plain_yaml(file)
    if section is not None:
        if not isinstance(data, dict) or section not in data:
            raise ValueError(f"{file} is malformed: it has no top-level {section!r} mapping")
        data = data[section]
    if not isinstance(data, dict):
        where = f"{section!r}" if section else "top level"
        raise ValueError(f"{file} is malformed: the {where} must be a mapping, got {type(data).__name__} {data!r:.80}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError, TypeError, ArithmeticError) as err:  # ArithmeticError: inf -> int
        raise ValueError(f"{file} is malformed: {err}") from err


def save_structured_yaml(config: Any, file: str | Path) -> None:
    """Write a dataclass instance as YAML; refuses (``ValueError``) a string holding ``${`` so nothing written can
    later be read as an interpolation."""
    node = OmegaConf.structured(config)
    check_no_interpolation(OmegaConf.to_container(node, resolve=False), file, writing=True)
    OmegaConf.save(node, file)


# ---------------------------------------------------------------------------------------------- directories
def load_checked_weights(build: Callable[[], Any], weights: str | Path, *, config_file: str | Path,
                         min_tensors: int, asks: str) -> Any:
    """``build()`` with the tensors of the safetensors file ``weights`` loaded into it.

    The file's names and shapes are checked against ``build()`` on the meta device before anything real is built,
    and a config asking for more than the file could hold (``min_tensors``, described by ``asks``) is refused before
    even that: ``config_file`` is read from disk. ``ValueError`` naming the file for an unreadable file or a mismatch.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    source = f"{weights} (checked against {config_file})"
    if min_tensors > len(state):
        raise ValueError(f"{source}: {asks} but the file holds only {len(state)} tensors")
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        wrong = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise ValueError(f"{source}: weights do not match the config: " + "; ".join(
            f"{k}: file {have.get(k, 'missing')} vs config {want.get(k, 'none')}" for k in wrong[:5]))
    module = build()
    module.load_state_dict(state)
    return module


def read_manifest(directory: str | Path) -> list[str] | None:
    """The files ``directory/manifest.json`` lists (relative POSIX paths), or None when there is no manifest.

    A manifest that is not ours or lists a path outside the directory raises ``ValueError`` naming it.
    """
    data = _read_manifest_data(directory)
    return None if data is None else list(data["files"])


def manifest_kind(directory: str | Path) -> str | None:
    """The ``kind`` that ``directory/manifest.json`` records (None without a manifest); checked as ``read_manifest``."""
    data = _read_manifest_data(directory)
    return None if data is None else data.get("kind")


def _read_manifest_data(directory: str | Path) -> dict[str, Any] | None:
    file = Path(directory) / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not a valid manifest (JSON): {err}") from err
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{file} was not written by chameleon_lite (no \"format\": \"{MANIFEST_FORMAT}\")")
    if data.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{file}: manifest version {data.get('version')!r} is not supported (only {MANIFEST_VERSION})")
    files = data.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{file}: \"files\" must be a list of relative paths")
    for name in files:
        path = PurePosixPath(name)
        if not name or path.is_absolute() or ".." in path.parts or path.as_posix() != name or "\\" in name:
            raise ValueError(f"{file} lists {name!r}, which is not a plain relative path inside the directory")
    return data


def check_writable_dir(out_dir: str | Path) -> list[str] | None:
    """Check that ``write_dir`` may write ``out_dir``; return the files its manifest lists (None: absent/empty).

    Raises ``FileExistsError`` when ``out_dir`` is a file, or a non-empty directory without ``manifest.json``.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return None
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; refusing to replace it")
    if not any(out_dir.iterdir()):
        return None
    listed = read_manifest(out_dir)
    if listed is None:
        raise FileExistsError(
            f"{out_dir} is not empty and has no {MANIFEST_FILE}, so chameleon_lite did not write it; refusing to "
            "write into it (nothing was changed). Choose a new or empty directory, or move its contents away yourself."
        )
    return listed


def write_dir(out_dir: str | Path, build: Callable[[Path], None], *, kind: str) -> Path:
    """Write a directory: ``build(tmp)`` fills a temporary sibling, then its files are moved into ``out_dir``.

    ``out_dir`` may be absent or empty (the temporary directory is renamed into place whole), or carry a
    ``manifest.json``: then each new file replaces its old version with an atomic rename, files the old manifest
    lists and the new version lacks are removed, and nothing else is touched. A new file whose name is taken by
    a file the old manifest does not list is refused (``FileExistsError``) before anything changes. The manifest
    (``{"format", "version", "kind", "files"}``) is written last; while files are moved it lists the old and the
    new files together, so an interrupted write never leaves a file of ours unlisted.
    """
    out_dir = Path(out_dir)
    old = check_writable_dir(out_dir)
    if old is not None:
        existing = manifest_kind(out_dir)
        if existing in ACCUMULATING_KINDS and existing != kind:
            raise FileExistsError(
                f"{out_dir} holds chameleon_lite's {existing} output ({out_dir / MANIFEST_FILE}); refusing to replace "
                f"it with a {kind} directory (nothing was changed). Choose a new or empty directory."
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()  # not mkdtemp: the directory renamed into place keeps the umask's permissions, not 0700
    try:
        build(tmp)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() or p.is_symlink())
        files = [f for f in files if f != MANIFEST_FILE]
        _write_manifest(tmp, files, kind)
        if old is None:
            try:
                tmp.rename(out_dir)  # POSIX rename(2) replaces an empty directory and fails on a non-empty one
                return out_dir
            except OSError:
                old = check_writable_dir(out_dir)  # it gained files meanwhile: refused unless they are ours
            if old is None:  # still empty: a platform that does not rename onto an empty directory
                out_dir.rmdir()
                tmp.rename(out_dir)
                return out_dir
        _install(tmp, out_dir, files, old, kind)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only what build() wrote; empty after a successful install
    return out_dir


def _install(tmp: Path, out_dir: Path, files: list[str], old: list[str], kind: str) -> None:
    root = out_dir.resolve()
    listed = set(old)
    for name in sorted(set(files) | listed):
        target = out_dir / name
        if not target.parent.resolve().is_relative_to(root):
            raise FileExistsError(f"{target} lies outside {out_dir} (a linked folder); refusing to write there")
        if name in files and (target.exists() or target.is_symlink()):
            if name not in listed:
                raise FileExistsError(
                    f"{target} exists but {out_dir / MANIFEST_FILE} does not list it, so chameleon_lite did not "
                    "write it; refusing to overwrite it (nothing was changed). Move it away, or choose another "
                    "directory."
                )
            if target.is_dir() and not target.is_symlink():
                raise FileExistsError(f"{target} is a directory where a file is to be written; refusing to replace it")
    _write_manifest(out_dir, sorted(set(files) | listed), kind, via=tmp)  # write-ahead: old and new files listed
    for name in files:
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, out_dir / name)
    for name in sorted(listed - set(files), reverse=True):
        target = out_dir / name
        if target.is_file() or target.is_symlink():
            target.unlink()
        for parent in target.parents:  # folders left empty by what we removed; never out_dir itself
            if parent == out_dir or out_dir not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break
    os.replace(tmp / MANIFEST_FILE, out_dir / MANIFEST_FILE)


# ------------------------------------------------------------------------- directories filled file by file
def _plain_name(name: str) -> str:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or path.as_posix() != name or "\\" in name:
        raise ValueError(f"{name!r} is not a plain relative path inside the directory")
    return name


def _listed_of_kind(directory: Path, kind: str) -> set[str]:
    """The names ``directory``'s manifest lists (empty without one); refused when it records another kind."""
    data = _read_manifest_data(directory)
    if data is None:
        return set()
    if data.get("kind") != kind:
        raise FileExistsError(
            f"{directory / MANIFEST_FILE} says chameleon_lite wrote {directory} as a {data.get('kind')!r} directory, "
            f"not {kind!r}; refusing to mix them (nothing was changed). Choose another directory."
        )
    return set(data["files"])


def check_listed(directory: str | Path, names: list[str] | tuple[str, ...], *, kind: str) -> set[str]:
    """Refuse to write or remove any of ``names`` in ``directory`` that exists and is not listed in its manifest.

    For directories that writers fill one file (or sub-directory) at a time (``ACCUMULATING_KINDS``): each such
    name is the package's only when ``directory/manifest.json`` (of this ``kind``) lists it. Returns the listed
    names. Raises ``FileExistsError`` naming the first unlisted existing name (or when ``directory`` is a file or
    its manifest records another kind), ``ValueError`` for a broken manifest; nothing is changed either way.
    """
    directory = Path(directory)
    if not directory.exists() and not directory.is_symlink():
        return set()
    if not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; refusing to write into it")
    listed = _listed_of_kind(directory, kind)
    for name in names:
        target = directory / _plain_name(name)
        if (target.exists() or target.is_symlink()) and name not in listed:
            raise FileExistsError(
                f"{target} exists, but chameleon_lite did not write it ({directory / MANIFEST_FILE} does not list "
                "it); refusing to overwrite or delete it (nothing was changed). Move it away, or choose another "
                "output directory."
            )
    return listed


def record_files(directory: str | Path, *, add: tuple[str, ...] | list[str] = (),
                 remove: tuple[str, ...] | list[str] = (), kind: str) -> None:
    """Add ``add`` to and drop ``remove`` from ``directory/manifest.json`` (created with ``kind`` when absent).

    Call it with ``add`` before a file is moved into place (write-ahead: a file of ours is never unlisted) and
    with ``remove`` after it is gone. Nothing is written when the list does not change. One writer per directory
    at a time (the manifest is read, changed and replaced).
    """
    directory = Path(directory)
    listed = _listed_of_kind(directory, kind) if directory.is_dir() else set()
    new = (listed | {_plain_name(n) for n in add}) - set(remove)
    if new == listed and ((directory / MANIFEST_FILE).is_file() or not new):
        return
    directory.mkdir(parents=True, exist_ok=True)
    _write_manifest(directory, sorted(new), kind)


def remove_listed(directory: str | Path, names: list[str] | tuple[str, ...], *, kind: str) -> list[str]:
    """Delete those of ``names`` that ``directory``'s manifest lists (files the package wrote) and drop them from
    it; unlisted names are left alone. Returns the names removed from the manifest."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    listed = _listed_of_kind(directory, kind)
    mine = [n for n in names if n in listed]
    for name in mine:
        target = directory / name
        if target.is_file() or target.is_symlink():
            target.unlink()
    record_files(directory, remove=mine, kind=kind)
    return mine


def _write_manifest(directory: Path, files: list[str], kind: str, via: Path | None = None) -> None:
    """Write ``directory/manifest.json`` atomically (through a temporary file in ``via`` or ``directory``)."""
    text = json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "kind": kind, "files": files},
                      indent=2) + "\n"
    fd, tmp_name = tempfile.mkstemp(prefix=".manifest-", dir=via or directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp_name, directory / MANIFEST_FILE)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
