"""Shard writing (chameleon_lite.data.shards) and robust streaming readers (chameleon_lite.data.readers)."""

from __future__ import annotations

import copy
import io
import json
import logging
import multiprocessing
import pickle
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chameleon_lite.data.readers import (
    REPAIR_REASONS,
    SKIP_REASONS,
    ImageLimits,
    ReadStats,
    interleaved_dataset,
    list_shards,
    pair_dataset,
    qa_dataset,
)
from chameleon_lite.data.shards import write_shards
from chameleon_lite.safe_io import read_manifest

# ----------------------------------------------------------------------------------------------- helpers


def _noise(seed: int, size=(12, 10), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8), mode)


def _encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    return _encode(image, "PNG")


def _with_png_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite a PNG's IHDR width/height (and its CRC): a header that lies about the size."""
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return data[:16] + bytes(ihdr) + crc + data[33:]


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _pair_members(key: str, seed: int = 0) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", _png(_noise(seed))), (f"{key}.txt", f"caption {key}".encode()), (f"{key}.json", b"{}")]


def _pairs(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "__key__": f"{i:06d}",
            "png": _noise(i),
            "txt": f"a caption for sample {i} — ünïcode",
            "json": {"z": i, "a": [1, 2], "nested": {"b": 1, "a": 2}},
        }
        for i in range(start, start + n)
    ]


def _keys(samples) -> list[str]:
    return [s["key"] for s in samples]


def _loader(ds, num_workers: int, **kw):
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers, **kw)


@pytest.fixture(scope="module")
def six_shards(tmp_path_factory) -> Path:
    """6 shards x 5 pair samples (30 in all)."""
    out = tmp_path_factory.mktemp("six")
    write_shards(_pairs(30), out, prefix="train", max_count=5, progress=False)
    return out


# ------------------------------------------------------------------------------------------- writing


def test_write_then_read_round_trip_is_identical(tmp_path):
    samples = _pairs(10)
    paths = write_shards(samples, tmp_path, prefix="train", max_count=4, progress=False)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(tmp_path.iterdir()) == [tmp_path / "manifest.json", *paths]  # no temporary files
    assert read_manifest(tmp_path) == [p.name for p in paths]  # each shard is listed as the package's
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        raw_json = tar.extractfile("000000.json").read()
        assert {(m.mtime, m.uname) for m in tar.getmembers()} == {(0, "bigdata")}  # reproducible headers
    assert names[:3] == ["000000.json", "000000.png", "000000.txt"]
    assert raw_json == json.dumps(samples[0]["json"], sort_keys=True, ensure_ascii=False).encode()

    ds = pair_dataset(tmp_path / "train-{000000..000002}.tar")
    read = list(ds)
    assert _keys(read) == [s["__key__"] for s in samples]
    for written, got in zip(samples, read):
        assert got["text"] == written["txt"]
        assert got["meta"] == written["json"]
        assert got["image"].mode == "RGB"
        np.testing.assert_array_equal(np.asarray(got["image"]), np.asarray(written["png"]))  # pixel-exact
    assert ds.stats == ReadStats(good=10)


def test_write_is_byte_deterministic(tmp_path):
    first = write_shards(_pairs(7), tmp_path / "a", max_count=3, progress=False)
    second = write_shards(_pairs(7), tmp_path / "b", max_count=3, progress=False)
    assert [p.name for p in first] == [p.name for p in second] == [f"shard-00000{i}.tar" for i in range(3)]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))


def test_write_bytes_pass_through_and_jpeg(tmp_path):
    raw_png = _png(_noise(1))
    ramp = np.linspace(0, 255, 32, dtype=np.uint8)
    image = Image.fromarray(np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128), axis=-1).astype(np.uint8))
    samples = [
        {"__key__": "bytes", "png": raw_png, "txt": "x"},
        {"__key__": "jpeg", "jpg": image, "txt": "y", "__url__": "ignored metadata"},
    ]
    (path,) = write_shards(samples, tmp_path, progress=False, total=2)
    with tarfile.open(path) as tar:
        assert tar.extractfile("bytes.png").read() == raw_png
        assert sorted(tar.getnames()) == ["bytes.png", "bytes.txt", "jpeg.jpg", "jpeg.txt"]
    read = {s["key"]: s for s in pair_dataset(path)}
    np.testing.assert_array_equal(np.asarray(read["bytes"]["image"]), np.asarray(_noise(1)))
    error = np.abs(np.asarray(read["jpeg"]["image"], dtype=float) - np.asarray(image, dtype=float)).mean()
    assert error < 3  # lossy, but the same picture


