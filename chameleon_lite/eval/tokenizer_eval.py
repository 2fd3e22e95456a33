"""Quality of an image tokenizer on a set of images: pixels, codebook health and (for the shapes world) meaning.

``evaluate_image_tokenizer`` streams batches through ``encode`` / ``decode`` and reports

- ``psnr`` (dB) and ``ssim`` of ``decode(encode(x))`` against ``x``, averaged over images;
- ``codebook_usage`` (fraction of codes used at least once over the whole set), ``code_perplexity``, ``dead_codes``;
- with a shapes-world config: ``parser_agreement``, the fraction of images for which the scene parser reads the
  same objects (shape, colour, size, cell) from the reconstruction as from the original, and the object-level
  precision/recall of the reconstruction's parse against the original's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from chameleon_lite.eval.image_metrics import code_histogram, histogram_metrics, psnr, ssim


def _batches(images: Iterable[Image.Image], batch_size: int) -> Iterable[list[Image.Image]]:
    batch: list[Image.Image] = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def evaluate_image_tokenizer(
    model,
    images: Iterable[Image.Image],
    *,
    world=None,
    batch_size: int = 64,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, float]:
    """Evaluate a ``VQImageTokenizer`` on PIL ``images``; a ``world`` (``WorldConfig``) adds parser scores."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world is not None:
        from chameleon_lite.world.scene_parser import parse_scene

    hist = torch.zeros(model.codebook_size, dtype=torch.long)
    n = 0
    psnr_sum = ssim_sum = 0.0
    agree = 0
    matched = predicted = reference = 0
    bar = tqdm(total=total, desc="evaluating tokenizer", unit="img", disable=not progress)
    for batch in _batches(images, batch_size):
        x = model.preprocess(batch)  # (B, C, H, W) in [-1, 1]
        codes = model.encode(x)  # (B, h, w)
        recon = model.decode(codes)  # (B, C, H, W)
        b = x.shape[0]
        psnr_sum += float(psnr(recon, x)) * b
        ssim_sum += float(ssim(recon, x)) * b
        hist += code_histogram(codes.cpu(), model.codebook_size)
        if world is not None:
            for original, rebuilt in zip(model.to_pil(x), model.to_pil(recon)):
                want, got = Counter(parse_scene(original, world)), Counter(parse_scene(rebuilt, world))
                agree += want == got
                matched += sum((want & got).values())
                predicted += sum(got.values())
                reference += sum(want.values())
        n += b
        bar.update(b)
    bar.close()
    if n == 0:
        raise ValueError("evaluate_image_tokenizer got no images")
    health = histogram_metrics(hist)
    result = {
        "images": n,
        "psnr": psnr_sum / n,
        "ssim": ssim_sum / n,
        "codebook_usage": health["usage"],
        "code_perplexity": health["perplexity"],
        "dead_codes": int(health["dead_codes"]),
        "codebook_size": model.codebook_size,
    }
    if world is not None:
        result["parser_agreement"] = agree / n
        result["parser_object_precision"] = matched / max(predicted, 1)
        result["parser_object_recall"] = matched / max(reference, 1)
    return result


def format_report(metrics: dict[str, float], keys: Sequence[str] | None = None) -> str:
    """A plain two-column text table of ``metrics``."""
    keys = keys or list(metrics)
    width = max(len(k) for k in keys)
    lines = []
    for k in keys:
        v = metrics[k]
        lines.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)


@torch.no_grad()
def reconstruction_grid(model, images: Sequence[Image.Image], *, world=None, scale: int = 3) -> Image.Image:
    """Originals (top row) over their reconstructions (bottom row), upscaled ``scale``x with nearest neighbour.

    With a shapes-world ``world`` config, a green bar under a reconstruction means the scene parser reads the same
    objects from it as from the original, a red bar that it does not.
    """
    from PIL import ImageDraw

    x = model.preprocess(list(images))
    originals, rebuilt = model.to_pil(x), model.to_pil(model.decode(model.encode(x)))
    w, h = originals[0].size
    bar = 3 if world is not None else 0
    pad = 2
    sheet = Image.new("RGB", (len(originals) * (w + pad) * scale, (2 * h + pad + bar) * scale), (128, 128, 128))
    draw = ImageDraw.Draw(sheet)
    if world is not None:
        from chameleon_lite.world.scene_parser import parse_scene
    for i, (orig, rec) in enumerate(zip(originals, rebuilt)):
        left = i * (w + pad) * scale
        sheet.paste(orig.resize((w * scale, h * scale), Image.Resampling.NEAREST), (left, 0))
        sheet.paste(rec.resize((w * scale, h * scale), Image.Resampling.NEAREST), (left, (h + pad) * scale))
        if world is not None:
            same = Counter(parse_scene(orig, world)) == Counter(parse_scene(rec, world))
            top = (2 * h + pad) * scale
            colour = (0, 170, 0) if same else (220, 0, 0)
            draw.rectangle([left, top, left + w * scale - 1, top + bar * scale - 1], fill=colour)
    return sheet
