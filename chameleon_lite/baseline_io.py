"""Baseline model directories: ``config.yaml`` + ``model.safetensors`` + ``tokenizer/``, like the native arm's.

::

    config.yaml          kind: baseline, the tokenizer bundle name, vit / projector / decoder configs
    model.safetensors    encoder.*, projector.*, decoder.* (a tied output head stored once)
    tokenizer/           a copy of the tokenizer bundle
    manifest.json        the files written here (not needed to load)

Written like the native arm's (``safe_io.write_dir``: never over files it did not write, each file renamed into
place whole); read with validation that names the file at fault, ``config.yaml`` as plain data (never
interpolated). Nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chameleon_lite.baseline import BaselineConfig, BaselineVLM
from chameleon_lite.bundle import TokenizerBundle, load_bundle, save_bundle
from chameleon_lite.model import DecoderConfig
from chameleon_lite.pretrained import (
    CONFIG_FILE,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    _as_bundle,
    check_model_dir,
)
from chameleon_lite.projectors import ProjectorConfig
from chameleon_lite.safe_io import check_writable_dir, load_structured_yaml, save_structured_yaml, write_dir
from chameleon_lite.vision_encoder import ViTConfig

__all__ = ["BaselineDirConfig", "write_baseline_dir", "load_baseline_dir", "baseline_state_dict"]

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
    bundle, readme = _as_bundle(bundle)
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
