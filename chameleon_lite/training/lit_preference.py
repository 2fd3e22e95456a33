"""Stage 3: direct preference optimisation (DPO) of either arm against hallucination.

``chameleon-lite fit --config configs/native/dpo_tiny.yaml`` (or ``configs/baseline/dpo_tiny.yaml``)::

    model:
      class_path: chameleon_lite.training.lit_preference.PreferenceModule
      init_args: {init_from: runs/native-demo/model, beta: 0.1, lr: 1.0e-5}
    data:
      class_path: chameleon_lite.training.lit_preference.PreferenceDataModule
      init_args: {train_pairs: "data/prefs/prefs-*.tar"}

The policy starts from a trained model directory of either arm (``config.yaml``'s ``kind`` picks the arm); a
frozen copy of it is the reference. For each pair (image, prompt, chosen, rejected) both responses are scored as
sums of log-probabilities over the **response tokens only** (the answer or caption and its ``<eos>``), with the
prompt built by the arm's own generation prompt builder, so DPO sees exactly what ``generate`` will. The loss
(Rafailov et al. 2023, eq. 7)::

    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))  +  sft_weight * NLL(chosen) per token

The second term (RPO, Pang et al. 2024) keeps the chosen answers likely: plain DPO on these pairs lowered both
sides and greedy answers drifted to words no pair names ("0" to an existence question; ``docs/dpo.md``).

The baseline's ViT stays frozen (as in its stage 2); its projector and decoder are tuned. The native arm's VQ
tokenizer is never trained. ``ExportPreferenceModel`` writes the tuned policy as a model directory of its arm.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader

from chameleon_lite.data.task_formats import image_response
from chameleon_lite.model.decoder import IGNORE_INDEX
from chameleon_lite.safe_io import check_writable_dir
from chameleon_lite.training.optimizers import clip_fused_directly, use_fused_adamw
from chameleon_lite.training.schedules import warmup_cosine
from chameleon_lite.world.preference_pairs import PreferencePair, read_preference_pairs

__all__ = ["dpo_loss", "response_logps", "response_rows", "response_lengths", "sequence_logps", "load_policy",
           "PreferenceModule", "PreferenceDataModule", "ExportPreferenceModel"]


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> dict[str, Tensor]:
    """The DPO loss of ``(B,)`` summed response log-probabilities; returns ``loss`` (mean over pairs),
    ``margin`` (mean ``beta * ((pi_c - ref_c) - (pi_r - ref_r))``) and ``accuracy`` (share with margin > 0)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))  # (B,)
    return {"loss": -F.logsigmoid(logits).mean(), "margin": logits.mean().detach(),
            "accuracy": (logits > 0).float().mean().detach()}


