"""Contrastive image-text pretraining of the baseline's vision encoder (SigLIP or CLIP) and retrieval metrics.

Notable features:

- ``TextEncoder``: token embedding + learned positions + bidirectional pre-norm blocks (the ViT's
  ``TransformerBlock``), padding removed from attention by a key mask, final LayerNorm; pooled by the last real
  token (``"eos"``) or a masked mean (``"mean"``). Right padding; ``lengths`` count the real tokens.
- ``ContrastiveModel``: linear heads (no bias) from each tower to ``embed_dim``, L2-normalised outputs; a learnable
  ``logit_scale`` (log temperature, clamped to ``log(max_temperature)`` when used, as CLIP) and, for SigLIP only,
  a learnable ``logit_bias`` (absent for CLIP, so no parameter goes without gradient under DDP).
- Losses: ``siglip_loss`` (Zhai et al. 2023, sigmoid over all B x B pairs, summed over texts, mean over images)
  and ``clip_loss`` (symmetric cross-entropy).
- ``retrieval_recall_at_k``: image->text or text->image Recall@k on cosine similarity, optionally treating
  pairs with the same group id (identical captions) as interchangeable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chameleon_lite.baseline.vision_encoder import (
    TransformerBlock,
    VisionEncoder,
    check_positive_int,
    init_transformer_weights_,
    trunc_normal_init_,
)

TEXT_POOLS = ("eos", "mean")
LOSSES = ("siglip", "clip")
DIRECTIONS = ("image_to_text", "text_to_image")


# ---------------------------------------------------------------------------------------------- text tower
@dataclass
class TextEncoderConfig:
    """Shape of the text tower.

    Args:
        vocab_size: number of token ids (ids must lie in ``[0, vocab_size)``).
        d_model: token width.
        n_layers: transformer blocks.
        n_heads: attention heads; must divide ``d_model``.
        max_len: longest token sequence (size of the learned position table).
        pad_id: id used for right padding; only read when ``lengths`` is not given (then
            ``lengths = (ids != pad_id).sum(1)``).
        pool: ``"eos"`` (output at the last real token, ``lengths - 1``) or ``"mean"`` (mean over real tokens).
        mlp_ratio: MLP hidden width = ``round(mlp_ratio * d_model)``.
        dropout: attention-probability and residual dropout.
        norm_eps: LayerNorm epsilon.
    """

    vocab_size: int
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    max_len: int = 64
    pad_id: int = 3
    pool: str = "eos"
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not isinstance(self.pad_id, int) or not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id={self.pad_id!r} must be an int in [0, vocab_size={self.vocab_size})")
        if self.pool not in TEXT_POOLS:
            raise ValueError(f"pool={self.pool!r} must be one of {TEXT_POOLS}")
        if self.mlp_ratio <= 0 or self.mlp_hidden < 1:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} must be > 0 (and give an MLP width >= 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be > 0")

    @property
    def mlp_hidden(self) -> int:
        return round(self.mlp_ratio * self.d_model)


class TextEncoder(nn.Module):
    """Right-padded token ids ``(B, L)`` -> one vector per caption ``(B, d_model)``."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.max_len, c.d_model))
        self.embed_dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(c.d_model, c.n_heads, c.mlp_hidden, c.dropout, c.norm_eps) for _ in range(c.n_layers)
        )
        self.norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Truncated normal (std 0.02) embeddings, positions and matrices; zero biases; unit norms."""
        init_transformer_weights_(self, generator)
        trunc_normal_init_(self.pos_embed, generator=generator)

    def lengths_from_padding(self, ids: torch.Tensor) -> torch.Tensor:
        """Real-token counts ``(B,)`` of right-padded ``ids`` (tokens different from ``pad_id``)."""
        return (ids != self.config.pad_id).sum(dim=1)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled caption vectors.

        Args:
            ids: ``(B, L)`` long, right-padded; ``L <= max_len``. Positions ``>= lengths`` are ignored whatever
                they hold.
            lengths: ``(B,)`` long, real tokens per row, each in ``[1, L]``; default derived from ``pad_id``.

        Returns:
            ``(B, d_model)``: the final-normed output at ``lengths - 1`` (``pool="eos"``) or its masked mean.
        """
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"ids must be a (B, L) long tensor, got {tuple(ids.shape)} {ids.dtype}")
        B, L = ids.shape
        if L > self.config.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len={self.config.max_len}")
        if lengths is None:
            lengths = self.lengths_from_padding(ids)
        if lengths.shape != (B,) or lengths.dtype != torch.long:
            raise ValueError(f"lengths must be a ({B},) long tensor, got {tuple(lengths.shape)} {lengths.dtype}")
        if bool(((lengths < 1) | (lengths > L)).any()):
            raise ValueError(f"every length must be in [1, {L}], got {lengths.tolist()}")
        key_mask = torch.arange(L, device=ids.device) < lengths[:, None]  # (B, L) True = real token
        x = self.embed_dropout(self.embed_tokens(ids) + self.pos_embed[:, :L])  # (B, L, d)
        for block in self.blocks:
            x = block(x, key_mask=key_mask)
        x = self.norm(x)  # (B, L, d)
        if self.config.pool == "eos":
            return x[torch.arange(B, device=x.device), lengths - 1]  # (B, d)
        weights = key_mask.to(x.dtype)[..., None]  # (B, L, 1)
        return (x * weights).sum(dim=1) / lengths[:, None].to(x.dtype)  # (B, d)


