"""Text -> image R-precision with the exported contrastive scorer (``chameleon_lite.eval.r_precision``)."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from chameleon_lite.eval.r_precision import (
    ContrastiveScorer,
    load_scorer,
    r_precision,
    score_text_to_image,
)
from chameleon_lite.safe_io import load_plain_yaml

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "tokenizers" / "shapes-32"


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- hand-checked
def test_hand_checked_r_precision():
    """Pool a=(1,0), b=(0,1), c=(-1,0); r=3 so each image's distractors are exactly the two other keys.

    image (1, 0)    own a: cos 1      vs b 0, c -1          -> hit
    image (1, 0.1)  own b: cos 0.0995 vs a 0.995            -> miss
    image (-1, 0.2) own c: cos 0.981  vs a -0.981, b 0.196  -> hit
    image (2, 2)    own a: cos 0.707  vs b 0.707 (a tie)    -> miss (a tie is not a win)
    """
    pool = t([1, 0], [0, 1], [-1, 0])
    keys = ["a", "b", "c"]
    own_keys = ["a", "b", "c", "a"]
    own = pool[[0, 1, 2, 0]]
    images = t([1, 0], [1, 0.1], [-1, 0.2], [2, 2])
    for seed in range(5):  # every draw is forced: the result cannot depend on the seed
        out = r_precision(images, own, pool, own_keys=own_keys, pool_keys=keys, r=3, seed=seed)
        assert out == {"r_precision": 0.5, "hits": 2, "n": 4, "r": 3, "per_image": [True, False, True, False]}
    # r=2: one distractor drawn from two; image 0 beats both b and c, image 1 loses to a but beats c
    out = r_precision(images[:1], own[:1], pool, own_keys=["a"], pool_keys=keys, r=2, seed=0)
    assert out["hits"] == 1


def test_draws_are_seeded_and_uniform_enough():
    """Image (0, 1), own caption (1, 0) (cos 0); pool rows 0-9 beat it (cos > 0), rows 10-19 do not (cos < 0).

    r=2 draws one distractor of 20: a hit half of the time (seeded, so the count is fixed); r=12 draws 11, so at
    least one of rows 0-9 every time: never a hit.
    """
    pool = torch.cat([t([0.5, 1]).expand(10, 2), t([0.5, -1]).expand(10, 2)])  # (20, 2)
    images = t([0, 1]).expand(400, 2).contiguous()
    own = t([1, 0]).expand(400, 2).contiguous()
    keys = [f"p{j}" for j in range(20)]
    own_keys = ["own"] * 400
    a = r_precision(images, own, pool, own_keys=own_keys, pool_keys=keys, r=2, seed=1)
    assert a == r_precision(images, own, pool, own_keys=own_keys, pool_keys=keys, r=2, seed=1)
    assert 150 < a["hits"] < 250, a
    assert r_precision(images, own, pool, own_keys=own_keys, pool_keys=keys, r=12, seed=1)["hits"] == 0


# ---------------------------------------------------------------------------------------------- identical texts
def test_copies_of_the_own_caption_are_never_distractors():
    """If a copy of "x" were drawn it would tie with the own caption and turn the hit into a miss."""
    pool = t([1, 0], [1, 0], [1, 0], [0, 1], [-1, 0])
    keys = ["x", "x", "x", "y", "z"]
    image, own = t([1, 0]), t([1, 0])
    for seed in range(30):
        assert r_precision(image, own, pool, own_keys=["x"], pool_keys=keys, r=3, seed=seed)["hits"] == 1


def test_repeated_distractor_texts_are_drawn_once():
    """Pool y,y,y,y,z: r=3 must draw y and z (two distinct texts), never y twice; z beats the own caption."""
    pool = t([1, 0], [1, 0], [1, 0], [1, 0], [-1, 0])
    keys = ["y", "y", "y", "y", "z"]
    image, own = t([-1, 0]), t([0, 1])  # own cos 0; y cos -1; z cos 1
    for seed in range(30):
        assert r_precision(image, own, pool, own_keys=["x"], pool_keys=keys, r=3, seed=seed)["hits"] == 0


# ---------------------------------------------------------------------------------------------- errors
def test_too_small_a_pool_is_refused():
    pool = t([1, 0], [0, 1], [-1, 0])
    with pytest.raises(ValueError, match=r"r=4 needs 3 distractor.*only 2 distinct.*image 0"):
        r_precision(t([1, 0]), t([1, 0]), pool, own_keys=["a"], pool_keys=["a", "b", "c"], r=4)
    with pytest.raises(ValueError, match=r"only 1 distinct"):  # copies of the own caption do not count
        r_precision(t([1, 0]), t([1, 0]), pool, own_keys=["a"], pool_keys=["a", "a", "b"], r=3)
    with pytest.raises(ValueError, match=r"only 1 distinct"):  # nor do repeated distractors
        r_precision(t([1, 0]), t([1, 0]), pool, own_keys=["q"], pool_keys=["b", "b", "b"], r=3)
    # exactly enough is fine
    assert r_precision(t([1, 0]), t([1, 0]), pool, own_keys=["q"], pool_keys=["a", "b", "b"], r=3)["n"] == 1


def test_bad_shapes_and_arguments_are_refused():
    pool, keys = t([1, 0], [0, 1], [-1, 0]), ["a", "b", "c"]
    one = t([1, 0])
    with pytest.raises(ValueError, match="own_text_emb has shape"):
        r_precision(t([1, 0], [0, 1]), one, pool, own_keys=["a", "b"], pool_keys=keys, r=2)
    with pytest.raises(ValueError, match="pool_text_emb has width 3"):
        r_precision(one, one, torch.ones(3, 3), own_keys=["a"], pool_keys=keys, r=2)
    with pytest.raises(ValueError, match="own_keys must be a sequence of 1"):
        r_precision(one, one, pool, own_keys=["a", "b"], pool_keys=keys, r=2)
    with pytest.raises(ValueError, match="pool_keys must be a sequence of 3"):
        r_precision(one, one, pool, own_keys=["a"], pool_keys=keys[:2], r=2)
    with pytest.raises(ValueError, match="image_emb must be a 2-D"):
        r_precision(torch.ones(2), one, pool, own_keys=["a"], pool_keys=keys, r=2)
    with pytest.raises(ValueError, match="image_emb is empty"):
        r_precision(torch.ones(0, 2), torch.ones(0, 2), pool, own_keys=[], pool_keys=keys, r=2)
    with pytest.raises(ValueError, match="NaN"):
        r_precision(t([float("nan"), 0]), one, pool, own_keys=["a"], pool_keys=keys, r=2)
    for bad_r in (1, 0, True, 2.0):
        with pytest.raises(ValueError, match="must be an int >= 2"):
            r_precision(one, one, pool, own_keys=["a"], pool_keys=keys, r=bad_r)
    with pytest.raises(TypeError, match="not hashable"):
        r_precision(one, one, pool, own_keys=["a"], pool_keys=[[1], [2], [3]], r=2)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny ContrastiveEncoderModule trained for a few steps on a tiny 32-px world, exported as a scorer."""
    import lightning as L

    from chameleon_lite.baseline.contrastive import ContrastiveConfig, TextEncoderConfig
    from chameleon_lite.baseline.vision_encoder import ViTConfig
    from chameleon_lite.comparison.demo import DEMO_WORLD
    from chameleon_lite.data.baseline_datamodule import BaselineDataModule
    from chameleon_lite.training.lit_baseline import ContrastiveEncoderModule, ExportContrastiveScorer
    from chameleon_lite.world.scenes import WorldConfig
    from chameleon_lite.world.shapes_world import ShapesWorldSpec, write_shapes_world
    root = tmp_path_factory.mktemp("r_precision")
    world = root / "world"
    write_shapes_world(ShapesWorldSpec(train=96, val=0, test=0, seed=3, questions_per_scene=1,
                                       world=WorldConfig(**DEMO_WORLD["world"])), world, progress=False)
    module = ContrastiveEncoderModule(
        tokenizer=str(BUNDLE),
        vit=ViTConfig(image_size=32, patch_size=8, d_model=32, n_layers=2, n_heads=2),
        text=TextEncoderConfig(vocab_size=1, pad_id=0, d_model=32, n_layers=1, n_heads=2, max_len=64, pool="mean"),
        contrastive=ContrastiveConfig(embed_dim=16, loss="siglip"),
        lr=3e-3, warmup_steps=2, seed=0,
    )
    data = BaselineDataModule(train_shards=str(world / "train" / "pairs-*.tar"), tokenizer=str(BUNDLE),
                              image_size=32, format="contrastive", batch_size=16, seed=0)
    out = root / "scorer"
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=12, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[ExportContrastiveScorer(out)],
                        default_root_dir=root)
    trainer.fit(module, datamodule=data)
    return module, data, out


