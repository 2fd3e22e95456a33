"""Examples from a trained model directory: captions and answers for fresh shapes scenes, images for captions.

Prints every prompt with its output and writes a figure: for each caption, the scene it describes (reference),
then the model's images at CFG 1 and at the given CFG scale; under each generated image the scene parser's
object-level F1 against the reference scene.

    python benchmarks/generation_examples.py --model runs/native-tiny/model --out docs/generation_examples.png
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from chameleon_lite import ChameleonLite
from chameleon_lite.world.language import describe
from chameleon_lite.world.questions import make_questions
from chameleon_lite.world.render import render_scene
from chameleon_lite.world.scene_parser import parse_scene
from chameleon_lite.world.scenes import WorldConfig
from chameleon_lite.world.splits import CompositionalSplit


def object_f1(want, got) -> float:
    want, got = Counter(want), Counter(got)
    hit = sum((want & got).values())
    return 2 * hit / max(sum(want.values()) + sum(got.values()), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/native-tiny/model")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", default="docs/generation_examples.png")
    args = parser.parse_args()

    model = ChameleonLite.from_pretrained(args.model)
    world = WorldConfig()
    sampler = CompositionalSplit().sampler("test", args.seed)
    scenes = [sampler.sample() for _ in range(args.scenes)]
    images = [render_scene(s) for s in scenes]

    print("## captions (greedy)")
    for scene, caption in zip(scenes, model.generate([[im] for im in images])):
        print(f"- truth: {describe(scene, random.Random(0))}\n  model: {caption[0] if caption else ''}")

    print("## questions (greedy)")
    correct = total = 0
    for i, (scene, image) in enumerate(zip(scenes, images)):
        for qa in make_questions(scene, random.Random(i), world)[:4]:
            (answer,) = model.generate([image, qa.question]) or [""]
            correct += answer.strip() == qa.answer
            total += 1
            print(f"- [{qa.category}] {qa.question} -> {answer.strip()!r} (truth {qa.answer!r})")
    print(f"answers exactly right: {correct}/{total}")

    print("## images from captions (image codes sampled at temperature 1, seed 0)")
    captions = [describe(s, random.Random(0)) for s in scenes]
    plain = model.generate([[c] for c in captions], mode="image", cfg_scale=1.0, seed=0)
    guided = model.generate([[c] for c in captions], mode="image", cfg_scale=args.cfg_scale, seed=0)
    scale, pad = 3, 4
    w = h = 64 * scale
    sheet = Image.new("RGB", (3 * (w + pad), len(scenes) * (h + 14 + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (scene, ref, a, b) in enumerate(zip(scenes, images, plain, guided)):
        top = row * (h + 14 + pad)
        for col, (im, label) in enumerate([(ref, "reference"), (a[0], "cfg 1"), (b[0], f"cfg {args.cfg_scale:g}")]):
            sheet.paste(im.resize((w, h), Image.Resampling.NEAREST), (col * (w + pad), top))
            if col:
                label += f"  F1 {object_f1(parse_scene(ref, world), parse_scene(im, world)):.2f}"
            draw.text((col * (w + pad) + 2, top + h + 1), label, fill="black")
        want = parse_scene(ref, world)
        f1_plain, f1_guided = object_f1(want, parse_scene(a[0], world)), object_f1(want, parse_scene(b[0], world))
        print(f"- {captions[row]}\n  parser F1 cfg 1: {f1_plain:.2f}  cfg {args.cfg_scale:g}: {f1_guided:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"figure written to {args.out}")


if __name__ == "__main__":
    main()
