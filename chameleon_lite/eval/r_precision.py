"""R-precision of text -> image generation, scored by a contrastive image-text model (no scene parser needed).

R-precision (Xu et al. 2018, AttnGAN): embed each generated image, its own caption and ``r - 1`` other captions
with a contrastive image-text model; the image is a hit when its own caption is the most similar of the ``r``.
The score is the share of hits (chance level ``1 / r``; the papers use ``r = 100``).

The scorer is the package's own ``ContrastiveModel`` (the baseline's encoder pretraining,
``lit_baseline.ContrastiveEncoderModule``), exported whole by the callback ``lit_baseline.ExportContrastiveScorer``
into a scorer directory::

    config.yaml          kind: contrastive_scorer, tokenizer (bundle name), tokenizer_path (as trained with),
                         image_size, vit / text / contrastive configs, trained_steps (schema: ScorerDirConfig)
    model.safetensors    the whole ContrastiveModel: vision.*, text.*, vision_head / text_head, logit_scale
                         (and logit_bias for SigLIP)
    tokenizer/           a copy of the bundle's text part (tokenizer.yaml, text.model): captions are tokenized
                         exactly as in training even if the original bundle changes or is absent
    manifest.json        the files written here (``safe_io.write_dir``; not needed to load)

``load_scorer`` reads it back (``config.yaml`` as plain data, never interpolated; weights from safetensors only,
names and shapes checked before anything is built) into a ``ContrastiveScorer``. Captions are tokenized as
``data.baseline_data.contrastive_batch`` does in training: ``bundle.text.encode(caption.strip()) + [<eos>]``,
right-padded with ``vocab.pad``; images go through ``image_preprocessing.preprocess_images`` at the trained
``image_size`` (center crop, the training readers' defaults), scaled to ``[-1, 1]``.

Notable choices of ``r_precision``:

- **Distractors are other texts.** Every image gives a key per caption (the caption string, or any group id;
  ``score_text_to_image`` uses the token ids). The pool is first reduced to distinct keys (first occurrence), and
  an image's distractors are ``r - 1`` of them drawn without replacement, never one with the image's own key: a
  copy of the own caption would tie with it, and a repeated distractor would make the task easier than ``r``.
- **A tie is a miss.** A hit needs the own caption's cosine similarity to be strictly above every distractor's
  (a model that maps everything to one point scores 0, not 1).
- **Seeded.** The draws are a pure function of ``seed``, the keys and their order (NumPy's ``default_rng``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import MISSING
from PIL import Image
from safetensors.torch import save_file

from chameleon_lite.baseline.contrastive import ContrastiveConfig, ContrastiveModel, TextEncoder, TextEncoderConfig
from chameleon_lite.baseline.vision_encoder import VisionEncoder, ViTConfig
from chameleon_lite.model.model_dir import resolve_bundle_path
from chameleon_lite.safe_io import (
    check_writable_dir,
    load_checked_weights,
    load_structured_yaml,
    save_structured_yaml,
    write_dir,
)
from chameleon_lite.tokenization.bundle import TokenizerBundle, load_bundle, save_bundle
from chameleon_lite.tokenization.image_preprocessing import preprocess_images
from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig

__all__ = [
    "ContrastiveScorer",
    "ScorerDirConfig",
    "load_scorer",
    "r_precision",
    "score_text_to_image",
    "write_scorer_dir",
]

KIND = "contrastive_scorer"
FORMAT_VERSION = 1
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
DEFAULT_BATCH_SIZE = 256
_SIM_CHUNK = 1024  # images per block of the (images x pool) similarity matrix


# ---------------------------------------------------------------------------------------------- directory
@dataclass
class ScorerDirConfig:
    """Schema of a scorer directory's ``config.yaml``.

    Args:
        tokenizer: name of the tokenizer bundle the model was trained with (checked against ``tokenizer/``).
        tokenizer_path: the bundle path or shipped name as given to the training module (provenance; the
            fallback, through ``pretrained.resolve_bundle_path``, for a directory without ``tokenizer/``).
        image_size: side of the square images the vision tower reads (equals ``vit.image_size``).
        vit, text, contrastive: the vision tower, text tower and heads/loss configs.
        format_version: layout version of the directory.
        kind: ``"contrastive_scorer"``.
        trained_steps: optimizer steps the weights were trained for, when known.
    """

    tokenizer: str = MISSING
    tokenizer_path: str = MISSING
    image_size: int = MISSING
    vit: ViTConfig = MISSING
    text: TextEncoderConfig = MISSING
    contrastive: ContrastiveConfig = MISSING
    format_version: int = FORMAT_VERSION
    kind: str = KIND
    trained_steps: int | None = None


def _check_bundle_fits(bundle: TokenizerBundle, text: TextEncoderConfig, where: str) -> None:
    if text.vocab_size != bundle.vocab.size or text.pad_id != bundle.vocab.pad:
        raise ValueError(f"{where}: the text tower has vocab_size={text.vocab_size}, pad_id={text.pad_id} but bundle "
                         f"{bundle.name!r} has {bundle.vocab.size} ids and pad id {bundle.vocab.pad}")


def write_scorer_dir(
    model: ContrastiveModel,
    tokenizer: str | Path,
    out_dir: str | Path,
    *,
    trained_steps: int | None = None,
) -> Path:
    """Write the whole ``model`` as a scorer directory (``load_scorer`` reads it) and return ``out_dir``.

    Args:
        model: the trained contrastive model (vision and text towers, heads, logit scale and bias).
        tokenizer: the bundle directory or shipped name it was trained with (``resolve_bundle_path``); its text
            part is copied into ``tokenizer/`` and the string is recorded as ``tokenizer_path``.
        out_dir: absent, empty, or written before by the package (``safe_io.write_dir``: files it did not write
            stay; any other non-empty directory raises ``FileExistsError`` before anything is written).
        trained_steps: recorded in ``config.yaml`` when given.
    """
    out_dir = Path(out_dir)
    bundle = load_bundle(resolve_bundle_path(tokenizer), load_image_tokenizer=False)
    text = model.text.config
    _check_bundle_fits(bundle, text, "write_scorer_dir")
    vit = model.vision.config
    config = ScorerDirConfig(tokenizer=bundle.name, tokenizer_path=str(tokenizer), image_size=vit.image_size,
                             vit=vit, text=text, contrastive=model.config,
                             trained_steps=None if trained_steps is None else int(trained_steps))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    check_writable_dir(out_dir)  # refuse early, before anything is built
    readme = (f"# Text part of tokenizer bundle `{bundle.name}`\n\nCopied by `write_scorer_dir` from "
              f"`{tokenizer}`: the contrastive scorer beside it tokenizes captions with this text model. The image "
              "tokenizer is not needed there and was left out.\n")

    def build(tmp: Path) -> None:
        save_structured_yaml(config, tmp / CONFIG_FILE)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "kind": KIND})
        save_bundle(bundle, tmp / TOKENIZER_DIR, readme=readme)

    return write_dir(out_dir, build, kind=KIND)


def load_scorer_config(file: str | Path) -> ScorerDirConfig:
    """Parse and validate a scorer directory's ``config.yaml`` (plain data, never interpolated)."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"scorer config not found: {file}")
    config = load_structured_yaml(file, ScorerDirConfig)
    if config.kind != KIND:
        raise ValueError(f"{file}: kind={config.kind!r}; this loader reads {KIND!r} directories")
    if config.format_version != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {config.format_version} is not supported (only {FORMAT_VERSION})")
    if config.image_size != config.vit.image_size:
        raise ValueError(f"{file}: image_size={config.image_size} but vit.image_size={config.vit.image_size}")
    return config


