"""LightningModule that pretrains the early-fusion decoder (the native arm), and the callback that exports it.

Batches follow the token datamodule's contract: a dict of ``(B, T)`` tensors ``input_ids``, ``targets`` (already
shifted, ``-100`` = not predicted), ``weights`` (per-position loss weights, per-modality weights multiplied in),
``target_is_image``, ``position_ids`` (restarting per document) and ``document_ids`` (attention stays inside a
document). The loss is ``next_token_loss`` (weighted cross-entropy + ``z_loss_weight`` * z-loss).

Notable choices:

- The vocabulary size always comes from the tokenizer bundle (``tokenizer``); a ``model.vocab_size`` other than
  the ``DecoderConfig`` default must equal it. ``z_loss_weight=None`` takes ``model.z_loss_weight``.
- AdamW (decoupled weight decay, fused on CUDA) decays only ``nn.Linear`` weights: no decay on norms (RMSNorm and
  the per-head QK LayerNorm, whose weights are 2-D), biases, or the embedding table (nor a head tied to it).
- LR: linear warm-up then cosine to ``min_lr_ratio * lr`` at ``decay_steps`` (default ``trainer.max_steps``).
- Per optimizer step (accumulated over micro-batches and summed over processes) the module computes
  ``train/loss`` (also on the progress bar), ``train/ce``, ``train/z_loss``, ``train/text_loss`` and
  ``train/image_loss`` (unweighted mean cross-entropy over counted positions whose target is text / an image
  code; left out for a step without any), ``train/max_logit``, ``train/grad_norm`` (total L2 norm before
  clipping), ``train/tokens_per_s`` (non-padding input tokens of all processes / wall time, over the steps
  since the previous logged step), ``train/mfu`` (when ``peak_flops`` is given; see :func:`flops_per_token`),
  ``train/lr`` and ``train/nonfinite_skips``. ``train/loss`` is logged every step; the others on the steps whose
  values Lightning hands to the loggers (``trainer.log_every_n_steps``), since each ``self.log`` call costs
  ~0.5 ms of CPU. All of it costs one host sync per optimizer step, in ``on_before_optimizer_step``, which is
  also where non-finite values are caught.
- A non-finite loss (or gradient norm) never passes silently: ``on_nonfinite="raise"`` raises a RuntimeError
  naming the global step; ``"skip"`` drops the gradients (AdamW leaves parameters and moments untouched), warns,
  and counts the skip in ``train/nonfinite_skips`` (saved in checkpoints). Works unchanged under DDP: every
  process sees the same summed flag.
- Validation sums over the whole epoch (and across processes) before dividing: ``val/loss`` (same definition
  as ``train/loss``), ``val/ce``, ``val/text_loss``, ``val/image_loss``, ``val/accuracy``.
- Precision, gradient clipping and accumulation come from the Trainer; ``compile=True`` compiles the decoder in
  place (``nn.Module.compile``: state-dict names are unchanged); activation checkpointing is
  ``model.gradient_checkpointing``. Under FSDP (Lightning wraps the whole module) clipping by norm goes through
  ``FullyShardedDataParallel.clip_grad_norm_`` and ``train/grad_norm`` sums the shards (not run on a GPU yet).
- Hyper-parameters are saved as plain types (the decoder config as a dict) so checkpoints load with
  ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import IGNORE_INDEX, Decoder, next_token_loss
from chameleon_lite.model.model_dir import resolve_bundle_path
from chameleon_lite.native.chameleon import write_model_dir
from chameleon_lite.safe_io import check_writable_dir
from chameleon_lite.tokenization.bundle import load_bundle
from chameleon_lite.training.optimizers import clip_fused_directly, use_fused_adamw
from chameleon_lite.training.perf import resolve_peak_flops
from chameleon_lite.training.schedules import warmup_cosine

BATCH_KEYS: dict[str, str] = {  # key -> expected dtype kind
    "input_ids": "int",
    "targets": "int",
    "weights": "float",
    "target_is_image": "bool",
    "position_ids": "int",
    "document_ids": "int",
}
_DEFAULT_VOCAB_SIZE = DecoderConfig().vocab_size
# order of the per-step statistics vector (summed over micro-batches and processes)
_STATS = ("ce_sum", "weight_sum", "z_sum", "n_tokens", "text_sum", "text_n", "image_sum", "image_n", "hits",
          "input_tokens", "nonfinite")


# ---------------------------------------------------------------------------------------------- helpers
def flops_per_token(config: DecoderConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N + 12 * L * H * Q * T`` (PaLM, appendix B).

    ``N`` counts the non-embedding parameters including the output head (a ``d_model x padded_vocab`` matmul every
    token pays, tied or not; the input embedding is a lookup): per block the q/k/v/o projections, the QK-norm
    weights and biases, the SwiGLU matrices and the two RMSNorms, plus the final norm and the head. The second term
    is attention's ``QK^T`` and ``AV`` (forward + backward) with ``L`` layers, ``H`` query heads of size ``Q`` and
    context ``T = seq_len``. Activation recomputation is not counted (MFU convention).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    d, hd, h, h_kv = config.d_model, config.head_dim, config.n_heads, config.n_kv_heads
    attention = d * hd * (h + 2 * h_kv) + h * hd * d  # q, k, v, o projections
    qk_norm = 2 * hd * (h + h_kv) if config.qk_norm else 0  # per-head LayerNorm weight + bias on q and k
    mlp = 3 * d * config.mlp_hidden  # gate, up, down
    block = attention + qk_norm + mlp + 2 * d  # + attn_norm, mlp_norm
    n_params = config.n_layers * block + d + d * config.padded_vocab_size  # + final norm, output head
    return 6.0 * n_params + 12.0 * config.n_layers * h * hd * seq_len


def decoder_param_groups(decoder: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on ``nn.Linear`` weights only (not on norms, biases, embeddings, a tied head)."""
    embeddings = {id(m.weight) for m in decoder.modules() if isinstance(m, nn.Embedding)}
    linear = {id(m.weight) for m in decoder.modules() if isinstance(m, nn.Linear)} - embeddings
    decay, no_decay = [], []
    for p in decoder.parameters():  # yields a tied weight once
        if p.requires_grad:
            (decay if id(p) in linear else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_batch(batch: Any) -> tuple[int, int]:
    """Validate a batch against the contract (keys, ``(B, T)`` shapes, dtypes); return ``(B, T)``."""
    if not isinstance(batch, dict):
        raise ValueError(f"a batch must be a dict of tensors, got {type(batch).__name__}")
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing} (has {sorted(batch)})")
    shape = tuple(batch["input_ids"].shape)
    if len(shape) != 2:
        raise ValueError(f"batch['input_ids'] must be (B, T), got shape {shape}")
    for key, kind in BATCH_KEYS.items():
        t = batch[key]
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"batch[{key!r}] must be a tensor of shape {shape}, got {got}")
        ok = {"int": not t.dtype.is_floating_point and t.dtype != torch.bool, "float": t.dtype.is_floating_point,
              "bool": t.dtype == torch.bool}[kind]
        if not ok:
            raise ValueError(f"batch[{key!r}] must be a {kind} tensor, got {t.dtype}")
    return shape


