"""The model-directory layout both arms share: file names, the declared ``kind``, and where the bundle comes from.

A model directory (native: ``chameleon_lite.native.chameleon``; baseline: ``chameleon_lite.baseline.vlm``) holds
``config.yaml`` (with a ``kind``), ``model.safetensors`` and ``tokenizer/`` (a copy of the tokenizer bundle).
"""

from __future__ import annotations

from pathlib import Path

from chameleon_lite.safe_io import load_plain_yaml
from chameleon_lite.tokenization.bundle import TokenizerBundle, load_bundle

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "TOKENIZER_DIR",
    "as_bundle",
    "check_model_dir",
    "model_dir_kind",
    "resolve_bundle_path",
]


def model_dir_kind(path: str | Path) -> str | None:
    """The ``kind`` a model directory's ``config.yaml`` declares (``"native"``, ``"baseline"``), None without one.

    Raises ``ValueError`` naming the file when it is not valid YAML, not a mapping, or interpolates.
    """
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return None
    data = load_plain_yaml(file)
    if not isinstance(data, dict):
        raise ValueError(f"{file} is malformed: the top level must be a mapping, got {type(data).__name__}")
    kind = data.get("kind", "native")  # directories from before `kind` are native
    if not isinstance(kind, str):
        raise ValueError(f"{file} is malformed: kind={kind!r} is not a string")
    return kind


def resolve_bundle_path(path: str | Path) -> Path:
    """A bundle path as given when it exists, else the shipped bundle it names (``chameleon_lite.shipped``).

    Lets ``tokenizer: tokenizers/shapes-64`` (the default of the native module) and the short name ``shapes-64``
    work from any directory, installed or not. The returned path may not exist; ``load_bundle`` then names it.
    """
    from chameleon_lite.shipped import resolve_path
    return resolve_path(path, kind="bundle")


def as_bundle(bundle: TokenizerBundle | str | Path) -> tuple[TokenizerBundle, str | None]:
    """A loaded bundle and the README text to copy with it (None: ``save_bundle`` writes its default)."""
    if isinstance(bundle, TokenizerBundle):
        return bundle, None
    path = resolve_bundle_path(bundle)
    loaded = load_bundle(path)
    readme = path / "README.md"
    return loaded, readme.read_text(encoding="utf-8") if readme.is_file() else None


def check_model_dir(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it is a directory holding config, weights and tokenizer; else FileNotFoundError."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR) if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(f"model directory {path} is missing {', '.join(missing)}")
    return path
