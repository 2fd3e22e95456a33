"""Issue 14 for the data and report writers: nothing deletes or overwrites a file the package did not write.

``write_shards`` (and through it ``write_shapes_world`` and ``tokenize_shards``), ``tokens.yaml``, ``world.yaml``,
``compare``'s report files and seed folders, and the demo: a user's file of a colliding name survives byte for byte
and the call is refused before anything is written; the package's own earlier output is replaced.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from chameleon_lite.data.shards import write_shards
from chameleon_lite.safe_io import MANIFEST_FILE, manifest_kind, read_manifest, write_dir

USER_BYTES = b"my own file, not chameleon_lite's\n"


def _pairs(n: int, tag: str = "a") -> list[dict]:
    return [{"__key__": f"{tag}{i:03d}", "txt": f"text {tag} {i}", "json": {"i": i}} for i in range(n)]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _user_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(USER_BYTES)
    return path


# ---------------------------------------------------------------------------------------------- write_shards
@pytest.mark.parametrize("overwrite", [True, False])
def test_write_shards_refuses_a_shard_it_did_not_write(tmp_path, overwrite):
    mine = _user_file(tmp_path / "qa-000000.tar")
    _user_file(tmp_path / "notes.txt")
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"qa-000000\.tar exists, but chameleon_lite did not write it.*Move it"):
        write_shards(_pairs(3), tmp_path, prefix="qa", progress=False, overwrite=overwrite)
    assert _snapshot(tmp_path) == before and mine.read_bytes() == USER_BYTES  # nothing written, nothing deleted


def test_write_shards_never_truncates_a_file_named_like_its_temporary(tmp_path):
    """The old writer opened ``qa-000000.tar.tmp`` with "wb" and renamed it over the shard: that file was lost."""
    mine = _user_file(tmp_path / "qa-000000.tar.tmp")
    paths = write_shards(_pairs(3), tmp_path, prefix="qa", progress=False)
    assert [p.name for p in paths] == ["qa-000000.tar"] and mine.read_bytes() == USER_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_FILE, "qa-000000.tar", "qa-000000.tar.tmp"]


def test_write_shards_manifest_accumulates_and_a_rewrite_replaces_only_its_prefix(tmp_path):
    pairs = write_shards(_pairs(6), tmp_path, prefix="pairs", max_count=2, progress=False)
    qa = write_shards(_pairs(5, "q"), tmp_path, prefix="qa", max_count=2, progress=False)
    assert manifest_kind(tmp_path) == "data"
    assert read_manifest(tmp_path) == sorted(p.name for p in pairs + qa)  # several prefixes share one manifest
    _user_file(tmp_path / "qa-notes.txt")
    _user_file(tmp_path / "qa-extra.tar")  # not a shard name of prefix qa: not ours, not touched
    kept = {k: v for k, v in _snapshot(tmp_path).items()
            if k.startswith("pairs-") or k in ("qa-notes.txt", "qa-extra.tar")}

    new = write_shards(_pairs(2, "r"), tmp_path, prefix="qa", max_count=2, progress=False, overwrite=True)
    assert [p.name for p in new] == ["qa-000000.tar"]
    assert not (tmp_path / "qa-000001.tar").exists() and not (tmp_path / "qa-000002.tar").exists()  # ours: gone
    after = _snapshot(tmp_path)
    assert {k: after[k] for k in kept} == kept and len(kept) == 5  # pairs shards and the user's qa-* files intact
    assert read_manifest(tmp_path) == sorted([p.name for p in pairs] + ["qa-000000.tar"])

    _user_file(tmp_path / "qa-000007.tar")  # a user's file that looks like a shard: the rewrite is refused
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"qa-000007\.tar"):
        write_shards(_pairs(2, "s"), tmp_path, prefix="qa", progress=False, overwrite=True)
    assert _snapshot(tmp_path) == before
    os.remove(tmp_path / "qa-000007.tar")  # moved away: the package's own shards are replaced again
    write_shards(_pairs(2, "s"), tmp_path, prefix="qa", progress=False, overwrite=True)
    with pytest.raises(ValueError, match="already exist"):  # overwrite=False still refuses the package's own
        write_shards(_pairs(2, "s"), tmp_path, prefix="qa", progress=False)


def test_data_and_model_directories_are_not_mixed(tmp_path):
    model = write_dir(tmp_path / "model", lambda d: (d / "config.yaml").write_text("a: 1\n"), kind="native")
    with pytest.raises(FileExistsError, match="'native' directory, not 'data'"):
        write_shards(_pairs(2), model, prefix="pairs", progress=False)
    data = tmp_path / "data"
    write_shards(_pairs(2), data, prefix="pairs", progress=False)
    before = _snapshot(data)
    with pytest.raises(FileExistsError, match="holds chameleon_lite's data output"):  # would delete the shards
        write_dir(data, lambda d: (d / "config.yaml").write_text("a: 1\n"), kind="native")
    assert _snapshot(data) == before


# ---------------------------------------------------------------------------------------------- world and tokens
def _tiny_spec():
    from chameleon_lite.world.shapes_world import ShapesWorldSpec

    spec = ShapesWorldSpec(train=3, val=2, test=2, seed=1, questions_per_scene=2, shard_size=2)
    spec.world.image_size, spec.world.grid, spec.world.max_objects = 32, 2, 2
    return spec


@pytest.mark.parametrize("name", ["world.yaml", "train/pairs-000000.tar", "test/docs-000001.tar"])
def test_shapes_world_refuses_a_colliding_file_and_replaces_its_own(tmp_path, name):
    from chameleon_lite.world.shapes_world import load_world_spec, write_shapes_world

    out = tmp_path / "world"
    mine = _user_file(out / name)
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=name.split("/")[-1].replace(".", r"\.")):
        write_shapes_world(_tiny_spec(), out, progress=False)
    assert _snapshot(out) == before and mine.read_bytes() == USER_BYTES  # refused before anything was generated
    mine.unlink()

    write_shapes_world(_tiny_spec(), out, progress=False)
    assert read_manifest(out) == ["world.yaml"]
    assert read_manifest(out / "train") == ["docs-000000.tar", "docs-000001.tar", "pairs-000000.tar",
                                            "pairs-000001.tar", "qa-000000.tar", "qa-000001.tar", "qa-000002.tar"]
    _user_file(out / "train" / "README.md")
    smaller = _tiny_spec()
    smaller.train, smaller.seed = 1, 2
    write_shapes_world(smaller, out, progress=False)  # its own earlier output: replaced, stale shards removed
    assert load_world_spec(out).seed == 2
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "README.md", "docs-000000.tar", MANIFEST_FILE, "pairs-000000.tar", "qa-000000.tar"]
    assert (out / "train" / "README.md").read_bytes() == USER_BYTES


@pytest.fixture(scope="module")
def bundle_and_raw(tmp_path_factory):
    from chameleon_lite.shipped import resolve_path
    from chameleon_lite.tokenization.bundle import load_bundle
    from chameleon_lite.world.shapes_world import write_shapes_world
    raw = tmp_path_factory.mktemp("raw") / "world"
    write_shapes_world(_tiny_spec(), raw, progress=False)
    return load_bundle(resolve_path("shapes-32", kind="bundle")), raw


@pytest.mark.parametrize("name", ["tokens.yaml", "qa-000000.tar"])
def test_tokenize_refuses_a_colliding_file_and_replaces_its_own(tmp_path, bundle_and_raw, name):
    from chameleon_lite.data.pretokenize import RECORD_FILE, tokenize_shards

    bundle, raw = bundle_and_raw
    out = tmp_path / "tokens"
    mine = _user_file(out / name)
    with pytest.raises(FileExistsError, match=name.replace(".", r"\.")):
        tokenize_shards(bundle, str(raw / "train"), out, num_workers=0, shard_size=2, progress=False)
    assert _snapshot(out) == {name: USER_BYTES}  # refused before any shard was written (pairs come first)
    mine.unlink()

    _user_file(out / "notes.txt")
    tokenize_shards(bundle, str(raw / "train"), out, num_workers=0, shard_size=2, progress=False)
    first = read_manifest(out)
    assert RECORD_FILE in first and "pairs-000000.tar" in first and "qa-000000.tar" in first
    tokenize_shards(bundle, str(raw / "train"), out, num_workers=0, shard_size=2, progress=False)  # its own: again
    assert read_manifest(out) == first and (out / RECORD_FILE).is_file()
    assert (out / "notes.txt").read_bytes() == USER_BYTES


# ---------------------------------------------------------------------------------------------- compare and demo
@dataclass
class _DecoderConfig:
    d_model: int = 8


class _FakeModel:
    class decoder:  # noqa: N801 - stands for the attribute
        config = _DecoderConfig()

    class bundle:  # noqa: N801
        image_tokenizer = None


def _arm_result(arm: str) -> dict:
    cat = {"correct": 1, "total": 2, "accuracy": 0.5}
    result = {
        "qa": {"by_category": {"count": cat}, "overall": cat, "pope": {}, "held_out": {}, "records": [],
               "chance": {"count": {"chance": 0.5, "majority_answer": "1"}}},
        "captioning": {"n_samples": 1, "bleu_4": 0.1, "cider_d": 0.2},
        "cost": {"visual_tokens_per_image": 6, "latency": {"ttft_s": 0.01, "decode_tokens_per_s": 100.0},
                 "parameters": dict.fromkeys(("encoder", "projector", "decoder", "embeddings", "total"), 1)},
    }
    return result, []


@pytest.fixture
def fast_compare(monkeypatch):
    """``compare`` with training and evaluation replaced (instant); ``calls`` records what ran."""
    import chameleon_lite.comparison.run as run

    calls = []
    monkeypatch.setattr(run, "_load_world", lambda raw: calls.append("world") or SimpleNamespace(world=None))
    monkeypatch.setattr(run, "reference_answers_from_shards", lambda pattern: {})
    monkeypatch.setattr(run, "_world_summary", lambda spec, tokenizer: {})
    monkeypatch.setattr(run, "_load", lambda arm, model_dir, device="cpu": _FakeModel())
    monkeypatch.setattr(run, "_evaluate_arm", lambda arm, *a, **k: _arm_result(arm))
    monkeypatch.setattr(run, "precision_overrides", lambda precision: [])
    return calls


def _config(tmp_path: Path, seeds=(0,)):
    from chameleon_lite.comparison.config import CompareConfig

    cfg = CompareConfig(name="t", train_samples=1, seeds=list(seeds))
    cfg.data.raw, cfg.data.tokens = str(tmp_path / "raw"), str(tmp_path / "tokens")
    cfg.native.model_dir = cfg.baseline.model_dir = str(tmp_path / "models")  # nothing trained
    return cfg


@pytest.mark.parametrize("name", ["report.md", "metrics.json", "loss_curves.png", "seed1", "seed1/notes.txt"])
def test_compare_refuses_a_colliding_name_before_training(tmp_path, fast_compare, name):
    from chameleon_lite.comparison.run import compare

    out = tmp_path / "out"
    mine = _user_file(out / name)
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=r"did not write it"):
        compare(_config(tmp_path, seeds=(0, 1)), out, progress=False)
    assert fast_compare == []  # refused before the data was even read
    assert _snapshot(out) == before and mine.read_bytes() == USER_BYTES


def test_the_cli_reports_a_refusal_in_one_line(tmp_path, fast_compare):
    """`chameleon-lite compare --out` on a folder with the user's report.md exits with the refusal, no traceback."""
    from omegaconf import OmegaConf

    from chameleon_lite.cli import main

    config = tmp_path / "compare.yaml"
    OmegaConf.save(OmegaConf.structured(_config(tmp_path)), config)
    out = tmp_path / "out"
    mine = _user_file(out / "report.md")
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--config", str(config), "--out", str(out), "--no-progress"])
    message = str(exit_info.value.code)
    assert message.startswith("chameleon-lite compare: ") and "report.md" in message and "did not write it" in message
    assert mine.read_bytes() == USER_BYTES and fast_compare == []