@pytest.mark.parametrize(
    "sample, match",
    [
        ({"__key__": "a.b", "txt": "x"}, "contains '.'"),
        ({"__key__": "", "txt": "x"}, "non-empty"),
        ({"__key__": "a/b", "txt": "x"}, "contains '/'"),
        ({"__key__": 3, "txt": "x"}, "must be a str"),
        ({"txt": "x"}, "no '__key__'"),
        ({"__key__": "k"}, "no members"),
        ({"__key__": "k", "jpg": Image.new("RGBA", (4, 4))}, "JPEG"),
        ({"__key__": "k", "txt": 1.5}, "don't know how to encode"),
        ({"__key__": "k", "json": {"x": float("nan")}}, "not JSON"),
        ({"__key__": "k", "json": {"segments": [{"image": "0.png"}]}}, "not in sample"),
        ({"__key__": "k", "txt.png": Image.new("RGB", (4, 4)), "txt": "x", "gif": Image.new("RGB", (4, 4))}, "gif"),
    ],
)
def test_write_rejects_bad_samples(tmp_path, sample, match):
    with pytest.raises(ValueError, match=match):
        write_shards([_pairs(1)[0], sample], tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # the shard being written is removed


def test_write_rejects_duplicates_and_existing_shards(tmp_path):
    with pytest.raises(ValueError, match="duplicate sample key"):
        write_shards(_pairs(2) + _pairs(1), tmp_path / "dup", progress=False)
    write_shards(_pairs(6), tmp_path, max_count=2, progress=False)
    with pytest.raises(ValueError, match="already exist"):
        write_shards(_pairs(2), tmp_path, max_count=2, progress=False)
    paths = write_shards(_pairs(2), tmp_path, max_count=2, progress=False, overwrite=True)
    assert sorted(tmp_path.glob("shard-*.tar")) == paths  # stale shard-000001/2 are gone
    assert write_shards([], tmp_path / "empty", progress=False) == []
    assert list((tmp_path / "empty").iterdir()) == []


# ------------------------------------------------------------------------------- QA and interleaved


def test_qa_and_interleaved_round_trip(tmp_path):
    qa = [
        {"__key__": "q0", "png": _noise(0), "json": {"question": "How many?", "answer": "2", "category": "counting"}},
        {"__key__": "q1", "png": _noise(1), "json": {"question": "Is it red?", "answer": "no"}},  # no category
    ]
    write_shards(qa, tmp_path / "qa", progress=False)
    got = list(qa_dataset(tmp_path / "qa"))
    assert [(s["key"], s["question"], s["answer"], s["category"]) for s in got] == [
        ("q0", "How many?", "2", "counting"),
        ("q1", "Is it red?", "no", ""),
    ]
    assert got[0]["meta"] == qa[0]["json"]
    np.testing.assert_array_equal(np.asarray(got[1]["image"]), np.asarray(_noise(1)))

    segments = [{"text": "First"}, {"image": "0.png"}, {"text": "then"}, {"image": "1.png"}, {"image": "0.png"}]
    doc = {"__key__": "doc0", "json": {"segments": segments}, "0.png": _noise(5), "1.png": _noise(6)}
    (path,) = write_shards([doc], tmp_path / "il", progress=False)
    with tarfile.open(path) as tar:
        assert sorted(tar.getnames()) == ["doc0.0.png", "doc0.1.png", "doc0.json"]
    (read,) = list(interleaved_dataset(path, image_transform=np.asarray))
    assert read["key"] == "doc0"
    assert read["segments"][0] == "First" and read["segments"][2] == "then"
    for i, seed in [(1, 5), (3, 6), (4, 5)]:
        np.testing.assert_array_equal(read["segments"][i], np.asarray(_noise(seed)))  # transform applied


# ---------------------------------------------------------------------------------------- shard lists


def test_list_shards_patterns(six_shards):
    expected = [str(six_shards / f"train-{i:06d}.tar") for i in range(6)]
    assert list_shards(str(six_shards / "train-{000000..000005}.tar")) == expected
    assert list_shards(six_shards) == expected
    assert list_shards(str(six_shards / "train-*.tar")) == expected
    assert list_shards([expected[3], six_shards / "train-00000{0,1}.tar"]) == [expected[3]] + expected[:2]
    assert list_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]  # remote/pipe URLs are not checked
    with pytest.raises(ValueError, match="not found"):
        list_shards(str(six_shards / "train-{000000..000006}.tar"))
    with pytest.raises(ValueError, match="more than once"):
        list_shards([expected[0], expected[0]])
    with pytest.raises(ValueError, match="matches no files"):
        list_shards(str(six_shards / "val-*.tar"))