@torch.no_grad()
def modality_losses(
    logits: Tensor, targets: Tensor, weights: Tensor, target_is_image: Tensor
) -> dict[str, Tensor]:
    """Cross-entropy summed and counted separately over text and image targets (detached).

    A position counts when ``targets != -100`` and ``weights > 0`` (as in ``next_token_loss``); each counted
    position contributes its unweighted cross-entropy. Returns ``text_sum``, ``text_n``, ``image_sum``,
    ``image_n`` and the means ``text_loss`` / ``image_loss`` (NaN when there is no such position).
    """
    counted = (targets != IGNORE_INDEX) & (weights > 0)  # (B, T)
    ce = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)  # (B, T)
    out = {}
    for name, where in (("text", counted & ~target_is_image), ("image", counted & target_is_image)):
        total, n = (ce * where).sum(), where.sum()
        out[f"{name}_sum"], out[f"{name}_n"] = total, n
        out[f"{name}_loss"] = total / n  # 0/0 = NaN when the batch has none
    return out


# ---------------------------------------------------------------------------------------------- the module


class NativeLMModule(L.LightningModule):
    """Next-token pretraining of the early-fusion ``Decoder`` on packed text + image-code sequences.

    Args:
        tokenizer: tokenizer bundle directory; fixes the vocabulary (``vocab_size``) and is copied on export.
        model: decoder shape and switches (``DecoderConfig``); ``vocab_size`` is filled in from the bundle. None:
            the ``DecoderConfig`` defaults.
        lr: peak learning rate (AdamW).
        betas: AdamW betas.
        weight_decay: decoupled weight decay on the linear weights (none on norms, biases, embeddings).
        warmup_steps: linear warm-up, in optimizer steps.
        decay_steps: the cosine decay ends here (default: the trainer's ``max_steps``; neither: constant LR).
        min_lr_ratio: learning rate at the end of the decay, as a fraction of ``lr``.
        z_loss_weight: weight of the z-loss; None takes ``model.z_loss_weight``.
        on_nonfinite: ``"raise"`` (RuntimeError naming the global step) or ``"skip"`` (drop the step, warn, count).
        compile: ``torch.compile`` the decoder (in place; the state dict keeps its names).
        peak_flops: peak FLOP/s of one device (e.g. ``989e12`` for an H100 SXM in bf16) to log ``train/mfu``;
            ``"auto"`` takes the datasheet figure of the training GPU (``perf.resolve_peak_flops``; no MFU, with a
            warning, on a CPU or an unlisted GPU).
        seed: seed of the weight initialisation (the global RNG is left untouched).
    """

    def __init__(
        self,
        tokenizer: str = "tokenizers/shapes-64",
        model: DecoderConfig | None = None,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        z_loss_weight: float | None = None,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        compile: bool = False,
        peak_flops: float | Literal["auto"] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if lr <= 0 or weight_decay < 0 or warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError("need lr > 0, weight_decay >= 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
        if decay_steps is not None and decay_steps < 1:
            raise ValueError(f"decay_steps={decay_steps} must be >= 1 or None")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={betas} must be two numbers in [0, 1)")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite={on_nonfinite!r} must be 'raise' or 'skip'")
        if isinstance(peak_flops, str) and peak_flops != "auto":
            raise ValueError(f"peak_flops={peak_flops!r} must be a number > 0, 'auto' or None")
        if peak_flops is not None and not isinstance(peak_flops, str) and peak_flops <= 0:
            raise ValueError(f"peak_flops={peak_flops} must be > 0, 'auto' or None")
        if z_loss_weight is not None and z_loss_weight < 0:
            raise ValueError(f"z_loss_weight={z_loss_weight} must be >= 0")

        self.tokenizer_path = resolve_bundle_path(tokenizer)
        self.vocab = load_bundle(self.tokenizer_path, load_image_tokenizer=False).vocab
        config = _decoder_config(model, self.vocab.size, self.tokenizer_path)
        if z_loss_weight is not None:
            config = dataclasses.replace(config, z_loss_weight=float(z_loss_weight))
        self.config = config
        self.z_loss_weight = config.z_loss_weight

        self.save_hyperparameters()
        # plain types only: checkpoints must load with torch.load(weights_only=True)
        self.hparams["tokenizer"] = str(tokenizer)
        self.hparams["model"] = dataclasses.asdict(config)
        self.hparams["betas"] = tuple(float(b) for b in betas)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.decoder = Decoder(config)
        self.nonfinite_skips = 0
        self._compiled = False
        self._step_stats: Tensor | None = None
        self._step_max_logit: Tensor | None = None
        self._seq_len = 0
        self._window_start: float | None = None
        self._window_tokens = 0.0
        self._peak_flops: float | None = None  # resolved from the peak_flops argument in on_train_start
        self._val_stats: Tensor | None = None

    # ---- model -------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.hparams.compile and not self._compiled:
            # resolve (and log) the attention backend first: doing it inside the compiled forward is a graph break
            device = self._trainer.strategy.root_device if self._trainer is not None else self.device
            self.decoder.attention_backend(device)
            self.decoder.compile()
            self._compiled = True

    def forward(self, input_ids: Tensor, **kwargs: Any) -> Tensor:
        """``Decoder.forward``: logits ``(B, T, padded_vocab_size)``."""
        return self.decoder(input_ids, **kwargs)

    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Forward one batch: ``next_token_loss``'s dict plus ``text_*``/``image_*`` (see ``modality_losses``),
        ``max_logit`` and ``input_tokens`` (non-padding input tokens)."""
        check_batch(batch)
        logits = self.decoder(
            batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"]
        )  # (B, T, V_padded)
        out = next_token_loss(logits, batch["targets"], batch["weights"], self.z_loss_weight)
        out.update(modality_losses(logits.detach(), batch["targets"], batch["weights"], batch["target_is_image"]))
        out["max_logit"] = logits.detach().max()
        out["input_tokens"] = (batch["input_ids"] != self.vocab.pad).sum()
        return out

    @staticmethod
    def _stats_vector(out: dict[str, Tensor]) -> Tensor:
        values = {
            "ce_sum": out["ce_sum"], "weight_sum": out["weight_sum"], "z_sum": out["z_loss"] * out["n_tokens"],
            "n_tokens": out["n_tokens"], "text_sum": out["text_sum"], "text_n": out["text_n"],
            "image_sum": out["image_sum"], "image_n": out["image_n"], "hits": out["accuracy"] * out["n_tokens"],
            "input_tokens": out["input_tokens"], "nonfinite": ~torch.isfinite(out["loss"]),
        }
        return torch.stack([values[k].detach().float() for k in _STATS])  # (len(_STATS),)

    # ---- training ----------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.compute_losses(batch)
        stats = self._stats_vector(out)
        self._step_stats = stats if self._step_stats is None else self._step_stats + stats
        m = out["max_logit"].float()
        self._step_max_logit = m if self._step_max_logit is None else torch.maximum(self._step_max_logit, m)
        self._seq_len = batch["input_ids"].shape[1]
        return out["loss"]

    def on_train_start(self) -> None:
        self._window_start = None
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        self._peak_flops = resolve_peak_flops(self.hparams.peak_flops, self.device, precision)
        if self.hparams.peak_flops == "auto":
            if self._peak_flops is None:
                rank_zero_warn(f"peak_flops='auto': no datasheet peak for {self.device} at precision {precision}; "
                               "train/mfu is not logged")
            else:
                rank_zero_info(f"peak_flops='auto': {self._peak_flops:.4g} FLOP/s per device for MFU")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Grad norm, the non-finite check and the per-step logging, with one host sync."""
        stats, max_logit = self._step_stats, self._step_max_logit
        self._step_stats = self._step_max_logit = None
        if stats is None:  # no training_step since the last optimizer step
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = _total_norm(grads) if grads else stats.new_zeros(())
        if self._fsdp_root() is not None:  # each process holds a disjoint shard of the gradients
            grad_norm = self.trainer.strategy.reduce(grad_norm.float().square(), reduce_op="sum").sqrt()
        if self._world_size() > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(max_logit, op=torch.distributed.ReduceOp.MAX)
        host = torch.cat([stats, max_logit.reshape(1), grad_norm.float().reshape(1)]).tolist()  # the one sync
        s = dict(zip(_STATS, host[: len(_STATS)]))
        max_logit_value, grad_norm_value = host[len(_STATS)], host[len(_STATS) + 1]
        tokens_per_s = self._update_throughput(s["input_tokens"])

        ce = s["ce_sum"] / s["weight_sum"] if s["weight_sum"] > 0 else 0.0
        z_loss = s["z_sum"] / max(s["n_tokens"], 1.0)
        loss = ce + self.z_loss_weight * z_loss
        if s["nonfinite"] > 0 or not math.isfinite(loss) or not math.isfinite(grad_norm_value):
            what = "loss" if s["nonfinite"] > 0 or not math.isfinite(loss) else "gradient norm"
            message = (
                f"non-finite {what} at global step {self.global_step} (loss={loss}, ce={ce}, z_loss={z_loss}, "
                f"max_logit={max_logit_value}, grad_norm={grad_norm_value})"
            )
            if self.hparams.on_nonfinite == "raise":
                raise RuntimeError(message + "; lower lr, raise z_loss_weight, or set on_nonfinite='skip'")
            for p in params:
                p.grad = None  # AdamW skips parameters without gradients: no update, moments untouched
            self.nonfinite_skips += 1
            rank_zero_warn(f"{message}: optimizer step skipped ({self.nonfinite_skips} skipped so far)")
            self.log("train/nonfinite_skips", float(self.nonfinite_skips), on_step=True, on_epoch=False,
                     batch_size=1)
            return

        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        if not self._logger_writes_this_step():
            return  # Lightning would drop the values: skip the (~0.5 ms each) self.log calls
        metrics = {
            "train/ce": ce,
            "train/z_loss": z_loss,
            "train/max_logit": max_logit_value,
            "train/grad_norm": grad_norm_value,
            "train/lr": optimizer.param_groups[0]["lr"],
            "train/nonfinite_skips": float(self.nonfinite_skips),
        }
        for name in ("text", "image"):
            if s[f"{name}_n"] > 0:
                metrics[f"train/{name}_loss"] = s[f"{name}_sum"] / s[f"{name}_n"]
        if tokens_per_s is not None:
            metrics["train/tokens_per_s"] = tokens_per_s
            if self._peak_flops:
                flops_per_s = tokens_per_s / self._world_size() * flops_per_token(self.config, self._seq_len)
                metrics["train/mfu"] = flops_per_s / self._peak_flops
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def _update_throughput(self, tokens: float) -> float | None:
        """Add one step's tokens to the throughput window; on logging steps return its tokens/s and restart it.

        The window runs from one logging step's ``on_before_optimizer_step`` to the next (both after the host
        sync, so GPU work is included); the step that opens it (the first one, and the first after validation)
        only starts the clock.
        """
        now = time.perf_counter()
        if self._window_start is None:
            self._window_start, self._window_tokens = now, 0.0
            return None
        self._window_tokens += tokens
        if not self._logger_writes_this_step() or now <= self._window_start:
            return None
        rate = self._window_tokens / (now - self._window_start)
        self._window_start, self._window_tokens = now, 0.0
        return rate

    def _logger_writes_this_step(self) -> bool:
        """Whether Lightning passes this optimizer step's ``on_step`` values to the loggers (every
        ``trainer.log_every_n_steps``); True outside a trainer or if Lightning's internals moved."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """The trainer's clipping; under FSDP clip by norm through the root ``FullyShardedDataParallel`` (Lightning's
        FSDP precision plugin refuses ``gradient_clip_algorithm="norm"``)."""
        root = self._fsdp_root()
        if root is not None and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            root.clip_grad_norm_(gradient_clip_val)
            return
        if gradient_clip_val and clip_fused_directly(self, optimizer, gradient_clip_val, gradient_clip_algorithm):
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _fsdp_root(self) -> nn.Module | None:
        """The root ``FullyShardedDataParallel`` module when training under Lightning's FSDP strategy, else None."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, FSDPStrategy):
            return None
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not isinstance(strategy.model, FullyShardedDataParallel):
            raise ValueError("under FSDP, NativeLMModule expects Lightning to wrap the whole module (no wrapping in "
                             "configure_model), so that gradient norms and clipping cover every shard")
        return strategy.model

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _decay_steps(self) -> int | None:
        if self.hparams.decay_steps is not None:
            return self.hparams.decay_steps
        max_steps = self._trainer.max_steps if self._trainer is not None else -1
        return max_steps if max_steps and max_steps > 0 else None

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            decoder_param_groups(self.decoder, self.hparams.weight_decay),
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            fused=True if use_fused_adamw(self, self.decoder.parameters()) else None,
        )
        schedule = warmup_cosine(self.hparams.warmup_steps, self._decay_steps(), self.hparams.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_skips"] = int(self.nonfinite_skips)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_skips = int(checkpoint.get("nonfinite_skips", 0))

    # ---- validation --------------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_stats = None

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        stats = self._stats_vector(self.compute_losses(batch))
        self._val_stats = stats if self._val_stats is None else self._val_stats + stats

    def on_validation_epoch_end(self) -> None:
        if self._val_stats is None:
            return
        stats = self._val_stats
        if self._world_size() > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        s = dict(zip(_STATS, stats.tolist()))
        self._val_stats = None
        if s["weight_sum"] <= 0:
            return
        ce = s["ce_sum"] / s["weight_sum"]
        n = max(s["n_tokens"], 1.0)
        metrics = {
            "val/loss": ce + self.z_loss_weight * s["z_sum"] / n,
            "val/ce": ce,
            "val/accuracy": s["hits"] / n,
        }
        for name in ("text", "image"):
            if s[f"{name}_n"] > 0:
                metrics[f"val/{name}_loss"] = s[f"{name}_sum"] / s[f"{name}_n"]
        self.log("val/loss", metrics.pop("val/loss"), prog_bar=True)
        self.log_dict(metrics)

    def on_validation_end(self) -> None:
        self._window_start = None  # the throughput window must not include validation


def _decoder_config(model: DecoderConfig | dict | None, vocab_size: int, bundle: Path) -> DecoderConfig:
    """``model`` as a ``DecoderConfig`` whose ``vocab_size`` is the bundle's (a conflicting explicit one raises)."""
    if model is None:
        model = DecoderConfig(vocab_size=vocab_size)
    elif isinstance(model, dict):  # e.g. hyper-parameters from a checkpoint
        model = dict(model)
        if model.get("vocab_size") in (None, 0):
            model["vocab_size"] = vocab_size
        model = DecoderConfig(**model)
    elif not isinstance(model, DecoderConfig):
        raise ValueError(f"model must be a DecoderConfig, a dict or None, got {type(model).__name__}")
    if model.vocab_size != vocab_size:
        if model.vocab_size != _DEFAULT_VOCAB_SIZE:
            raise ValueError(
                f"model.vocab_size={model.vocab_size} but tokenizer bundle {bundle} has {vocab_size} ids; "
                "leave vocab_size out (it is taken from the bundle)"
            )
        model = dataclasses.replace(model, vocab_size=vocab_size)
    return model


def _total_norm(grads: list[Tensor]) -> Tensor:
    """L2 norm of all gradients together (foreach kernels; no host sync)."""
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


# ---------------------------------------------------------------------------------------------- export callback
class ExportModelDir(L.Callback):
    """Write the model directory (``config.yaml``, ``model.safetensors``, ``tokenizer/``) when ``fit`` ends.

    Args:
        out_dir: where to write it; None: ``<trainer.default_root_dir>/model``.
        tokenizer: bundle directory to copy; None: the module's ``tokenizer``.

    The state dict is gathered on every process (a collective under FSDP) and written by rank 0 only. ``out_dir``
    must be absent, empty or a directory written before (``safe_io.write_dir``); that is checked when fit starts,
    so a run does not train only to be refused at the end.
    """

    def __init__(self, out_dir: str | None = None, tokenizer: str | None = None) -> None:
        self.out_dir = out_dir
        self.tokenizer = tokenizer
        self.written: Path | None = None

    def _target(self, trainer: L.Trainer) -> Path:
        return Path(self.out_dir) if self.out_dir else Path(trainer.default_root_dir) / "model"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_writable_dir(self._target(trainer))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, NativeLMModule):
            raise ValueError(f"ExportModelDir exports a NativeLMModule, got {type(pl_module).__name__}")
        state = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            return
        decoder_state = {}
        for key, value in state.items():
            for prefix in ("decoder._orig_mod.", "decoder."):
                if key.startswith(prefix):
                    decoder_state[key[len(prefix) :]] = value
                    break
        out_dir = self._target(trainer)
        bundle = resolve_bundle_path(self.tokenizer) if self.tokenizer else pl_module.tokenizer_path
        self.written = write_model_dir(decoder_state, pl_module.config, bundle, out_dir,
                                       trained_steps=trainer.global_step)
        rank_zero_info(f"model directory written to {self.written}")
