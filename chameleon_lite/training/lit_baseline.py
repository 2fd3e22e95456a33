"""LightningModules of the encoder-projector baseline, and the callbacks that export what they train.

Three recipes (``configs/baseline/``), each ``chameleon-lite fit --config ...``:

1. ``ContrastiveEncoderModule``: the ViT learns from image-caption pairs with a small text tower (SigLIP's
   sigmoid loss, or CLIP's softmax loss). Validation logs zero-shot retrieval ``val/r1_i2t`` (image -> caption
   R@1; identical captions count as correct) and ``val/r1_t2i``. ``ExportVisionEncoder`` writes the ViT;
   ``ExportContrastiveScorer`` writes the whole model (both towers, heads, logit scale/bias) as the scorer of
   ``eval.r_precision`` (text -> image R-precision).
2. ``BaselineVLMModule(stage=1)``: encoder and decoder frozen, the projector learns from captions.
3. ``BaselineVLMModule(stage=2)``: decoder unfrozen (and the encoder with ``train_encoder=True``), captions + QA.

``ExportBaselineDir`` writes a baseline model directory at the end of ``fit`` (``BaselineVLM.from_pretrained``).

Notable choices:

- **Where weights come from.** Stage 1 loads the vision encoder from ``encoder_init`` (a directory written by
  ``ExportVisionEncoder``) and, if given, the decoder from ``decoder_init`` (a native or baseline model
  directory; default: a fresh decoder, since no pretrained language model exists offline). Stage 2 loads
  everything from ``init_from`` (the stage-1 model directory). Every loaded config must equal the module's:
  the first differing field is named.
- **Frozen is frozen.** Frozen parts have ``requires_grad=False``, are kept in eval mode, are left out of the
  optimizer, and a frozen encoder runs under ``no_grad``.
- **Validation** logs ``val/loss`` (text cross-entropy), ``val/accuracy`` (token argmax hits) and, for QA rows,
  ``val/answer_exact``: the fraction of answers whose every token (and the ``<eos>``) is the teacher-forced
  argmax, which is exactly the fraction that unconstrained greedy decoding gets right.
- ``train/samples`` counts training rows seen (all processes), the budget unit of the comparison.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file, save_file
from torch import Tensor

from chameleon_lite.baseline.contrastive import (
    ContrastiveConfig,
    ContrastiveModel,
    TextEncoder,
    TextEncoderConfig,
    retrieval_recall_at_k,
)
from chameleon_lite.baseline.projectors import ProjectorConfig
from chameleon_lite.baseline.vision_encoder import VisionEncoder, ViTConfig
from chameleon_lite.baseline.vlm import (
    BaselineConfig,
    BaselineVLM,
    load_baseline_config,
    load_state_into,
    parameter_counts,
    write_baseline_dir,
)
from chameleon_lite.eval.r_precision import write_scorer_dir
from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import IGNORE_INDEX, next_token_loss
from chameleon_lite.model.model_dir import model_dir_kind, resolve_bundle_path
from chameleon_lite.native.chameleon import load_decoder, load_model_config
from chameleon_lite.safe_io import (
    check_writable_dir,
    load_checked_weights,
    load_structured_yaml,
    save_structured_yaml,
    write_dir,
)
from chameleon_lite.tokenization.bundle import load_bundle
from chameleon_lite.training.lit_native import decoder_param_groups
from chameleon_lite.training.optimizers import clip_fused_directly, use_fused_adamw
from chameleon_lite.training.schedules import warmup_cosine

__all__ = [
    "ContrastiveEncoderModule",
    "BaselineVLMModule",
    "ExportVisionEncoder",
    "ExportContrastiveScorer",
    "ExportBaselineDir",
    "load_vision_encoder",
]

ENCODER_CONFIG = "config.yaml"
ENCODER_WEIGHTS = "model.safetensors"


# settings of how a model is trained or run, not of what its weights mean: they may differ between stages
_RUN_SETTINGS = {"z_loss_weight", "dropout", "gradient_checkpointing", "attention_backend"}


def _check_same(expected: Any, found: Any, what: str) -> None:
    a, b = dataclasses.asdict(expected), dataclasses.asdict(found)
    for key in a:
        if key in _RUN_SETTINGS:
            continue
        if a[key] != b.get(key):
            raise ValueError(f"{what}: {key}={b.get(key)!r} but this module is configured with {a[key]!r}")


def _optimizer(module: L.LightningModule, params: list[dict[str, Any]]):
    h = module.hparams
    fused = use_fused_adamw(module, [p for group in params for p in group["params"]])
    optimizer = torch.optim.AdamW(params, lr=h.lr, betas=tuple(h.betas), fused=True if fused else None)
    max_steps = module.trainer.max_steps if module._trainer is not None else -1
    schedule = warmup_cosine(h.warmup_steps, max_steps if max_steps and max_steps > 0 else None, h.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _check_hparams(lr: float, weight_decay: float, warmup_steps: int, min_lr_ratio: float) -> None:
    if lr <= 0 or weight_decay < 0 or warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError("need lr > 0, weight_decay >= 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")


# ---------------------------------------------------------------------------------------------- encoder


def load_vision_encoder(directory: str | Path, expected: ViTConfig | None = None) -> VisionEncoder:
    """A ``VisionEncoder`` from a directory written by ``ExportVisionEncoder`` (config.yaml, model.safetensors)."""
    directory = Path(directory)
    for name in (ENCODER_CONFIG, ENCODER_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"vision encoder directory {directory} has no {name}")
    config = load_structured_yaml(directory / ENCODER_CONFIG, ViTConfig)  # plain data: never interpolated
    if expected is not None:
        _check_same(expected, config, f"{directory / ENCODER_CONFIG}")
    return load_checked_weights(partial(VisionEncoder, config), directory / ENCODER_WEIGHTS,
                                config_file=directory / ENCODER_CONFIG, min_tensors=config.n_layers,
                                asks=f"n_layers={config.n_layers}")


class ContrastiveEncoderModule(L.LightningModule):
    """Contrastive pretraining of the baseline's ViT against a small text tower (batches: ``contrastive_batch``).

    Args:
        tokenizer: tokenizer bundle directory (the text tower's vocabulary is the bundle's).
        vit: the vision encoder's shape.
        text: the text tower's shape (``vocab_size`` and ``pad_id`` are filled in from the bundle).
        contrastive: embedding size, loss (``siglip`` or ``clip``), initial temperature and bias.
        lr, betas, weight_decay, warmup_steps, min_lr_ratio: AdamW with warm-up and cosine decay to ``max_steps``.
        seed: seed of the weight initialisation.
    """

    def __init__(
        self,
        tokenizer: str = "tokenizers/shapes-64",
        vit: ViTConfig | None = None,
        text: TextEncoderConfig | None = None,
        contrastive: ContrastiveConfig | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_hparams(lr, weight_decay, warmup_steps, min_lr_ratio)
        vocab = load_bundle(resolve_bundle_path(tokenizer), load_image_tokenizer=False).vocab
        vit = vit or ViTConfig()
        text = dataclasses.replace(text or TextEncoderConfig(vocab_size=vocab.size), vocab_size=vocab.size,
                                   pad_id=vocab.pad)
        contrastive = contrastive or ContrastiveConfig()
        self.vit_config = vit
        self.save_hyperparameters()
        self.hparams["tokenizer"] = str(tokenizer)
        self.hparams["vit"] = dataclasses.asdict(vit)
        self.hparams["text"] = dataclasses.asdict(text)
        self.hparams["contrastive"] = dataclasses.asdict(contrastive)
        self.hparams["betas"] = tuple(float(b) for b in betas)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = ContrastiveModel(VisionEncoder(vit), TextEncoder(text), contrastive)
        self._val: list[tuple[Tensor, Tensor, Tensor]] = []

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        img, txt = self.model(batch["images"], batch["text_ids"], batch["text_lengths"])
        loss = self.model.loss(img, txt)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/samples", float((self.global_step + 1) * batch["images"].shape[0] * self.trainer.world_size))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        img, txt = self.model(batch["images"], batch["text_ids"], batch["text_lengths"])
        self.log("val/loss", self.model.loss(img, txt), prog_bar=True)
        groups = [tuple(row[:n].tolist()) for row, n in zip(batch["text_ids"], batch["text_lengths"])]
        self._val.append((img.float().cpu(), txt.float().cpu(), groups))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        img = torch.cat([v[0] for v in self._val])  # (N, E)
        txt = torch.cat([v[1] for v in self._val])  # (N, E)
        captions = [g for v in self._val for g in v[2]]
        ids: dict[tuple, int] = {}
        groups = torch.as_tensor([ids.setdefault(c, len(ids)) for c in captions])  # (N,) equal for equal captions
        self._val = []
        self.log("val/r1_i2t", retrieval_recall_at_k(img, txt, k=1, text_groups=groups), prog_bar=True)
        self.log("val/r1_t2i", retrieval_recall_at_k(txt, img, k=1, text_groups=groups))
        self.log("val/retrieval_pool", float(len(captions)))

    def configure_optimizers(self):
        return _optimizer(self, decoder_param_groups(self.model, self.hparams.weight_decay))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """The trainer's clipping, also for the fused AdamW used on CUDA (``optimizers.clip_fused_directly``)."""
        if not (gradient_clip_val and clip_fused_directly(self, optimizer, gradient_clip_val, gradient_clip_algorithm)):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