# ---------------------------------------------------------------------------------------------- losses
def _check_pair(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> None:
    if img_emb.dim() != 2 or img_emb.shape != txt_emb.shape:
        raise ValueError(f"img_emb and txt_emb must both be (B, E), got {tuple(img_emb.shape)} and "
                         f"{tuple(txt_emb.shape)}")


def siglip_loss(
    img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """Sigmoid loss of SigLIP (Zhai et al. 2023): every (image, text) pair is a binary problem.

    ``logits = exp(logit_scale) * img_emb @ txt_emb.T + logit_bias``; labels +1 on the diagonal (matching pair),
    -1 elsewhere; loss ``= -logsigmoid(labels * logits).sum() / B`` (sum over texts, mean over images).
    Embeddings are used as given (normalise them first).
    """
    _check_pair(img_emb, txt_emb)
    logits = logit_scale.exp() * img_emb @ txt_emb.T + logit_bias  # (B, B)
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1  # (B, B) +-1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def clip_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP: ``(CE(logits, diag) + CE(logits.T, diag)) / 2``, ``logits = exp(scale) i @ t.T``."""
    _check_pair(img_emb, txt_emb)
    logits = logit_scale.exp() * img_emb @ txt_emb.T  # (B, B)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


# ---------------------------------------------------------------------------------------------- the two towers
@dataclass
class ContrastiveConfig:
    """Heads and loss of ``ContrastiveModel``.

    Args:
        embed_dim: width of the shared embedding space.
        loss: ``"siglip"`` or ``"clip"``.
        init_temperature: initial ``exp(logit_scale)`` (SigLIP uses 10; CLIP's usual value is 1/0.07 ~ 14.3).
        init_bias: initial ``logit_bias`` (SigLIP only; -10 keeps the many negatives from dominating early).
        max_temperature: ``exp(logit_scale)`` is clamped to this when used (CLIP's 100).
    """

    embed_dim: int = 128
    loss: str = "siglip"
    init_temperature: float = 10.0
    init_bias: float = -10.0
    max_temperature: float = 100.0

    def __post_init__(self) -> None:
        check_positive_int("embed_dim", self.embed_dim)
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} must be one of {LOSSES}")
        if self.init_temperature <= 0:
            raise ValueError(f"init_temperature={self.init_temperature} must be > 0")
        if self.max_temperature < self.init_temperature:
            raise ValueError(f"max_temperature={self.max_temperature} must be >= init_temperature="
                             f"{self.init_temperature}")


class ContrastiveModel(nn.Module):
    """A ``VisionEncoder`` and a ``TextEncoder`` mapped into one L2-normalised space by linear heads."""

    def __init__(self, vision: VisionEncoder, text: TextEncoder, config: ContrastiveConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ContrastiveConfig()
        self.vision = vision
        self.text = text
        self.vision_head = nn.Linear(vision.config.d_model, config.embed_dim, bias=False)
        self.text_head = nn.Linear(text.config.d_model, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.init_bias))) if config.loss == "siglip" else None
        self.reset_head_parameters()

    def reset_head_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-init the heads (truncated normal 0.02), ``logit_scale`` and ``logit_bias``; the towers are untouched."""
        for head in (self.vision_head, self.text_head):
            trunc_normal_init_(head.weight, generator=generator)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(self.config.init_temperature))
            if self.logit_bias is not None:
                self.logit_bias.fill_(float(self.config.init_bias))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> unit vectors ``(B, embed_dim)``."""
        return F.normalize(self.vision_head(self.vision.pooled(images)), dim=-1)

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L)`` ids (+ ``(B,)`` lengths) -> unit vectors ``(B, embed_dim)``."""
        return F.normalize(self.text_head(self.text(ids, lengths)), dim=-1)

    def forward(
        self, images: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(img_emb, txt_emb)``, each ``(B, embed_dim)`` and L2-normalised."""
        return self.encode_image(images), self.encode_text(ids, lengths)

    @property
    def clamped_logit_scale(self) -> torch.Tensor:
        """``logit_scale`` clamped to ``log(max_temperature)`` (what the loss uses)."""
        return self.logit_scale.clamp(max=math.log(self.config.max_temperature))

    @property
    def temperature(self) -> float:
        """Current ``exp(logit_scale)`` as used by the loss (multiplies the cosine similarities)."""
        return float(self.clamped_logit_scale.detach().exp())

    def loss(self, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        """The configured loss (scalar) of one batch of matching pairs."""
        if self.config.loss == "siglip":
            return siglip_loss(img_emb, txt_emb, self.clamped_logit_scale, self.logit_bias)
        return clip_loss(img_emb, txt_emb, self.clamped_logit_scale)


# ---------------------------------------------------------------------------------------------- retrieval
def retrieval_recall_at_k(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    k: int = 1,
    text_groups: torch.Tensor | None = None,
    direction: str = "image_to_text",
) -> float:
    """Recall@k of cross-modal retrieval over one set of ``B`` (image, caption) pairs, on cosine similarity.

    Pair ``i`` is ``(img_emb[i], txt_emb[i])``. With ``direction="image_to_text"`` each image queries all ``B``
    texts and counts as a hit when one of its ``k`` most similar texts is correct; ``"text_to_image"`` is the
    mirror. Returns the fraction of hits in ``[0, 1]``.

    Correct means the query's own partner, or, when ``text_groups`` ``(B,)`` ints are given, any item whose
    pair has the same group id as the query's pair. Give identical captions the same group id: otherwise an image
    whose caption occurs twice is scored against an arbitrary tie-break between two equal text embeddings.
    Ties in similarity are broken by ``torch.topk``.
    """
    _check_pair(img_emb, txt_emb)
    B = img_emb.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= B:
        raise ValueError(f"k={k!r} must be an int in [1, {B}]")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} must be one of {DIRECTIONS}")
    if text_groups is None:
        groups = torch.arange(B, device=img_emb.device)
    else:
        if text_groups.shape != (B,):
            raise ValueError(f"text_groups must have shape ({B},), got {tuple(text_groups.shape)}")
        groups = text_groups.to(img_emb.device)
    with torch.no_grad():
        sims = F.normalize(img_emb.float(), dim=-1) @ F.normalize(txt_emb.float(), dim=-1).T  # (B_img, B_txt)
        if direction == "text_to_image":
            sims = sims.T  # (B_txt, B_img)
        top = sims.topk(k, dim=1).indices  # (B, k) indices of retrieved items
        hits = (groups[top] == groups[:, None]).any(dim=1)  # (B,)
    return hits.float().mean().item()
