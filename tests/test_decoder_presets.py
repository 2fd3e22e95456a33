"""Decoder presets: every shipped recipe resolves to exactly the decoder it had before presets (the values below,
copied from the recipes at 177012d), which is its named preset; presets expand when a recipe is read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.presets import PRESETS, expand_presets
from chameleon_lite.training.lightning_cli import parse_recipe

REPO = Path(__file__).resolve().parents[1]
_COMMON = {"qk_norm": True, "swin_norm": False, "dropout": 0.0, "tie_embeddings": False}
BEFORE = {  # each recipe's decoder block as written before presets (max_seq_len resolved)
    "demo": {"d_model": 192, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 512, **_COMMON},
    "tiny": {"d_model": 192, "n_layers": 4, "n_heads": 6, "n_kv_heads": 2, "max_seq_len": 512, **_COMMON},
    "small": {"d_model": 768, "n_layers": 16, "n_heads": 12, "n_kv_heads": 4, "max_seq_len": 2048, **_COMMON},
}
RECIPES = {
    "configs/native/demo.yaml": "demo", "configs/baseline/stage1_demo.yaml": "demo",
    "configs/baseline/stage2_demo.yaml": "demo",
    "configs/native/tiny.yaml": "tiny", "configs/baseline/stage1_tiny.yaml": "tiny",
    "configs/baseline/stage2_tiny.yaml": "tiny",
    "configs/native/small.yaml": "small", "configs/native/small-fsdp.yaml": "small",
    "configs/baseline/stage1_small.yaml": "small", "configs/baseline/stage2_small.yaml": "small",
}


def recipe_decoder(path: str, overrides: tuple[str, ...] = ()) -> DecoderConfig:
    model = parse_recipe(str(REPO / path), list(overrides)).model.init_args.model
    return DecoderConfig(**(model.as_dict() if hasattr(model, "as_dict") else model))


@pytest.mark.parametrize("path", sorted(RECIPES))
def test_recipe_decoder_is_its_preset_and_unchanged(path):
    name = RECIPES[path]
    resolved = recipe_decoder(path)
    assert resolved == DecoderConfig(**BEFORE[name])
    assert resolved == DecoderConfig.from_name(name)


def test_presets_are_the_recorded_decoders():
    assert PRESETS == BEFORE


def test_overrides_beside_a_preset_and_on_the_command_line():
    assert DecoderConfig.from_name("tiny", n_layers=2).n_layers == 2
    assert expand_presets({"model": {"preset": "demo", "n_heads": 6}})["model"] == {**BEFORE["demo"], "n_heads": 6}
    # a command-line override on a recipe that names a preset, even one equal to DecoderConfig's default
    decoder = recipe_decoder("configs/native/tiny.yaml", ("--model.init_args.model.n_heads=4",
                                                          "--model.init_args.model.d_model=64"))
    assert (decoder.n_heads, decoder.d_model, decoder.n_layers) == (4, 64, 4)


def test_unknown_preset_is_an_error_when_read(tmp_path):
    with pytest.raises(ValueError, match="unknown decoder preset 'huge'"):
        expand_presets({"preset": "huge"})
    recipe = (REPO / "configs/native/tiny.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.replace("preset: tiny", "preset: huge"))
    assert "preset: huge" in bad.read_text()
    with pytest.raises(SystemExit):
        parse_recipe(str(bad))


def test_explicit_blocks_stay_valid():
    assert not any(f.name == "preset" for f in dataclasses.fields(DecoderConfig))
    assert expand_presets({"model": dict(BEFORE["small"])}) == {"model": BEFORE["small"]}
