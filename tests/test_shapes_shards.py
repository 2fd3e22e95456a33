"""The shapes world written to shards and read back: identical, deterministic, worker-count independent."""

import hashlib

import numpy as np
import pytest
import torch

from chameleon_lite.cli import main
from chameleon_lite.data.language import CATEGORIES
from chameleon_lite.data.readers import interleaved_dataset, pair_dataset, qa_dataset
from chameleon_lite.data.scenes import Scene
from chameleon_lite.data.shapes_world import ShapesWorldSpec, iter_samples, load_world_spec, write_shapes_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    spec = ShapesWorldSpec(train=1000, val=8, test=8, seed=3, shard_size=250)
    out = tmp_path_factory.mktemp("shapes")
    counts = write_shapes_world(spec, out, progress=False)
    return spec, out, counts


def _digest(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).digest() for p in directory.rglob("*.tar")}


def test_pairs_read_back_identical(world):
    spec, out, counts = world
    assert counts["train"]["pairs"] == 1000 and len(list((out / "train").glob("pairs-*.tar"))) == 4
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
    assert len(docs) == 1000
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
    # the first 120 training scenes of the 1000-scene world are the same scenes
    first = [s["text"] for s in pair_dataset(str(out / "train" / "pairs-000000.tar"))][:120]
    assert first == [s["text"] for s in pair_dataset(str(tmp_path / "a" / "train" / "pairs-*.tar"))]


@pytest.mark.parametrize("seeded_shuffle", [False, True])
def test_same_samples_with_one_or_two_workers(world, seeded_shuffle):
    _, out, _ = world

    def read(num_workers):
        ds = pair_dataset(str(out / "train" / "pairs-*.tar"), shuffle_shards=seeded_shuffle, seed=7)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
        return [(s["key"], s["text"]) for s in loader]

    one, two = read(1), read(2)
    assert len(one) == 1000 and sorted(one) == sorted(two)
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
