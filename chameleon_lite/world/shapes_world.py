"""Write the shapes world to webdataset shards (the layout img2dataset produces, plus QA and interleaved docs).

Output of :func:`write_shapes_world` (and ``chameleon-lite data shapes``)::

    OUT/world.yaml                      world config, held-out combos, seed, counts: everything to regenerate it
    OUT/{split}/pairs-000000.tar        KEY.png, KEY.txt (caption), KEY.json {"scene", "held_out"}
    OUT/{split}/qa-000000.tar           KEY.png, KEY.json {"question", "answer", "category", "pope_type", ...}
    OUT/{split}/docs-000000.tar         KEY.json {"segments": [{"text"}, {"image": "0.png"}, ...]}, KEY.0.png, ...
    OUT/manifest.json, OUT/{split}/manifest.json   what the package wrote there (``safe_io``; only that is replaced)

Every sample is a pure function of ``(seed, split, index)``: scenes come from the split's seeded stream
(:mod:`chameleon_lite.world.splits`) and the text about scene ``i`` from
``random.Random(f"{seed}/{split}/{i}/{kind}")``. That is what lets ``write_shapes_world(..., num_workers=N)`` render
chunks of scenes in N processes and still write the samples of ``num_workers=1``, in the same order. The processes
are started with ``spawn``, so, as for any spawning pool, the calling program must be importable: the CLI, a
script (with the usual ``if __name__ == "__main__":`` guard) or a notebook, not code piped into ``python -``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import random
import secrets
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from chameleon_lite.data.shards import DATA_KIND, check_shard_names, write_shards
from chameleon_lite.safe_io import check_listed, load_structured_yaml, record_files
from chameleon_lite.world.edits import make_document
from chameleon_lite.world.language import describe
from chameleon_lite.world.questions import make_questions
from chameleon_lite.world.render import render_scene
from chameleon_lite.world.scenes import Scene, WorldConfig
from chameleon_lite.world.splits import DEFAULT_HELD_OUT, SPLITS, CompositionalSplit

KINDS: tuple[str, ...] = ("pairs", "qa", "docs")
WORLD_FILE = "world.yaml"


@dataclass
class ShapesWorldSpec:
    """What to generate: sizes of each split, the world, held-out combos, seed."""

    train: int = 1000
    val: int = 200
    test: int = 200
    val_held_out: int = 0  # scenes of the second validation split, each around a held-out combo (splits.py)
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    held_out: list[list[str]] = field(default_factory=lambda: [list(c) for c in sorted(DEFAULT_HELD_OUT)])
    test_held_out_fraction: float = 0.5
    questions_per_scene: int | None = None  # None: one per category + a positive/negative existence pair
    edits_per_doc: int = 1
    shard_size: int = 2000

    def __post_init__(self) -> None:
        for name in SPLITS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def split(self) -> CompositionalSplit:
        return CompositionalSplit(
            held_out=frozenset(tuple(c) for c in self.held_out),
            config=self.world,
            test_held_out_fraction=self.test_held_out_fraction,
        )


def _key(split: str, index: int) -> str:
    return f"{split}-{index:07d}"


def iter_scenes(spec: ShapesWorldSpec, split: str) -> Iterator[tuple[int, Scene, tuple]]:
    """``(index, scene, held-out combos in it)`` for every scene of ``split``, in order."""
    yield from _scene_range(spec.split().sampler(split, spec.seed), 0, 0, getattr(spec, split))


def _scene_range(sampler: Any, first: int, start: int, stop: int) -> Iterator[tuple[int, Scene, tuple]]:
    """``(index, scene, held)`` for ``start <= index < stop`` from ``sampler``, whose next scene is scene ``first``;
    the scenes before ``start`` are drawn (the stream advances) and dropped."""
    for index in range(first, stop):
        scene, held = sampler.sample_flagged()
        if index >= start:
            yield index, scene, held


def iter_samples(
    spec: ShapesWorldSpec, split: str, kind: str, start: int = 0, stop: int | None = None
) -> Iterator[dict[str, Any]]:
    """The shard samples of one ``kind`` (``pairs``, ``qa`` or ``docs``) of ``split``, as write_shards takes them.

    Only the scenes ``start <= index < stop`` (``stop=None``: to the end of the split) are rendered and yielded;
    the scene stream still advances through the ones before ``start``, so each index keeps its scene.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
    if start < 0 or (stop is not None and stop < 0):
        raise ValueError(f"start and stop must be >= 0, got {start}, {stop}")
    sampler = spec.split().sampler(split, spec.seed)
    n = getattr(spec, split)
    stop = n if stop is None else min(stop, n)
    yield from _samples(spec, split, kind, _scene_range(sampler, 0, start, stop))


