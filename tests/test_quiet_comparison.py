"""The comparison's fits print none of Lightning's per-stage banners; a plain fit keeps them (levels are restored)."""

import logging
from pathlib import Path

import pytest

from chameleon_lite.shipped import resolve_path
from chameleon_lite.training.lightning_cli import quiet_lightning

BANNERS = ("GPU available", "TPU available", "litlogger", "Total FLOPs", "Trainable params", "Seed set to",
           "LeafSpec", "`Trainer.fit` stopped", "was configured so")
DECODER = ["d_model=32", "n_layers=2", "n_heads=4", "n_kv_heads=2"]


@pytest.fixture(scope="module")
def toy_tokens(tmp_path_factory) -> Path:
    """A tiny 32-px shapes world pre-tokenized with the shipped shapes-32 bundle."""
    from chameleon_lite.data.pretokenize import tokenize_shards
    from chameleon_lite.tokenization.bundle import load_bundle
    from chameleon_lite.world.shapes_world import ShapesWorldSpec, write_shapes_world

    root = tmp_path_factory.mktemp("quiet")
    spec = ShapesWorldSpec(train=24, val=8, test=0, seed=1, questions_per_scene=2)
    spec.world.image_size, spec.world.grid, spec.world.max_objects = 32, 2, 2
    write_shapes_world(spec, root / "raw", progress=False)
    bundle = load_bundle(resolve_path("shapes-32", kind="bundle"))
    for split in ("train", "val"):
        tokenize_shards(bundle, str(root / "raw" / split), root / "tokens" / split, num_workers=0, progress=False)
    return root / "tokens"


def test_a_comparison_fit_prints_no_lightning_banners(toy_tokens, tmp_path, capfd, recwarn):
    from chameleon_lite.comparison.training import train_native

    capfd.readouterr()
    extra = [f"--model.init_args.model.{x}" for x in DECODER] + [
        "--data.init_args.seq_len=128", "--model.init_args.model.max_seq_len=128", "--data.init_args.batch_size=4",
        "--model.init_args.warmup_steps=1", "--trainer.limit_val_batches=1"]
    level = logging.getLogger("lightning.pytorch").level
    with quiet_lightning():
        result = train_native("native/demo", tmp_path, tokens=str(toy_tokens), tokenizer="shapes-32",
                              train_samples=8, seed=0, extra=extra, progress=False)
    assert Path(result.model_dir, "model.safetensors").is_file()
    out, err = capfd.readouterr()
    for banner in BANNERS:
        assert banner not in out + err, banner
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]
    assert logging.getLogger("lightning.pytorch").level == level  # a plain `fit` afterwards keeps its banners


def test_compare_and_demo_run_inside_quiet_lightning(tmp_path, monkeypatch):
    import chameleon_lite.comparison.demo as demo_module
    import chameleon_lite.comparison.run as run_module
    from chameleon_lite.cli import main

    seen = []

    def fake_compare(config, out, overrides=(), progress=True):
        seen.append((Path(config).name, logging.getLogger("lightning.pytorch").getEffectiveLevel()))
        report = Path(out) / "report.md"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("# report\n")
        return {"report": report}

    monkeypatch.setattr(run_module, "compare", fake_compare)
    monkeypatch.setattr(demo_module, "prepare_demo_data", lambda *a, **k: [])
    assert main(["compare", "--config", "compare/demo", "--out", str(tmp_path / "cmp")]) == 0
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    assert seen == [("demo.yaml", logging.WARNING), ("demo.yaml", logging.WARNING)]
    assert logging.getLogger("lightning.pytorch").getEffectiveLevel() == logging.INFO
