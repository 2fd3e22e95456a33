"""The native arm: ``ChameleonLite`` and its model directory (what training exports; all that generation loads).

A model directory holds::

    config.yaml          format version, kind, tokenizer bundle name, the DecoderConfig (schema: ModelDirConfig)
    model.safetensors    decoder weights only (tied output head stored once, as ``embed_tokens.weight``)
    tokenizer/           a copy of the tokenizer bundle (``save_bundle``)
    manifest.json        the files written here (``chameleon_lite.safe_io``; not needed to load)

Writing never deletes what it did not write (``safe_io.write_dir``): everything goes into a temporary directory
beside ``out_dir``; a new or empty ``out_dir`` is replaced by it whole, one written before (it has
``manifest.json``) gets each listed file replaced by an atomic rename while other files stay, and any other
non-empty directory is refused. ``config.yaml`` is read as plain data, never interpolated.

Reading validates everything and names the file at fault: missing
files, unknown or mistyped config keys, weights whose names or shapes disagree with ``config.yaml``, a
vocabulary size that disagrees with the bundle. Nothing here unpickles anything (Lightning checkpoints are read
with ``torch.load(weights_only=True)``) and nothing imports Lightning, so ``ChameleonLite.from_pretrained`` works
in a plain PyTorch process. The Lightning callback ``ExportModelDir`` lives in ``chameleon_lite.training.lit_native``.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import Decoder
from chameleon_lite.model.model_dir import CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE, as_bundle, check_model_dir
from chameleon_lite.safe_io import (
    check_writable_dir,
    load_structured_yaml,
    save_structured_yaml,
    write_dir,
)
from chameleon_lite.tokenization.bundle import TokenizerBundle, load_bundle, save_bundle

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND = "native"
_TIED_HEAD_KEY = "lm_head.weight"  # not stored when tie_embeddings (it is embed_tokens.weight)


@dataclass
class ModelDirConfig:
    """Schema of a model directory's ``config.yaml``.

    Args:
        tokenizer: name of the tokenizer bundle stored in ``tokenizer/`` (checked on load).
        decoder: the decoder's shape and switches.
        format_version: layout version of the directory.
        kind: ``"native"`` (the early-fusion model over one vocabulary).
        trained_steps: optimizer steps the weights were trained for, when known.
    """

    tokenizer: str = MISSING
    decoder: DecoderConfig = MISSING
    format_version: int = FORMAT_VERSION
    kind: str = KIND
    trained_steps: int | None = None


# ---------------------------------------------------------------------------------------------- config
def load_model_config(file: str | Path) -> ModelDirConfig:
    """Parse and validate ``config.yaml`` (typed; unknown keys, wrong types and bad values raise naming the file).

    Read as plain data (``safe_io.load_structured_yaml``): a ``${...}`` interpolation is refused, not resolved.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"model config not found: {file}")
    config = load_structured_yaml(file, ModelDirConfig)  # runs DecoderConfig.__post_init__ (checks, derived fields)
    if config.format_version != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {config.format_version} is not supported (only {FORMAT_VERSION})")
    if config.kind != KIND:
        raise ValueError(f"{file}: kind={config.kind!r}; this loader reads {KIND!r} model directories")
    return config


# ---------------------------------------------------------------------------------------------- weights
def decoder_state_dict(decoder: nn.Module) -> dict[str, torch.Tensor]:
    """The decoder's weights as contiguous CPU tensors; a tied output head is left out (safetensors has no aliases)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in decoder.state_dict().items()}
    if decoder.config.tie_embeddings:
        state.pop(_TIED_HEAD_KEY, None)
    return state


def expected_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor ``model.safetensors`` must hold for ``config`` (built on the meta device)."""
    with torch.device("meta"):
        decoder = Decoder(config)
    shapes = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop(_TIED_HEAD_KEY, None)
    return shapes