def test_compare_records_its_output_and_replaces_it_on_a_rerun(tmp_path, fast_compare):
    from chameleon_lite.comparison.run import compare

    out = tmp_path / "out"
    _user_file(out / "notes.md")
    _user_file(out / "data" / "report.md")  # another folder's file of the same name: not compare's business
    compare(_config(tmp_path), out, progress=False)
    assert manifest_kind(out) == "compare"
    assert read_manifest(out) == ["accuracy_per_category.png", "metrics.json", "report.md", "seed0"]
    (out / "loss_curves.png").write_bytes(b"x")  # as if an earlier run of ours had made it
    data = json.loads((out / MANIFEST_FILE).read_text())
    data["files"] = sorted([*data["files"], "loss_curves.png"])
    (out / MANIFEST_FILE).write_text(json.dumps(data))
    compare(_config(tmp_path), out, progress=False)  # its own earlier output: replaced
    assert not (out / "loss_curves.png").exists()  # a plot of ours this run did not make is removed
    assert read_manifest(out) == ["accuracy_per_category.png", "metrics.json", "report.md", "seed0"]
    assert (out / "notes.md").read_bytes() == USER_BYTES == (out / "data" / "report.md").read_bytes()
    assert json.loads((out / "metrics.json").read_text())["name"] == "t"