def response_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum of ``log p(target)`` over positions whose target is not ``IGNORE_INDEX``: logits ``(B, T, V)`` and
    aligned targets ``(B, T)`` (``targets[:, t]`` is the token after position ``t``) -> ``(B,)`` in fp32."""
    mask = targets != IGNORE_INDEX  # (B, T)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, T)
    return (picked * mask).sum(-1)


def _prompt(pair: PreferencePair) -> list:
    return [pair.image, pair.prompt] if pair.prompt.strip() else [pair.image]


def _response_ids(pair: PreferencePair, side: str, bundle: Any) -> list[int]:
    """``pair.<side>`` as the training formats end a response: an answer (or, without a question, a caption) then
    ``<eos>`` (``task_formats.image_response``)."""
    ids = bundle.text.encode(getattr(pair, side).strip())
    if pair.prompt.strip():
        return image_response("qa", {"question": [], "answer": ids}, bundle.vocab)[1]
    return image_response("caption", {"caption": ids}, bundle.vocab)[1]


def policy_arm(model: Any) -> str:
    """``"baseline"`` for a ``BaselineVLM``, ``"native"`` for a ``ChameleonLite``; anything else is a ``TypeError``."""
    from chameleon_lite.baseline.vlm import BaselineVLM
    from chameleon_lite.native.chameleon import ChameleonLite

    if isinstance(model, BaselineVLM):
        return "baseline"
    if isinstance(model, ChameleonLite):
        return "native"
    raise TypeError(f"preference tuning needs a BaselineVLM or a ChameleonLite, got {type(model).__name__}")


def response_rows(model: Any, pairs: Sequence[PreferencePair], side: str) -> dict[str, Tensor]:
    """The tensors that score ``pair.<side>`` (``"chosen"`` or ``"rejected"``) after each pair's prompt.

    Native (``ChameleonLite``): ``input_ids`` ``(B, T)`` and aligned ``targets`` ``(B, T)``. Baseline
    (``BaselineVLM``): ``images`` ``(B, C, H, W)``, ``input_ids`` ``(B, T)`` with one image placeholder and
    ``loss_mask`` ``(B, T)`` over the response. Rows are right-padded with ``<pad>``; the response is
    ``text.encode(response) + <eos>``, the targets the models are trained on.
    """
    if side not in ("chosen", "rejected"):
        raise ValueError(f"side must be 'chosen' or 'rejected', got {side!r}")
    baseline = policy_arm(model) == "baseline"
    bundle, vocab = model.bundle, model.bundle.vocab
    prompts, images = [], []
    device = model.device
    for pair in pairs:
        if baseline:
            from chameleon_lite.generation.baseline import build_baseline_prompt

            ids, imgs = build_baseline_prompt(_prompt(pair), model)
            images += imgs
        else:
            from chameleon_lite.generation.native import build_prompt_ids

            with torch.no_grad(), torch.autocast(device.type, enabled=False):  # the codes generate() would see
                ids = build_prompt_ids(_prompt(pair), "text", bundle, model.image_code_cache)
        prompts.append(ids)
    responses = [_response_ids(p, side, bundle) for p in pairs]
    T = max(len(a) + len(b) for a, b in zip(prompts, responses))
    input_ids = torch.full((len(pairs), T), vocab.pad, dtype=torch.long)  # (B, T)
    in_response = torch.zeros(len(pairs), T, dtype=torch.bool)  # (B, T)
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[b, : len(prompt) + len(response)] = torch.as_tensor(prompt + response)
        in_response[b, len(prompt): len(prompt) + len(response)] = True
    if baseline:
        from chameleon_lite.tokenization.image_preprocessing import preprocess_images
        from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig
        pixels = preprocess_images(images, ImageTokenizerConfig(image_size=model.config.vit.image_size))
        return {"images": pixels.to(device), "input_ids": input_ids.to(device), "loss_mask": in_response.to(device)}
    targets = torch.full_like(input_ids, IGNORE_INDEX)  # (B, T): targets[:, t] = ids[:, t+1] in the response
    targets[:, :-1] = torch.where(in_response[:, 1:], input_ids[:, 1:], targets[:, 1:])
    return {"input_ids": input_ids.to(device), "targets": targets.to(device)}


def sequence_logps(model: Any, rows: dict[str, Tensor]) -> Tensor:
    """Summed response log-probabilities ``(B,)`` of rows from ``response_rows``, with gradients if enabled."""
    if "images" in rows:  # BaselineVLM: logits over the expanded rows and their aligned targets
        logits, targets = model(rows["images"], rows["input_ids"], rows["loss_mask"])
    else:
        logits, targets = model.decoder(rows["input_ids"]), rows["targets"]
    return response_logps(logits[..., : model.bundle.vocab.size], targets)


def response_lengths(rows: dict[str, Tensor]) -> Tensor:
    """Response tokens per row ``(B,)`` of rows from ``response_rows``."""
    mask = rows["loss_mask"] if "loss_mask" in rows else rows["targets"] != IGNORE_INDEX  # (B, T)
    return mask.sum(-1)


def load_policy(init_from: str | Path) -> nn.Module:
    """A trained model directory of either arm (``config.yaml``'s ``kind``), on CPU, in train mode."""
    from chameleon_lite.model.model_dir import model_dir_kind

    kind = model_dir_kind(init_from)
    if kind == "baseline":
        from chameleon_lite.baseline.vlm import BaselineVLM

        return BaselineVLM.from_pretrained(init_from).train()
    if kind == "native":
        from chameleon_lite.native.chameleon import ChameleonLite

        return ChameleonLite.from_pretrained(init_from).train()
    raise ValueError(f"{init_from} is not a model directory of either arm (config.yaml kind={kind!r})")


class PreferenceModule(L.LightningModule):
    """DPO of a trained model of either arm against a frozen copy of itself (see the module docstring).

    Args:
        init_from: the model directory to tune (native or baseline).
        beta: DPO temperature (how far the policy may move from the reference; 0.1 in the DPO paper).
        lr, betas, weight_decay, warmup_steps, min_lr_ratio: AdamW, warm-up then cosine decay to ``max_steps``.
        sft_weight: weight of the chosen responses' per-token negative log-likelihood added to the DPO loss (RPO;
            0 = plain DPO).
        seed: recorded for reproducibility (the trainer's ``seed_everything`` seeds the run).
    """

    def __init__(self, init_from: str, beta: float = 0.1, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.95),
                 weight_decay: float = 0.0, warmup_steps: int = 10, min_lr_ratio: float = 0.1,
                 sft_weight: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        if beta <= 0 or lr <= 0 or weight_decay < 0 or warmup_steps < 0 or sft_weight < 0:
            raise ValueError("need beta > 0, lr > 0, weight_decay >= 0, warmup_steps >= 0 and sft_weight >= 0")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
        self.save_hyperparameters()
        self.policy: nn.Module | None = None  # loaded in configure_model: a recipe parses without its model dir
        self.reference: nn.Module | None = None

    def configure_model(self) -> None:
        """Load the policy and its frozen reference (the same weights, never updated) from ``init_from``."""
        if self.policy is not None:
            return
        self.policy = load_policy(self.hparams.init_from)
        self.reference = load_policy(self.hparams.init_from).eval().requires_grad_(False)
        for module in self._frozen_parts():
            module.requires_grad_(False)

    def _frozen_parts(self) -> list[nn.Module]:
        """The baseline's ViT and the native arm's VQ tokenizer: never trained, always in eval mode (a VQ layer in
        train mode would update its codebook)."""
        parts = [getattr(self.policy, name, None) for name in ("encoder", "image_tokenizer")]
        return [p for p in parts if p is not None]

    @property
    def arm(self) -> str:
        return policy_arm(self.policy)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference is None:
            return self
        self.reference.eval()  # the reference never leaves eval mode
        for module in self._frozen_parts():
            module.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def _step(self, pairs: Sequence[PreferencePair], prefix: str) -> Tensor:
        rows = {side: response_rows(self.policy, pairs, side) for side in ("chosen", "rejected")}
        with torch.no_grad():
            ref = {side: sequence_logps(self.reference, rows[side]) for side in rows}  # (B,) each
        pol = {side: sequence_logps(self.policy, rows[side]) for side in rows}
        out = dpo_loss(pol["chosen"], pol["rejected"], ref["chosen"], ref["rejected"], self.hparams.beta)
        loss = out["loss"]
        # the chosen responses' per-token negative log-likelihood (RPO, Pang et al. 2024): without it DPO lowers the
        # likelihood of both sides and greedy answers drift to tokens no pair names (measured: docs/dpo.md)
        nll = -(pol["chosen"] / response_lengths(rows["chosen"]).clamp(min=1)).mean()
        if self.hparams.sft_weight:
            loss = loss + self.hparams.sft_weight * nll
        self.log_dict({f"{prefix}/loss": loss, f"{prefix}/dpo_loss": out["loss"], f"{prefix}/chosen_nll": nll.detach(),
                       f"{prefix}/margin": out["margin"],
                       f"{prefix}/reward_accuracy": out["accuracy"]},
                      prog_bar=prefix == "train", batch_size=len(pairs), on_step=prefix == "train",
                      on_epoch=prefix != "train")
        return loss

    def training_step(self, batch: list[PreferencePair], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: list[PreferencePair], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        h = self.hparams
        params = self.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay,
                                      fused=True if use_fused_adamw(self, params) else None)
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        schedule = warmup_cosine(h.warmup_steps, max_steps if max_steps and max_steps > 0 else None, h.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and clip_fused_directly(self, optimizer, gradient_clip_val, gradient_clip_algorithm):
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs from ``prefs-*.tar`` shards (``chameleon-lite data preference-pairs``) as lists of
    ``PreferencePair`` (the module builds each arm's tensors).

    Args:
        train_pairs: shard glob(s) of the pairs.
        val_pairs: how many pairs (taken from the end of a seeded shuffle) are held out for validation reward
            accuracy; they come from training scenes too, never from the comparison's validation or test split.
        batch_size: pairs per step.
        seed: the shuffle.
    """

    def __init__(self, train_pairs: str, val_pairs: int = 64, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1 or val_pairs < 0:
            raise ValueError(f"need batch_size >= 1 and val_pairs >= 0, got {batch_size} and {val_pairs}")
        self.save_hyperparameters()
        self.train: list[PreferencePair] = []
        self.val: list[PreferencePair] = []

    def setup(self, stage: str) -> None:
        pairs = read_preference_pairs(self.hparams.train_pairs)
        random.Random(self.hparams.seed).shuffle(pairs)
        n_val = min(self.hparams.val_pairs, len(pairs) // 2)
        self.train, self.val = pairs[: len(pairs) - n_val], pairs[len(pairs) - n_val:]

    def _loader(self, pairs: list[PreferencePair], shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(pairs, batch_size=self.hparams.batch_size, shuffle=shuffle, collate_fn=list,
                          generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, shuffle=False)


class ExportPreferenceModel(L.Callback):
    """Write the tuned policy as a model directory of its arm when ``fit`` ends (target checked when fit starts)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.written: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_writable_dir(self.out_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, PreferenceModule):
            raise ValueError(f"ExportPreferenceModel exports a PreferenceModule, got {type(pl_module).__name__}")
        if not trainer.is_global_zero:
            return
        policy = pl_module.policy.eval()
        self.written = Path(policy.save_pretrained(self.out_dir))
        rank_zero_info(f"{pl_module.arm} model directory (after DPO) written to {self.written}")
