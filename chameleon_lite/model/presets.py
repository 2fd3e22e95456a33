"""Named decoder presets (litgpt's ``Config.from_name``): recipes that must build the same decoder name one preset.

::

    DecoderConfig.from_name("demo")                      # the demo decoder, vocab_size from the default
    DecoderConfig.from_name("tiny", max_seq_len=1024)    # a preset with overrides

In a recipe (LightningCLI, ``chameleon_lite.training.lightning_cli``) a decoder block may name a preset, with
overrides::

    model:
      preset: demo                        # chameleon_lite/model/presets.py
      max_seq_len: ${data.init_args.seq_len}

Design (the thinnest that keeps every old recipe valid): the ``preset`` key is expanded when the recipe is *read*
(``expand_presets``, run by the recipe loader of ``lightning_cli`` after OmegaConf's interpolation), into the
preset's fields updated by the keys written beside it. So the parsed recipe holds a plain ``DecoderConfig`` block
(an explicit block without ``preset`` is unchanged), command-line overrides such as
``--model.init_args.model.n_layers=2`` apply on top as before, an unknown name is a parse error, and
``comparison.check_matched_decoders`` compares the expanded decoders before anything trains. Presets do not set
``vocab_size`` (the tokenizer bundle does). Plain data, no torch: importing this module is free.

Presets: ``demo`` (the CPU demo's arms: configs/native/demo.yaml, configs/baseline/*_demo.yaml), ``tiny``
(configs/native/tiny.yaml, configs/baseline/*_tiny.yaml), ``small`` (~100M, one GPU: configs/native/small*.yaml,
configs/baseline/*_small.yaml).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PRESETS", "preset", "expand_presets"]

_COMMON = {"qk_norm": True, "swin_norm": False, "dropout": 0.0, "tie_embeddings": False}

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"d_model": 192, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 512, **_COMMON},
    "tiny": {"d_model": 192, "n_layers": 4, "n_heads": 6, "n_kv_heads": 2, "max_seq_len": 512, **_COMMON},
    "small": {"d_model": 768, "n_layers": 16, "n_heads": 12, "n_kv_heads": 4, "max_seq_len": 2048, **_COMMON},
}
"""Preset name -> ``DecoderConfig`` fields (all but ``vocab_size``)."""

PRESET_KEY = "preset"


def preset(name: str) -> dict[str, Any]:
    """The fields of preset ``name`` (a copy); ``ValueError`` naming the known presets for an unknown one."""
    if name not in PRESETS:
        raise ValueError(f"unknown decoder preset {name!r}; known presets: {sorted(PRESETS)}")
    return dict(PRESETS[name])


def expand_presets(value: Any) -> Any:
    """``value`` (a loaded recipe) with every mapping that has a ``preset`` key replaced by that preset's fields
    updated by the mapping's other keys (recursively; anything else unchanged)."""
    if isinstance(value, Mapping):
        out = {k: expand_presets(v) for k, v in value.items()}
        if PRESET_KEY in out:
            name = out.pop(PRESET_KEY)
            if not isinstance(name, str):
                raise ValueError(f"{PRESET_KEY}: {name!r} must be a decoder preset's name ({sorted(PRESETS)})")
            out = {**preset(name), **out}
        return out
    if isinstance(value, list):
        return [expand_presets(v) for v in value]
    return value