def test_export_reload_and_score(trained, tmp_path):
    import shutil

    from chameleon_lite.data.baseline_data import contrastive_batch

    module, data, out = trained
    config = load_plain_yaml(out / "config.yaml")
    assert config["kind"] == "contrastive_scorer" and config["tokenizer"] == "shapes-32"
    assert config["tokenizer_path"] == str(BUNDLE) and config["image_size"] == 32 and config["trained_steps"] == 12
    assert {"vit", "text", "contrastive"} <= set(config) and config["text"]["vocab_size"] == 1420
    assert (out / "model.safetensors").is_file() and (out / "tokenizer" / "text.model").is_file()

    scorer = load_scorer(out)
    assert not scorer.model.training
    memory = ContrastiveScorer(module.model, data.bundle)
    for name, tensor in module.model.state_dict().items():  # the whole model: towers, heads, scale and bias
        assert torch.equal(scorer.model.state_dict()[name], tensor.cpu()), name
    assert scorer.model.logit_bias is not None

    samples = data.train_data
    idx = samples.indices("caption")[:40].tolist()
    captions = [samples.answers[i] for i in idx]
    images = [Image.fromarray(samples.images[int(samples.image_index[i])].permute(1, 2, 0).numpy()) for i in idx]
    assert torch.equal(scorer.embed_texts(captions, batch_size=7), memory.embed_texts(captions, batch_size=7))
    assert torch.equal(scorer.embed_images(images, batch_size=7), memory.embed_images(images, batch_size=7))

    # the scorer sees captions and images exactly as training did (contrastive_batch)
    batch = contrastive_batch(samples, idx, data.bundle.vocab)
    assert scorer.tokenize(captions) == [samples.target[i] for i in idx]
    with torch.no_grad():
        img_ref, txt_ref = module.model.eval()(batch["images"], batch["text_ids"], batch["text_lengths"])
    assert torch.allclose(scorer.embed_images(images), img_ref, atol=1e-5)
    assert torch.allclose(scorer.embed_texts(captions), txt_ref, atol=1e-5)
    emb = scorer.embed_texts(captions)
    assert emb.shape == (40, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(40), atol=1e-5)

    # R-precision of the training images against their own captions, the whole training set as the pool
    pool = [samples.answers[i] for i in samples.indices("caption").tolist()]
    result = score_text_to_image(scorer, images, captions, pool, r=20, seed=0)
    assert set(result) == {"r_precision", "hits", "n", "r", "per_image"}
    assert result["n"] == 40 and result["r"] == 20 and 0 <= result["hits"] <= 40
    assert 0.0 <= result["r_precision"] <= 1.0 and result["r_precision"] == result["hits"] / 40
    assert score_text_to_image(scorer, images, captions, pool, r=20, seed=0) == result  # seeded

    with pytest.raises(ValueError, match="distractor"):
        score_text_to_image(scorer, images, captions, pool[:5], r=20)
    with pytest.raises(ValueError, match="40 generated images but 39 captions"):
        score_text_to_image(scorer, images, captions[:-1], pool, r=20)
    with pytest.raises(ValueError, match="max_len=64"):
        scorer.embed_texts(["red circle " * 60])

    # without the bundle copy the directory falls back to tokenizer_path (resolve_bundle_path)
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    shutil.rmtree(bare / "tokenizer")
    assert torch.equal(load_scorer(bare).embed_texts(captions[:5]), scorer.embed_texts(captions[:5]))


def test_load_scorer_refuses_bad_directories(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, _, out = trained
    with pytest.raises(FileNotFoundError, match="not found"):
        load_scorer(tmp_path / "missing")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    text = (bad / "config.yaml").read_text()
    (bad / "config.yaml").write_text(text.replace("image_size: 32\n", "image_size: ${oc.env:HOME}\n", 1))
    with pytest.raises(ValueError, match="interpolation"):
        load_scorer(bad)
    (bad / "config.yaml").write_text(text)
    state = load_file(str(bad / "model.safetensors"))
    state.pop("text_head.weight")
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="text_head.weight: file missing"):
        load_scorer(bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_scorer(bad)
    # the export refuses a directory it did not write, before training
    from chameleon_lite.training.lit_baseline import ExportContrastiveScorer

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ExportContrastiveScorer(foreign).on_fit_start(None, None)
