"""The shapes world written to shards and read back: identical, deterministic, worker-count independent."""

import hashlib
import shutil
import tarfile

import numpy as np
import pytest
import torch

from chameleon_lite.cli import main
from chameleon_lite.data.readers import interleaved_dataset, pair_dataset, qa_dataset
from chameleon_lite.safe_io import read_manifest
from chameleon_lite.world.questions import CATEGORIES
from chameleon_lite.world.scenes import Scene
from chameleon_lite.world.shapes_world import ShapesWorldSpec, iter_samples, load_world_spec, write_shapes_world
from chameleon_lite.world.splits import SPLITS


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    spec = ShapesWorldSpec(train=400, val=8, test=8, seed=3, shard_size=100)
    out = tmp_path_factory.mktemp("shapes")
    counts = write_shapes_world(spec, out, progress=False)
    return spec, out, counts


def _digest(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).digest() for p in directory.rglob("*.tar")}


def test_pairs_read_back_identical(world):
    spec, out, counts = world
    assert counts["train"]["pairs"] == 400 and len(list((out / "train").glob("pairs-*.tar"))) == 4
    read = list(pair_dataset(str(out / "train" / "pairs-*.tar")))
    expected = list(iter_samples(spec, "train", "pairs"))
    assert [s["key"] for s in read] == [e["__key__"] for e in expected]
    for got, want in zip(read, expected):
        assert got["text"] == want["txt"]
        assert got["meta"] == want["json"]
        assert np.array_equal(np.asarray(got["image"]), np.asarray(want["png"]))
        assert Scene.from_dict(got["meta"]["scene"]).objects  # scenes are never empty


def test_qa_and_docs_read_back_identical(world):
    spec, out, counts = world
    qa = list(qa_dataset(str(out / "train" / "qa-*.tar")))
    expected = list(iter_samples(spec, "train", "qa"))
    assert len(qa) == counts["train"]["qa"] == len(expected)
    assert [(q["question"], q["answer"], q["category"]) for q in qa] == [
        (e["json"]["question"], e["json"]["answer"], e["json"]["category"]) for e in expected
    ]
    assert {q["category"] for q in qa} == set(CATEGORIES)
    docs = list(interleaved_dataset(str(out / "train" / "docs-*.tar")))
    assert len(docs) == 400
    for doc, want in zip(docs[:50], iter_samples(spec, "train", "docs")):
        kinds = ["text" if isinstance(s, str) else "image" for s in doc["segments"]]
        assert kinds == ["text", "image", "text", "image"]  # caption, scene, edit, edited scene
        assert doc["segments"][0] == want["json"]["segments"][0]["text"]
        assert np.array_equal(np.asarray(doc["segments"][3]), np.asarray(want["1.png"]))