def check_state_dict(state: Mapping[str, torch.Tensor], config: DecoderConfig, source: str) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or mis-shaped tensor of ``state`` for ``config``.

    A config claiming more layers than ``state`` has tensors is refused before anything is built (a config read
    from disk could otherwise keep the loader building layers for hours), as is one no decoder can be built from.
    """
    if config.n_layers > len(state):
        raise ValueError(f"weights in {source} do not match the decoder config: n_layers={config.n_layers} but the "
                         f"file holds only {len(state)} tensors")
    try:
        want = expected_shapes(config)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise ValueError(f"weights in {source}: the decoder config cannot be built ({err})") from err
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [
        f"{k}: {tuple(state[k].shape)} in {source} vs {want[k]} from the config"
        for k in sorted(set(want) & set(state))
        if tuple(state[k].shape) != want[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if wrong:
        problems.append("shape mismatches: " + "; ".join(wrong))
    if problems:
        raise ValueError(f"weights in {source} do not match the decoder config: " + ". ".join(problems))


def load_decoder(config: DecoderConfig, weights_file: str | Path, device: torch.device | str = "cpu") -> Decoder:
    """Build a decoder for ``config`` and fill it from a safetensors file (checked first by ``check_state_dict``)."""
    weights_file = Path(weights_file)
    if not weights_file.is_file():
        raise FileNotFoundError(f"decoder weights not found: {weights_file}")
    try:
        state = load_file(weights_file, device=str(device))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_file} is not a readable safetensors file: {err}") from err
    check_state_dict(state, config, str(weights_file))
    with torch.device(device):
        decoder = Decoder(config)
    decoder.load_state_dict(state, strict=not config.tie_embeddings)  # tied: lm_head.weight IS embed_tokens.weight
    return decoder.eval()


# ---------------------------------------------------------------------------------------------- export
def write_model_dir(
    state: Mapping[str, torch.Tensor],
    config: DecoderConfig,
    bundle: TokenizerBundle | str | Path,
    out_dir: str | Path,
    *,
    trained_steps: int | None = None,
) -> Path:
    """Write a model directory from decoder weights ``state`` (names as in ``Decoder.state_dict()``).

    ``bundle`` is a ``TokenizerBundle`` or a bundle directory. ``out_dir`` may be absent or empty, or a directory
    written before (its ``manifest.json`` files are replaced, other files stay); any other existing path raises
    ``FileExistsError`` before anything is written (``safe_io.write_dir``).
    """
    out_dir = Path(out_dir)
    bundle, readme = as_bundle(bundle)
    if config.vocab_size != bundle.vocab.size:
        raise ValueError(
            f"decoder vocab_size={config.vocab_size} but tokenizer bundle {bundle.name!r} has {bundle.vocab.size} ids"
        )
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if config.tie_embeddings:
        state.pop(_TIED_HEAD_KEY, None)
    check_state_dict(state, config, "the exported state dict")
    check_writable_dir(out_dir)  # refuse early, before anything is built
    dir_config = ModelDirConfig(tokenizer=bundle.name, decoder=config, trained_steps=trained_steps)

    def build(tmp: Path) -> None:
        save_structured_yaml(dir_config, tmp / CONFIG_FILE)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "kind": KIND})
        save_bundle(bundle, tmp / TOKENIZER_DIR, readme=readme)

    write_dir(out_dir, build, kind=KIND)
    log.info("model directory written to %s", out_dir)
    return out_dir


def export_model_dir(
    module_or_decoder: nn.Module,
    bundle: TokenizerBundle | str | Path,
    out_dir: str | Path,
    *,
    trained_steps: int | None = None,
) -> Path:
    """Write the model directory of a ``Decoder`` or of a module holding one as ``.decoder`` (``NativeLMModule``).

    Args:
        module_or_decoder: the trained decoder, or a module with a ``decoder`` attribute.
        bundle: the tokenizer bundle the decoder was trained with (object or directory).
        out_dir: the model directory to write (absent, empty, or written before; see ``write_model_dir``).
        trained_steps: recorded in ``config.yaml`` (default: the module's ``global_step`` when it has a trainer).
    """
    decoder = module_or_decoder
    if not isinstance(decoder, Decoder):
        decoder = getattr(module_or_decoder, "decoder", None)
    if not isinstance(decoder, Decoder):
        raise ValueError(f"expected a Decoder or a module with a .decoder, got {type(module_or_decoder).__name__}")
    if trained_steps is None and getattr(module_or_decoder, "_trainer", None) is not None:
        trained_steps = int(module_or_decoder.global_step)
    return write_model_dir(decoder_state_dict(decoder), decoder.config, bundle, out_dir, trained_steps=trained_steps)


def export_checkpoint(
    ckpt_path: str | Path, out_dir: str | Path, *, tokenizer: str | Path | TokenizerBundle | None = None
) -> Path:
    """Write a model directory from a ``NativeLMModule`` Lightning checkpoint (``chameleon-lite export``).

    The checkpoint is read with ``torch.load(weights_only=True)``: nothing is unpickled beyond tensors and plain
    containers. The decoder config comes from the saved hyper-parameters (``model``), the bundle from
    ``tokenizer`` (default: the ``tokenizer`` hyper-parameter, a bundle directory).
    """
    ckpt_path = Path(ckpt_path)
    ckpt = _load_checkpoint(ckpt_path)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("model"), dict) or "tokenizer" not in hparams:
        raise ValueError(f"{ckpt_path} is not a NativeLMModule checkpoint (no 'model'/'tokenizer' hyper-parameters)")
    try:
        config = DecoderConfig(**hparams["model"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{ckpt_path}: bad decoder config in hyper_parameters['model']: {err}") from err
    prefixes = ("decoder._orig_mod.", "decoder.")  # the first: a decoder wrapped by torch.compile()
    state = {}
    for key, value in ckpt.get("state_dict", {}).items():
        for prefix in prefixes:
            if key.startswith(prefix):
                state[key[len(prefix) :]] = value
                break
    if not state:
        raise ValueError(f"{ckpt_path} has no decoder weights (no 'decoder.*' entries in its state_dict)")
    bundle = tokenizer if tokenizer is not None else hparams["tokenizer"]
    steps = ckpt.get("global_step")
    return write_model_dir(state, config, bundle, out_dir, trained_steps=int(steps) if steps is not None else None)


def _load_checkpoint(ckpt_path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a Lightning checkpoint; ``ValueError`` says what is wrong with the file."""
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    with open(ckpt_path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{ckpt_path} is empty, not a Lightning checkpoint")
    try:
        is_zip = zipfile.is_zipfile(ckpt_path)
    except zipfile.BadZipFile:  # is_zipfile catches OSError only; a damaged end record can raise this
        is_zip = False
    if not is_zip:
        if head == b"PK\x03\x04":
            raise ValueError(f"{ckpt_path} is a truncated or damaged checkpoint: it starts like the zip archive "
                             "torch.save writes but its end (the zip directory) is missing")
        raise ValueError(f"{ckpt_path} is not a Lightning checkpoint: torch.save and Lightning write a zip archive "
                         f"and this file is not one (it starts with {head!r})")
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = re.search(r"WeightsUnpickler error: (.*?)(?:\n\n|$)", str(err), re.S)
        reason = reason.group(1).strip() if reason else str(err)
        if "Unsupported global" in reason:
            raise ValueError(
                f"{ckpt_path} holds objects that weights_only loading refuses (hyper-parameters must be plain "
                f"types): {reason}"
            ) from err
        raise ValueError(f"{ckpt_path} is a damaged checkpoint (its pickle cannot be read: {reason})") from err
    except Exception as err:  # a corrupt archive or pickle surfaces as RuntimeError, EOFError, UnicodeDecodeError...
        raise ValueError(
            f"{ckpt_path} is a damaged checkpoint (torch.load could not read it: {type(err).__name__}: {err})"
        ) from err


# ---------------------------------------------------------------------------------------------- loading
class ChameleonLite(nn.Module):
    """A trained native model: the decoder plus the tokenizer bundle it reads and writes.

    Attributes:
        decoder: the early-fusion ``Decoder`` (in eval mode after ``from_pretrained``).
        bundle: the ``TokenizerBundle`` (text tokenizer, vocabulary, VQ image tokenizer).
        vocab: ``bundle.vocab``.
        config: the parsed ``config.yaml`` (``ModelDirConfig``; the decoder's is ``config.decoder``).
        image_tokenizer: ``bundle.image_tokenizer`` registered as a sub-module so ``.to()`` moves it too.
    """

    def __init__(self, decoder: Decoder, bundle: TokenizerBundle, config: ModelDirConfig) -> None:
        super().__init__()
        if decoder.config.vocab_size != bundle.vocab.size:
            raise ValueError(f"decoder vocab_size={decoder.config.vocab_size} != bundle vocabulary {bundle.vocab.size}")
        self.decoder = decoder
        self.image_tokenizer = bundle.image_tokenizer
        self.bundle = bundle
        self.vocab = bundle.vocab
        self.config = config

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> ChameleonLite:
        """Load a model directory (see the module docstring); ``dtype`` casts the decoder (the VQ model stays fp32)."""
        path = check_model_dir(path)
        config = load_model_config(path / CONFIG_FILE)
        bundle = load_bundle(path / TOKENIZER_DIR)
        if bundle.name != config.tokenizer:
            raise ValueError(
                f"{path / CONFIG_FILE} names tokenizer {config.tokenizer!r} but {path / TOKENIZER_DIR} holds "
                f"bundle {bundle.name!r}"
            )
        if config.decoder.vocab_size != bundle.vocab.size:
            raise ValueError(
                f"{path / CONFIG_FILE}: decoder.vocab_size={config.decoder.vocab_size} but the bundle in "
                f"{path / TOKENIZER_DIR} has {bundle.vocab.size} ids"
            )
        try:
            decoder = load_decoder(config.decoder, path / WEIGHTS_FILE, device=device)
        except ValueError as err:  # the weights and config.yaml disagree: name both
            raise ValueError(f"{err} (decoder config: {path / CONFIG_FILE})") from err
        if dtype is not None:
            decoder = decoder.to(dtype)
        model = cls(decoder, bundle, config).to(device)
        return model.eval()

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write this model as a model directory (never over files it did not write; see ``write_model_dir``)."""
        return export_model_dir(self.decoder, self.bundle, out_dir, trained_steps=self.config.trained_steps)

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """``Decoder.forward`` unchanged: logits ``(B, T, padded_vocab_size)`` (see its docstring for kwargs)."""
        return self.decoder(input_ids, **kwargs)

    @torch.inference_mode()
    def logits(
        self,
        input_ids: torch.Tensor | list[int],
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits over the real vocabulary, ``(B, T, vocab.size)`` (a 1-D input gives ``(1, T, ...)``).

        Inputs are moved to the model's device; padded vocabulary columns are dropped.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]  # (1, T)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab.size):
            raise ValueError(f"input ids must lie in [0, {self.vocab.size}); got min {ids.min()}, max {ids.max()}")
        kwargs = {
            name: t.to(self.device)[None] if t.dim() == 1 else t.to(self.device)
            for name, t in (("position_ids", position_ids), ("document_ids", document_ids))
            if t is not None
        }
        return self.decoder(ids, **kwargs)[..., : self.vocab.size]  # (B, T, V)

    # ------------------------------------------------------------------ generation (chameleon_lite.generation.native)
    @property
    def image_code_cache(self) -> Any:
        """Codes of prompt images already encoded, keyed by a hash of their pixels (``generation.ImageCodeCache``)."""
        cache = self.__dict__.get("_image_code_cache")
        if cache is None:
            from chameleon_lite.generation.native import ImageCodeCache

            cache = self.__dict__["_image_code_cache"] = ImageCodeCache()
        return cache

    def generate(self, prompts: Any, config: Any = None, **kwargs: Any) -> list:
        """Text and/or images for one prompt or a batch; see ``chameleon_lite.generation.native.generate`` for
        arguments."""
        from chameleon_lite.generation.native import generate

        return generate(self, prompts, config, **kwargs)

    def stream(self, prompts: Any, config: Any = None, **kwargs: Any) -> Any:
        """Like ``generate`` but yields text pieces and images as they come
        (``chameleon_lite.generation.native.stream``)."""
        from chameleon_lite.generation.native import stream

        return stream(self, prompts, config, **kwargs)

    def token_steps(self, prompts: Any, *, max_new_tokens: int | None = None) -> Any:
        """The engine's steps of greedy text generation, one per decoded position
        (``chameleon_lite.generation.native.token_steps``)."""
        from chameleon_lite.generation.native import token_steps

        return token_steps(self, prompts, max_new_tokens=max_new_tokens)


__all__ = [
    "ChameleonLite",
    "ModelDirConfig",
    "check_state_dict",
    "decoder_state_dict",
    "export_checkpoint",
    "export_model_dir",
    "load_decoder",
    "load_model_config",
    "write_model_dir",
]
