"""Scene parser: exact on clean renders, graceful on corrupted or arbitrary images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from chameleon_lite.world.render import render_scene
from chameleon_lite.world.scene_parser import label_components, parse_objects, parse_scene, parse_to_scene
from chameleon_lite.world.scenes import Scene, SceneObject, SceneSampler, WorldConfig

CONFIG = WorldConfig()
FRESH_SEED = 80_808_080  # never used while developing the parser


def test_parser_is_exact_on_2000_fresh_scenes():
    scenes = SceneSampler(CONFIG, FRESH_SEED).sample_many(2000)
    wrong = [s for s in scenes if tuple(parse_scene(render_scene(s), CONFIG)) != s.objects]
    assert not wrong, f"{len(wrong)} scenes misparsed, e.g. {wrong[0]}"
    assert sum(len(s) for s in scenes) > 6000


def test_parser_returns_canonical_scene():
    scene = SceneSampler(CONFIG, FRESH_SEED + 1).sample()
    parsed = parse_to_scene(np.asarray(render_scene(scene)), CONFIG)
    assert parsed == scene
    objects = parse_scene(render_scene(scene), CONFIG)
    assert objects == sorted(objects, key=lambda o: (o.row, o.col))


@pytest.mark.parametrize(
    "config, render_size",
    [
        (WorldConfig(), 256),  # larger render, parser resizes
        (WorldConfig(grid=4, max_objects=10), 64),
        (WorldConfig(background="black", colors=("red", "green", "blue", "yellow", "purple", "white")), 64),
        (WorldConfig(image_size=128), 128),
    ],
)
def test_parser_is_exact_on_other_worlds(config, render_size):
    for scene in SceneSampler(config, FRESH_SEED + 2).sample_many(150):
        assert tuple(parse_scene(render_scene(scene, render_size), config)) == scene.objects, scene


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda im: _jpeg(im, 50),
        lambda im: im.filter(ImageFilter.GaussianBlur(1.0)),
        lambda im: im.quantize(16).convert("RGB"),
    ],
    ids=["jpeg50", "blur1", "quantize16"],
)
def test_parser_degrades_gracefully(corrupt):
    scenes = SceneSampler(CONFIG, FRESH_SEED + 3).sample_many(150)
    exact = sum(tuple(parse_scene(corrupt(render_scene(s)), CONFIG)) == s.objects for s in scenes)
    assert exact / len(scenes) >= 0.95


def test_touching_objects_of_different_colours_are_split():
    scene = Scene(
        (SceneObject("square", "orange", "large", 1, 0), SceneObject("square", "yellow", "large", 1, 1)),
    )
    pixels = np.asarray(render_scene(scene)).copy()
    pixels[22:42, 17:26] = pixels[32, 10]  # paint an orange bridge between the two squares
    parsed = parse_objects(pixels, CONFIG)
    assert [(p.obj.color, p.obj.col) for p in parsed] == [("orange", 0), ("yellow", 1)]


def test_parser_never_crashes_on_arbitrary_images():
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        np.full((64, 64, 3), 255, np.uint8),
        np.zeros((64, 64, 3), np.uint8),
        rng.random((64, 64)),  # float grayscale in [0, 1]
        rng.integers(0, 256, (30, 47, 4), dtype=np.uint8),  # RGBA, wrong size
        rng.integers(0, 256, (300, 200, 1), dtype=np.uint8),
        Image.new("L", (1, 1)),
        Image.new("RGBA", (500, 500), (255, 0, 0, 128)),
    ]
    for image in images:
        objects = parse_scene(image, CONFIG)
        assert len(objects) <= CONFIG.grid**2
        assert len({o.cell for o in objects}) == len(objects)
    assert parse_scene(np.full((64, 64, 3), 255, np.uint8), CONFIG) == []


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((0, 5, 3)),
        np.zeros((4, 4, 2)),
        np.zeros((2, 4, 4, 3)),
        np.full((4, 4, 3), np.nan),
        np.full((4, 4, 3), 2.0),
        np.full((4, 4, 3), 300),
        np.zeros((4, 4, 3), dtype=bool),
        "picture.png",
    ],
)
def test_parser_rejects_non_images(bad):
    with pytest.raises(ValueError):
        parse_scene(bad, CONFIG)


def test_label_components():
    mask = np.array(
        [
            [1, 1, 0, 0, 1],
            [0, 1, 0, 0, 1],
            [0, 0, 1, 0, 0],  # diagonal neighbour joins the first component
            [1, 0, 0, 0, 1],
        ],
        dtype=bool,
    )
    labels, n = label_components(mask)
    assert n == 4
    assert labels[0, 0] == labels[1, 1] == labels[2, 2] != labels[0, 4]
    assert labels[0, 4] == labels[1, 4] and labels[3, 0] != labels[3, 4]
    assert (labels[~mask] == 0).all() and (labels[mask] > 0).all()
    groups = np.array([[0, 1, 0, 0, 0]] * 4)
    grouped, n_grouped = label_components(mask, groups)
    assert n_grouped == 6 and grouped[0, 0] != grouped[0, 1] == grouped[1, 1] != grouped[2, 2]
