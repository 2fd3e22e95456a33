"""End to end on tiny data: `fit` lowers the loss, resume is exact, 2-process DDP runs, export loads."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chameleon_lite.data.pretokenize import tokenize_shards
from chameleon_lite.tokenization.bundle import load_bundle
from chameleon_lite.world.shapes_world import ShapesWorldSpec, write_shapes_world

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "configs" / "native" / "tiny.yaml"
BUNDLE = REPO / "tokenizers" / "shapes-64"
TINY_MODEL = [
    "--model.init_args.model.d_model=64",
    "--model.init_args.model.n_layers=2",
    "--model.init_args.model.n_heads=4",
    "--model.init_args.model.n_kv_heads=2",
    "--data.init_args.seq_len=256",
    "--data.init_args.batch_size=4",
    "--model.init_args.warmup_steps=5",
]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A tiny shapes world, pre-tokenized with the shipped bundle."""
    root = tmp_path_factory.mktemp("native")
    write_shapes_world(ShapesWorldSpec(train=40, val=8, test=0, seed=11, questions_per_scene=2), root / "raw",
                       progress=False)
    bundle = load_bundle(BUNDLE)
    for split in ("train", "val"):
        tokenize_shards(bundle, str(root / "raw" / split), root / "tokens" / split, num_workers=0, progress=False)
    return root


def _overrides(root: Path, run: Path, steps: int) -> list[str]:
    return [
        f"--data.init_args.train_tokens={root / 'tokens' / 'train'}",
        f"--data.init_args.val_tokens={root / 'tokens' / 'val'}",
        f"--data.init_args.tokenizer={BUNDLE}",
        f"--model.init_args.tokenizer={BUNDLE}",  # the recipe's ${...} link is resolved before overrides apply
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=10",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}",
        f"--trainer.logger.init_args.save_dir={run}",
        f"--trainer.callbacks.init_args.out_dir={run / 'model'}",
        *TINY_MODEL,
    ]


def _losses(run: Path) -> dict[int, float]:
    (metrics,) = run.glob("logs/version_*/metrics.csv")
    out = {}
    with open(metrics) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


@pytest.mark.skipif(not BUNDLE.is_dir(), reason="needs the shipped tokenizer bundle")
def test_fit_lowers_loss_and_exports(tokens, tmp_path):
    from chameleon_lite import ChameleonLite
    from chameleon_lite.training.lightning_cli import run_lightning_cli
    run = tmp_path / "run"
    run_lightning_cli(["fit", "--config", str(TINY_RECIPE), *_overrides(tokens, run, 30)])
    losses = _losses(run)
    steps = sorted(losses)
    first, last = [losses[s] for s in steps[:5]], [losses[s] for s in steps[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 1.0, losses  # nats; an untrained model sits at ln(vocab) ~ 7.57
    model = ChameleonLite.from_pretrained(run / "model")
    ids = torch.tensor([[model.vocab.bos, model.vocab.boi]])
    assert model.logits(ids).shape[:2] == (1, 2)


@pytest.mark.skipif(not BUNDLE.is_dir(), reason="needs the shipped tokenizer bundle")
def test_resume_is_exact(tokens, tmp_path):
    """Stopped after 4 steps and resumed from its checkpoint, a run logs the same losses for steps 5..8."""
    from chameleon_lite.training.lightning_cli import run_lightning_cli

    ckpt = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_top_k=-1"]
    full = tmp_path / "full"
    run_lightning_cli(["fit", "--config", str(TINY_RECIPE), *_overrides(tokens, full, 8), *ckpt])
    (step4,) = full.glob("logs/version_0/checkpoints/*step=4*.ckpt")
    resumed = tmp_path / "resumed"
    run_lightning_cli(["fit", "--config", str(TINY_RECIPE), *_overrides(tokens, resumed, 8), f"--ckpt_path={step4}"])
    a, b = _losses(full), _losses(resumed)
    later = [s for s in sorted(a) if s >= 4]
    assert later and all(s in b for s in later), (a, b)
    assert [a[s] for s in later] == [b[s] for s in later]


@pytest.mark.skipif(not BUNDLE.is_dir(), reason="needs the shipped tokenizer bundle")
def test_ddp_two_processes_on_cpu(tokens, tmp_path):
    """Two ranks of batch 4 see the rows one process of batch 8 sees, each row once: the first logged loss (the
    same initial weights, before any update, reduced over the ranks) equals the single process's. A rank that read
    the other's rows, or the same rows twice, would log the loss of another set of rows."""
    from chameleon_lite import ChameleonLite
    from chameleon_lite.training.lightning_cli import run_lightning_cli
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "chameleon_lite.cli", "fit", "--config", str(TINY_RECIPE),
           *_overrides(tokens, run, 3), "--trainer.devices=2", "--trainer.strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = tmp_path / "single"
    run_lightning_cli(["fit", "--config", str(TINY_RECIPE), *_overrides(tokens, single, 1),
                       "--data.init_args.batch_size=8"])
    ddp_losses, single_losses = _losses(run), _losses(single)
    assert sorted(ddp_losses) == [0, 1, 2], ddp_losses  # one logged (all-rank) loss per optimizer step
    assert ddp_losses[0] == pytest.approx(single_losses[0], rel=1e-5, abs=1e-6), (ddp_losses, single_losses)
    model = ChameleonLite.from_pretrained(run / "model")  # the export is rank 0's trained weights
    initial = ChameleonLite.from_pretrained(single / "model")  # one step from the same start
    assert not torch.equal(model.decoder.embed_tokens.weight, initial.decoder.embed_tokens.weight)
