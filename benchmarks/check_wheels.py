"""Check that the wheels in ``.whl/`` plus the GPU image's packages satisfy every requirement.

``benchmarks/gpu_wheels.sh`` downloads the wheels that a GPU machine without internet needs on top of its own
packages. This script checks that set without installing anything: starting from ``pyproject.toml``'s
dependencies (plus ``pytest`` and ``transformers``, which the CUDA tests and ``gpu_generation.py --vs-transformers``
import, and the ``xformers`` extra when an xformers wheel is present), it follows every ``Requires-Dist`` line
(environment markers evaluated for CPython 3.12.3 on x86-64 Linux, requested extras included) through the wheels'
``METADATA``, and resolves each requirement either to a wheel in ``.whl/`` (whose version must satisfy it) or to a
package of the GPU image (``GPU_IMAGE`` below). It also checks that there is one wheel per package, that every
wheel installs on CPython 3.12 / manylinux_2_28 x86-64 (file tag and ``Requires-Python``), and that no wheel is
left over (not reached from the roots).

On the GPU machine itself, after installing the wheels, ``--installed`` replaces the built-in ``GPU_IMAGE`` table
with the versions that ``importlib.metadata`` finds there (run it with the same ``PYTHONPATH``).

Usage::

    python benchmarks/check_wheels.py                 # here, against the built-in GPU image table
    PYTHONPATH=/tmp/site python3 benchmarks/check_wheels.py --installed   # on the GPU machine

Prints the resolution, then every problem; exits 1 if there is any. Needs ``packaging`` (and ``tomli`` on
Python 3.10).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent

# The GPU machine: CPython 3.12.3 on x86-64 Linux.
TARGET_PYTHON = "3.12.3"
TARGET_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]

# Roots besides pyproject's [project].dependencies: imported by tests/test_cuda.py and gpu_generation.py.
EXTRA_ROOTS = ("pytest", "transformers")

# What the GPU image provides: name -> (version, exact). exact=True: the version installed there (from the task
# description of the image). exact=False: a lower bound that an installed package's own hard requirement guarantees
# (e.g. torch 2.11.0 requires typing-extensions>=4.10.0). None: installed, version not known.
GPU_IMAGE: dict[str, tuple[str | None, bool]] = {
    # listed as installed
    "torch": ("2.11.0", True),
    "triton": ("3.6.0", True),
    "lightning": ("2.6.6", True),
    "pytorch-lightning": ("2.6.6", True),
    "transformers": ("5.17.0", True),
    "safetensors": ("0.8.0", True),
    "sentencepiece": ("0.2.2", True),
    "numpy": ("2.5.2", True),
    "einops": (None, False),
    "pillow": (None, False),
    "tqdm": ("4.60", False),  # also required by transformers 5.17.0 (tqdm>=4.60)
    "pyyaml": ("5.4", False),  # lightning 2.6.6 requires PyYAML>5.4
    "matplotlib": (None, False),
    "pytest": (None, False),
    # hard requirements of torch 2.11.0 (PyPI cp312 manylinux_2_28 wheel's METADATA)
    "typing-extensions": ("4.10.0", False),
    "sympy": ("1.13.3", False),
    "networkx": ("2.5.1", False),
    "filelock": (None, False),
    "jinja2": (None, False),
    "fsspec": ("2022.5.0", False),  # lightning 2.6.6: fsspec[http]>=2022.5.0
    "setuptools": (None, False),
    # hard requirements of lightning 2.6.6 / transformers 5.17.0
    "packaging": ("23.0", False),
    "lightning-utilities": ("0.10.0", False),
    "torchmetrics": (None, False),
    "huggingface-hub": ("1.5.0", False),
    "tokenizers": ("0.23.1", False),
    "regex": (None, False),
    "typer": (None, False),
}


@dataclass
class Wheel:
    """One downloaded wheel: its file, name, version and METADATA fields."""

    path: Path
    name: str
    version: Version
    tags: frozenset[Tag]
    requires_python: str | None
    requires_dist: list[str]


@dataclass
class Report:
    """What the walk found: resolution lines, assumptions and problems."""

    resolved: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_wheel(path: Path) -> Wheel:
    """Read a wheel's name, version, tags and METADATA (Requires-Python, Requires-Dist) with zipfile."""
    name, version, _build, tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as archive:
        metadata_names = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        if len(metadata_names) != 1:
            raise ValueError(f"{path.name}: expected one top-level *.dist-info/METADATA, found {metadata_names}")
        text = archive.read(metadata_names[0]).decode("utf-8")
    headers = text.split("\n\n", 1)[0].splitlines()
    requires_python = next((h.split(":", 1)[1].strip() for h in headers if h.startswith("Requires-Python:")), None)
    requires_dist = [h.split(":", 1)[1].strip() for h in headers if h.startswith("Requires-Dist:")]
    return Wheel(path, canonicalize_name(name), version, frozenset(tags), requires_python, requires_dist)


def target_tags() -> set[Tag]:
    """Wheel tags that pip on CPython 3.12 / manylinux_2_28 x86-64 accepts."""
    tags = set(cpython_tags(python_version=(3, 12), abis=["cp312", "abi3", "none"], platforms=TARGET_PLATFORMS))
    tags |= set(compatible_tags(python_version=(3, 12), interpreter="cp312", platforms=TARGET_PLATFORMS))
    return tags


