"""The encoder-projector baseline (LLaVA-style): ViT features -> projector -> the same decoder, text out.

::

    model = BaselineVLM(BaselineConfig(vit=ViTConfig(), projector=ProjectorConfig(kind="mlp"),
                                       decoder=DecoderConfig(vocab_size=vocab.size)), vocab)
    logits, targets = model(images, input_ids, loss_mask)       # training (loss on text only)
    vlm = BaselineVLM.from_pretrained("runs/baseline-tiny/model")
    vlm.generate([image, "What color is the circle?"])           # -> ["red"]

An ``<image>`` placeholder (``Vocab.image_placeholder``) in ``input_ids`` is replaced by the projected visual
tokens of one image (:func:`expand_placeholders`), so the decoder reads ``<bos> v_1 .. v_N question <sep>``:
the same format as the native arm's ``<bos> <boi> c_1 .. c_N <eoi> question <sep>``, with continuous
embeddings instead of discrete codes. The decoder is the native arm's ``Decoder`` class with the same
vocabulary (the image-code rows of its embedding table and head are simply never trained), so a decoder
configuration is literally shared between the arms; :func:`parameter_counts` says where the parameters are.

A baseline model directory, like the native arm's (``chameleon_lite.native.chameleon``)::

    config.yaml          kind: baseline, the tokenizer bundle name, vit / projector / decoder configs
    model.safetensors    encoder.*, projector.*, decoder.* (a tied output head stored once)
    tokenizer/           a copy of the tokenizer bundle
    manifest.json        the files written here (not needed to load)

Written like the native arm's (``safe_io.write_dir``: never over files it did not write, each file renamed into
place whole); read with validation that names the file at fault, ``config.yaml`` as plain data (never
interpolated). Nothing is unpickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from chameleon_lite.baseline.projectors import ProjectorConfig, build_projector
from chameleon_lite.baseline.vision_encoder import VisionEncoder, ViTConfig
from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import IGNORE_INDEX, Decoder
from chameleon_lite.model.model_dir import CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE, as_bundle, check_model_dir
from chameleon_lite.safe_io import check_writable_dir, load_structured_yaml, save_structured_yaml, write_dir
from chameleon_lite.tokenization.bundle import TokenizerBundle, load_bundle, save_bundle
from chameleon_lite.tokenization.vocab import Vocab

__all__ = [
    "BaselineConfig",
    "BaselineDirConfig",
    "BaselineVLM",
    "baseline_state_dict",
    "expand_placeholders",
    "load_baseline_dir",
    "parameter_counts",
    "visual_tokens",
    "write_baseline_dir",
]


@dataclass
class BaselineConfig:
    """The three parts of the baseline: vision encoder, projector, decoder."""

    vit: ViTConfig = field(default_factory=ViTConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


def visual_tokens(config: BaselineConfig) -> int:
    """Decoder positions one image takes (the projector's output tokens for the ViT's patch count)."""
    n_patches = (config.vit.image_size // config.vit.patch_size) ** 2
    projector = build_projector(config.projector, config.vit.d_model, config.decoder.d_model)
    return projector.num_output_tokens(n_patches)


def expand_placeholders(
    input_ids: torch.Tensor,
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    placeholder_id: int,
    pad_id: int,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Splice image embeddings in place of the placeholder tokens.

    Args:
        input_ids: ``(B, T)`` ids, right padded; each placeholder stands for one image.
        text_embeds: ``(B, T, d)`` embeddings of ``input_ids``.
        image_embeds: ``(n_images, N, d)``: one entry per placeholder, in row-major order of the placeholders.
        placeholder_id: the ``<image>`` id.
        pad_id: fills the ids of the padding at the end of shorter rows.
        loss_mask: optional ``(B, T)`` bool, carried over (False on visual tokens and padding).

    Returns:
        ``(embeds (B, T', d), ids (B, T'), loss_mask (B, T') or None, lengths (B,))`` where each placeholder now
        spans ``N`` positions (their id stays ``placeholder_id``) and ``T'`` is the longest expanded row.
        Padding embeddings are zero.
    """
    B, T = input_ids.shape
    n_img, N, d = image_embeds.shape
    is_ph = input_ids == placeholder_id  # (B, T)
    if int(is_ph.sum()) != n_img:
        raise ValueError(f"input_ids hold {int(is_ph.sum())} <image> placeholders but {n_img} images were given")
    span = torch.where(is_ph, N, 1)  # (B, T) new positions each token takes
    is_pad = input_ids == pad_id
    span = torch.where(is_pad & ~is_ph, torch.zeros_like(span), span)  # padding is rebuilt at the end
    ends = span.cumsum(dim=1)  # (B, T)
    starts = ends - span  # (B, T) first new position of each token
    lengths = ends[:, -1]  # (B,)
    T_new = int(lengths.max()) if B else 0
    embeds = text_embeds.new_zeros(B, T_new, d)  # (B, T', d)
    ids = input_ids.new_full((B, T_new), pad_id)  # (B, T')
    new_mask = torch.zeros(B, T_new, dtype=torch.bool, device=input_ids.device) if loss_mask is not None else None
    b_txt, t_txt = torch.nonzero(~is_ph & ~is_pad, as_tuple=True)
    pos_txt = starts[b_txt, t_txt]
    embeds = embeds.index_put((b_txt, pos_txt), text_embeds[b_txt, t_txt])
    ids[b_txt, pos_txt] = input_ids[b_txt, t_txt]
    if new_mask is not None:
        new_mask[b_txt, pos_txt] = loss_mask[b_txt, t_txt]
    b_img, t_img = torch.nonzero(is_ph, as_tuple=True)  # row-major: the order of image_embeds
    if n_img:
        pos_img = starts[b_img, t_img][:, None] + torch.arange(N, device=input_ids.device)  # (n_img, N)
        b_rep = b_img[:, None].expand(n_img, N)
        embeds = embeds.index_put((b_rep, pos_img), image_embeds.to(embeds.dtype))
        ids[b_rep, pos_img] = placeholder_id
    return embeds, ids, new_mask, lengths


