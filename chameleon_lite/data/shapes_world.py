"""Write the shapes world to webdataset shards (the layout img2dataset produces, plus QA and interleaved docs).

Output of :func:`write_shapes_world` (and ``chameleon-lite data shapes``)::

    OUT/world.yaml                      world config, held-out combos, seed, counts: everything to regenerate it
    OUT/{split}/pairs-000000.tar        KEY.png, KEY.txt (caption), KEY.json {"scene", "held_out"}
    OUT/{split}/qa-000000.tar           KEY.png, KEY.json {"question", "answer", "category", "pope_type", ...}
    OUT/{split}/docs-000000.tar         KEY.json {"segments": [{"text"}, {"image": "0.png"}, ...]}, KEY.0.png, ...
    OUT/manifest.json, OUT/{split}/manifest.json   what the package wrote there (``safe_io``; only that is replaced)

Every sample is a pure function of ``(seed, split, index)``: scenes come from the split's seeded stream
(:mod:`chameleon_lite.data.splits`) and the text about scene ``i`` from ``random.Random(f"{seed}/{split}/{i}")``.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from chameleon_lite.data.edits import make_document
from chameleon_lite.data.language import describe, make_questions
from chameleon_lite.data.render import render_scene
from chameleon_lite.data.scenes import Scene, WorldConfig
from chameleon_lite.data.shards import DATA_KIND, check_shard_names, write_shards
from chameleon_lite.data.splits import DEFAULT_HELD_OUT, SPLITS, CompositionalSplit
from chameleon_lite.safe_io import check_listed, load_structured_yaml, record_files

KINDS: tuple[str, ...] = ("pairs", "qa", "docs")
WORLD_FILE = "world.yaml"


@dataclass
class ShapesWorldSpec:
    """What to generate: sizes of each split, the world, held-out combos, seed."""

    train: int = 1000
    val: int = 200
    test: int = 200
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
    sampler = spec.split().sampler(split, spec.seed)
    for index in range(getattr(spec, split)):
        scene, held = sampler.sample_flagged()
        yield index, scene, held


def iter_samples(spec: ShapesWorldSpec, split: str, kind: str) -> Iterator[dict[str, Any]]:
    """The shard samples of one ``kind`` (``pairs``, ``qa`` or ``docs``) of ``split``, as write_shards takes them."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
    # in val/test, excluding held-out combos from generated text is pointless (the scenes may contain them)
    exclude = spec.split().held_out if split == "train" else frozenset()
    size = spec.world.image_size
    for index, scene, held in iter_scenes(spec, split):
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


def write_shapes_world(spec: ShapesWorldSpec, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Generate every split and kind into ``out`` and write ``out/world.yaml``; returns the written counts.

    ``out`` and its split folders are data directories (issue 14): what is written is listed in their
    ``manifest.json`` and a rerun replaces only that; a ``world.yaml`` or ``{pairs,qa,docs}-NNNNNN.tar`` the package
    did not write is refused with ``FileExistsError`` before anything is generated.
    """
    out = Path(out)
    check_listed(out, [WORLD_FILE], kind=DATA_KIND)
    for split in SPLITS:
        if getattr(spec, split):
            for kind in KINDS:
                check_shard_names(out / split, kind)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        n = getattr(spec, split)
        counts[split] = {}
        for kind in KINDS:
            if n == 0:
                counts[split][kind] = 0
                continue
            written = 0

            def counted(samples):
                nonlocal written
                for sample in samples:
                    written += 1
                    yield sample

            paths = write_shards(
                counted(iter_samples(spec, split, kind)),
                out / split,
                prefix=kind,
                max_count=spec.shard_size,
                progress=progress,
                total=None if kind == "qa" else n,  # questions per scene vary
                overwrite=True,
            )
            counts[split][kind] = written
            if progress:
                print(f"{split}/{kind}: {written} samples in {len(paths)} shard(s)")
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


def load_world_spec(path: str | Path) -> ShapesWorldSpec:
    """Read the spec back from ``world.yaml`` (or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "world.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"shapes world record not found: {path} (make it with: chameleon-lite data shapes)")
    return load_structured_yaml(path, ShapesWorldSpec, section="spec")  # plain data: never interpolated
