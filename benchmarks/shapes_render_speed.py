"""Render (and parse) speed of the shapes world on one core.

    python benchmarks/shapes_render_speed.py [--n 5000] [--image-size 64] [--seed 0]

Prints scenes/s for sampling, rendering and parsing (target: rendering >= 1,000 scenes/s at 64x64).
"""

from __future__ import annotations

import argparse
import time

from chameleon_lite.world.render import render_scene
from chameleon_lite.world.scene_parser import parse_scene
from chameleon_lite.world.scenes import SceneSampler, WorldConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000, help="scenes to render")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-parse", type=int, default=1000, help="scenes to parse (0 to skip)")
    args = parser.parse_args()

    config = WorldConfig(image_size=args.image_size)
    start = time.perf_counter()
    scenes = SceneSampler(config, args.seed).sample_many(args.n)
    sample_s = time.perf_counter() - start

    render_scene(scenes[0], args.image_size)  # warm-up
    start = time.perf_counter()
    images = [render_scene(scene, args.image_size) for scene in scenes]
    render_s = time.perf_counter() - start
    print(f"sampling : {args.n / sample_s:10.0f} scenes/s")
    print(f"rendering: {args.n / render_s:10.0f} scenes/s at {args.image_size}x{args.image_size} ({args.n} scenes)")

    if args.n_parse > 0:
        subset = images[: args.n_parse]
        parse_scene(subset[0], config)  # warm-up (builds template cache)
        start = time.perf_counter()
        for image in subset:
            parse_scene(image, config)
        parse_s = time.perf_counter() - start
        print(f"parsing  : {len(subset) / parse_s:10.0f} scenes/s ({len(subset)} scenes)")


if __name__ == "__main__":
    main()