class ExportVisionEncoder(L.Callback):
    """Write the trained ViT (``config.yaml`` + ``model.safetensors``) to ``out_dir`` when ``fit`` ends.

    ``out_dir`` must be absent, empty or written before (``safe_io.write_dir``: files it did not write stay).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_writable_dir(self.out_dir)  # refused before training, not after

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, ContrastiveEncoderModule):
            raise ValueError(f"ExportVisionEncoder exports a ContrastiveEncoderModule, got {type(pl_module).__name__}")
        if not trainer.is_global_zero:
            return
        vision = pl_module.model.vision
        state = {k: v.detach().cpu().contiguous() for k, v in vision.state_dict().items()}

        def build(tmp: Path) -> None:
            save_file(state, str(tmp / ENCODER_WEIGHTS), metadata={"format": "pt", "kind": "vision_encoder"})
            save_structured_yaml(pl_module.vit_config, tmp / ENCODER_CONFIG)

        write_dir(self.out_dir, build, kind="vision_encoder")
        rank_zero_info(f"vision encoder written to {self.out_dir}")


class ExportContrastiveScorer(L.Callback):
    """Write the whole trained contrastive model as a scorer directory to ``out_dir`` when ``fit`` ends.

    The directory (``eval.r_precision.write_scorer_dir``; read by ``eval.r_precision.load_scorer``) holds
    ``model.safetensors`` (vision and text towers, heads, ``logit_scale`` and, for SigLIP, ``logit_bias``),
    ``config.yaml`` (vit / text / contrastive configs, image size, the tokenizer bundle's name and the path it was
    trained with) and ``tokenizer/`` (the bundle's text part). ``out_dir`` must be absent, empty or written before
    (``safe_io.write_dir``: files it did not write stay); checked when fit starts.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.written: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_writable_dir(self.out_dir)  # refused before training, not after

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, ContrastiveEncoderModule):
            raise ValueError(f"ExportContrastiveScorer exports a ContrastiveEncoderModule, got "
                             f"{type(pl_module).__name__}")
        if not trainer.is_global_zero:
            return
        self.written = write_scorer_dir(pl_module.model, pl_module.hparams.tokenizer, self.out_dir,
                                        trained_steps=trainer.global_step)
        rank_zero_info(f"contrastive scorer written to {self.written}")