def _build(config: ScorerDirConfig) -> ContrastiveModel:
    return ContrastiveModel(VisionEncoder(config.vit), TextEncoder(config.text), config.contrastive)


def load_scorer(directory: str | Path, device: torch.device | str = "cpu") -> ContrastiveScorer:
    """A ``ContrastiveScorer`` (model in eval mode on ``device``) from a directory ``write_scorer_dir`` wrote.

    The text tokenizer is the bundle copy in ``tokenizer/``; a directory without one falls back to
    ``tokenizer_path`` through ``pretrained.resolve_bundle_path``. Either way the bundle's name and vocabulary must
    match ``config.yaml``. Errors name the file at fault.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"scorer directory not found: {directory}")
    cfg_file, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    config = load_scorer_config(cfg_file)
    if not weights.is_file():
        raise FileNotFoundError(f"scorer directory {directory} has no {WEIGHTS_FILE}")
    copy = directory / TOKENIZER_DIR
    bundle_dir = copy if copy.is_dir() else resolve_bundle_path(config.tokenizer_path)
    bundle = load_bundle(bundle_dir, load_image_tokenizer=False)
    if bundle.name != config.tokenizer:
        raise ValueError(f"{cfg_file} names tokenizer {config.tokenizer!r} but {bundle_dir} holds bundle "
                         f"{bundle.name!r}")
    _check_bundle_fits(bundle, config.text, str(cfg_file))
    model = load_checked_weights(partial(_build, config), weights, config_file=cfg_file,
                                 min_tensors=config.vit.n_layers + config.text.n_layers,
                                 asks=f"the config asks for {config.vit.n_layers} + {config.text.n_layers} layers")
    return ContrastiveScorer(model.to(device), bundle)


# ---------------------------------------------------------------------------------------------- scorer
class ContrastiveScorer:
    """A contrastive model in eval mode and the tokenizer bundle of its text tower; embeds images and captions.

    Args:
        model: the ``ContrastiveModel`` (put in eval mode here; it stays on its device).
        bundle: the bundle it was trained with (only the text tokenizer and vocabulary are used).
        batch_size: default number of images or captions per forward pass.

    Embeddings come back as float32 CPU tensors ``(N, embed_dim)``, L2-normalised.
    """

    def __init__(self, model: ContrastiveModel, bundle: TokenizerBundle, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        _check_bundle_fits(bundle, model.text.config, "ContrastiveScorer")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int")
        self.model = model.eval()
        self.bundle = bundle
        self.batch_size = batch_size
        vit = model.vision.config
        self.image_size = vit.image_size
        self._preprocess = ImageTokenizerConfig(image_size=vit.image_size, in_channels=vit.channels)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return self.model.config.embed_dim

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Captions -> token ids as in training: ``text.encode(caption.strip()) + [<eos>]``.

        ``ValueError`` for a caption longer than the text tower's ``max_len`` (``<eos>`` included), naming its
        index; ``TypeError`` for a non-string.
        """
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of captions, got a single string; wrap it in a list")
        vocab, limit = self.bundle.vocab, self.model.text.config.max_len
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"caption {i} must be a str, got {type(text).__name__}")
            ids = self.bundle.text.encode(text.strip()) + [vocab.eos]
            if len(ids) > limit:
                raise ValueError(f"caption {i} is {len(ids)} tokens with <eos>, more than the text tower's "
                                 f"max_len={limit}: {text[:80]!r}")
            out.append(ids)
        return out

    def _batch_size(self, batch_size: int | None) -> int:
        size = self.batch_size if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"batch_size={size!r} must be a positive int")
        return size

    def embed_token_ids(self, ids: Sequence[Sequence[int]], batch_size: int | None = None) -> torch.Tensor:
        """Token-id lists (``tokenize``'s output) -> unit vectors ``(N, embed_dim)``, right-padded per batch."""
        size = self._batch_size(batch_size)
        pad, device = self.bundle.vocab.pad, self.device
        parts = []
        with torch.inference_mode():
            for start in range(0, len(ids), size):
                rows = ids[start:start + size]
                if any(len(r) == 0 for r in rows):
                    raise ValueError("every token-id list needs at least one id (tokenize appends <eos>)")
                L = max(len(r) for r in rows)
                batch = torch.full((len(rows), L), pad, dtype=torch.long)  # (B, L) right-padded
                for b, r in enumerate(rows):
                    batch[b, : len(r)] = torch.as_tensor(r, dtype=torch.long)
                lengths = torch.as_tensor([len(r) for r in rows], dtype=torch.long)  # (B,)
                emb = self.model.encode_text(batch.to(device), lengths.to(device))  # (B, E)
                parts.append(emb.float().cpu())
        if not parts:
            return torch.empty(0, self.embed_dim)
        return torch.cat(parts)  # (N, E)

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """Captions -> unit vectors ``(N, embed_dim)`` (tokenized by ``tokenize``, as in training)."""
        return self.embed_token_ids(self.tokenize(texts), batch_size)

    def embed_images(self, images: Sequence[Image.Image], batch_size: int | None = None) -> torch.Tensor:
        """PIL images (any mode and size) -> unit vectors ``(N, embed_dim)``.

        Preprocessed as the training readers do (``preprocess_images``: colours through ``to_rgb``, center crop to
        ``image_size``, values in ``[-1, 1]``).
        """
        if isinstance(images, Image.Image):
            raise TypeError("embed_images expects a list of PIL images, got a single image; wrap it in a list")
        size = self._batch_size(batch_size)
        images = list(images)
        device = self.device
        parts = []
        with torch.inference_mode():
            for start in range(0, len(images), size):
                pixels = preprocess_images(images[start:start + size], self._preprocess)  # (B, C, H, W) in [-1, 1]
                parts.append(self.model.encode_image(pixels.to(device)).float().cpu())  # (B, E)
        if not parts:
            return torch.empty(0, self.embed_dim)
        return torch.cat(parts)  # (N, E)


