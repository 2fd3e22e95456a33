"""``chameleon-lite demo``: the whole pipeline at tiny scale on a CPU, nothing downloaded.

1. generate a shapes world (``OUT/data``): ``DEMO_WORLD``, a smaller world than the default one (a 2x2 grid of
   16-px cells at 32 px, 1-3 objects, 4 shapes, 4 colours, both sizes) with every question category and the default
   held-out colour-shape combos, so that each cell is one 2x2 block of codes of ``tokenizers/shapes-32`` and the
   demo's models learn within its budget (README, "What the demo measures", has the default world's curve beside),
2. pre-tokenize it with the bundle the demo config names (``OUT/tokens``),
3. run ``configs/compare/demo.yaml`` on it: train the native model and the baseline (encoder pretraining,
   stage 1, stage 2; identical decoders) under the same sample budget, evaluate both, write ``OUT/report.md``.

Steps whose output already exists (same world spec, token record present) are reused, so a second run only
retrains and re-evaluates. Steps 1 and 2 are ``prepare_demo_data`` (also used by ``chameleon-lite learning-curve
--demo-world``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from chameleon_lite.model.model_dir import resolve_bundle_path
from chameleon_lite.shipped import resolve_path

__all__ = ["demo", "prepare_demo_data", "DEMO_CONFIG", "DEMO_WORLD"]

logger = logging.getLogger(__name__)

DEMO_CONFIG = "configs/compare/demo.yaml"  # a shipped recipe: found from any directory (``chameleon_lite.shipped``)
DEMO_WORLD = {
    "train": 5000, "val": 200, "test": 300, "val_held_out": 200, "seed": 0,
    "world": {"image_size": 32, "grid": 2, "max_objects": 3, "shapes": ["circle", "square", "triangle", "star"],
              "colors": ["red", "green", "blue", "yellow"]},
}
"""The demo's world (a ``ShapesWorldSpec`` as a dict; held-out combos are the default red triangle, blue circle,
green square and yellow star). ``val_held_out``: validation scenes around a held-out combo, for choosing a stage-3
recipe (``benchmarks/dpo_sweep.py``); nothing in ``compare`` reads them."""


def _same_world(path: Path, spec) -> bool:
    from chameleon_lite.world.shapes_world import load_world_spec

    try:
        return OmegaConf.to_container(OmegaConf.structured(load_world_spec(path))) == OmegaConf.to_container(
            OmegaConf.structured(spec))
    except (FileNotFoundError, ValueError):
        return False


def prepare_demo_data(out: str | Path, config: str | Path, *, world: dict[str, Any] | None = None,
                      progress: bool = True, num_workers: int | None = None) -> list[str]:
    """The demo's data steps: generate the shapes world into ``OUT/data`` and pre-tokenize its ``train``/``val``
    splits into ``OUT/tokens`` with the tokenizer bundle named by ``config``'s ``data.tokenizer``.

    Steps whose output already exists (same world spec, token record present) are reused. Returns the
    ``data.*`` dotlist overrides that point a compare config at this data (``data.raw``, ``data.tokens``,
    ``data.tokenizer``). ``world``: a ``ShapesWorldSpec`` as a dict (default ``DEMO_WORLD``). ``num_workers``:
    processes generating the world (None: 1, so that the token shards are the same on every machine: their order
    follows the raw shards' boundaries, which depend on it); pre-tokenizing uses as many, at least 2.
    """
    from chameleon_lite.comparison.config import load_compare_config
    from chameleon_lite.data.pretokenize import RECORD_FILE, tokenize_shards
    from chameleon_lite.data.shards import DATA_KIND
    from chameleon_lite.safe_io import read_manifest, remove_listed
    from chameleon_lite.tokenization.bundle import load_bundle
    from chameleon_lite.world.shapes_world import ShapesWorldSpec, write_shapes_world

    out = Path(out)
    spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ShapesWorldSpec), world or DEMO_WORLD))
    if num_workers is None:
        # 1: the demo's token shards, and so its training stream and figures, are the same on every machine
        # (pre-tokenizing interleaves its workers' shards, so its output order follows the raw shard boundaries)
        num_workers = 1
    data, tokens = out / "data", out / "tokens"
    if _same_world(data, spec):
        print(f"[demo] reusing the shapes world in {data}")
    else:
        print(f"[demo] 1/3 generating the shapes world ({spec.train} train / {spec.val} val / {spec.test} test scenes)")
        write_shapes_world(spec, data, progress=progress, num_workers=num_workers)
        for split in ("train", "val"):  # only a record the package wrote; tokenize_shards refuses any other
            remove_listed(tokens / split, [RECORD_FILE], kind=DATA_KIND)
    cfg = load_compare_config(resolve_path(config, kind="config"))  # read as compare reads it: never interpolated
    bundle_dir = resolve_bundle_path(cfg.data.tokenizer)
    bundle = load_bundle(bundle_dir)
    for split in ("train", "val"):
        if (tokens / split / RECORD_FILE).is_file() and RECORD_FILE in (read_manifest(tokens / split) or []):
            print(f"[demo] reusing the token shards in {tokens / split}")
            continue
        print(f"[demo] 2/3 pre-tokenizing the {split} split with {bundle_dir}")
        stats = tokenize_shards(bundle, str(data / split / "*.tar"), tokens / split, progress=progress,
                                num_workers=max(2, num_workers))
        print(f"[demo]     {stats.samples} samples, {stats.images_per_second:.0f} images/s")
    return [f"data.raw={data}", f"data.tokens={tokens}", f"data.tokenizer={bundle_dir}"]


def demo(out: str | Path = "runs/demo", *, config: str = DEMO_CONFIG, overrides: list[str] = (),
         world: dict[str, Any] | None = None, progress: bool = True) -> Path:
    """Run the demo; returns the path of ``report.md``."""
    from chameleon_lite.comparison.config import load_compare_config
    from chameleon_lite.comparison.report import check_compare_out
    from chameleon_lite.comparison.run import compare
    from chameleon_lite.training.lightning_cli import quiet_lightning
    out = Path(out)
    started = time.perf_counter()
    config_path = resolve_path(config, kind="config")
    # a report file or seed folder in OUT that the package did not write is refused now, not after the data steps
    check_compare_out(out, load_compare_config(config_path, list(overrides)).seeds)
    data_overrides = prepare_demo_data(out, config, world=world, progress=progress)
    print(f"[demo] 3/3 training and comparing both arms ({config_path})")
    with quiet_lightning():  # the demo's own lines and progress bars only, not Lightning's banners per stage
        result = compare(config_path, out, overrides=[*data_overrides, *overrides], progress=progress)
    minutes = (time.perf_counter() - started) / 60
    print(f"[demo] done in {minutes:.1f} min: {result['report']}")
    return result["report"]