def _samples(
    spec: ShapesWorldSpec, split: str, kind: str, scenes: Iterable[tuple[int, Scene, tuple]]
) -> Iterator[dict[str, Any]]:
    """The samples of ``kind`` made from ``(index, scene, held)`` triples (``iter_samples``' body)."""
    # in val/test, excluding held-out combos from generated text is pointless (the scenes may contain them)
    exclude = spec.split().held_out if split == "train" else frozenset()
    size = spec.world.image_size
    for index, scene, held in scenes:
        key = _key(split, index)
        rng = random.Random(f"{spec.seed}/{split}/{index}/{kind}")
        meta = {"scene": scene.to_dict(), "held_out": [list(c) for c in held], "split": split}
        if kind == "pairs":
            yield {"__key__": key, "png": render_scene(scene, size), "txt": describe(scene, rng), "json": meta}
        elif kind == "qa":
            image = render_scene(scene, size)
            questions = make_questions(scene, rng, spec.world, n=spec.questions_per_scene, exclude_combos=exclude)
            for j, qa in enumerate(questions):
                yield {"__key__": f"{key}-q{j}", "png": image, "json": {**qa.to_dict(), **meta, "scene_key": key}}
        else:
            segments, images = [], {}
            for seg in make_document(scene, rng, spec.world, n_edits=spec.edits_per_doc, exclude_combos=exclude):
                if "image" in seg:
                    name = f"{len(images)}.png"
                    images[name] = render_scene(seg["image"], size)
                    segments.append({"image": name})
                else:
                    segments.append({"text": seg["text"]})
            yield {"__key__": key, "json": {"segments": segments, "split": split}, **images}


def write_shapes_world(
    spec: ShapesWorldSpec, out: str | Path, *, progress: bool = True, num_workers: int = 1
) -> dict[str, Any]:
    """Generate every split and kind into ``out`` and write ``out/world.yaml``; returns the written counts.

    ``out`` and its split folders are data directories (issue 14): what is written is listed in their
    ``manifest.json`` and a rerun replaces only that; a ``world.yaml`` or ``{pairs,qa,docs}-NNNNNN.tar`` the package
    did not write is refused with ``FileExistsError`` before anything is generated.

    ``num_workers > 1`` renders in that many processes: each ``(split, kind)`` is cut into chunks of scene indices,
    each chunk is written to shards in a private temporary folder ``out/.shards.tmp-*`` (removed at the end, also on
    an error), and the parent then moves the shards into place in order. The samples and their order are the same as
    with ``num_workers=1`` (byte for byte); only where one shard ends and the next begins may differ (a chunk's last
    shard can be short). Nothing in the split folders changes until every chunk is written.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
    out = Path(out)
    check_listed(out, [WORLD_FILE], kind=DATA_KIND)
    for split in SPLITS:
        if getattr(spec, split):
            for kind in KINDS:
                check_shard_names(out / split, kind)
    out.mkdir(parents=True, exist_ok=True)
    if num_workers == 1:
        counts = _write_sequential(spec, out, progress)
    else:
        counts = _write_parallel(spec, out, progress, num_workers)
    record = OmegaConf.create({"spec": OmegaConf.structured(spec), "counts": counts})
    check_listed(out, [WORLD_FILE], kind=DATA_KIND)
    tmp = out / f".{WORLD_FILE}.tmp-{secrets.token_hex(6)}"
    try:
        OmegaConf.save(record, tmp)
        record_files(out, add=[WORLD_FILE], kind=DATA_KIND)  # listed before it is in place
        os.replace(tmp, out / WORLD_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    return counts


class _Counted:
    """An iterator over ``samples`` that counts what it yielded (``n``): write_shards' sample count."""

    def __init__(self, samples):
        self._samples, self.n = iter(samples), 0

    def __iter__(self):
        return self

    def __next__(self):
        sample = next(self._samples)
        self.n += 1
        return sample


def _write_sequential(spec: ShapesWorldSpec, out: Path, progress: bool) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        n = getattr(spec, split)
        counts[split] = {}
        for kind in KINDS:
            if n == 0:
                counts[split][kind] = 0
                continue
            counted = _Counted(iter_samples(spec, split, kind))
            paths = write_shards(
                counted,
                out / split,
                prefix=kind,
                max_count=spec.shard_size,
                progress=progress,
                total=None if kind == "qa" else n,  # questions per scene vary
                overwrite=True,
            )
            counts[split][kind] = counted.n
            if progress:
                print(f"{split}/{kind}: {counted.n} samples in {len(paths)} shard(s)")
    return counts


# -------------------------------------------------------------------------------------------- parallel writing
# Rough cost of one scene of each kind relative to ``pairs`` (one image rendered and encoded): ``qa`` encodes the
# image once per question (about 7 by default), ``docs`` renders and encodes two. Only used to cut chunks of
# similar cost; a wrong guess costs balance, never correctness.
_KIND_COST = {"pairs": 1.0, "qa": 4.0, "docs": 2.0}
_CHUNKS_PER_WORKER = 4  # enough chunks that no worker idles long at the end
_MIN_CHUNK = 16  # scenes; smaller chunks only add short shards