def test_regeneration_is_byte_identical(world, tmp_path):
    spec, out, _ = world
    small = ShapesWorldSpec(train=120, val=8, test=8, seed=3, shard_size=250)
    write_shapes_world(small, tmp_path / "a", progress=False)
    write_shapes_world(small, tmp_path / "b", progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert load_world_spec(tmp_path / "a") == small
    # the first 120 training scenes of the 400-scene world are the same scenes
    first = [s["text"] for s in pair_dataset(str(out / "train" / "pairs-*.tar"))][:120]
    assert first == [s["text"] for s in pair_dataset(str(tmp_path / "a" / "train" / "pairs-*.tar"))]


@pytest.mark.parametrize("seeded_shuffle", [False, True])
def test_same_samples_with_one_or_two_workers(world, seeded_shuffle):
    _, out, _ = world

    def read(num_workers):
        ds = pair_dataset(str(out / "train" / "pairs-*.tar"), shuffle_shards=seeded_shuffle, seed=7)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
        return [(s["key"], s["text"]) for s in loader]

    one, two = read(1), read(2)
    assert len(one) == 400 and sorted(one) == sorted(two)
    assert read(2) == two  # same worker count, same order


def test_splits_are_disjoint_and_held_out_only_in_test(world):
    spec, out, _ = world
    held = {tuple(c) for c in spec.held_out}
    for split in ("train", "val"):
        for s in pair_dataset(str(out / split / "pairs-*.tar")):
            combos = {(o["color"], o["shape"]) for o in s["meta"]["scene"]["objects"]}
            assert not combos & held, (split, s["key"])
            assert s["meta"]["held_out"] == []
    assert any(s["meta"]["held_out"] for s in pair_dataset(str(out / "test" / "pairs-*.tar")))


def test_cli_data_shapes(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path), "--train", "5", "--val", "2", "--test", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_world_spec(tmp_path).train == 5
    assert len(list(pair_dataset(str(tmp_path / "val" / "pairs-*.tar")))) == 2
    assert not (tmp_path / "val_held_out").exists()  # 0 by default

    out = tmp_path / "with-valB"
    assert main(["data", "shapes", "--out", str(out), "--train", "5", "--val", "2", "--test", "2",
                 "--val-held-out", "3"]) == 0
    assert load_world_spec(out).val_held_out == 3
    held = [s["meta"]["held_out"] for s in pair_dataset(str(out / "val_held_out" / "pairs-*.tar"))]
    assert len(held) == 3 and all(held)
    questions = list(qa_dataset(str(out / "val_held_out" / "qa-*.tar")))
    assert questions and all(q["meta"]["split"] == "val_held_out" for q in questions)
    assert _digest(out / "train") == _digest(tmp_path / "train")  # the other splits are as without it


# ------------------------------------------------------------------------------------------ parallel generation
def _small_world(**kwargs):
    spec = ShapesWorldSpec(train=60, val=10, test=10, val_held_out=9, seed=5, shard_size=7, **kwargs)
    spec.world.image_size, spec.world.grid, spec.world.max_objects = 32, 2, 3
    return spec


def _stream(directory):
    """Every member (name, bytes) of every shard, in the order readers see them: split, kind, shard, member."""
    members = []
    for split in SPLITS:
        for kind in ("pairs", "qa", "docs"):
            for path in sorted((directory / split).glob(f"{kind}-*.tar")):
                with tarfile.open(path) as tar:
                    members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return members


def _assert_manifests_exact(directory):
    assert read_manifest(directory) == ["world.yaml"]
    assert sorted(p.name for p in directory.iterdir()) == sorted(["manifest.json", "world.yaml", *SPLITS])
    for split in SPLITS:  # and no temporary folder left
        files = sorted(p.name for p in (directory / split).iterdir() if p.name != "manifest.json")
        assert files and read_manifest(directory / split) == files


@pytest.fixture(scope="module")
def sequential_and_parallel(tmp_path_factory):
    spec = _small_world()
    root = tmp_path_factory.mktemp("parallel")
    one = write_shapes_world(spec, root / "one", progress=False)
    three = write_shapes_world(spec, root / "three", progress=False, num_workers=3)
    return spec, root, one, three


def test_iter_samples_start_stop_keeps_each_scene():
    spec = _small_world()
    whole = list(iter_samples(spec, "train", "qa"))
    part = list(iter_samples(spec, "train", "qa", 5, 9))
    inside = [s for s in whole if 5 <= int(s["__key__"].split("-")[1]) < 9]
    assert [s["__key__"] for s in part] == [s["__key__"] for s in inside]
    assert {s["json"]["scene_key"] for s in part} == {f"train-{i:07d}" for i in range(5, 9)}
    for got, want in zip(part, inside):
        assert got["json"] == want["json"] and np.array_equal(np.asarray(got["png"]), np.asarray(want["png"]))
    assert [s["__key__"] for s in iter_samples(spec, "val", "pairs", 8)] == ["val-0000008", "val-0000009"]
    assert list(iter_samples(spec, "val", "pairs", 3, 3)) == []


def test_parallel_world_has_the_samples_of_the_sequential_one(sequential_and_parallel):
    spec, root, one, three = sequential_and_parallel
    assert one == three and one["train"]["qa"] > one["train"]["pairs"] == 60
    members = _stream(root / "one")
    assert _stream(root / "three") == members  # every key and byte, in order
    # pairs: png, txt, json; qa: png, json; docs: json and two images (the scene and the edited scene)
    assert len(members) == sum(3 * c["pairs"] + 2 * c["qa"] + 3 * c["docs"] for c in one.values())
    assert (root / "one" / "world.yaml").read_bytes() == (root / "three" / "world.yaml").read_bytes()
    # the chunks' shards are numbered on: a reader sees the sequential order
    assert [s["key"] for s in pair_dataset(str(root / "three" / "train" / "pairs-*.tar"))] == [
        f"train-{i:07d}" for i in range(60)]
    assert len(list((root / "three" / "train").glob("qa-*.tar"))) >= len(list((root / "one" / "train").glob("qa-*")))


def test_parallel_world_manifests_list_exactly_its_shards(sequential_and_parallel):
    _, root, _, _ = sequential_and_parallel
    _assert_manifests_exact(root / "one")
    _assert_manifests_exact(root / "three")


def test_parallel_rerun_replaces_its_own_shards_and_refuses_others(sequential_and_parallel, tmp_path):
    _, root, _, _ = sequential_and_parallel
    out = tmp_path / "world"
    shutil.copytree(root / "three", out)
    (out / "train" / "README.md").write_text("mine\n")
    smaller = _small_world()
    smaller.train, smaller.seed = 20, 6
    stranger = out / "val" / "qa-000099.tar"
    stranger.write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="qa-000099.tar"):  # refused before anything is generated
        write_shapes_world(smaller, out, progress=False, num_workers=2)
    assert stranger.read_bytes() == b"not ours"
    stranger.unlink()
    assert _stream(out) == _stream(root / "three")

    counts = write_shapes_world(smaller, out, progress=False, num_workers=2)
    assert counts == write_shapes_world(smaller, tmp_path / "sequential", progress=False)
    assert _stream(out) == _stream(tmp_path / "sequential")  # no stale shard of the larger world is left
    assert load_world_spec(out) == smaller and (out / "train" / "README.md").read_text() == "mine\n"
    assert read_manifest(out / "train") == sorted(p.name for p in (out / "train").glob("*.tar"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_parallel_error_leaves_no_temporary_folder(tmp_path):
    spec = _small_world()
    spec.train, spec.val, spec.test, spec.shard_size = 4, 0, 0, 0  # write_shards refuses max_count=0 in the workers
    with pytest.raises(ValueError, match="max_count"):
        write_shapes_world(spec, tmp_path / "world", progress=False, num_workers=2)
    assert sorted(p.name for p in (tmp_path / "world").iterdir()) == []
    with pytest.raises(ValueError, match="num_workers"):
        write_shapes_world(spec, tmp_path / "world", progress=False, num_workers=0)


def test_cli_data_shapes_demo_world(tmp_path, capsys):
    from chameleon_lite.comparison.demo import DEMO_WORLD

    out = tmp_path / "demo"
    assert main(["data", "shapes", "--out", str(out), "--demo-world", "--train", "3", "--val", "1", "--test", "1",
                 "--num-workers", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    spec = load_world_spec(out)
    assert (spec.train, spec.val, spec.test) == (3, 1, 1)
    want = DEMO_WORLD["world"]
    assert (spec.world.image_size, spec.world.grid, spec.world.max_objects) == (32, 2, 3)
    assert list(spec.world.shapes) == want["shapes"] and list(spec.world.colors) == want["colors"]
    images = [s["image"] for s in pair_dataset(str(out / "train" / "pairs-*.tar"))]
    assert len(images) == 3 and all(image.size == (32, 32) for image in images)

    with pytest.raises(SystemExit, match="cannot be combined with --image-size"):
        main(["data", "shapes", "--out", str(tmp_path / "no"), "--demo-world", "--image-size", "64"])
    with pytest.raises(SystemExit, match="--grid, --max-objects"):
        main(["data", "shapes", "--out", str(tmp_path / "no"), "--demo-world", "--grid", "2", "--max-objects", "3"])
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "shapes", "--out", str(tmp_path / "no"), "--num-workers", "0"])
    assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
