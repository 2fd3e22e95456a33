"""``chameleon-lite data import`` (issue 17): a folder of images with captions and questions becomes train/val/test
shards that the package's readers and pre-tokenizer take; bad input is counted, never fatal or silent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chameleon_lite.data.folder_import import import_folder
from chameleon_lite.data.readers import pair_dataset, qa_dataset

REPO = Path(__file__).resolve().parents[1]


def _photo(path: Path, seed: int, size=(24, 20), fmt: str | None = None) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    rows = []
    for i in range(40):
        name = f"sub/img{i:02d}.png" if i % 2 else f"img{i:02d}.jpg"
        _photo(root / name, i)
        rows.append({"file": name, "caption": f"a photo number {i}", "label": str(i % 3)})
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 20)  # a JPEG header, no image
    (root / "thin.png").parent.mkdir(exist_ok=True)
    _photo(root / "thin.png", 99, size=(200, 2))  # aspect ratio 100: the readers skip it
    _photo(root / "uncaptioned.png", 98)
    rows += [{"file": "broken.jpg", "caption": "broken"}, {"file": "thin.png", "caption": "thin"},
             {"file": "missing.jpg", "caption": "not there"}, {"file": "img00.jpg", "caption": "again"},
             {"file": "img02.jpg", "caption": "  "}]
    with open(root / "captions.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(root / "qa.jsonl", "w") as f:
        for i in range(0, 40, 4):
            name = f"sub/img{i:02d}.png" if i % 2 else f"img{i:02d}.jpg"
            record = {"file": name, "question": "what number?", "answer": str(i), "category": "count"}
            f.write(json.dumps(record) + "\n")
        f.write(json.dumps({"file": "nope.png", "question": "q", "answer": "a"}) + "\n")
    return root


def test_import_writes_splits_the_readers_take_and_counts_every_skip(folder, tmp_path):
    out = tmp_path / "data"
    summary = import_folder(folder, out, captions=folder / "captions.jsonl", qa=folder / "qa.jsonl", val=0.1,
                            test=0.2, seed=0, progress=False)
    assert sum(summary.pairs.values()) == 40  # img02's later blank caption is counted, its first one kept
    assert all(summary.pairs[s] > 0 for s in ("train", "val", "test"))
    assert dict(summary.skipped) == {"corrupt_image": 1, "extreme_aspect_ratio": 1, "caption_for_missing_file": 1,
                                     "duplicate_caption": 1, "empty_caption": 1, "image_without_caption": 1,
                                     "question_for_missing_file": 1}
    assert summary.examples["image_without_caption"] == ["uncaptioned.png"]
    record = json.loads((out / "import.json").read_text())
    assert record["pairs"] == summary.pairs and record["skipped"]["corrupt_image"] == 1
    sources: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        pairs = list(pair_dataset(str(out / split / "pairs-*.tar")))
        assert len(pairs) == summary.pairs[split]
        sources[split] = {p["meta"]["source"] for p in pairs}
        for p in pairs:
            assert p["meta"]["split"] == split and p["text"].startswith("a photo number")
            n = int(p["meta"]["source"].split("img")[1][:2])
            assert p["meta"]["extra"] == {"label": str(n % 3)}
        if summary.questions[split]:
            for q in qa_dataset(str(out / split / "qa-*.tar")):  # a question lives in its image's split
                assert q["meta"]["source"] in sources[split] and q["category"] == "count"
    assert not (sources["train"] & sources["test"]) and not (sources["train"] & sources["val"])
    assert sum(summary.questions.values()) == 10
    # JPEG and PNG bytes are written as given
    jpg = next(p for p in pair_dataset(str(out / "*" / "pairs-*.tar")) if p["meta"]["source"] == "img00.jpg")
    original = Image.open(folder / "img00.jpg").convert("RGB")
    assert np.array_equal(np.asarray(jpg["image"]), np.asarray(original))


def test_the_split_is_seeded_and_stable_when_images_are_added(folder, tmp_path):
    first = import_folder(folder, tmp_path / "a", captions=folder / "captions.jsonl", seed=3, progress=False)
    again = import_folder(folder, tmp_path / "b", captions=folder / "captions.jsonl", seed=3, progress=False)
    assert first.pairs == again.pairs

    def split_of(out: Path) -> dict[str, str]:
        return {p["meta"]["source"]: p["meta"]["split"] for p in pair_dataset(str(out / "*" / "pairs-*.tar"))}

    before = split_of(tmp_path / "a")
    _photo(folder / "new.png", 7)
    with open(folder / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file": "new.png", "caption": "a new photo"}) + "\n")
    import_folder(folder, tmp_path / "c", captions=folder / "captions.jsonl", seed=3, progress=False)
    after = split_of(tmp_path / "c")
    assert {k: after[k] for k in before} == before and "new.png" in after
    other = import_folder(folder, tmp_path / "d", captions=folder / "captions.jsonl", seed=4, progress=False)
    assert split_of(tmp_path / "d") != after or other.pairs != first.pairs


def test_sidecar_captions_and_csv(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    for i in range(6):
        _photo(root / f"{i}.webp", i, fmt="WEBP")
        (root / f"{i}.txt").write_text(f"caption {i}\n")
    summary = import_folder(root, tmp_path / "side", val=0.0, test=0.0, progress=False)
    assert summary.pairs["train"] == 6 and not summary.skipped
    texts = sorted(p["text"] for p in pair_dataset(str(tmp_path / "side" / "train" / "pairs-*.tar")))
    assert texts == [f"caption {i}" for i in range(6)]
    (root / "c.csv").write_text("file,caption\n0.webp,zero\n1.webp,\"one, with a comma\"\n")
    summary = import_folder(root, tmp_path / "csv", captions=root / "c.csv", val=0.0, test=0.0, progress=False)
    assert summary.pairs["train"] == 2 and summary.skipped["image_without_caption"] == 4
    (root / "bad.csv").write_text("path,text\n0.webp,zero\n")
    with pytest.raises(ValueError, match="'file' and 'caption'"):
        import_folder(root, tmp_path / "bad", captions=root / "bad.csv", progress=False)
    (root / "bad.jsonl").write_text('{"file": "0.webp", "caption": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        import_folder(root, tmp_path / "bad2", captions=root / "bad.jsonl", progress=False)


def test_import_never_replaces_what_it_did_not_write(folder, tmp_path):
    out = tmp_path / "data"
    (out / "train").mkdir(parents=True)
    (out / "train" / "pairs-000000.tar").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        import_folder(folder, out, captions=folder / "captions.jsonl", progress=False)
    assert (out / "train" / "pairs-000000.tar").read_bytes() == b"mine"
    assert not (out / "val").exists() and not (out / "import.json").exists()
    ours = tmp_path / "ours"
    import_folder(folder, ours, captions=folder / "captions.jsonl", progress=False)
    with pytest.raises(ValueError, match="overwrite"):
        import_folder(folder, ours, captions=folder / "captions.jsonl", progress=False)
    import_folder(folder, ours, captions=folder / "captions.jsonl", overwrite=True, progress=False)


@pytest.mark.skipif(not (REPO / "tokenizers" / "shapes-32").is_dir(), reason="needs the shipped shapes-32 bundle")
def test_imported_shards_pre_tokenize(folder, tmp_path):
    from chameleon_lite.data.pretokenize import tokenize_shards
    from chameleon_lite.tokenization.bundle import load_bundle
    out = tmp_path / "data"
    summary = import_folder(folder, out, captions=folder / "captions.jsonl", qa=folder / "qa.jsonl", val=0.1,
                            test=0.2, progress=False)
    stats = tokenize_shards(load_bundle(REPO / "tokenizers" / "shapes-32"), str(out / "train" / "*.tar"),
                            tmp_path / "tokens", num_workers=0, progress=False)
    assert stats.samples == summary.pairs["train"] + summary.questions["train"]


def test_an_unreadable_folder_or_bad_fractions_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        import_folder(tmp_path / "none", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="val"):
        import_folder(tmp_path / "empty", tmp_path / "o", val=0.6, test=0.5)
    with pytest.raises(ValueError, match="no usable image-caption pairs"):
        import_folder(tmp_path / "empty", tmp_path / "o", progress=False)
