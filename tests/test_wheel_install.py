"""A non-editable install runs from anywhere: the wheel carries the shipped bundles and recipes.

Builds a wheel from a copy of the sources (``pip wheel --no-deps --no-build-isolation``: nothing downloaded),
installs it with ``--no-deps`` into a fresh virtual environment that sees this environment's dependencies
(torch, Lightning, ...) but not this checkout, then works from an empty directory: ``bundle-info shapes-32``,
``fit --config native/demo --print_config``, the resolver, and the demo's data and tokenize steps on a tiny world.
Nothing may be written into the installed package. About 30-40 s on a laptop CPU.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "chameleon_lite", "tokenizers", "configs")
BUNDLES = ("shapes-32", "shapes-48", "shapes-64")

pytestmark = pytest.mark.skipif(not all((REPO / s).exists() for s in SOURCES), reason="needs a source checkout")


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the checkout itself is left untouched)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(REPO / name, src / name)
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(tmp / "dist"), str(src)], tmp, env)
    (found,) = (tmp / "dist").glob("chameleon_lite-*.whl")
    return found


def test_wheel_carries_every_recipe_and_the_default_bundles(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (REPO / "configs").rglob("*.yaml"):
        assert f"chameleon_lite/_shipped/configs/{recipe.relative_to(REPO / 'configs').as_posix()}" in names
    for bundle in BUNDLES:
        for file in (REPO / "tokenizers" / bundle).iterdir():
            assert f"chameleon_lite/_shipped/tokenizers/{bundle}/{file.name}" in names
    assert not any(n.startswith(("tokenizers/", "configs/")) for n in names)  # no top-level package named tokenizers


def test_installed_wheel_runs_from_an_empty_directory(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        tmp_path, dict(os.environ)).strip())
    # this environment's dependencies as plain paths: their own .pth files (an editable install of this
    # checkout among them) are not processed, so `chameleon_lite` can only come from the wheel
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_NO_INPUT="1", CHAMELEON_LITE_CACHE=str(tmp_path / "cache"))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], tmp_path, env)
    installed = purelib / "chameleon_lite"
    before = _files(installed)

    work = tmp_path / "work"  # an empty directory, far from the checkout
    work.mkdir()
    cli = str(env_dir / "bin" / "chameleon-lite")
    info = _run([cli, "bundle-info", "shapes-32"], work, env)
    assert f"at {installed / '_shipped' / 'tokenizers' / 'shapes-32'}" in info and "grid 4x4" in info
    listed = _run([cli, "bundle-info"], work, env)
    assert all(b in listed for b in BUNDLES) and "compare/demo" in listed
    recipe = _run([cli, "fit", "--config", "native/demo", "--print_config"], work, env)
    assert "tokenizer: tokenizers/shapes-32" in recipe

    script = (
        "import json, chameleon_lite, chameleon_lite.shipped as s\n"
        "from chameleon_lite.comparison.demo import DEMO_CONFIG, prepare_demo_data\n"
        "from chameleon_lite.model.model_dir import resolve_bundle_path\n"
        "world = {'train': 8, 'val': 4, 'test': 4, 'seed': 0, 'world': {'image_size': 32, 'grid': 2, "
        "'max_objects': 2}}\n"
        "over = prepare_demo_data('out', DEMO_CONFIG, world=world, progress=False)\n"
        "print(json.dumps({'package': chameleon_lite.__file__, 'root': str(s.shipped_root()), "
        "'recipe': str(s.resolve_path('configs/native/demo.yaml')), 'bundle': str(resolve_bundle_path('shapes-64')),"
        " 'overrides': over}))\n"
    )
    got = json.loads(_run([str(python), "-c", script], work, env).strip().splitlines()[-1])
    assert Path(got["package"]).parent == installed  # the wheel's copy, not the checkout
    assert got["root"] == str(installed / "_shipped")
    assert got["recipe"] == str(installed / "_shipped" / "configs" / "native" / "demo.yaml")
    assert got["bundle"] == str(installed / "_shipped" / "tokenizers" / "shapes-64")
    assert f"data.tokenizer={installed / '_shipped' / 'tokenizers' / 'shapes-32'}" in got["overrides"]
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # everything under the directory the user named
    assert any((work / "out" / "tokens" / "train").iterdir()) and (work / "out" / "data" / "world.yaml").is_file()
    assert _files(installed) == before  # nothing written into site-packages
