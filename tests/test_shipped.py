"""Shipped recipes and tokenizer bundles are found by short name or by repository-relative path from any directory."""

from pathlib import Path

import pytest

from chameleon_lite.shipped import describe_shipped, resolve_path, shipped_names, shipped_root

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """An empty working directory outside the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_short_names_and_repo_paths_resolve_from_any_directory(elsewhere):
    root = shipped_root()
    assert root is not None
    assert resolve_path("native/tiny") == root / "configs/native/tiny.yaml"
    assert resolve_path("compare/demo", kind="config") == root / "configs/compare/demo.yaml"
    assert resolve_path("configs/native/demo.yaml") == root / "configs/native/demo.yaml"  # as recipes name recipes
    assert resolve_path("shapes-64", kind="bundle") == root / "tokenizers/shapes-64"
    assert resolve_path("tokenizers/shapes-32", kind="bundle") == root / "tokenizers/shapes-32"


def test_an_existing_path_wins_and_unknown_names_come_back_unchanged(elsewhere):
    (elsewhere / "shapes-64").mkdir()  # the user's own folder of that name
    assert resolve_path("shapes-64", kind="bundle") == Path("shapes-64")
    (elsewhere / "native").mkdir()
    (elsewhere / "native" / "tiny.yaml").write_text("{}\n")
    assert resolve_path("native/tiny.yaml") == Path("native/tiny.yaml")
    assert resolve_path("no-such-bundle", kind="bundle") == Path("no-such-bundle")
    assert resolve_path("/abs/missing.yaml") == Path("/abs/missing.yaml")
    assert resolve_path("shapes-64", kind="config") == Path("shapes-64")  # a bundle is not a recipe
    with pytest.raises(ValueError, match="kind"):
        resolve_path("shapes-64", kind="tokenizer")


def test_every_recipe_and_bundle_in_the_repository_is_listed():
    configs = sorted(p.relative_to(REPO / "configs").with_suffix("").as_posix()
                     for p in (REPO / "configs").rglob("*.yaml"))
    assert shipped_names("config") == configs
    assert {"shapes-32", "shapes-48", "shapes-64"} <= set(shipped_names("bundle"))
    text = describe_shipped()
    assert "shapes-32" in text and "compare/demo" in text


def test_cli_lists_and_reads_shipped_bundles(elsewhere, capsys):
    from chameleon_lite.cli import build_parser, main

    assert main(["bundle-info"]) == 0
    listed = capsys.readouterr().out
    assert "shapes-64" in listed and "native/tiny" in listed
    assert main(["bundle-info", "--list"]) == 0
    assert capsys.readouterr().out == listed
    assert main(["bundle-info", "shapes-32"]) == 0
    assert "grid 4x4" in capsys.readouterr().out
    assert "compare/demo" in build_parser().format_help()  # --help names what ships
    assert list(elsewhere.iterdir()) == []  # nothing written where the user stands


def test_lightning_config_args_resolve_shipped_recipes(elsewhere):
    from chameleon_lite.training.lightning_cli import resolve_config_args

    root = shipped_root()
    got = resolve_config_args(["fit", "--config", "native/tiny", "-c", "configs/native/demo.yaml",
                               "--config=compare/demo", "--trainer.max_steps=1"])
    assert got == ["fit", "--config", str(root / "configs/native/tiny.yaml"), "-c",
                   str(root / "configs/native/demo.yaml"), f"--config={root / 'configs/compare/demo.yaml'}",
                   "--trainer.max_steps=1"]


def test_shipped_root_prefers_the_wheel_copy_and_ignores_unrelated_site_packages(tmp_path, monkeypatch):
    import chameleon_lite.shipped as shipped

    site = tmp_path / "site-packages"
    for name in ("tokenizers", "configs"):  # another project's top-level folders (HF's tokenizers is one)
        (site / name).mkdir(parents=True)
    monkeypatch.setattr(shipped, "_PACKAGE_DIR", site / "chameleon_lite")
    assert shipped.shipped_root() is None  # no pyproject.toml: not a source checkout
    assert shipped.resolve_path("shapes-64", kind="bundle") == Path("shapes-64")
    for name in ("tokenizers/shapes-64", "configs/native"):
        (site / "chameleon_lite" / "_shipped" / name).mkdir(parents=True)
    (site / "chameleon_lite" / "_shipped" / "configs/native/tiny.yaml").write_text("{}\n")
    assert shipped.shipped_root() == site / "chameleon_lite" / "_shipped"
    assert shipped.resolve_path("native/tiny") == site / "chameleon_lite/_shipped/configs/native/tiny.yaml"
