"""`chameleon-lite compare` shows one progress bar (stage, samples, time) and ends with the headline table and the
report's path; `--no-progress` prints one line per stage instead; `compare()` is quiet from Python too."""

import json
import logging
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from chameleon_lite.comparison.progress import PipelineProgress, headline_lines, spread

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "tokenizers" / "shapes-64"
DECODER = ["d_model=32", "n_layers=2", "n_heads=4", "n_kv_heads=2"]
VIT = ["--model.init_args.vit.d_model=32", "--model.init_args.vit.n_layers=2", "--model.init_args.vit.n_heads=2"]
QUIET = ["--trainer.limit_val_batches=1"]
STAGES = ["seed 0 · native", "seed 0 · baseline encoder", "seed 0 · baseline stage 1", "seed 0 · baseline stage 2",
          "seed 0 · evaluating native", "seed 0 · evaluating baseline", "writing the report"]
BANNERS = ("GPU available", "TPU available", "litlogger", "Total FLOPs", "Trainable params", "Seed set to",
           "LeafSpec", "`Trainer.fit` stopped")
LIGHTNING_BARS = ("Epoch 0", "Sanity Checking", "Validation DataLoader", "Validation:")
FRAME = re.compile(r"^(?P<desc>.+?): +\d+%\|[^|]*\| (?P<n>\d+)/(?P<total>\d+) \[")


@pytest.fixture(scope="module")
def toy_config(tmp_path_factory) -> Path:
    """test_compare.py's toy comparison (seconds): a 40-scene world, 2-layer decoders, a 48-sample budget."""
    from chameleon_lite.data.pretokenize import tokenize_shards
    from chameleon_lite.tokenization.bundle import load_bundle
    from chameleon_lite.world.shapes_world import ShapesWorldSpec, write_shapes_world

    if not BUNDLE.is_dir():
        pytest.skip("needs the shipped tokenizer bundle")
    root = tmp_path_factory.mktemp("progress")
    write_shapes_world(ShapesWorldSpec(train=40, val=8, test=8, seed=3, questions_per_scene=3), root / "raw",
                       progress=False)
    bundle = load_bundle(BUNDLE)
    for split in ("train", "val"):
        tokenize_shards(bundle, str(root / "raw" / split), root / "tokens" / split, num_workers=0, progress=False)
    native = [f"--model.init_args.model.{x}" for x in DECODER] + [
        "--data.init_args.seq_len=256", "--model.init_args.model.max_seq_len=256", "--data.init_args.batch_size=4",
        "--model.init_args.warmup_steps=2", *QUIET]
    decoder = [f"--model.init_args.model.{x}" for x in DECODER] + ["--model.init_args.model.max_seq_len=256"]
    config = {
        "name": "toy", "train_samples": 48, "seeds": [0],
        "data": {"raw": str(root / "raw"), "tokens": str(root / "tokens"), "tokenizer": str(BUNDLE)},
        "native": {"overrides": native},
        "baseline": {"encoder_samples": 16, "stage1_fraction": 0.25,
                     "encoder_overrides": [*VIT, "--data.init_args.batch_size=8", *QUIET],
                     "stage1_overrides": [*VIT, *decoder, "--data.init_args.batch_size=4", *QUIET],
                     "stage2_overrides": [*VIT, *decoder, "--data.init_args.batch_size=4", *QUIET]},
        "eval": {"qa_questions": 12, "captions": 4, "text_to_image": 3, "cfg_scale": 2.0, "batch_size": 8},
    }
    path = root / "toy.yaml"
    OmegaConf.save(OmegaConf.create(config), path)
    return path


def test_compare_shows_one_bar_over_every_stage_and_ends_with_the_headline(toy_config, tmp_path, capfd,
                                                                             monkeypatch):
    from chameleon_lite.cli import main

    monkeypatch.chdir(REPO)  # the compare config names its recipes relative to the repository
    closed = []
    close = PipelineProgress.close
    monkeypatch.setattr(PipelineProgress, "close", lambda self: (closed.append((self.n, self.total)), close(self)))
    out_dir = tmp_path / "out"
    capfd.readouterr()
    assert main(["compare", "--config", str(toy_config), "--out", str(out_dir)]) == 0
    out, err = capfd.readouterr()

    # one bar: every frame tqdm drew is that bar, its descriptions are the stages in order, each once
    frames = [f.strip() for f in re.split(r"[\r\n]", err) if "%|" in f]
    parsed = [FRAME.match(f) for f in frames]
    assert frames and all(parsed), [f for f, m in zip(frames, parsed) if not m]
    descriptions = [m["desc"] for m in parsed]
    sequence = [d for i, d in enumerate(descriptions) if i == 0 or d != descriptions[i - 1]]
    assert sequence == STAGES, sequence
    for text in (*LIGHTNING_BARS, *BANNERS):  # no per-fit Lightning bar, no evaluation bars, no banners
        assert text not in out + err, text

    # the bar ends at its total, and that total is every training sample the report counts
    metrics = json.loads((out_dir / "metrics.json").read_text())
    native, baseline = (metrics["arms"][arm]["per_seed"][0]["training"] for arm in ("native", "baseline"))
    samples = native["samples_seen"] + baseline["samples_seen"] + baseline["stages"]["encoder"]["samples"]
    last = parsed[-1]
    assert int(last["n"]) == int(last["total"]) == samples
    assert closed == [(samples, samples)]
    assert samples >= 48 + 16 + 48  # the budgets; a fit's last step may pass its share

    # the final lines: the headline table (both arms, chance, overall, text->image) and the report's path
    lines = out.rstrip("\n").splitlines()
    headline = headline_lines(out_dir / "report.md")
    assert lines[-len(headline):] == headline
    assert headline[-1] == f"report: {out_dir / 'report.md'}"
    table = "\n".join(headline)
    assert "| category | native | baseline | chance (majority answer) |" in table
    assert "| **all** |" in table and "Text->image (native):" in table
    for cat in metrics["arms"]["native"]["per_seed"][0]["qa"]["by_category"]:
        assert f"| {cat} |" in table


def test_without_a_bar_each_stage_prints_a_line(capsys):
    bar = PipelineProgress(10, enabled=False)
    bar.stage("seed 0 · native")
    bar.plan(10, 12)
    for n in spread(12, 5):
        bar.advance(n)
    bar.stage("seed 0 · evaluating native")
    bar.close()
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[compare] seed 0 · native (elapsed 00:00:0") and "0/10 training samples" in lines[0]
    assert lines[1].startswith("[compare] seed 0 · evaluating native") and "12/12 training samples" in lines[1]
    assert spread(7, 3) == [2, 3, 2] and sum(spread(100, 7)) == 100


def test_compare_called_from_python_is_quiet(monkeypatch):
    import chameleon_lite.comparison.run as run_module

    seen = []

    def stop(*args, **kwargs):
        seen.append(logging.getLogger("lightning.pytorch").getEffectiveLevel())
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "load_compare_config", stop)
    level = logging.getLogger("lightning.pytorch").getEffectiveLevel()
    with pytest.raises(KeyboardInterrupt):
        run_module.compare("any.yaml", "unused")
    assert seen == [logging.WARNING]
    assert logging.getLogger("lightning.pytorch").getEffectiveLevel() == level
    assert run_module.compare.__name__ == "compare" and "Run a comparison" in run_module.compare.__doc__