def next_token_targets(ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``targets[:, t] = ids[:, t+1]`` where ``loss_mask[:, t+1]``, else ``IGNORE_INDEX`` (aligned with logits)."""
    targets = torch.full_like(ids, IGNORE_INDEX)  # (B, T)
    targets[:, :-1] = torch.where(loss_mask[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    return targets


class BaselineVLM(nn.Module):
    """Vision encoder + projector + decoder. Reads images and text, writes text.

    Attributes:
        encoder: ``VisionEncoder`` (features from ``config.vit.feature_layer``).
        projector: maps ``(B, n_patches, vit.d_model)`` to ``(B, visual_tokens, decoder.d_model)``.
        decoder: the shared ``Decoder`` class.
        vocab: the unified vocabulary (its ``image_placeholder`` marks where images go).
        bundle: the tokenizer bundle when loaded with ``from_pretrained`` (needed by ``generate``), else None.
    """

    def __init__(self, config: BaselineConfig, vocab: Vocab) -> None:
        super().__init__()
        if config.decoder.vocab_size != vocab.size:
            raise ValueError(f"decoder.vocab_size={config.decoder.vocab_size} but the vocabulary has {vocab.size} ids")
        self.config = config
        self.vocab = vocab
        self.bundle: Any = None
        self.encoder = VisionEncoder(config.vit)
        self.projector = build_projector(config.projector, config.vit.d_model, config.decoder.d_model)
        self.decoder = Decoder(config.decoder)

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def visual_tokens(self) -> int:
        return self.projector.num_output_tokens(self.encoder.num_patches)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, C, H, W)`` in [-1, 1] -> projected visual tokens ``(n, N, decoder.d_model)``.

        A frozen encoder (no parameter requires grad) runs without building an autograd graph.
        """
        if any(p.requires_grad for p in self.encoder.parameters()):
            return self.projector(self.encoder(images))
        with torch.no_grad():
            features = self.encoder(images)  # (n, n_patches, d_vit)
        return self.projector(features)

    def embed_inputs(
        self, input_ids: torch.Tensor, images: torch.Tensor | None, loss_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``expand_placeholders`` with this model's embeddings (see there for the returned tuple)."""
        text_embeds = self.decoder.embed(input_ids)  # (B, T, d)
        if images is None:
            image_embeds = text_embeds.new_zeros(0, self.visual_tokens, text_embeds.shape[-1])
        else:
            image_embeds = self.encode_images(images.to(text_embeds.dtype))  # (n, N, d)
        return expand_placeholders(input_ids, text_embeds, image_embeds, self.vocab.image_placeholder,
                                   self.vocab.pad, loss_mask)

    def forward(
        self, images: torch.Tensor | None, input_ids: torch.Tensor, loss_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, T', V_padded)`` over the expanded rows and their aligned targets ``(B, T')`` (text only)."""
        embeds, ids, mask, _ = self.embed_inputs(input_ids, images, loss_mask)
        logits = self.decoder(inputs_embeds=embeds)  # (B, T', V_padded)
        return logits, next_token_targets(ids, mask)

    # ------------------------------------------------------------------ model directories and generation
    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> BaselineVLM:
        """Load a baseline model directory (:func:`load_baseline_dir`)."""
        return load_baseline_dir(path, device=device)

    def save_pretrained(self, out_dir: str | Path, bundle: Any = None) -> Path:
        """Write a baseline model directory (``config.yaml``, ``model.safetensors``, ``tokenizer/``)."""
        bundle = bundle if bundle is not None else self.bundle
        if bundle is None:
            raise ValueError("save_pretrained needs the tokenizer bundle (pass bundle=...)")
        return write_baseline_dir(self, bundle, out_dir)

    def generate(self, prompts: Any, config: Any = None, **kwargs: Any) -> list:
        """Text for one prompt or a batch of prompts (segments: ``str`` and ``PIL.Image``); see
        ``chameleon_lite.generation.baseline.generate``."""
        from chameleon_lite.generation.baseline import generate

        return generate(self, prompts, config, **kwargs)

    def stream(self, prompts: Any, config: Any = None, **kwargs: Any) -> Any:
        """Text pieces as they are produced (``chameleon_lite.generation.baseline.stream``)."""
        from chameleon_lite.generation.baseline import stream

        return stream(self, prompts, config, **kwargs)

    def token_steps(self, prompts: Any, *, max_new_tokens: int | None = None) -> Any:
        """The engine's steps of greedy text generation, one per decoded position
        (``chameleon_lite.generation.baseline.token_steps``)."""
        from chameleon_lite.generation.baseline import token_steps

        return token_steps(self, prompts, max_new_tokens=max_new_tokens)


def _count(module: nn.Module | Sequence[nn.Parameter]) -> int:
    params = module.parameters() if isinstance(module, nn.Module) else module
    return sum(p.numel() for p in params)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per part, for either arm: ``encoder``, ``projector``, ``decoder`` (blocks and final norm),
    ``embeddings`` (input table and output head, counted once when tied) and ``total``.

    Accepts a ``BaselineVLM``, a ``Decoder``, or anything holding a ``.decoder`` (``ChameleonLite``,
    ``NativeLMModule``). The native arm's image tokenizer is not counted (it is a fixed, separately trained
    preprocessor, like a text tokenizer); the baseline's encoder is, since it is part of the model.
    """
    decoder = model if isinstance(model, Decoder) else getattr(model, "decoder", None)
    if not isinstance(decoder, Decoder):
        raise ValueError(f"expected a Decoder, a BaselineVLM or a module with a .decoder, got {type(model).__name__}")
    embeddings = _count([decoder.embed_tokens.weight])
    if not decoder.config.tie_embeddings:
        embeddings += _count([decoder.lm_head.weight])
    counts = {
        "encoder": _count(model.encoder) if isinstance(model, BaselineVLM) else 0,
        "projector": _count(model.projector) if isinstance(model, BaselineVLM) else 0,
        "decoder": _count(decoder) - embeddings,
        "embeddings": embeddings,
    }
    counts["total"] = sum(counts.values())
    return counts


# ---------------------------------------------------------------------------------------------- model directories
KIND = "baseline"
FORMAT_VERSION = 1
_TIED_HEAD_KEY = "decoder.lm_head.weight"


@dataclass
class BaselineDirConfig:
    """Schema of a baseline model directory's ``config.yaml``."""

    tokenizer: str = MISSING
    vit: ViTConfig = MISSING
    projector: ProjectorConfig = MISSING
    decoder: DecoderConfig = MISSING
    format_version: int = FORMAT_VERSION
    kind: str = KIND
    trained_steps: int | None = None

    def model_config(self) -> BaselineConfig:
        return BaselineConfig(vit=self.vit, projector=self.projector, decoder=self.decoder)


def baseline_state_dict(model: BaselineVLM) -> dict[str, torch.Tensor]:
    """All weights as contiguous CPU tensors, a tied output head left out."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.decoder.tie_embeddings:
        state.pop(_TIED_HEAD_KEY, None)
    return state


def write_baseline_dir(
    model: BaselineVLM, bundle: TokenizerBundle | str | Path, out_dir: str | Path, *, trained_steps: int | None = None
) -> Path:
    """Write ``model`` with its tokenizer bundle to ``out_dir``: absent, empty or written before (its
    ``manifest.json`` files are replaced, other files stay); any other directory raises ``FileExistsError``."""
    out_dir = Path(out_dir)
    bundle, readme = as_bundle(bundle)
    if model.config.decoder.vocab_size != bundle.vocab.size:
        raise ValueError(f"decoder vocab_size={model.config.decoder.vocab_size} but bundle {bundle.name!r} has "
                         f"{bundle.vocab.size} ids")
    check_writable_dir(out_dir)  # refuse early, before anything is built
    c = model.config
    config = BaselineDirConfig(tokenizer=bundle.name, vit=c.vit, projector=c.projector, decoder=c.decoder,
                               trained_steps=trained_steps)

    def build(tmp: Path) -> None:
        save_structured_yaml(config, tmp / CONFIG_FILE)
        save_file(baseline_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "kind": KIND})
        save_bundle(bundle, tmp / TOKENIZER_DIR, readme=readme)

    write_dir(out_dir, build, kind=KIND)
    return out_dir


def load_baseline_config(file: str | Path) -> BaselineDirConfig:
    """Parse and validate a baseline ``config.yaml`` (unknown keys, wrong types, bad values raise naming the file)."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"model config not found: {file}")
    config = load_structured_yaml(file, BaselineDirConfig)  # plain data: never interpolated
    if config.kind != KIND:
        raise ValueError(f"{file}: kind={config.kind!r}; this loader reads {KIND!r} model directories")
    if config.format_version != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {config.format_version} is not supported (only {FORMAT_VERSION})")
    return config


def load_state_into(model: BaselineVLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` (all of encoder/projector/decoder) into ``model``; names the first missing, unexpected or
    mis-shaped tensor."""
    _check_shapes(model, state, source)
    model.load_state_dict(state, strict=not model.config.decoder.tie_embeddings)


def _check_shapes(model: BaselineVLM, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_into``'s checks against a model on any device (the meta device included)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.decoder.tie_embeddings:
        expected.pop(_TIED_HEAD_KEY, None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config implies {expected[name]}")


def load_baseline_dir(path: str | Path, device: torch.device | str = "cpu") -> BaselineVLM:
    """A ``BaselineVLM`` (eval mode, ``.bundle`` set) from a baseline model directory."""
    path = check_model_dir(path)
    config = load_baseline_config(path / CONFIG_FILE)
    bundle = load_bundle(path / TOKENIZER_DIR, load_image_tokenizer=False)
    if bundle.name != config.tokenizer:
        raise ValueError(f"{path / CONFIG_FILE} names tokenizer {config.tokenizer!r} but {path / TOKENIZER_DIR} "
                         f"holds bundle {bundle.name!r}")
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path / WEIGHTS_FILE} is not a readable safetensors file: {err}") from err
    source = f"{path / WEIGHTS_FILE} (checked against {path / CONFIG_FILE})"
    # shapes first, on the meta device: a config read from disk must not make the loader allocate (or build layers)
    # beyond what the weights file holds
    if config.vit.n_layers + config.decoder.n_layers > len(state):
        raise ValueError(f"{source}: the config asks for {config.vit.n_layers} + {config.decoder.n_layers} layers but "
                         f"the file holds only {len(state)} tensors")
    try:
        with torch.device("meta"):
            shapes = BaselineVLM(config.model_config(), bundle.vocab)
    except (ValueError, TypeError, RuntimeError, OverflowError) as err:
        raise ValueError(f"{path / CONFIG_FILE} does not fit the bundle in {path / TOKENIZER_DIR}: {err}") from err
    _check_shapes(shapes, state, source)
    model = BaselineVLM(config.model_config(), bundle.vocab)
    load_state_into(model, state, source)
    model.bundle = bundle
    return model.to(device).eval()