def marker_environment(extra: str) -> dict[str, str]:
    """PEP 508 marker values of the GPU machine (whatever this machine is), with ``extra`` set."""
    env = default_environment()
    env.update(
        python_version="3.12",
        python_full_version=TARGET_PYTHON,
        implementation_name="cpython",
        implementation_version=TARGET_PYTHON,
        platform_python_implementation="CPython",
        os_name="posix",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        extra=extra,
    )
    return env


def applies(requirement: Requirement, extras: frozenset[str]) -> bool:
    """True when the requirement's marker holds on the GPU machine for one of the requested ``extras`` (or none)."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate(marker_environment(extra)) for extra in ("", *sorted(extras)))


def image_satisfies(spec: SpecifierSet, entry: tuple[str | None, bool]) -> bool | None:
    """True/False when the image's known version decides ``spec``; None when it cannot be decided (assumed)."""
    version, exact = entry
    if not spec:
        return True
    if version is None:
        return None
    if exact:
        return spec.contains(version, prereleases=True)
    # A guaranteed lower bound decides only lower-bound clauses that it meets.
    lower_bound = Version(version)
    for clause in spec:
        if clause.operator not in (">=", ">") or Version(clause.version) > lower_bound:
            return None
        if clause.operator == ">" and Version(clause.version) == lower_bound:
            return None
    return True


def installed_image() -> dict[str, tuple[str | None, bool]]:
    """The current environment's distributions as an exact-version table (for ``--installed``)."""
    table: dict[str, tuple[str | None, bool]] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            table.setdefault(canonicalize_name(name), (dist.version, True))
    return table


def roots(pyproject: Path, with_xformers: bool) -> list[Requirement]:
    """The requirements the walk starts from: pyproject dependencies, ``EXTRA_ROOTS``, optionally xformers."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"]) + list(EXTRA_ROOTS)
    if with_xformers:
        lines += project["optional-dependencies"]["xformers"]
    return [Requirement(line) for line in lines]


def walk(wheels: dict[str, Wheel], image: dict[str, tuple[str | None, bool]], start: list[Requirement]) -> Report:
    """Resolve every applicable requirement reachable from ``start``; wheels shadow the image (PYTHONPATH first)."""
    report = Report()
    seen: set[tuple[str, frozenset[str]]] = set()
    queue: list[tuple[Requirement, str]] = [(req, "pyproject/roots") for req in start]
    while queue:
        req, parent = queue.pop(0)
        name = canonicalize_name(req.name)
        label = f"{req} (from {parent})"
        if name in wheels:
            wheel = wheels[name]
            if req.specifier and not req.specifier.contains(wheel.version, prereleases=True):
                report.problems.append(f"{label}: the wheel has {wheel.version}")
                continue
            report.resolved.append(f"{label} -> wheel {wheel.path.name}")
            key = (name, frozenset(req.extras))
            if key in seen:
                continue
            seen.add(key)
            for line in wheel.requires_dist:
                child = Requirement(line)
                if applies(child, frozenset(req.extras)):
                    queue.append((child, f"{wheel.name} {wheel.version}"))
        elif name in image:
            verdict = image_satisfies(req.specifier, image[name])
            version, exact = image[name]
            shown = "version unknown" if version is None else (version if exact else f">={version}")
            if verdict is False:
                report.problems.append(f"{label}: the GPU image has {name} {shown}")
            elif verdict is None:
                report.assumed.append(f"{label}: GPU image has {name} ({shown}), assumed to satisfy it")
            else:
                report.resolved.append(f"{label} -> GPU image {name} {shown}")
            if req.extras:
                report.assumed.append(f"{label}: extras {sorted(req.extras)} of an image package not followed")
        else:
            report.problems.append(f"{label}: MISSING (no wheel in .whl/ and not in the GPU image)")
    reached = {name for name, _extras in seen}
    for name in sorted(set(wheels) - reached):
        report.problems.append(f"{wheels[name].path.name}: not needed by anything (left over)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel-dir", type=Path, default=REPO_ROOT / ".whl", help="folder with the wheels")
    parser.add_argument("--pyproject", type=Path, default=REPO_ROOT / "pyproject.toml")
    parser.add_argument("--installed", action="store_true",
                        help="resolve against this environment's installed packages instead of the built-in table")
    args = parser.parse_args(argv)

    paths = sorted(args.wheel_dir.glob("*.whl"))
    if not paths:
        print(f"no wheels in {args.wheel_dir}", file=sys.stderr)
        return 1
    problems: list[str] = []
    wheels: dict[str, Wheel] = {}
    accepted = target_tags()
    for path in paths:
        wheel = read_wheel(path)
        if wheel.name in wheels:
            problems.append(f"two wheels of {wheel.name}: {wheels[wheel.name].path.name} and {path.name}")
        wheels[wheel.name] = wheel
        if not wheel.tags & accepted:
            problems.append(f"{path.name}: no tag installable on CPython 3.12 manylinux_2_28 x86-64")
        if wheel.requires_python and not SpecifierSet(wheel.requires_python).contains(TARGET_PYTHON):
            problems.append(f"{path.name}: Requires-Python {wheel.requires_python} excludes {TARGET_PYTHON}")

    image = installed_image() if args.installed else GPU_IMAGE
    report = walk(wheels, image, roots(args.pyproject, with_xformers="xformers" in wheels))
    problems += report.problems

    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} wheels, {total / 2**20:.2f} MiB in {args.wheel_dir}")
    for line in dict.fromkeys(report.resolved):
        print(f"  ok       {line}")
    for line in dict.fromkeys(report.assumed):
        print(f"  assumed  {line}")
    for line in problems:
        print(f"  PROBLEM  {line}")
    print("all requirements satisfied" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
