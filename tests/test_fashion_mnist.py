"""Fashion-MNIST through ``data import`` (issue 17): IDX files are read exactly, the official test split stays the
test split, and every image gets a caption and class / footwear / existence questions from its label."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from chameleon_lite.data.folder_import import import_folder
from chameleon_lite.data.readers import pair_dataset, qa_dataset
from chameleon_lite.world.fashion_mnist import CLASSES, FOOTWEAR, read_idx, write_fashion_mnist_folder
from chameleon_lite.world.language import with_article


def _idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    src = tmp_path / "fmnist"
    src.mkdir()
    for split, n in (("train", 30), ("t10k", 10)):
        _idx(src / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(src / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, gz=split == "train")  # raw files work too
    return src


def test_read_idx_is_exact_and_names_bad_files(idx_dir, tmp_path):
    labels = read_idx(idx_dir / "train-labels-idx1-ubyte.gz")
    assert labels.tolist() == [i % 10 for i in range(30)]
    assert read_idx(idx_dir / "t10k-images-idx3-ubyte.gz").shape == (10, 28, 28)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="5 bytes"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_imports_with_its_own_test_split(idx_dir, tmp_path):
    folder = tmp_path / "folder"
    assert write_fashion_mnist_folder(idx_dir, folder, train=20, test=10, seed=1) == {"train": 20, "test": 10}
    summary = import_folder(folder, tmp_path / "data", captions=folder / "captions.jsonl", qa=folder / "qa.jsonl",
                            val=0.2, test=0.0, progress=False)
    assert summary.pairs["test"] == 10 and summary.pairs["train"] + summary.pairs["val"] == 20
    assert summary.repaired["grey_to_rgb"] == 30 and not summary.skipped
    labels = {f"train/{i:05d}.png": CLASSES[i % 10] for i in range(20)}
    labels |= {f"test/{i:05d}.png": CLASSES[i % 10] for i in range(10)}
    for p in pair_dataset(str(tmp_path / "data" / "*" / "pairs-*.tar")):
        source = p["meta"]["source"]
        assert (p["meta"]["split"] == "test") == source.startswith("test/")
        assert labels[source] in p["text"] and p["meta"]["extra"]["label"] == labels[source]
    qa = list(qa_dataset(str(tmp_path / "data" / "*" / "qa-*.tar")))
    assert len(qa) == 90 and {q["category"] for q in qa} == {"class", "footwear", "existence"}
    for q in qa:
        name = labels[q["meta"]["source"]]
        if q["category"] == "class":
            assert q["answer"] == name
        elif q["category"] == "footwear":
            assert q["answer"] == ("yes" if name in FOOTWEAR else "no")
        else:
            own = q["question"] == f"Is there {with_article(name)} in this photo?"
            assert (q["answer"] == "yes") == own and q["meta"]["pope_type"] == ("positive" if own else "random")
    with pytest.raises(FileExistsError):
        write_fashion_mnist_folder(idx_dir, folder)


def test_a_bad_split_field_is_refused(tmp_path):
    from PIL import Image

    root = tmp_path / "p"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    (root / "c.jsonl").write_text(json.dumps({"file": "a.png", "caption": "x", "split": "holdout"}) + "\n")
    with pytest.raises(ValueError, match="c.jsonl:1: split='holdout'"):
        import_folder(root, tmp_path / "o", captions=root / "c.jsonl", progress=False)