# ---------------------------------------------------------------------------------------------- R-precision
def _distinct(keys: Sequence[Hashable], what: str) -> dict[Hashable, int]:
    """Key -> index of its first occurrence in ``keys`` (insertion order = order of first occurrence)."""
    first: dict[Hashable, int] = {}
    for j, key in enumerate(keys):
        try:
            first.setdefault(key, j)
        except TypeError:
            raise TypeError(f"{what}[{j}] is a {type(key).__name__}, not hashable: use caption strings, ints or "
                            "tuples") from None
    return first


def _check_pool(own_keys: Sequence[Hashable], distinct_pool: dict[Hashable, int], r: int) -> None:
    """``ValueError`` naming the first image whose pool holds fewer than ``r - 1`` distinct other texts."""
    P = len(distinct_pool)
    for i, key in enumerate(own_keys):
        try:
            usable = P - (key in distinct_pool)
        except TypeError:
            raise TypeError(f"own_keys[{i}] is a {type(key).__name__}, not hashable: use caption strings, ints or "
                            "tuples") from None
        if usable < r - 1:
            raise ValueError(f"r={r} needs {r - 1} distractor captions per image, but the pool holds only {usable} "
                             f"distinct caption(s) other than image {i}'s own ({key!r:.80}); pass a larger pool or "
                             "a smaller r")


