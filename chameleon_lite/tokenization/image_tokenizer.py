"""VQ image tokenizer: images <-> grids of discrete codes that share the vocabulary with text.

`encode(images) -> LongTensor[B, h, w]` and `decode(codes) -> images` are the whole contract the rest of the
package relies on; whichever quantizer is inside, the codes are ints in `[0, config.codebook_size)`.

Notable design choices:
- VQGAN-family conv autoencoder (Esser et al. 2021): residual blocks with GroupNorm + SiLU, strided-conv
  downsampling, nearest-upsample + conv upsampling, an optional mid block (ResBlock [-> self-attention] -> ResBlock)
  at the latent resolution. No attention at high resolution: it is slow on CPU and shapes do not need it.
- The quantizer comes from vector-quantize-pytorch (`VectorQuantize` with EMA codebook, k-means init and dead-code
  replacement; `FSQ`; `LFQ`) behind one private wrapper, `_Quantizer`, that normalises their differing return
  tuples to `(quantized (B, D, h, w), indices (B, h, w), aux_loss)` and their differing index->vector lookups.
- `forward(images).recon` is clamped to [-1, 1] with a straight-through gradient, so the losses see exactly what
  `decode` returns (and `decode(encode(x)) == forward(x).recon` in eval mode) while gradients still flow.
- Preprocessing is explicit: any PIL mode -> RGB (transparency composited onto `pad_color`), then either
  "center_crop" (resize the short side, crop the centre) or "pad" (resize the long side, letterbox with `pad_color`).
- Weights are saved with safetensors only, with the config in the file's metadata, so `load` can name exactly which
  setting disagrees with the weights. Quantizer buffers (EMA statistics, k-means `initted` flag) are included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from einops import rearrange
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

from chameleon_lite.safe_io import write_dir
from chameleon_lite.tokenization.image_preprocessing import preprocess_images, to_pil
from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig
from chameleon_lite.tokenization.vq_autoencoder import ConvEncoder, ImageDecoder, PatchEncoder

WEIGHTS_NAME = "image_tokenizer.safetensors"
CONFIG_NAME = "image_tokenizer.yaml"

# Settings that only change how the model trains or how PIL images are prepared; `load` accepts them differing
# from the values stored with the weights. Every other field changes the network or the meaning of the codes.
_NON_ARCHITECTURE_FIELDS = frozenset(
    {"kmeans_init", "kmeans_iters", "decay", "threshold_ema_dead_code", "commitment_weight", "lfq_entropy_weight"}
    | {"resize_mode", "pad_color", "resample"}
)


class TokenizerOutput(NamedTuple):
    """What `VQImageTokenizer.forward` returns."""

    recon: Tensor  # (B, C, H, W) in [-1, 1]; clamped with a straight-through gradient
    codes: Tensor  # (B, h, w) int64
    aux_loss: Tensor  # () quantizer loss (commitment / entropy), already weighted; 0 for fsq


class _Quantizer(nn.Module):
    """The one wrapper over vector-quantize-pytorch: same call signature and outputs whatever `config.quantizer` is.

    The library is used channel-last on flattened positions, (B, N, D), for all three quantizers: that is the
    layout in which their index -> vector lookups (`get_output_from_indices`, `indices_to_codes`) agree with
    their forward passes (VectorQuantize's image-fmap mode applies `project_out` on the wrong axis in lookups).
    """

    def __init__(self, config: ImageTokenizerConfig) -> None:
        super().__init__()
        self.kind = config.quantizer
        self.codebook_size = int(config.codebook_size)
        if self.kind == "vq":
            self.impl = VectorQuantize(
                dim=config.latent_dim,
                codebook_size=self.codebook_size,
                codebook_dim=config.codebook_dim,
                decay=config.decay,
                kmeans_init=config.kmeans_init,
                kmeans_iters=config.kmeans_iters,
                threshold_ema_dead_code=config.threshold_ema_dead_code,
                use_cosine_sim=config.use_cosine_sim,
                rotation_trick=config.rotation_trick,
                commitment_weight=config.commitment_weight,
                channel_last=True,
            )
        elif self.kind == "fsq":
            self.impl = FSQ(levels=list(config.fsq_levels), dim=config.latent_dim)
        else:
            self.impl = LFQ(
                dim=config.latent_dim,
                codebook_size=self.codebook_size,
                entropy_loss_weight=config.lfq_entropy_weight,
                commitment_loss_weight=config.commitment_weight,
            )

    def forward(self, latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, D, h, w) -> quantized (B, D, h, w), indices (B, h, w) int64, aux_loss ()."""
        h, w = latents.shape[-2:]
        flat = rearrange(latents, "b d h w -> b (h w) d")
        if self.kind == "vq":
            quantized, indices, aux_loss = self.impl(flat)
        elif self.kind == "fsq":
            quantized, indices = self.impl(flat)
            aux_loss = flat.new_zeros(())
        else:
            quantized, indices, aux_loss = self.impl(flat)
        quantized = rearrange(quantized, "b (h w) d -> b d h w", h=h, w=w)
        indices = rearrange(indices.long(), "b (h w) -> b h w", h=h, w=w)
        return quantized, indices, aux_loss.reshape(())

    @property
    def pending_kmeans_init(self) -> bool:
        """True while a VQ codebook waits for its k-means init (the library runs it on the next forward, even
        in eval mode, with random sampling)."""
        return self.kind == "vq" and not bool(self.impl._codebook.initted)

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, h, w) int64 -> (B, D, h, w), the vectors the forward pass would have produced for these indices."""
        h, w = indices.shape[-2:]
        flat = rearrange(indices, "b h w -> b (h w)")
        if self.kind == "vq":
            vectors = self.impl.get_output_from_indices(flat)
        else:
            vectors = self.impl.indices_to_codes(flat)
        return rearrange(vectors, "b (h w) d -> b d h w", h=h, w=w)


# --------------------------------------------------------------------------------------------------------------
# the tokenizer


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run in eval mode (no EMA updates, no dead-code replacement) and restore the previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class VQImageTokenizer(nn.Module):
    """Conv encoder -> quantizer -> conv decoder, mapping images in [-1, 1] to (h, w) grids of integer codes.

    Example:
        >>> tok = VQImageTokenizer(ImageTokenizerConfig())
        >>> codes = tok.encode(tok.preprocess(pil_images))   # (B, 8, 8) int64
        >>> images = tok.to_pil(tok.decode(codes))
    """

    def __init__(self, config: ImageTokenizerConfig) -> None:
        super().__init__()
        if not isinstance(config, ImageTokenizerConfig):
            raise ValueError(f"config must be an ImageTokenizerConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = PatchEncoder(config) if config.encoder == "patch" else ConvEncoder(config)
        self.quantizer = _Quantizer(config)
        self.decoder = ImageDecoder(config)

    @property
    def codebook_size(self) -> int:
        return int(self.config.codebook_size)

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    # ---- checks ------------------------------------------------------------------------------------------------

    def _check_images(self, images: Tensor) -> None:
        expected = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, expected))}), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [-1, 1], got dtype {images.dtype} (use preprocess())")

    def _check_codes(self, codes: Tensor) -> None:
        h, w = self.grid
        if not isinstance(codes, Tensor) or codes.ndim != 3 or tuple(codes.shape[1:]) != (h, w):
            shape = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"expected codes of shape (B, {h}, {w}) for the {h}x{w} grid, got {shape}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"expected integer codes, got dtype {codes.dtype}")
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bad.any():
            b, row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"code {int(codes[b, row, col])} at (batch {b}, row {row}, col {col}) is outside "
                f"[0, {self.codebook_size}); {int(bad.sum())} code(s) out of range"
            )

    # ---- model -------------------------------------------------------------------------------------------------

    def forward(self, images: Tensor) -> TokenizerOutput:
        """(B, C, H, W) in [-1, 1] -> TokenizerOutput(recon (B, C, H, W), codes (B, h, w), aux_loss ())."""
        self._check_images(images)
        latents = self.encoder(images)  # (B, D, h, w)
        quantized, codes, aux_loss = self.quantizer(latents)
        raw = self.decoder(quantized)  # (B, C, H, W), unbounded
        recon = raw + (raw.clamp(-1.0, 1.0) - raw).detach()  # values clamped, gradient straight through
        return TokenizerOutput(recon=recon, codes=codes, aux_loss=aux_loss)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """FloatTensor (B, C, H, W) in [-1, 1] -> LongTensor (B, h, w) of codes in [0, codebook_size).

        Runs in eval mode (the quantizer's EMA statistics are not touched) and restores the previous mode.
        """
        self._check_images(images)
        if self.quantizer.pending_kmeans_init:
            raise ValueError(
                "the VQ codebook is not initialised yet: k-means init runs on the first training batch; "
                "train the tokenizer (or set kmeans_init=False) before encoding"
            )
        with _eval_mode(self):
            _, codes, _ = self.quantizer(self.encoder(images))
        return codes

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """LongTensor (B, h, w) of codes in [0, codebook_size) -> FloatTensor (B, C, H, W) clamped to [-1, 1]."""
        self._check_codes(codes)
        with _eval_mode(self):
            quantized = self.quantizer.lookup(codes.long())  # (B, D, h, w)
            return self.decoder(quantized).clamp(-1.0, 1.0)

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """List of PIL images -> FloatTensor (B, C, image_size, image_size) in [-1, 1] on this model's device."""
        return preprocess_images(images, self.config).to(self._device())

    @staticmethod
    def to_pil(images: Tensor) -> list[Image.Image]:
        """FloatTensor (B, C, H, W) in [-1, 1] -> list of PIL images."""
        return to_pil(images)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- persistence -------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> dict[str, Any]:
        """Write `image_tokenizer.safetensors` (weights + quantizer buffers, config in the metadata) and
        `image_tokenizer.yaml` (the config) into `directory`; return the config dict.

        `directory` must be absent, empty or written here before (`safe_io.write_dir`: files it did not write are
        never replaced or removed; another non-empty directory raises FileExistsError).
        """
        config_dict = self.config.to_dict()

        def build(tmp: Path) -> None:
            self.save_weights(tmp / WEIGHTS_NAME)
            with open(tmp / CONFIG_NAME, "w") as f:
                yaml.safe_dump(config_dict, f, sort_keys=False)

        write_dir(directory, build, kind="image_tokenizer")
        return config_dict

    def save_weights(self, path: str | Path) -> None:
        """Write weights and quantizer buffers to one safetensors file, with the config in its metadata."""
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        metadata = {"format": "pt", "config": json.dumps(self.config.to_dict())}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(
        cls,
        path: str | Path,
        config: ImageTokenizerConfig | dict[str, Any] | None = None,
        map_location: str | torch.device = "cpu",
    ) -> VQImageTokenizer:
        """Load from a directory written by `save_pretrained` or from a `.safetensors` file.

        `config` defaults to the one stored with the weights. A given config must agree with the stored one on
        everything that shapes the network or the codes (otherwise ValueError naming each disagreeing field), and
        its tensors must match the file's names and shapes (otherwise ValueError naming them).
        """
        path = Path(path)
        weights_path = path / WEIGHTS_NAME if path.is_dir() else path
        if not weights_path.is_file():
            raise ValueError(f"no tokenizer weights at {weights_path}")
        stored = _stored_config(weights_path)
        if config is None:
            if stored is None:
                raise ValueError(f"{weights_path} carries no config; pass config= explicitly")
            config = stored
        elif isinstance(config, dict):
            config = ImageTokenizerConfig.from_dict(config)
        if stored is not None:
            _check_config_agrees(config, stored)
        state = load_file(str(weights_path), device=str(map_location))
        try:  # shapes first, on the meta device: a config read from disk allocates nothing beyond the file's tensors
            with torch.device("meta"):
                probe = cls(config)
        except (TypeError, OverflowError) as err:
            raise ValueError(f"no image tokenizer can be built from the config of {weights_path}: {err}") from err
        except RuntimeError:  # FSQ calls .item() while building: checked on the real model below instead
            probe = None
        if probe is not None:
            _check_state_agrees(probe, state, config)
        model = cls(config)
        if probe is None:
            _check_state_agrees(model, state, config)
        model.load_state_dict(state, strict=True)
        return model.to(map_location)


def _stored_config(weights_path: Path) -> ImageTokenizerConfig | None:
    with safe_open(str(weights_path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "config" not in metadata:
        return None
    return ImageTokenizerConfig.from_dict(json.loads(metadata["config"]))


def _check_config_agrees(config: ImageTokenizerConfig, stored: ImageTokenizerConfig) -> None:
    problems = []
    for f in dataclasses.fields(ImageTokenizerConfig):
        if f.name in _NON_ARCHITECTURE_FIELDS:
            continue
        given, saved = getattr(config, f.name), getattr(stored, f.name)
        if given != saved:
            problems.append(f"{f.name}: config has {given!r}, weights were saved with {saved!r}")
    if config.grid != stored.grid:
        problems.append(f"grid: config gives {config.grid}, weights were saved for {stored.grid}")
    if problems:
        raise ValueError("tokenizer config does not match the saved weights: " + "; ".join(problems))


def _check_state_agrees(model: nn.Module, state: dict[str, Tensor], config: ImageTokenizerConfig) -> None:
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for name in sorted(set(expected) & set(state)):
        if expected[name].shape != state[name].shape:
            file_shape, model_shape = tuple(state[name].shape), tuple(expected[name].shape)
            what = f"{name} has shape {file_shape} in the file, {model_shape} in the model"
            if name.endswith("_codebook.embed"):
                what = (
                    f"codebook_size: the file has {state[name].shape[-2]} codes, config says {config.codebook_size} "
                    f"({what})"
                )
            problems.append(what)
    if problems:
        raise ValueError("tokenizer weights do not fit the config: " + "; ".join(problems))
