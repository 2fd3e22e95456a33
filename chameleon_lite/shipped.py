"""What ships with the package: the default tokenizer bundles (``tokenizers/<name>``) and every recipe
(``configs/**.yaml``), and the one function that turns a name into a path.

Where they are:

- in a wheel or a non-editable install, the build (``setup.py``) copies the repository's top-level ``tokenizers/``
  and ``configs/`` into ``chameleon_lite/_shipped/`` as package data;
- in a source checkout or an editable install (``pip install -e .``), they are read from the repository root
  beside the package, so an edit to a recipe takes effect at once.

``resolve_path(name)``: a path that exists wins (relative to the working directory, as the user typed it); else
a relative name is looked up among the shipped files: as written (``configs/native/demo.yaml``,
``tokenizers/shapes-32``: how recipes refer to each other and to bundles), then as a short name
(``native/tiny`` -> ``configs/native/tiny.yaml``, ``shapes-64`` -> ``tokenizers/shapes-64``). Nothing found: the
name comes back as given, so the loader that reads it names the missing path.

Nothing here imports torch; shipped files are read, never written.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["shipped_root", "resolve_path", "shipped_names", "describe_shipped"]

_PACKAGE_DIR = Path(__file__).resolve().parent
_KINDS = ("bundle", "config")


def shipped_root() -> Path | None:
    """The directory holding the shipped ``tokenizers/`` and ``configs/``; None when neither copy is there.

    ``chameleon_lite/_shipped`` (built into a wheel) comes first, then the repository root of a source checkout
    (recognised by its ``pyproject.toml``: beside an installed package, site-packages may hold other projects'
    top-level ``tokenizers``/``configs``, Hugging Face's ``tokenizers`` among them).
    """
    shipped, repo = _PACKAGE_DIR / "_shipped", _PACKAGE_DIR.parent
    for root, marker in ((shipped, shipped), (repo, repo / "pyproject.toml")):
        if marker.exists() and (root / "configs").is_dir() and (root / "tokenizers").is_dir():
            return root
    return None


def _candidates(name: str, kind: str | None) -> list[str]:
    """Paths relative to the shipped root that ``name`` may mean, most literal first."""
    out = [name]
    if kind in (None, "bundle"):
        out.append(f"tokenizers/{name}")
    if kind in (None, "config"):
        out += [f"configs/{name}", f"configs/{name}.yaml"]
    return out


def resolve_path(name: str | Path, kind: str | None = None) -> Path:
    """The path ``name`` refers to: itself when it exists, else the shipped file or bundle it names.

    Args:
        name: a path (absolute, or relative to the working directory), a path relative to the repository root as
            recipes write them (``tokenizers/shapes-32``, ``configs/native/demo.yaml``), or a short name
            (``shapes-64``, ``native/tiny``, ``compare/demo``).
        kind: ``"bundle"`` (a tokenizer bundle directory), ``"config"`` (a YAML recipe) or None (either).

    Returns ``Path(name)`` unchanged when it exists, is absolute, or matches nothing shipped (the caller's
    loader then reports it as missing).
    """
    if kind not in (None, *_KINDS):
        raise ValueError(f"kind={kind!r} must be one of {_KINDS} or None")
    path = Path(name).expanduser()
    if path.exists() or path.is_absolute():
        return path
    root = shipped_root()
    if root is None:
        return path
    for rel in _candidates(path.as_posix(), kind):
        candidate = root / rel
        if (candidate.is_dir() if kind == "bundle" else candidate.is_file() if kind == "config"
                else candidate.exists()):
            return candidate
    return path


def shipped_names(kind: str) -> list[str]:
    """Short names of what ships: ``"bundle"`` -> ``["shapes-32", ...]``, ``"config"`` -> ``["compare/demo", ...]``."""
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r} must be one of {_KINDS}")
    root = shipped_root()
    if root is None:
        return []
    if kind == "bundle":
        return sorted(p.name for p in (root / "tokenizers").iterdir() if (p / "tokenizer.yaml").is_file())
    configs = root / "configs"
    return sorted(p.relative_to(configs).with_suffix("").as_posix() for p in configs.rglob("*.yaml"))


def describe_shipped() -> str:
    """A few lines listing the shipped bundles and recipes by short name, and where they are read from."""
    root = shipped_root()
    if root is None:
        return "no shipped tokenizers/ or configs/ found beside the package"
    return "\n".join([
        f"shipped with chameleon-lite (read from {root}):",
        "  tokenizer bundles (--tokenizer NAME): " + ", ".join(shipped_names("bundle")),
        "  recipes (--config NAME): " + ", ".join(shipped_names("config")),
    ])
