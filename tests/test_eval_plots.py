"""Report plots: each writes a valid, non-empty PNG; bad input raises ValueError before anything is drawn."""

from __future__ import annotations

import pytest
from PIL import Image

from chameleon_lite.eval.plots import image_grid_with_captions, plot_accuracy_per_category, plot_loss_curves
from chameleon_lite.world.render import render_scene
from chameleon_lite.world.scenes import Scene, SceneObject

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_size=(100, 100)):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1]
        extrema = image.convert("L").getextrema()
        assert extrema[0] < extrema[1]  # something was drawn


def score(correct, total):
    return {"correct": correct, "total": total, "accuracy": correct / total}


RESULTS = {
    "native": {"count": score(30, 50), "color": score(45, 50), "existence": score(70, 100)},
    "baseline": {"count": score(25, 50), "color": score(48, 50)},  # lacks a category: no bar
}


def test_accuracy_bars_write_a_png(tmp_path):
    path = plot_accuracy_per_category(RESULTS, {"count": 0.3, "color": 0.17, "existence": None}, tmp_path / "a/acc.png")
    assert path == tmp_path / "a" / "acc.png"
    assert_png(path)


@pytest.mark.parametrize(
    "results, chance, message",
    [
        ({}, {}, "non-empty"),
        ({"native": {}}, {}, "no category scores"),
        ({"native": {"count": {"correct": 3, "total": 2, "accuracy": 1.5}}}, {}, "correct <= total"),
        ({"native": {"count": {"correct": 1, "total": 2, "accuracy": 0.9}}}, {}, "not correct/total"),
        ({"native": {"count": {"correct": 1, "total": 0, "accuracy": None}}}, {}, "total >= 1"),
        ({"native": {"count": {"correct": 1, "accuracy": 0.5}}}, {}, "must be a dict"),
        ({"native": {"count": score(1, 2)}}, {"colour": 0.5}, "without results"),
        ({"native": {"count": score(1, 2)}}, {"count": 1.5}, r"\[0, 1\]"),
    ],
)
def test_accuracy_bars_reject_bad_input(tmp_path, results, chance, message):
    with pytest.raises(ValueError, match=message):
        plot_accuracy_per_category(results, chance, tmp_path / "acc.png")
    assert not (tmp_path / "acc.png").exists()


def test_loss_curves(tmp_path):
    curves = {"native": [(0, 5.0), (10, 3.2), (20, 2.5)], "baseline": [(0, 4.0), (20, 2.9)]}
    assert_png(plot_loss_curves(curves, tmp_path / "loss.png", log_y=True))
    for bad in ({}, {"native": []}, {"native": [(0, float("nan"))]}, {"native": [(0,)]}):
        with pytest.raises(ValueError):
            plot_loss_curves(bad, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="log scale"):
        plot_loss_curves({"native": [(0, 0.0)]}, tmp_path / "bad.png", log_y=True)
    with pytest.raises(ValueError, match=".png"):
        plot_loss_curves(curves, tmp_path / "loss.jpg")


def test_image_grid(tmp_path):
    scene = Scene((SceneObject("circle", "red", "large", 0, 0), SceneObject("star", "blue", "small", 2, 1)))
    images = [render_scene(scene, 64), Image.new("RGB", (64, 64), "white"), render_scene(scene, 32)]
    captions = ["a large red circle in the top left and a small blue star in the bottom middle"] * 3
    verdicts = ["correct", "0 objects, want 2; missing blue star, red circle", "correct"]
    path = image_grid_with_captions(images, captions, verdicts, tmp_path / "grid.png", columns=2, passed=[1, 0, 1])
    assert_png(path, min_size=(200, 200))
    with pytest.raises(ValueError, match="captions"):
        image_grid_with_captions(images, captions[:2], verdicts, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no images"):
        image_grid_with_captions([], [], [], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="PIL image"):
        image_grid_with_captions(["x"], ["c"], ["v"], tmp_path / "bad.png")