def _check_r(r: int) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 2:
        raise ValueError(f"r={r!r} must be an int >= 2 (the own caption plus r - 1 distractors)")


def r_precision(
    image_emb: torch.Tensor,
    own_text_emb: torch.Tensor,
    pool_text_emb: torch.Tensor,
    *,
    own_keys: Sequence[Hashable],
    pool_keys: Sequence[Hashable],
    r: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """R-precision: the share of images whose own caption beats ``r - 1`` drawn distractors on cosine similarity.

    Args:
        image_emb: ``(N, E)`` embeddings of the (generated) images.
        own_text_emb: ``(N, E)``; row ``i`` embeds image ``i``'s own caption.
        pool_text_emb: ``(P, E)`` embeddings of the captions distractors are drawn from (may include the own
            captions: those are excluded by key).
        own_keys: ``N`` hashable keys naming each own caption (the caption string, its token ids as a tuple, or
            a group id); equal keys mean identical text.
        pool_keys: ``P`` keys of the pool captions, comparable with ``own_keys``. The pool is reduced to distinct
            keys (the first row of each key is used) so that no text is drawn twice.
        r: captions ranked per image (the own one plus ``r - 1`` distractors); chance level is ``1 / r``.
        seed: seed of the distractor draws (``numpy.random.default_rng``).

    For image ``i``, ``r - 1`` distinct pool keys other than ``own_keys[i]`` are drawn without replacement; it is a
    hit when the cosine similarity to its own caption is strictly greater than to each of them (ties are misses).
    Embeddings need not be normalised.

    Returns:
        ``{"r_precision": hits / n, "hits": int, "n": N, "r": r, "per_image": [bool] * N}`` (which images hit).

    Raises:
        ValueError: shapes disagree (or are empty), embeddings are not finite, ``r < 2``, or the pool holds fewer
            than ``r - 1`` distinct captions other than some image's own (the image is named).
        TypeError: a key is not hashable.
    """
    _check_r(r)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed={seed!r} must be an int")
    for name, t in (("image_emb", image_emb), ("own_text_emb", own_text_emb), ("pool_text_emb", pool_text_emb)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating tensor (rows x embed_dim), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is empty")
    N, E = image_emb.shape
    if own_text_emb.shape != (N, E):
        raise ValueError(f"own_text_emb has shape {tuple(own_text_emb.shape)} but image_emb has {(N, E)}: one own "
                         "caption per image, same embedding width")
    if pool_text_emb.shape[1] != E:
        raise ValueError(f"pool_text_emb has width {pool_text_emb.shape[1]} but image_emb has {E}")
    P_all = pool_text_emb.shape[0]
    if isinstance(own_keys, (str, bytes)) or len(own_keys) != N:
        raise ValueError(f"own_keys must be a sequence of {N} keys (one per image), got {len(own_keys)}")
    if isinstance(pool_keys, (str, bytes)) or len(pool_keys) != P_all:
        raise ValueError(f"pool_keys must be a sequence of {P_all} keys (one per pool row), got {len(pool_keys)}")
    for name, t in (("image_emb", image_emb), ("own_text_emb", own_text_emb), ("pool_text_emb", pool_text_emb)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds NaN or infinite values")

    distinct = _distinct(pool_keys, "pool_keys")
    _check_pool(own_keys, distinct, r)
    slot = {key: p for p, key in enumerate(distinct)}  # key -> row of the distinct pool
    rows = torch.as_tensor(list(distinct.values()), dtype=torch.long)  # (P,) first pool row of each distinct key
    P = len(distinct)

    rng = np.random.default_rng(seed)
    draws = np.empty((N, r - 1), dtype=np.int64)  # (N, r-1) rows of the distinct pool
    for i, key in enumerate(own_keys):
        skip = slot.get(key)
        if skip is None:
            draws[i] = rng.choice(P, size=r - 1, replace=False)
        else:  # the first r - 1 of a random order of the pool without the own key: a uniform subset
            picked = rng.choice(P, size=r, replace=False)
            draws[i] = picked[picked != skip][: r - 1]

    with torch.no_grad():
        img = F.normalize(image_emb.detach().float().cpu(), dim=-1)  # (N, E)
        own = F.normalize(own_text_emb.detach().float().cpu(), dim=-1)  # (N, E)
        pool = F.normalize(pool_text_emb.detach().float().cpu()[rows], dim=-1)  # (P, E)
        own_sim = (img * own).sum(dim=-1)  # (N,)
        index = torch.from_numpy(draws)  # (N, r-1)
        hit = torch.zeros(N, dtype=torch.bool)  # (N,)
        for start in range(0, N, _SIM_CHUNK):
            stop = min(start + _SIM_CHUNK, N)
            sims = img[start:stop] @ pool.T  # (c, P)
            best_other = sims.gather(1, index[start:stop]).max(dim=1).values  # (c,)
            hit[start:stop] = own_sim[start:stop] > best_other
    hits = int(hit.sum())
    return {"r_precision": hits / N, "hits": hits, "n": N, "r": r, "per_image": hit.tolist()}


def score_text_to_image(
    scorer: ContrastiveScorer,
    generated_images: Sequence[Image.Image],
    captions: Sequence[str],
    pool_captions: Sequence[str],
    *,
    r: int = 100,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """R-precision of images generated from ``captions`` (image ``i`` from caption ``i``), against ``pool_captions``.

    Captions are identical when their token ids are (``scorer.tokenize``): those are the keys, so a pool copy of
    an image's own caption is never its distractor. Each distinct caption is embedded once. The pool is checked
    before any image is embedded. Returns ``r_precision``'s dict.
    """
    if isinstance(generated_images, Image.Image) or isinstance(captions, str) or isinstance(pool_captions, str):
        raise TypeError("score_text_to_image expects lists of images, captions and pool captions")
    if len(generated_images) != len(captions):
        raise ValueError(f"{len(generated_images)} generated images but {len(captions)} captions (one per image)")
    if len(captions) == 0:
        raise ValueError("no generated images to score")
    _check_r(r)
    own_keys = [tuple(ids) for ids in scorer.tokenize(captions)]
    pool_keys = [tuple(ids) for ids in scorer.tokenize(pool_captions)]
    pool_unique = list(dict.fromkeys(pool_keys))  # distinct token sequences, in order of first appearance
    _check_pool(own_keys, dict.fromkeys(pool_unique, 0), r)
    own_unique = list(dict.fromkeys(own_keys))
    own_rows = {key: j for j, key in enumerate(own_unique)}
    own_emb = scorer.embed_token_ids(own_unique, batch_size)[[own_rows[k] for k in own_keys]]  # (N, E)
    pool_emb = scorer.embed_token_ids(pool_unique, batch_size)  # (P, E)
    image_emb = scorer.embed_images(generated_images, batch_size)  # (N, E)
    return r_precision(image_emb, own_emb, pool_emb, own_keys=own_keys, pool_keys=pool_unique, r=r, seed=seed)