def test_demo_runs_on_a_fresh_and_on_its_own_out_and_refuses_a_users_report(tmp_path, fast_compare):
    from chameleon_lite.comparison.demo import demo

    world = {"train": 3, "val": 2, "test": 2, "seed": 1, "questions_per_scene": 2,
             "world": {"image_size": 32, "grid": 2, "max_objects": 2}}
    demo_overrides = [f"native.model_dir={tmp_path / 'm'}", f"baseline.model_dir={tmp_path / 'm'}"]
    out = tmp_path / "demo"
    _user_file(out / "notes.md")
    report = demo(out, overrides=demo_overrides, world=world, progress=False)
    assert report == out / "report.md" and read_manifest(out / "tokens" / "train")
    report = demo(out, overrides=demo_overrides, world=world, progress=False)  # reuses data and tokens
    world["seed"] = 2
    report = demo(out, overrides=demo_overrides, world=world, progress=False)  # regenerates them in place
    assert report.is_file() and (out / "notes.md").read_bytes() == USER_BYTES
    assert "seed: 2" in (out / "data" / "world.yaml").read_text()

    other = tmp_path / "other"
    mine = _user_file(other / "report.md")
    with pytest.raises(FileExistsError, match=r"report\.md exists, but chameleon_lite did not write it"):
        demo(other, overrides=demo_overrides, world=world, progress=False)
    assert _snapshot(other) == {"report.md": USER_BYTES} and mine.read_bytes() == USER_BYTES  # no data made either


@pytest.mark.parametrize("name", ["curve.md", "samples-20", "samples-10/report.md"])
def test_learning_curve_refuses_a_colliding_name_before_any_budget_runs(tmp_path, monkeypatch, name):
    import chameleon_lite.comparison.run as run
    from chameleon_lite.comparison.learning_curve import learning_curve

    calls = []
    monkeypatch.setattr(run, "compare", lambda *a, **k: calls.append(a))
    config = tmp_path / "c.yaml"
    config.write_text("name: t\ntrain_samples: 1\nseeds: [0]\n")
    out = tmp_path / "curve"
    mine = _user_file(out / name)
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=r"did not write it"):
        learning_curve(config, out, [10, 20, 40, 80], progress=False)
    assert calls == [] and _snapshot(out) == before and mine.read_bytes() == USER_BYTES