# ---------------------------------------------------------------------------------------------- VLM


class BaselineVLMModule(L.LightningModule):
    """Stage 1 / stage 2 training of the ``BaselineVLM`` (batches: ``vlm_batch``; loss on text only).

    Args:
        tokenizer: tokenizer bundle directory (fixes the vocabulary; copied on export).
        vit, projector, model: the three parts' configs (``model`` is the ``DecoderConfig``; its ``vocab_size``
            comes from the bundle).
        stage: 1 (projector only) or 2 (projector and decoder, plus the encoder with ``train_encoder``).
        encoder_init: directory of a pretrained vision encoder (``ExportVisionEncoder``); stage 1.
        decoder_init: a native or baseline model directory whose decoder initialises this one; stage 1.
        init_from: a baseline model directory to start from (stage 2: the stage-1 result).
        train_encoder: unfreeze the encoder (stage 2 only).
        lr, betas, weight_decay, warmup_steps, min_lr_ratio: AdamW, warm-up then cosine decay to ``max_steps``.
        z_loss_weight: None takes ``model.z_loss_weight``.
        seed: seed of the weight initialisation (parts not loaded from files).
    """

    def __init__(
        self,
        tokenizer: str = "tokenizers/shapes-64",
        vit: ViTConfig | None = None,
        projector: ProjectorConfig | None = None,
        model: DecoderConfig | None = None,
        stage: int = 1,
        encoder_init: str | None = None,
        decoder_init: str | None = None,
        init_from: str | None = None,
        train_encoder: bool = False,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        z_loss_weight: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_hparams(lr, weight_decay, warmup_steps, min_lr_ratio)
        if stage not in (1, 2):
            raise ValueError(f"stage={stage} must be 1 or 2")
        if train_encoder and stage == 1:
            raise ValueError("train_encoder=True needs stage=2 (stage 1 trains the projector only)")
        if init_from is not None and (encoder_init or decoder_init):
            raise ValueError("init_from loads every part; do not combine it with encoder_init / decoder_init")
        self.tokenizer_path = resolve_bundle_path(tokenizer)
        self.vocab = load_bundle(self.tokenizer_path, load_image_tokenizer=False).vocab
        decoder = model or DecoderConfig(vocab_size=self.vocab.size)
        if decoder.vocab_size != self.vocab.size:
            decoder = dataclasses.replace(decoder, vocab_size=self.vocab.size)
        if z_loss_weight is not None:  # as the native module: the decoder config records the weight it trained with
            decoder = dataclasses.replace(decoder, z_loss_weight=float(z_loss_weight))
        self.config = BaselineConfig(vit=vit or ViTConfig(), projector=projector or ProjectorConfig(), decoder=decoder)
        self.z_loss_weight = decoder.z_loss_weight
        self.save_hyperparameters()
        self.hparams["tokenizer"] = str(tokenizer)
        self.hparams["vit"] = dataclasses.asdict(self.config.vit)
        self.hparams["projector"] = dataclasses.asdict(self.config.projector)
        self.hparams["model"] = dataclasses.asdict(decoder)
        self.hparams["betas"] = tuple(float(b) for b in betas)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vlm = BaselineVLM(self.config, self.vocab)
        self._initial_weights_loaded = False
        self.trainable = {"encoder": bool(train_encoder), "projector": True, "decoder": stage == 2}
        for name, train in self.trainable.items():
            getattr(self.vlm, name).requires_grad_(train)
        self._val = torch.zeros(5)

    def setup(self, stage: str) -> None:
        """Load ``encoder_init`` / ``decoder_init`` / ``init_from`` before training starts (not at construction, so a
        recipe can be instantiated and checked without its inputs; a resumed checkpoint then overrides them)."""
        if stage == "fit" and not self._initial_weights_loaded:
            h = self.hparams
            self._load_initial_weights(h.encoder_init, h.decoder_init, h.init_from)
            self._initial_weights_loaded = True

    def _load_initial_weights(self, encoder_init: str | None, decoder_init: str | None, init_from: str | None):
        if encoder_init:
            loaded = load_vision_encoder(encoder_init, expected=self.config.vit)
            self.vlm.encoder.load_state_dict(loaded.state_dict())
        if decoder_init:
            path = Path(decoder_init)
            cfg_file = path / "config.yaml"
            if model_dir_kind(path) == "baseline":
                found = load_baseline_config(cfg_file).decoder
                state = {k[len("decoder."):]: v for k, v in load_file(str(path / "model.safetensors")).items()
                         if k.startswith("decoder.")}
                _check_same(self.config.decoder, found, str(cfg_file))
                self.vlm.decoder.load_state_dict(state, strict=not found.tie_embeddings)
            else:
                found = load_model_config(cfg_file).decoder
                _check_same(self.config.decoder, found, str(cfg_file))
                self.vlm.decoder.load_state_dict(load_decoder(found, path / "model.safetensors").state_dict())
        if init_from:
            path = Path(init_from)
            found = load_baseline_config(path / "config.yaml")
            for part in ("vit", "projector", "decoder"):
                _check_same(getattr(self.config, part), getattr(found, part), f"{path / 'config.yaml'} ({part})")
            load_state_into(self.vlm, load_file(str(path / "model.safetensors")), str(path / "model.safetensors"))

    def train(self, mode: bool = True):
        super().train(mode)
        for name, train in self.trainable.items():
            if not train:
                getattr(self.vlm, name).eval()  # frozen parts stay in eval mode (dropout off)
        return self

    def on_fit_start(self) -> None:
        counts = parameter_counts(self.vlm)
        trainable = sum(p.numel() for p in self.vlm.parameters() if p.requires_grad)
        rank_zero_info(f"baseline stage {self.hparams.stage}: parameters {counts}, trainable {trainable:,}")

    def _forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.vlm(batch["images"], batch["input_ids"], batch["loss_mask"])  # a frozen encoder runs without grad

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits, targets = self._forward(batch)
        out = next_token_loss(logits, targets, None, self.z_loss_weight)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log("train/samples", float((self.global_step + 1) * targets.shape[0] * self.trainer.world_size))
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(5, device=self.device)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits, targets = self._forward(batch)
        out = next_token_loss(logits, targets, None, 0.0)
        counted = targets != IGNORE_INDEX  # (B, T')
        hits = (logits.argmax(-1) == targets) | ~counted  # (B, T')
        is_qa = batch["task"] == 1  # (B,)
        exact = hits.all(dim=1) & is_qa
        self._val += torch.stack([out["ce_sum"], out["weight_sum"], out["accuracy"] * out["n_tokens"],
                                  exact.sum().float(), is_qa.sum().float()]).detach()

    def on_validation_epoch_end(self) -> None:
        ce_sum, weight_sum, hits, exact, n_qa = self.trainer.strategy.reduce(self._val, reduce_op="sum").tolist()
        if weight_sum <= 0:
            return
        self.log("val/loss", ce_sum / weight_sum, prog_bar=True)
        self.log("val/accuracy", hits / weight_sum)
        if n_qa > 0:
            self.log("val/answer_exact", exact / n_qa, prog_bar=True)

    def configure_optimizers(self):
        return _optimizer(self, decoder_param_groups(self.vlm, self.hparams.weight_decay))  # trainable only

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """The trainer's clipping, also for the fused AdamW used on CUDA (``optimizers.clip_fused_directly``)."""
        if not (gradient_clip_val and clip_fused_directly(self, optimizer, gradient_clip_val, gradient_clip_algorithm)):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


class ExportBaselineDir(L.Callback):
    """Write the baseline model directory (``BaselineVLM.from_pretrained``) when ``fit`` ends.

    ``out_dir`` must be absent, empty or written before (``safe_io.write_dir``); checked when fit starts.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.written: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_writable_dir(self.out_dir)  # refused before training, not after

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, BaselineVLMModule):
            raise ValueError(f"ExportBaselineDir exports a BaselineVLMModule, got {type(pl_module).__name__}")
        if not trainer.is_global_zero:
            return
        self.written = write_baseline_dir(pl_module.vlm, pl_module.tokenizer_path, self.out_dir,
                                          trained_steps=trainer.global_step)
        rank_zero_info(f"baseline model directory written to {self.written}")
