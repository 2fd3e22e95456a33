"""Throughput of pre-tokenization (raw shards -> token shards) with the shipped tokenizer bundle.

Generates a fresh shapes world of N scenes, then times `tokenize_shards` on its image-caption pairs for each
worker count and VQ batch size asked for, side by side in one run, and prints images/s.

    python benchmarks/tokenize_throughput.py --scenes 2000 --workers 0 2 --batch-sizes 64 256
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from chameleon_lite.data.pretokenize import tokenize_shards
from chameleon_lite.tokenization.bundle import load_bundle
from chameleon_lite.world.shapes_world import ShapesWorldSpec, write_shapes_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="tokenizers/shapes-64")
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()

    bundle = load_bundle(args.tokenizer)
    print(f"torch threads: {torch.get_num_threads()}; tokenizer {bundle.name}, grid {bundle.image_grid}")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        spec = ShapesWorldSpec(train=args.scenes, val=0, test=0, seed=4242, shard_size=max(1, args.scenes // 4))
        write_shapes_world(spec, raw, progress=False)
        shards = str(raw / "train" / "pairs-*.tar")
        print(f"{'workers':>7} {'batch':>6} {'images':>7} {'seconds':>8} {'images/s':>9}")
        for workers in args.workers:
            for batch in args.batch_sizes:
                out = Path(tmp) / f"tok-{workers}-{batch}"
                stats = tokenize_shards(bundle, shards, out, batch_size=batch, num_workers=workers, progress=False)
                rate = stats.images_per_second
                print(f"{workers:>7} {batch:>6} {stats.images:>7} {stats.seconds:>8.2f} {rate:>9.0f}")


if __name__ == "__main__":
    main()
