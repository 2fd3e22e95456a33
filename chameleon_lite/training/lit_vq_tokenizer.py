"""LightningModule that trains the VQ image tokenizer (`VQImageTokenizer`).

Notable choices:
- Loss = `l1_weight * L1 + l2_weight * MSE` on pixels in [-1, 1] + the quantizer's own auxiliary loss
  (commitment for vq, entropy + commitment for lfq, none for fsq; the vq codebook itself learns by EMA).
- Optional PatchGAN hinge loss with a fixed weight, switched on at `gan_start_step`. With the GAN on, the module uses
  Lightning's manual optimization with two optimizers (generator = tokenizer, discriminator). Note that Lightning
  then counts both optimizers' steps in `trainer.global_step` (so in `max_steps`) once the GAN has started.
- Perceptual (LPIPS) loss is not offered: it needs pretrained networks that cannot be downloaded offline.
- Validation logs PSNR, SSIM, and codebook usage (%), code perplexity and dead codes over the whole epoch
  (a code histogram accumulated across batches and summed across processes), plus a grid of originals (top row)
  and reconstructions (bottom row): TensorBoard `add_image` when a logger has it, else a PNG under
  `trainer.log_dir/reconstructions/`. Without any logger nothing is written.
- Batches are dicts with "image": FloatTensor (B, C, H, W) in [-1, 1], or that tensor itself (or a tuple/list whose
  first element it is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from chameleon_lite.eval.image_metrics import code_histogram, histogram_metrics, psnr, ssim
from chameleon_lite.tokenization.image_tokenizer import VQImageTokenizer, to_pil
from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig
from chameleon_lite.tokenization.patch_discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from chameleon_lite.training.schedules import warmup_cosine


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only, not on biases and norm scales."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class VQTokenizerModule(L.LightningModule):
    """Trains a `VQImageTokenizer` on image reconstruction.

    Args:
        config: the tokenizer architecture and quantizer (`ImageTokenizerConfig`); None = its defaults.
        lr: peak learning rate (AdamW), also used for the discriminator.
        betas: AdamW betas (VQGAN uses (0.5, 0.9)).
        weight_decay: AdamW weight decay on conv/linear weights.
        warmup_steps: linear learning-rate warmup, in batches.
        decay_steps: cosine decay of the learning rate ends here (default: the trainer's max_steps; None and no
            max_steps: constant after warm-up).
        min_lr_ratio: learning rate at the end of the decay, as a fraction of ``lr``.
        l1_weight: weight of the L1 pixel loss.
        l2_weight: weight of the MSE pixel loss.
        perceptual: perceptual loss; only "none" (no pretrained networks offline).
        gan_weight: weight of the PatchGAN hinge loss on the tokenizer; 0 disables the GAN entirely.
        gan_start_step: batch index at which the GAN loss and discriminator training start.
        disc_channels: width of the discriminator's first layer.
        disc_layers: stride-2 layers of the discriminator.
        log_every_n_steps: interval (batches) of the extra training diagnostics (PSNR, batch codebook usage).
        num_logged_images: originals/reconstructions in the validation image grid (0 disables it).
        seed: seed for the weight initialisation (the global RNG is left untouched).
    """

    def __init__(
        self,
        config: ImageTokenizerConfig | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        l1_weight: float = 1.0,
        l2_weight: float = 1.0,
        perceptual: str = "none",
        gan_weight: float = 0.0,
        gan_start_step: int = 0,
        disc_channels: int = 64,
        disc_layers: int = 3,
        log_every_n_steps: int = 50,
        num_logged_images: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if config is None:
            config = ImageTokenizerConfig()
        elif isinstance(config, dict):  # e.g. from a checkpoint's hparams
            config = ImageTokenizerConfig.from_dict(config)
        if perceptual != "none":
            raise ValueError(f"perceptual={perceptual!r} is not available (needs pretrained networks); use 'none'")
        if lr <= 0 or warmup_steps < 0 or gan_start_step < 0 or log_every_n_steps < 1 or num_logged_images < 0:
            raise ValueError(
                "need lr > 0, warmup_steps >= 0, gan_start_step >= 0, log_every_n_steps >= 1, num_logged_images >= 0"
            )
        if l1_weight < 0 or l2_weight < 0 or gan_weight < 0 or l1_weight + l2_weight == 0:
            raise ValueError("l1_weight, l2_weight and gan_weight must be >= 0 and l1_weight + l2_weight > 0")
        self.save_hyperparameters()
        self.hparams["config"] = config.to_dict()  # plain dict: checkpoints stay loadable with weights_only
        self.config = config
        self.use_gan = gan_weight > 0
        self.automatic_optimization = not self.use_gan
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tokenizer = VQImageTokenizer(config)
            self.discriminator = (
                PatchDiscriminator(config.in_channels, disc_channels, disc_layers) if self.use_gan else None
            )
        self._val_counts: Tensor | None = None
        self._val_examples: tuple[Tensor, Tensor] | None = None

    # ---- helpers -----------------------------------------------------------------------------------------------

    @staticmethod
    def _images(batch: Any) -> Tensor:
        if isinstance(batch, dict):
            if "image" not in batch:
                raise ValueError(f"batch dict has no 'image' key (keys: {sorted(batch)})")
            batch = batch["image"]
        elif isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise ValueError(f"expected an image tensor (B, C, H, W) in the batch, got {type(batch).__name__}")
        return batch

    def _recon_loss(self, recon: Tensor, images: Tensor) -> Tensor:
        loss = recon.new_zeros(())
        if self.hparams.l1_weight > 0:
            loss = loss + self.hparams.l1_weight * F.l1_loss(recon, images)
        if self.hparams.l2_weight > 0:
            loss = loss + self.hparams.l2_weight * F.mse_loss(recon, images)
        return loss

    def export_tokenizer(self, directory: str | Path) -> dict[str, Any]:
        """Save the trained tokenizer with `VQImageTokenizer.save_pretrained`; returns its config dict."""
        return self.tokenizer.save_pretrained(directory)

    # ---- training ----------------------------------------------------------------------------------------------

    def forward(self, images: Tensor):
        return self.tokenizer(images)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        images = self._images(batch)  # (B, C, H, W)
        batch_size = images.shape[0]
        out = self.tokenizer(images)
        recon_loss = self._recon_loss(out.recon, images)
        loss = recon_loss + out.aux_loss
        logs = {"train/recon_loss": recon_loss.detach(), "train/quant_loss": out.aux_loss.detach()}

        if self.use_gan:
            opt_g, opt_d = self.optimizers()
            sched_g, sched_d = self.lr_schedulers()
            # global_step == batches seen until the GAN starts (one optimizer step per batch), so this switches
            # on exactly at batch `gan_start_step` and stays on.
            gan_active = self.global_step >= self.hparams.gan_start_step
            with self.toggled_optimizer(opt_g):
                if gan_active:
                    g_loss = hinge_g_loss(self.discriminator(out.recon))
                    loss = loss + self.hparams.gan_weight * g_loss
                    logs["train/g_loss"] = g_loss.detach()
                opt_g.zero_grad()
                self.manual_backward(loss)
                opt_g.step()
            sched_g.step()
            if gan_active:
                with self.toggled_optimizer(opt_d):
                    real_logits = self.discriminator(images)
                    fake_logits = self.discriminator(out.recon.detach())
                    d_loss = hinge_d_loss(real_logits, fake_logits)
                    opt_d.zero_grad()
                    self.manual_backward(d_loss)
                    opt_d.step()
                sched_d.step()
                logs.update(
                    {
                        "train/d_loss": d_loss.detach(),
                        "train/d_real": real_logits.detach().mean(),
                        "train/d_fake": fake_logits.detach().mean(),
                    }
                )

        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict(logs, batch_size=batch_size)
        if batch_idx % self.hparams.log_every_n_steps == 0:
            with torch.no_grad():
                counts = code_histogram(out.codes, self.config.codebook_size)
                self.log("train/psnr", psnr(out.recon.detach(), images), prog_bar=True, batch_size=batch_size)
                usage = 100.0 * histogram_metrics(counts)["usage"]
                self.log("train/batch_codebook_usage", usage, batch_size=batch_size)
        return None if self.use_gan else loss

    def _decay_steps(self) -> int | None:
        """Steps of the cosine decay: ``decay_steps``, else the trainer's ``max_steps`` (None: constant LR)."""
        if self.hparams.decay_steps is not None:
            return self.hparams.decay_steps
        trainer = self._trainer
        max_steps = trainer.max_steps if trainer is not None else -1
        if max_steps and max_steps > 0:
            return max_steps // 2 if self.use_gan else max_steps  # with a GAN, global_step counts both optimizers
        return None

    def configure_optimizers(self):
        betas = tuple(self.hparams.betas)
        opt_g = torch.optim.AdamW(
            _param_groups(self.tokenizer, self.hparams.weight_decay), lr=self.hparams.lr, betas=betas
        )
        schedule = warmup_cosine(self.hparams.warmup_steps, self._decay_steps(), self.hparams.min_lr_ratio)
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, schedule)
        if not self.use_gan:
            return {"optimizer": opt_g, "lr_scheduler": {"scheduler": sched_g, "interval": "step"}}
        opt_d = torch.optim.AdamW(
            _param_groups(self.discriminator, self.hparams.weight_decay), lr=self.hparams.lr, betas=betas
        )
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, schedule)
        return [opt_g, opt_d], [sched_g, sched_d]

    # ---- validation --------------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_counts = torch.zeros(self.config.codebook_size, dtype=torch.long, device=self.device)
        self._val_examples = None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images = self._images(batch)  # (B, C, H, W)
        batch_size = images.shape[0]
        out = self.tokenizer(images)
        self._val_counts += code_histogram(out.codes, self.config.codebook_size)
        self.log_dict(
            {
                "val/recon_loss": self._recon_loss(out.recon, images),
                "val/psnr": psnr(out.recon, images),
                "val/ssim": ssim(out.recon, images),
            },
            batch_size=batch_size,
            sync_dist=True,
        )
        if batch_idx == 0 and self.hparams.num_logged_images > 0:
            n = self.hparams.num_logged_images
            self._val_examples = (images[:n].detach().cpu(), out.recon[:n].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self._val_counts, reduce_op="sum")
        stats = histogram_metrics(counts)
        self.log_dict(
            {
                "val/codebook_usage": 100.0 * stats["usage"],
                "val/code_perplexity": stats["perplexity"],
                "val/dead_codes": stats["dead_codes"],
            }
        )
        if self._val_examples is not None and not self.trainer.sanity_checking:
            self._log_image_grid(*self._val_examples)

    def _log_image_grid(self, originals: Tensor, recons: Tensor) -> None:
        """Originals (top row) over reconstructions (bottom row) -> logger image or PNG."""
        if not self.loggers:
            return
        grid = rearrange(torch.stack([originals, recons]), "row n c h w -> c (row h) (n w)")  # (C, 2H, nW)
        log_dir = self.trainer.log_dir  # must be called on every rank (it broadcasts)
        if not self.trainer.is_global_zero:
            return
        written = False
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("val/reconstructions", (grid.clamp(-1, 1) + 1) / 2, self.global_step)
                written = True
        if not written and log_dir is not None:
            path = Path(log_dir) / "reconstructions" / f"epoch{self.current_epoch:03d}-step{self.global_step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            to_pil(grid)[0].save(path)
