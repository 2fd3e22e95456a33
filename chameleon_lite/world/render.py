"""Rasterise shapes-world scenes to RGB images.

Notable choices:

- Anti-aliasing by supersampling: shapes are drawn with PIL at ``SUPERSAMPLE`` x the output size and
  box-downsampled (``Image.reduce``), so every edge pixel is an exact linear blend of the object colour and
  the background. The scene parser relies on this (it un-mixes colours along that line).
- All supersampled coordinates are integers (centres and extents are snapped once), so a shape's pixels
  depend only on its shape, size and sub-pixel phase. The parser redraws the same shapes with
  ``draw_shape`` to get its templates, which makes it exact on clean renders.
- Geometry (``SIZE_EXTENT``) is shared with ``scenes.py``; an object's bounding box is centred in its cell.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from chameleon_lite.world.scenes import COLORS, SIZE_EXTENT, Scene

SUPERSAMPLE = 4
"""Drawing resolution factor; every output pixel is the mean of ``SUPERSAMPLE**2`` drawn pixels."""

CROSS_ARM_WIDTH = 0.36
"""Width of a cross's arms as a fraction of its extent."""

STAR_INNER_RATIO = 0.42
"""Inner / outer radius of the five-pointed star."""

# five-pointed star, point up, outer radius 1, shifted down so its bounding box is centred vertically
_STAR_UNIT = tuple(
    (
        (1.0 if i % 2 == 0 else STAR_INNER_RATIO) * math.cos(-math.pi / 2 + i * math.pi / 5),
        (1.0 if i % 2 == 0 else STAR_INNER_RATIO) * math.sin(-math.pi / 2 + i * math.pi / 5)
        + (1 - math.sin(3 * math.pi / 10)) / 2,
    )
    for i in range(10)
)


def object_geometry(row: int, col: int, size: str, image_size: int, grid: int) -> tuple[int, int, int]:
    """Centre ``(cx, cy)`` and extent (even side of the bounding box) of an object, in supersampled pixels."""
    cell = image_size / grid
    cx = round((col + 0.5) * cell * SUPERSAMPLE)
    cy = round((row + 0.5) * cell * SUPERSAMPLE)
    return cx, cy, extent_supersampled(size, image_size, grid)


def extent_supersampled(size: str, image_size: int, grid: int) -> int:
    """Side of an object's bounding box in supersampled pixels (even, so shapes are symmetric)."""
    extent = SIZE_EXTENT[size] * image_size / grid * SUPERSAMPLE
    return max(2, 2 * round(extent / 2))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, extent: int, fill) -> None:
    """Draw one filled shape whose bounding box ``[cx - extent/2, cx + extent/2)`` is centred on ``(cx, cy)``.

    Coordinates are integer supersampled pixels; the box covers pixel indices ``cx - h .. cx + h - 1``.
    """
    h = extent // 2
    left, right, top, bottom = cx - h, cx + h - 1, cy - h, cy + h - 1
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx - 1, top), (cx, top), (right, bottom), (left, bottom)], fill=fill)
    elif shape == "diamond":
        draw.polygon(
            [
                (cx - 1, top),
                (cx, top),
                (right, cy - 1),
                (right, cy),
                (cx, bottom),
                (cx - 1, bottom),
                (left, cy),
                (left, cy - 1),
            ],
            fill=fill,
        )
    elif shape == "cross":
        a = max(1, round(CROSS_ARM_WIDTH * extent / 2))
        draw.rectangle((cx - a, top, cx + a - 1, bottom), fill=fill)
        draw.rectangle((left, cy - a, right, cy + a - 1), fill=fill)
    elif shape == "star":
        # integer offsets from the (integer) centre keep the star's pixels translation-invariant
        points = [(cx + round(h * ux - 0.5), cy + round(h * uy - 0.5)) for ux, uy in _STAR_UNIT]
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"render: unknown shape {shape!r}")


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Render ``scene`` as an anti-aliased ``image_size x image_size`` RGB image."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < scene.grid:
        raise ValueError(f"image_size must be an int >= grid ({scene.grid}), got {image_size!r}")
    canvas = Image.new("RGB", (image_size * SUPERSAMPLE, image_size * SUPERSAMPLE), COLORS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        cx, cy, extent = object_geometry(obj.row, obj.col, obj.size, image_size, scene.grid)
        draw_shape(draw, obj.shape, cx, cy, extent, COLORS[obj.color])
    return canvas.reduce(SUPERSAMPLE)