# --------------------------------------------------------------------------- order, workers, nodes


def test_order_across_workers_and_seeded_shuffle(six_shards):
    all_keys = [f"{i:06d}" for i in range(30)]
    assert _keys(pair_dataset(six_shards)) == all_keys  # no shuffle by default: file order
    for num_workers in (1, 2):
        once = _keys(_loader(pair_dataset(six_shards), num_workers))
        assert sorted(once) == all_keys
        assert _keys(_loader(pair_dataset(six_shards), num_workers)) == once

    def shuffled(num_workers, seed=7, epoch=0):
        ds = pair_dataset(six_shards, shuffle_shards=True, shuffle_buffer=8, seed=seed)
        ds.set_epoch(epoch)
        return _keys(_loader(ds, num_workers))

    for num_workers in (0, 2):
        order = shuffled(num_workers)
        assert sorted(order) == all_keys and order != all_keys
        assert shuffled(num_workers) == order  # reproducible run to run for a fixed worker count
    shard_shuffled = pair_dataset(six_shards, shuffle_shards=True, seed=7)
    shard_order = [int(key) // 5 for key in _keys(shard_shuffled)][::5]  # 5 samples per shard, in file order
    assert shard_order == [int(Path(s).stem[-6:]) for s in shard_shuffled.shards_for()] != list(range(6))
    assert shuffled(0, seed=8) != shuffled(0) and sorted(shuffled(0, seed=8)) == all_keys
    assert shuffled(0, epoch=1) != shuffled(0)  # set_epoch gives a new permutation


def _read_keys_per_rank(urls, world_size: int, num_workers: int = 0, **kw) -> list[list[str]]:
    return [
        _keys(_loader(pair_dataset(urls, rank=rank, world_size=world_size, **kw), num_workers))
        for rank in range(world_size)
    ]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_split_by_node_is_disjoint_and_complete(six_shards, num_workers):
    rank0, rank1 = _read_keys_per_rank(six_shards, 2, num_workers, shuffle_shards=True, seed=3)
    assert set(rank0).isdisjoint(rank1)
    assert sorted(rank0 + rank1) == [f"{i:06d}" for i in range(30)]
    assert len(rank0) == len(rank1) == 15  # 3 whole shards each
    ds = pair_dataset(six_shards, shuffle_shards=True, seed=3)
    assert sorted(ds.shards_for(0, 2) + ds.shards_for(1, 2)) == ds.shards


def test_split_by_node_from_environment(six_shards, monkeypatch):
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(_keys(pair_dataset(six_shards)))
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"{i:06d}" for i in range(30)]


