"""The VQ tokenizer recipe on anyone's images (issue 17): imported, non-square photos at 32, 64 and 128 px train a
bundle whose report holds PSNR, SSIM, codebook usage and perplexity and whose text model was trained on that
data's own captions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chameleon_lite.data.folder_import import import_folder

REPO = Path(__file__).resolve().parents[1]
WORDS = ("zebra", "quokka", "narwhal", "axolotl")  # words no shipped tokenizer was trained on


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("anyimages")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    with open(photos / "captions.jsonl", "w") as f:
        for i in range(48):
            w, h = (60, 44) if i % 2 else (40, 56)  # landscape and portrait: cropped or padded to a square
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"{i}.png")
            f.write(json.dumps({"file": f"{i}.png", "caption": f"a {WORDS[i % 4]} in the snow"}) + "\n")
    import_folder(photos, root / "data", captions=photos / "captions.jsonl", val=0.2, test=0.0, progress=False)
    return root / "data"


@pytest.mark.parametrize("size,mult,resize", [(32, "[1,2,4]", "center_crop"), (64, "[1,2,4,8]", "pad"),
                                              (128, "[1,2,4,8]", "center_crop")])
def test_tokenizer_recipe_trains_on_imported_images(imported, tmp_path, monkeypatch, size, mult, resize):
    from chameleon_lite.tokenization.bundle import load_bundle
    from chameleon_lite.training.lightning_cli import run_lightning_cli
    monkeypatch.chdir(REPO)
    out = tmp_path / "bundle"
    run_lightning_cli([
        "fit", "--config", "configs/tokenizer/fashion-32.yaml",
        f"--data.init_args.train_shards={imported}/train/pairs-*.tar",
        f"--data.init_args.val_shards={imported}/val/pairs-*.tar", f"--data.init_args.image_size={size}",
        "--data.init_args.batch_size=8", "--data.init_args.val_batch_size=8", "--data.init_args.shuffle_buffer=8",
        f"--model.init_args.config.image_size={size}",  # the recipe's ${data...} is read from the file
        f"--model.init_args.config.channel_mult={mult}", "--model.init_args.config.base_channels=8",
        "--model.init_args.config.codebook_size=16", "--model.init_args.config.kmeans_init=false",
        f"--model.init_args.config.resize_mode={resize}",
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.callbacks.init_args.out_dir={out}",
        f"--trainer.callbacks.init_args.text_shards=[{imported}/train/pairs-*.tar]",
        "--trainer.callbacks.init_args.text_vocab_size=300",
        f"--trainer.callbacks.init_args.eval_shards={imported}/val/pairs-*.tar",
        "--trainer.callbacks.init_args.eval_images=8"])
    bundle = load_bundle(out)
    down = 2 ** mult.count(",")  # each level after the first halves the side
    assert bundle.image_grid == (size // down, size // down)
    assert bundle.image_tokenizer.config.image_size == size and bundle.image_tokenizer.config.resize_mode == resize
    readme = (out / "README.md").read_text()
    for metric in ("psnr", "ssim", "codebook_usage", "code_perplexity"):
        assert metric in readme, metric
    assert "scene parser" not in readme  # no world here to judge reconstructions
    # the text model was trained on this data's captions: its words are learned pieces (ids from 260 on; 4..259
    # are the byte-fallback pieces a text model uses for what it never saw), and some of them are merged
    pieces = [bundle.text.encode(word) for word in WORDS]
    assert all(min(ids) >= 260 for ids in pieces), pieces
    assert sum(map(len, pieces)) < sum(map(len, WORDS))
    codes = bundle.image_tokenizer.encode(bundle.image_tokenizer.preprocess([Image.new("RGB", (70, 30))]))
    assert tuple(codes.shape) == (1, *bundle.image_grid)
