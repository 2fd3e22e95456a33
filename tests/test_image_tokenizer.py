"""Tests for the VQ image tokenizer, its metrics and its LightningModule (tiny models, CPU, a few seconds each)."""

from __future__ import annotations

import dataclasses
import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from chameleon_lite.eval.image_metrics import (
    code_histogram,
    code_perplexity,
    codebook_usage,
    dead_codes,
    histogram_metrics,
    psnr,
    ssim,
)
from chameleon_lite.tokenization.image_tokenizer import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    VQImageTokenizer,
    preprocess_images,
    to_pil,
)
from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig
from chameleon_lite.tokenization.patch_discriminator import PatchDiscriminator
from chameleon_lite.training.lit_vq_tokenizer import VQTokenizerModule

DOWNSAMPLE_MULTS = {4: [1, 2, 2], 8: [1, 2, 2, 2]}


def tiny_config(quantizer: str = "vq", downsample: int = 4, **overrides) -> ImageTokenizerConfig:
    values = dict(
        image_size=32,
        base_channels=8,
        channel_mult=DOWNSAMPLE_MULTS[downsample],
        latent_dim=8,
        quantizer=quantizer,
        codebook_size=None if quantizer == "fsq" else 32,
        fsq_levels=[4, 3, 3],
        kmeans_iters=2,
    )
    values.update(overrides)
    return ImageTokenizerConfig(**values)


