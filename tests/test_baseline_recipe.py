"""Every shipped comparison keeps the baseline's pretrained ViT frozen in stage 2.

Unfreezing it at the decoder's learning rate (``--model.init_args.train_encoder=true``) made the baseline
image-blind on the demo's validation split: the ViT's features collapsed to a large image-independent vector and
the answers stopped depending on the image (see the comment in configs/compare/demo.yaml).
"""

from pathlib import Path

import pytest

from chameleon_lite.comparison.config import load_compare_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs/compare").glob("*.yaml"))


def test_there_are_compare_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_compare_keeps_the_vit_frozen_in_stage2(path):
    cfg = load_compare_config(str(path))
    assert not any("train_encoder=true" in o.replace(" ", "").lower() for o in cfg.baseline.stage2_overrides)
    recipe = (ROOT / cfg.baseline.stage2_recipe).read_text()
    assert "train_encoder: false" in recipe