def test_rank_travels_to_spawned_workers(six_shards, monkeypatch):
    """A spawn-started DataLoader worker has no process group; the pickled dataset carries the parent's rank."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = pair_dataset(six_shards)
    as_sent_to_worker = pickle.loads(pickle.dumps(ds))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert _keys(as_sent_to_worker) == _keys(pair_dataset(six_shards, rank=1, world_size=2))
    assert len(_keys(pair_dataset(six_shards))) == 30


def _distributed_reader(rank: int, store: str, shard_dir: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        keys = _keys(_loader(pair_dataset(shard_dir), num_workers=2))
        queue.put((rank, keys))
    finally:
        torch.distributed.destroy_process_group()


def test_split_by_node_from_torch_distributed(six_shards, tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    store = str(tmp_path / "store")
    procs = [context.Process(target=_distributed_reader, args=(r, store, str(six_shards), queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert set(results[0]).isdisjoint(results[1])
    assert sorted(results[0] + results[1]) == [f"{i:06d}" for i in range(30)]


# ------------------------------------------------------------------------------------ robust decoding


def _cmyk_jpeg() -> bytes:
    return _encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return _encode(Image.new("RGB", (16, 8), (0, 128, 0)), "JPEG", exif=exif.tobytes())


def _truncated_png() -> bytes:
    data = _png(_noise(9, size=(32, 32)))
    return data[: len(data) // 2]


def _grey16_png() -> bytes:
    return _png(Image.fromarray(np.array([[0, 1000, 65535, 32768]], dtype=np.uint16)))


# case id -> (members of the "bad" sample, with "K" as its key; expected skip reason or repair reason)
PAIR_CASES = {
    "truncated": ([("K.png", _truncated_png()), ("K.txt", b"t")], "skip", "corrupt_image"),
    "not_an_image": ([("K.jpg", b"<html>404 not found</html>"), ("K.txt", b"t")], "skip", "not_an_image"),
    "broken_header": ([("K.jpg", b"\xff\xd8\xff" + b"garbage" * 9), ("K.txt", b"t")], "skip", "corrupt_image"),
    "zero_bytes": ([("K.png", b""), ("K.txt", b"t")], "skip", "empty_image"),
    "zero_width": ([("K.png", _with_png_size(_png(_noise(0)), 0, 10)), ("K.txt", b"t")], "skip", "empty_image"),
    "wide_20000": ([("K.png", _png(Image.new("L", (20000, 16)))), ("K.txt", b"t")], "skip", "extreme_aspect_ratio"),
    "bomb_header": (
        [("K.png", _with_png_size(_png(_noise(0)), 20000, 20000)), ("K.txt", b"t")],
        "skip",
        "image_too_large",
    ),
    "bomb_warning_range": (  # 1e8 pixels: PIL only warns (its error starts at ~1.8e8); our limit rejects
        [("K.png", _with_png_size(_png(_noise(0)), 10000, 10000)), ("K.txt", b"t")],
        "skip",
        "image_too_large",
    ),
    "no_image": ([("K.txt", b"t"), ("K.json", b"{}")], "skip", "missing_image"),
    "no_caption": ([("K.png", _png(_noise(0)))], "skip", "missing_text"),
    "blank_caption": ([("K.png", _png(_noise(0))), ("K.txt", b" \n")], "skip", "missing_text"),
    "bad_utf8": ([("K.png", _png(_noise(0))), ("K.txt", b"caf\xe9 \xff")], "skip", "invalid_utf8"),
    "bad_json": ([("K.png", _png(_noise(0))), ("K.txt", b"t"), ("K.json", b"{not json")], "repair", "invalid_json"),
    "cmyk": ([("K.jpg", _cmyk_jpeg()), ("K.txt", b"t")], "repair", "cmyk_to_rgb"),
    "greyscale": ([("K.png", _png(Image.new("L", (8, 8), 77))), ("K.txt", b"t")], "repair", "grey_to_rgb"),
    "palette": ([("K.png", _png(_noise(0).quantize(16))), ("K.txt", b"t")], "repair", "palette_to_rgb"),
    "16bit": ([("K.png", _grey16_png()), ("K.txt", b"t")], "repair", "high_bit_depth_to_rgb"),
    "rgba": ([("K.png", _png(_noise(0, mode="RGBA"))), ("K.txt", b"t")], "repair", "alpha_on_white"),
    "la": ([("K.png", _png(Image.new("LA", (8, 8), (10, 0)))), ("K.txt", b"t")], "repair", "alpha_on_white"),
    "exif": ([("K.jpg", _exif_rotated_jpeg()), ("K.txt", b"t")], "repair", "exif_orientation"),
}


@pytest.mark.parametrize("case", sorted(PAIR_CASES))
def test_pair_bad_input_is_counted_and_good_samples_survive(tmp_path, case):
    members, kind, reason = PAIR_CASES[case]
    shard = _write_tar(
        tmp_path / "s.tar", _pair_members("good0", 1) + members + _pair_members("good1", 2) + _pair_members("good2", 3)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no DecompressionBombWarning escapes
        ds = pair_dataset(shard)
        samples = {s["key"]: s for s in ds}
    good = {"good0", "good1", "good2"}
    if kind == "skip":
        assert set(samples) == good
        assert ds.stats == ReadStats(good=3, skipped={reason: 1})
    else:
        assert set(samples) == good | {"K"}
        assert ds.stats == ReadStats(good=4, repaired={reason: 1})
        assert samples["K"]["image"].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(samples["good1"]["image"]), np.asarray(_noise(2)))
    assert reason in (SKIP_REASONS if kind == "skip" else REPAIR_REASONS)


def _read_single_repaired(tmp_path, members) -> dict:
    (sample,) = list(pair_dataset(_write_tar(tmp_path / "one.tar", members)))
    return sample


def test_repairs_give_the_right_pixels(tmp_path):
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 10, 0)  # fully transparent -> white
    rgba[0, 1] = (200, 10, 10, 255)  # opaque -> unchanged
    rgba[0, 2] = (0, 0, 0, 128)  # half black on white -> mid grey
    members = [("K.png", _png(Image.fromarray(rgba))), ("K.txt", b"t")]
    pixels = np.asarray(_read_single_repaired(tmp_path, members)["image"])
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 1].tolist() == [200, 10, 10]
    assert abs(int(pixels[0, 2, 0]) - 127) <= 1 and len(set(pixels[0, 2].tolist())) == 1

    grey16 = np.asarray(_read_single_repaired(tmp_path, [("K.png", _grey16_png()), ("K.txt", b"t")])["image"])
    assert grey16[0, :, 0].tolist() == [0, 4, 255, 128]  # scaled by 1/257, not clipped

    cmyk = np.asarray(_read_single_repaired(tmp_path, [("K.jpg", _cmyk_jpeg()), ("K.txt", b"t")])["image"])
    assert np.abs(cmyk.astype(int) - [255, 0, 0]).max() < 8

    transparent_la = [("K.png", _png(Image.new("LA", (2, 2), (10, 0)))), ("K.txt", b"t")]
    assert (np.asarray(_read_single_repaired(tmp_path, transparent_la)["image"]) == 255).all()

    rotated = _read_single_repaired(tmp_path, [("K.jpg", _exif_rotated_jpeg()), ("K.txt", b"t")])["image"]
    assert rotated.size == (8, 16)


def test_explicit_pixel_limit_and_image_only_mode(tmp_path):
    shard = _write_tar(
        tmp_path / "s.tar",
        [("big.png", _png(_noise(0, size=(40, 40)))), ("big.txt", b"t")]
        + [("nocap.png", _png(_noise(1)))]
        + [("badcap.png", _png(_noise(2))), ("badcap.txt", b"\xff\xfe")],
    )
    strict = pair_dataset(shard, limits=ImageLimits(max_pixels=1000))
    assert _keys(strict) == []
    assert strict.stats.skipped == {"image_too_large": 1, "missing_text": 1, "invalid_utf8": 1}
    image_only = pair_dataset(shard, require_text=False, image_transform=lambda image: image.size)
    assert [(s["key"], s["text"], s["image"]) for s in image_only] == [
        ("big", "t", (40, 40)),
        ("nocap", "", (12, 10)),
        ("badcap", "", (12, 10)),
    ]
    assert image_only.stats == ReadStats(good=3, repaired={"invalid_utf8": 1})
    with pytest.raises(ValueError, match="max_pixels"):
        ImageLimits(max_pixels=0)


def _qa_members(key: str, meta: bytes | None, seed: int = 0) -> list[tuple[str, bytes]]:
    members = [(f"{key}.png", _png(_noise(seed)))]
    return members + ([(f"{key}.json", meta)] if meta is not None else [])


@pytest.mark.parametrize(
    "meta, reason",
    [
        (b'{"question": "What colour?", "category": "colour"}', "missing_field"),
        (b'{"question": "What colour?", "answer": "", "category": "colour"}', "missing_field"),
        (b'{"question": "What colour?", "answer": ', "invalid_json"),
        (b'["question", "answer"]', "invalid_json"),
        (None, "missing_json"),
    ],
)
def test_qa_bad_input(tmp_path, meta, reason):
    ok = b'{"question": "q", "answer": "a", "category": "c"}'
    shard = _write_tar(tmp_path / "qa.tar", _qa_members("a", ok) + _qa_members("bad", meta) + _qa_members("b", ok, 1))
    ds = qa_dataset(shard)
    assert _keys(ds) == ["a", "b"]
    assert ds.stats == ReadStats(good=2, skipped={reason: 1})


def _doc_members(key: str, segments, images: dict[str, bytes]) -> list[tuple[str, bytes]]:
    meta = segments if isinstance(segments, bytes) else json.dumps({"segments": segments}).encode()
    return [(f"{key}.json", meta)] + [(f"{key}.{name}", data) for name, data in images.items()]


@pytest.mark.parametrize(
    "segments, images, reason",
    [
        ([{"text": "a"}, {"image": "1.png"}], {"0.png": _png(_noise(0))}, "missing_image"),
        ([{"text": "a"}, {"image": "0.png"}], {"0.png": _truncated_png()}, "corrupt_image"),
        ([{"text": "a"}, {"image": "0.png"}], {"0.png": b"GIF? no, text"}, "not_an_image"),
        (b'{"segments": [{"text": "a"}', {}, "invalid_json"),
        ([{"text": "a", "image": "0.png"}], {"0.png": _png(_noise(0))}, "invalid_segments"),
        ([], {}, "invalid_segments"),
        ([{"video": "0.mp4"}], {}, "invalid_segments"),
    ],
)
def test_interleaved_bad_input(tmp_path, segments, images, reason):
    good = _doc_members("d0", [{"text": "hi"}, {"image": "0.png"}], {"0.png": _png(_noise(4, mode="RGBA"))})
    good2 = _doc_members("d2", [{"text": "only text"}], {})
    shard = _write_tar(tmp_path / "il.tar", good + _doc_members("d1", segments, images) + good2)
    ds = interleaved_dataset(shard)
    docs = list(ds)
    assert _keys(docs) == ["d0", "d2"]
    assert docs[1]["segments"] == ["only text"]
    assert ds.stats == ReadStats(good=2, skipped={reason: 1}, repaired={"alpha_on_white": 1})


def test_truncated_tar_counts_once_and_keeps_other_shards(tmp_path):
    members = []
    for i in range(4):
        members += [(f"t{i}.png", _png(_noise(i, size=(40, 40)))), (f"t{i}.txt", b"t")]
    whole = _write_tar(tmp_path / "whole.tar", members).read_bytes()
    (tmp_path / "a-truncated.tar").write_bytes(whole[: len(whole) // 2 + 100])  # cut inside a member
    write_shards(_pairs(3), tmp_path, prefix="b-good", progress=False)
    ds = pair_dataset([tmp_path / "a-truncated.tar", tmp_path / "b-good-000000.tar"])
    # t0, t1 are complete before the cut (which is inside t2.png); the next shard is read in full
    assert _keys(ds) == ["t0", "t1", "000000", "000001", "000002"]
    assert ds.stats == ReadStats(good=5, skipped={"tar_error": 1})  # once per shard, not per failed member


def _mixed_shards(out: Path) -> dict[str, int]:
    """4 shards, each with 3 good pairs and one bad sample of a different kind; returns expected counts."""
    bad = [
        ("K.png", _truncated_png()),
        ("K.jpg", b"not an image"),
        ("K.png", _png(Image.new("L", (8, 8)))),  # repaired, not skipped
        ("K.png", _png(_noise(0))),  # no caption
    ]
    for i, (name, data) in enumerate(bad):
        members = _pair_members(f"s{i}g0", i) + _pair_members(f"s{i}g1", i + 10)
        members += [(name.replace("K", f"s{i}bad"), data)] + ([(f"s{i}bad.txt", b"t")] if i < 3 else [])
        members += _pair_members(f"s{i}g2", i + 20)
        _write_tar(out / f"mixed-{i:06d}.tar", members)
    skipped = {"skip/corrupt_image": 1, "skip/not_an_image": 1, "skip/missing_text": 1}
    return {"good": 13, **skipped, "repair/grey_to_rgb": 1}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stats_are_aggregated_from_workers(tmp_path, num_workers, caplog):
    expected = ReadStats.from_counts(_mixed_shards(tmp_path))
    ds = pair_dataset(tmp_path)
    with caplog.at_level(logging.INFO, logger="chameleon_lite.data.readers"):
        keys = _keys(_loader(ds, num_workers))
    assert len(keys) == 13 and len(set(keys)) == 13
    assert ds.stats == expected  # counted in the worker processes, read in the main process
    assert list(ds) and ds.stats == expected + expected  # counts accumulate over passes
    snapshot = copy.deepcopy(ds)  # shared memory can't be deep-copied: the copy carries a snapshot
    ds.reset_stats()
    assert ds.stats == ReadStats() and snapshot.stats == expected + expected
    assert pickle.loads(pickle.dumps(snapshot)).stats == snapshot.stats
    assert ds.log_summary() == ReadStats()
    if num_workers == 0:  # worker processes log in their own process; caplog sees the main process only
        assert any("13 good, 3 skipped" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "13 good, 3 skipped" in expected.summary()


@pytest.mark.slow
def test_stats_with_spawned_workers(tmp_path):
    expected = ReadStats.from_counts(_mixed_shards(tmp_path))
    ds = pair_dataset(tmp_path)
    keys = _keys(_loader(ds, 2, multiprocessing_context="spawn"))
    assert len(keys) == 13
    assert ds.stats == expected