def square_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Coloured squares of random size and position on a black background, (n, 3, size, size) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, 3, size, size), -1.0)
    palette = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]]).float()
    for i in range(n):
        side = int(torch.randint(size // 4, size // 2, (1,), generator=g))
        top, left = torch.randint(0, size - side, (2,), generator=g).tolist()
        images[i, :, top : top + side, left : left + side] = palette[i % len(palette), :, None, None]
    return images


def warmed_up(model: VQImageTokenizer, images: torch.Tensor, steps: int = 3) -> VQImageTokenizer:
    """A few training-mode forwards so k-means init, EMA statistics and dead-code replacement have run."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(images)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- config


def test_config_derived_values_and_round_trip():
    assert ImageTokenizerConfig().grid == (8, 8)  # the default: 64 codes per 64x64 image
    cfg = ImageTokenizerConfig(image_size=64, channel_mult=[1, 2, 2, 4])
    assert cfg.downsample_factor == 8 and cfg.grid == (8, 8) and cfg.num_codes == 64
    fsq = ImageTokenizerConfig(quantizer="fsq", fsq_levels=[8, 5, 5, 5])
    assert fsq.codebook_size == 1000
    for c in (cfg, fsq):
        assert ImageTokenizerConfig(**dataclasses.asdict(c)) == c
        assert OmegaConf.to_object(OmegaConf.structured(c)) == c
        assert OmegaConf.to_object(OmegaConf.create(OmegaConf.to_yaml(OmegaConf.structured(c)))) == c.to_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(channel_mult=[1, 2]), "factor"),
        (dict(image_size=36), "divisible"),
        (dict(quantizer="rq"), "quantizer"),
        (dict(quantizer="lfq", codebook_size=300), "power-of-2"),
        (dict(quantizer="fsq", codebook_size=999), "disagrees"),
        (dict(quantizer="fsq", fsq_levels=[2, 4]), "fsq_levels"),
        (dict(resize_mode="stretch"), "resize_mode"),
        (dict(pad_color=[0, 0, 300]), "pad_color"),
        (dict(encoder="vit"), "encoder"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        ImageTokenizerConfig(**overrides)
    with pytest.raises(ValueError, match="unknown"):
        ImageTokenizerConfig.from_dict({"image_size": 64, "codebok_size": 3})


# ---------------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("quantizer", ["vq", "fsq", "lfq"])
@pytest.mark.parametrize("downsample", [4, 8])
def test_encode_decode_shapes_and_eval_consistency(quantizer, downsample):
    torch.manual_seed(0)
    cfg = tiny_config(quantizer, downsample)
    model = VQImageTokenizer(cfg)
    images = square_images(4)
    warmed_up(model, images)
    codes = model.encode(images)
    h, w = cfg.grid
    assert codes.shape == (4, h, w) == (4, 32 // downsample, 32 // downsample)
    assert codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < cfg.codebook_size
    decoded = model.decode(codes)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1
    out = model(images)  # eval mode
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(decoded, out.recon, rtol=0, atol=1e-6)


def test_patch_encoder_codes_depend_on_their_own_patch_only():
    """encoder='patch': changing one f x f patch changes that position's code and no other (the conv encoder's
    overlapping receptive fields and GroupNorm change many); the model still round-trips shapes and dtypes."""
    torch.manual_seed(0)
    images = square_images(6)
    for encoder, local in (("patch", True), ("conv", False)):
        model = warmed_up(VQImageTokenizer(tiny_config("vq", 8, encoder=encoder)), images)
        with torch.no_grad():
            latents = model.encoder(images)  # (B, latent_dim, 4, 4)
            changed = images.clone()
            changed[:, :, :8, :8] = 1.0  # the top-left 8x8 patch only
            moved = (model.encoder(changed) - latents).abs().amax(dim=1) > 0  # (B, 4, 4)
        assert moved[:, 0, 0].all()
        assert (moved.sum(dim=(1, 2)) == 1).all() == local, encoder
    assert model.decode(model.encode(images)).shape == images.shape


def test_encode_does_not_touch_quantizer_state_in_train_mode():
    torch.manual_seed(0)
    model = warmed_up(VQImageTokenizer(tiny_config("vq")), square_images(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.encode(square_images(4, seed=1))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_forward_gradients_reach_encoder_through_the_quantizer():
    torch.manual_seed(0)
    model = VQImageTokenizer(tiny_config("vq")).train()
    out = model(square_images(2))
    (out.recon.square().mean() + out.aux_loss).backward()
    assert model.encoder.conv_in.weight.grad is not None
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_invalid_codes_and_images_raise():
    model = VQImageTokenizer(tiny_config("vq")).eval()
    good = torch.zeros(2, 8, 8, dtype=torch.long)
    bad = good.clone()
    bad[1, 2, 3] = 32
    with pytest.raises(ValueError, match=r"code 32 at \(batch 1, row 2, col 3\).*\[0, 32\)"):
        model.decode(bad)
    with pytest.raises(ValueError, match="code -1"):
        model.decode(good - 1)
    with pytest.raises(ValueError, match=r"\(B, 8, 8\)"):
        model.decode(torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 8, 8\)"):
        model.decode(torch.zeros(2, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model.decode(good.float())
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model.encode(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="float"):
        model.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------------- preprocessing


def rgb_at(tensor: torch.Tensor, y: int, x: int) -> list[int]:
    return [round(float(v)) for v in (tensor[:, y, x] + 1) * 127.5]


def test_preprocess_modes_and_aspect_ratios():
    cfg = tiny_config(pad_color=[10, 20, 30])
    red = Image.new("RGB", (40, 40), (255, 0, 0))
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # fully transparent -> white, as in training
    rgba.paste((0, 255, 0, 255), (10, 10, 30, 30))  # opaque green centre
    gray = Image.new("L", (40, 40), 128)
    palette = red.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    wide = Image.new("RGB", (96, 32), (0, 0, 255))  # blue sides, red centre
    wide.paste((255, 0, 0), (32, 0, 64, 32))
    sixteen = Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16))
    batch = preprocess_images([red, rgba, gray, palette, wide, sixteen], cfg)
    assert batch.shape == (6, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1
    assert rgb_at(batch[0], 16, 16) == [255, 0, 0]
    assert rgb_at(batch[1], 1, 1) == [255, 255, 255] and rgb_at(batch[1], 16, 16) == [0, 255, 0]
    assert rgb_at(batch[2], 5, 5) == [128, 128, 128]
    assert rgb_at(batch[3], 5, 5) == [255, 0, 0]
    assert rgb_at(batch[4], 16, 2) == [255, 0, 0] and rgb_at(batch[4], 16, 29) == [255, 0, 0]  # crop kept centre
    assert rgb_at(batch[5], 3, 3) == [255, 255, 255]

    padded = preprocess_images([wide], dataclasses.replace(cfg, resize_mode="pad"))[0]
    # 96x32 -> 32x11 strip in the middle; bands above and below are the pad colour
    assert rgb_at(padded, 2, 16) == [10, 20, 30] and rgb_at(padded, 29, 16) == [10, 20, 30]
    assert rgb_at(padded, 16, 16) == [255, 0, 0] and rgb_at(padded, 16, 1) == [0, 0, 255]
    with pytest.raises(ValueError, match="list"):
        preprocess_images(red, cfg)


def _half_transparent(mode: str) -> Image.Image:
    """A 24x24 image of ``mode`` whose left half is transparent (a gradient of alpha where the mode has one)."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (24, 24, 4), dtype=np.uint8)
    rgba[:, :12, 3] = 0
    image = Image.fromarray(rgba, "RGBA")
    if mode == "RGBA":
        return image
    if mode == "LA":
        return image.convert("LA")
    if mode == "P":  # palette with a transparent index
        p = image.convert("RGB").quantize(8)
        p.paste(7, (0, 0, 12, 24))
        p.info["transparency"] = 7
        return p
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
@pytest.mark.parametrize("pad_color", [[0, 0, 0], [10, 200, 30]])
def test_prompt_images_get_the_training_colour_conversion(mode: str, pad_color: list[int]) -> None:
    """A transparent prompt image is what the training readers make of the same file: composited on white, not on
    the bundle's pad_color (issue 14: black for shapes-64 at inference, white in training)."""
    import io

    from chameleon_lite.data.decoding import decode_image

    image = _half_transparent(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    trained, _ = decode_image(buffer.getvalue())  # what a shard reader hands to training
    cfg = tiny_config(pad_color=pad_color)
    prompt = preprocess_images([image], cfg)
    assert torch.equal(prompt, preprocess_images([trained], cfg))
    assert rgb_at(prompt[0], 16, 2) == [255, 255, 255]  # a fully transparent pixel is white


def test_to_pil_round_trips_through_preprocess():
    images = square_images(3)
    pil = to_pil(images)
    assert [p.size for p in pil] == [(32, 32)] * 3 and pil[0].mode == "RGB"
    torch.testing.assert_close(preprocess_images(pil, tiny_config()), images)


# ---------------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_save_load_round_trip(tmp_path, quantizer):
    torch.manual_seed(0)
    model = warmed_up(VQImageTokenizer(tiny_config(quantizer)), square_images(8))
    returned = model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file() and (tmp_path / CONFIG_NAME).is_file()
    assert returned == model.config.to_dict()
    loaded = VQImageTokenizer.load(tmp_path)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():  # includes EMA statistics and the k-means `initted` flag
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    if quantizer == "vq":
        assert bool(loaded.quantizer.impl._codebook.initted)
    images = square_images(6, seed=3)
    assert torch.equal(model.encode(images), loaded.encode(images))
    from_file = VQImageTokenizer.load(tmp_path / WEIGHTS_NAME, model.config)
    assert torch.equal(from_file.encode(images), model.encode(images))


def test_load_rejects_mismatched_config(tmp_path):
    cfg = tiny_config("vq")
    VQImageTokenizer(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="codebook_size: config has 64, weights were saved with 32"):
        VQImageTokenizer.load(tmp_path, dataclasses.replace(cfg, codebook_size=64))
    with pytest.raises(ValueError, match="grid"):
        VQImageTokenizer.load(tmp_path, dataclasses.replace(cfg, image_size=64))
    # training-only settings may differ
    VQImageTokenizer.load(tmp_path, dataclasses.replace(cfg, decay=0.5, resize_mode="pad"))
    # weights without stored config: shapes are checked and the codebook size is named
    state = {k: v.contiguous() for k, v in VQImageTokenizer(cfg).state_dict().items()}
    save_file(state, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="codebook_size: the file has 32 codes, config says 64"):
        VQImageTokenizer.load(tmp_path / "bare.safetensors", dataclasses.replace(cfg, codebook_size=64))
    with pytest.raises(ValueError, match="no config"):
        VQImageTokenizer.load(tmp_path / "bare.safetensors")
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:  # the config travels inside the weights file
        assert json.loads(f.metadata()["config"]) == cfg.to_dict()


# ---------------------------------------------------------------------------------------------------- metrics


def test_psnr_of_known_mse():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.full_like(x, 0.1)  # MSE 0.01
    assert psnr(x, y, data_range=2.0).item() == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-4)
    y[1] = 0.2  # per-image mean: (26.02 + 20.0) / 2
    expected = (10 * math.log10(4 / 0.01) + 10 * math.log10(4 / 0.04)) / 2
    assert psnr(x, y, data_range=2.0).item() == pytest.approx(expected, abs=1e-4)
    assert math.isfinite(psnr(x, x).item())


def test_ssim_identical_and_against_torchmetrics():
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    torch.manual_seed(0)
    x = square_images(3)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    ours = ssim(noisy, x, data_range=2.0).item()
    reference = tm_ssim(noisy, x, data_range=2.0).item()
    assert ours < 0.9
    assert ours == pytest.approx(reference, abs=1e-4)
    other = torch.rand(2, 3, 20, 24)
    assert ssim(other, other.flip(-1), data_range=1.0).item() == pytest.approx(
        tm_ssim(other, other.flip(-1), data_range=1.0).item(), abs=1e-4
    )


def test_codebook_statistics():
    uniform = torch.arange(16).repeat(3)
    assert codebook_usage(uniform, 16) == 1.0
    assert code_perplexity(uniform, 16) == pytest.approx(16.0)
    assert dead_codes(uniform, 16) == 0
    one_hot = torch.full((5, 4), 3)
    assert codebook_usage(one_hot, 16) == pytest.approx(1 / 16)
    assert code_perplexity(one_hot, 16) == pytest.approx(1.0)
    assert dead_codes(one_hot, 16) == 15
    half = torch.tensor([0, 1, 2, 3])
    assert histogram_metrics(code_histogram(half, 8)) == pytest.approx(
        {"usage": 0.5, "perplexity": 4.0, "dead_codes": 4.0}
    )
    with pytest.raises(ValueError, match="outside"):
        code_histogram(torch.tensor([0, 16]), 16)


# ---------------------------------------------------------------------------------------------------- lightning


def recon_loss_on(module: VQTokenizerModule, images: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        loss = torch.nn.functional.l1_loss(module.tokenizer(images).recon, images).item()
    module.train()
    return loss


def test_lightning_training_lowers_loss_and_logs(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0, verbose=False)
    images = square_images(64)
    batches = [{"image": image} for image in images]
    module = VQTokenizerModule(
        tiny_config("vq", base_channels=16, latent_dim=16), lr=3e-3, warmup_steps=5, log_every_n_steps=5
    )
    before = recon_loss_on(module, images)
    trainer = L.Trainer(
        max_steps=30,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        check_val_every_n_epoch=2,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, DataLoader(batches, batch_size=16, shuffle=True), DataLoader(batches, batch_size=32))
    after = recon_loss_on(module, images)
    assert trainer.global_step == 30
    assert after < 0.6 * before, (before, after)
    metrics = trainer.logged_metrics
    for key in ("val/psnr", "val/ssim", "val/codebook_usage", "val/code_perplexity", "val/dead_codes", "train/loss"):
        assert key in metrics, key
    assert 0 < metrics["val/codebook_usage"] <= 100
    assert metrics["val/dead_codes"] == pytest.approx(32 * (1 - metrics["val/codebook_usage"] / 100))
    assert list(tmp_path.rglob("reconstructions/*.png"))
    module.export_tokenizer(tmp_path / "tok")
    assert torch.equal(VQImageTokenizer.load(tmp_path / "tok").encode(images), module.tokenizer.encode(images))


def test_lightning_gan_training_updates_discriminator(tmp_path):
    L.seed_everything(0, verbose=False)
    batches = [{"image": image} for image in square_images(16)]
    module = VQTokenizerModule(
        tiny_config("fsq"), gan_weight=0.1, gan_start_step=2, disc_channels=8, disc_layers=2, warmup_steps=0
    )
    assert not module.automatic_optimization
    disc_before = [p.detach().clone() for p in module.discriminator.parameters()]
    trainer = L.Trainer(
        max_steps=6,  # 2 batches without the GAN, then 2 batches x 2 optimizer steps
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(batches, batch_size=4))
    assert {"train/d_loss", "train/g_loss", "train/recon_loss"} <= set(trainer.logged_metrics)
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, module.discriminator.parameters()))


def test_module_accepts_plain_tensor_batches_and_rejects_perceptual():
    module = VQTokenizerModule(tiny_config("fsq"))
    assert module._images(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="image"):
        module._images({"pixels": torch.zeros(1)})
    with pytest.raises(ValueError, match="perceptual"):
        VQTokenizerModule(tiny_config("fsq"), perceptual="lpips")
    assert PatchDiscriminator(3, 8, 3)(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