def _plan_chunks(spec: ShapesWorldSpec, num_workers: int) -> list[tuple[str, str, int, int]]:
    """``(split, kind, start, stop)`` chunks of scene indices covering every non-empty split and kind, in the
    order the sequential path writes them (split, kind, index)."""
    jobs = [(split, kind) for split in SPLITS if getattr(spec, split) for kind in KINDS]
    total = sum(getattr(spec, split) * _KIND_COST[kind] for split, kind in jobs)
    target = total / (num_workers * _CHUNKS_PER_WORKER)  # the cost of one chunk
    chunks = []
    for split, kind in jobs:
        n = getattr(spec, split)
        size = max(_MIN_CHUNK, math.ceil(target / _KIND_COST[kind]))
        if kind != "qa" and 0 < spec.shard_size <= size:  # one sample per scene: whole shards, as sequentially
            size -= size % spec.shard_size  # (a bad shard_size is refused by write_shards, as sequentially)
        chunks += [(split, kind, start, min(start + size, n)) for start in range(0, n, size)]
    return chunks


def _sampler_states(spec: ShapesWorldSpec, chunks: list[tuple[str, str, int, int]]) -> dict[tuple[str, int], bytes]:
    """The pickled scene sampler of each split positioned at each chunk's first scene: one pass over each split's
    stream here instead of one per chunk in the workers."""
    states = {}
    for split in SPLITS:
        starts = sorted({start for s, _, start, _ in chunks if s == split})
        if not starts:
            continue
        sampler = spec.split().sampler(split, spec.seed)
        position = 0
        for start in starts:
            for _ in _scene_range(sampler, position, start, start):  # draws (and drops) scenes position..start-1
                pass
            position = start
            states[split, start] = pickle.dumps(sampler)
    return states


def _write_chunk(
    spec: ShapesWorldSpec, split: str, kind: str, start: int, stop: int, sampler_state: bytes, folder: str
) -> tuple[list[str], int]:
    """A worker's task: the samples of scenes ``start..stop-1`` as shards in ``folder``; returns their names and
    the number of samples. ``sampler_state``: the split's sampler pickled at scene ``start`` (by this process's
    parent, never read from disk)."""
    sampler = pickle.loads(sampler_state)
    scenes = _scene_range(sampler, start, start, stop)
    counted = _Counted(_samples(spec, split, kind, scenes))
    paths = write_shards(counted, folder, prefix=kind,
                         max_count=spec.shard_size, progress=False)
    return [p.name for p in paths], counted.n


def _write_parallel(spec: ShapesWorldSpec, out: Path, progress: bool, num_workers: int) -> dict[str, dict[str, int]]:
    chunks = _plan_chunks(spec, num_workers)
    counts = {split: {kind: 0 for kind in KINDS} for split in SPLITS}
    if not chunks:
        return counts
    states = _sampler_states(spec, chunks)
    tmp = out / f".shards.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    folders = [tmp / f"{i:06d}" for i in range(len(chunks))]
    results: list[tuple[list[str], int] | None] = [None] * len(chunks)
    workers = min(num_workers, len(chunks))
    bar = tqdm(total=len(chunks), disable=not progress, unit="chunk",
               desc=f"writing the shapes world ({workers} processes)")
    # spawn: the workers start clean (no copy of a parent holding torch threads or open files)
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        costliest_first = sorted(range(len(chunks)), key=lambda i: -_KIND_COST[chunks[i][1]] * (
            chunks[i][3] - chunks[i][2]))
        futures = {
            executor.submit(_write_chunk, spec, *chunks[i], states[chunks[i][0], chunks[i][2]], str(folders[i])): i
            for i in costliest_first
        }
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update()
        bar.close()
        executor.shutdown()
        # in order: each kind's old shards go, then the chunks' shards are renamed in with a running number
        for split in SPLITS:
            for kind in KINDS:
                mine = [i for i, chunk in enumerate(chunks) if chunk[:2] == (split, kind)]
                if not mine:
                    continue
                dest = out / split
                # write_shards(overwrite=True) with no samples: refuses an unlisted {kind}-NNNNNN.tar and removes
                # the listed ones, exactly as the sequential path does before writing a kind
                write_shards([], dest, prefix=kind, progress=False, overwrite=True)
                number = 0
                for i in mine:
                    names, written = results[i]
                    counts[split][kind] += written
                    for name in names:
                        final = dest / f"{kind}-{number:06d}.tar"
                        if final.exists() or final.is_symlink():  # appeared after the old shards were removed
                            raise FileExistsError(f"{final} appeared while shards were being written; "
                                                  "refusing to overwrite it")
                        record_files(dest, add=[final.name], kind=DATA_KIND)  # listed before it exists
                        os.replace(folders[i] / name, final)
                        number += 1
                if progress:
                    print(f"{split}/{kind}: {counts[split][kind]} samples in {number} shard(s)")
    finally:
        bar.close()
        executor.shutdown(wait=True, cancel_futures=True)  # a chunk still running finishes before its folder goes
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def load_world_spec(path: str | Path) -> ShapesWorldSpec:
    """Read the spec back from ``world.yaml`` (or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "world.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"shapes world record not found: {path} (make it with: chameleon-lite data shapes)")
    return load_structured_yaml(path, ShapesWorldSpec, section="spec")  # plain data: never interpolated
