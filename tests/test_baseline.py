"""The encoder-projector baseline: placeholder expansion, freezing, training stages, export, generation."""

import csv
from pathlib import Path

import pytest
import torch

from chameleon_lite.baseline.projectors import ProjectorConfig
from chameleon_lite.baseline.vision_encoder import ViTConfig
from chameleon_lite.baseline.vlm import (
    BaselineConfig,
    BaselineVLM,
    expand_placeholders,
    next_token_targets,
    parameter_counts,
)
from chameleon_lite.data.baseline_data import load_image_text_samples, vlm_batch
from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import IGNORE_INDEX
from chameleon_lite.tokenization.bundle import load_bundle
from chameleon_lite.world.shapes_world import ShapesWorldSpec, write_shapes_world

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "tokenizers" / "shapes-64"
CONFIGS = REPO / "configs" / "baseline"
pytestmark = pytest.mark.skipif(not BUNDLE.is_dir(), reason="needs the shipped tokenizer bundle")

TINY_VIT = ["--model.init_args.vit.d_model=32", "--model.init_args.vit.n_layers=2", "--model.init_args.vit.n_heads=2"]
TINY_DECODER = ["--model.init_args.model.d_model=64", "--model.init_args.model.n_layers=2",
                "--model.init_args.model.n_heads=4", "--model.init_args.model.n_kv_heads=2"]


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(BUNDLE, load_image_tokenizer=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    write_shapes_world(ShapesWorldSpec(train=48, val=8, test=0, seed=5, questions_per_scene=2), root, progress=False)
    return root


def _tiny_model(bundle, kind="mlp") -> BaselineVLM:
    config = BaselineConfig(
        vit=ViTConfig(image_size=64, patch_size=16, d_model=32, n_layers=2, n_heads=2),
        projector=ProjectorConfig(kind=kind, n_queries=4),
        decoder=DecoderConfig(vocab_size=bundle.vocab.size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              max_seq_len=128),
    )
    torch.manual_seed(0)
    return BaselineVLM(config, bundle.vocab)


def test_placeholder_expansion_puts_images_where_the_text_says():
    P, pad = 9, 0
    ids = torch.tensor([[1, P, 5, 6, 0], [1, 7, P, 8, P]])  # row 0: 1 image; row 1: 2 images; row 0 padded
    text = torch.arange(10, dtype=torch.float)[:, None].expand(10, 2)[ids]  # (B, T, 2): token id as embedding
    images = torch.stack([torch.full((3, 2), -float(k + 1)) for k in range(3)])  # (3 images, N=3, d=2)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    embeds, new_ids, new_mask, lengths = expand_placeholders(ids, text, images, P, pad, mask)
    assert lengths.tolist() == [6, 9] and embeds.shape == (2, 9, 2)
    assert embeds[0, :, 0].tolist() == [1, -1, -1, -1, 5, 6, 0, 0, 0]  # image 0 at row 0's placeholder
    assert embeds[1, :, 0].tolist() == [1, 7, -2, -2, -2, 8, -3, -3, -3]  # images 1, 2 in row-major order
    assert new_ids[0].tolist() == [1, P, P, P, 5, 6, pad, pad, pad]
    assert new_mask[0].tolist() == [False, False, False, False, True, True, False, False, False]
    assert new_mask[1].tolist() == [False] * 5 + [True] + [False] * 3
    targets = next_token_targets(new_ids, new_mask)
    assert targets[0].tolist() == [IGNORE_INDEX] * 3 + [5, 6] + [IGNORE_INDEX] * 4
    with pytest.raises(ValueError, match="placeholders"):
        expand_placeholders(ids, text, images[:2], P, pad)


@pytest.mark.parametrize("kind,tokens", [("linear", 16), ("mlp", 16), ("resampler", 4)])
def test_forward_shapes_and_text_only_loss(bundle, world, kind, tokens):
    model = _tiny_model(bundle, kind)
    assert model.visual_tokens == tokens
    samples, _ = load_image_text_samples(str(world / "val" / "*.tar"), bundle, progress=False)
    batch = vlm_batch(samples, list(range(4)), bundle.vocab)
    logits, targets = model(batch["images"], batch["input_ids"], batch["loss_mask"])
    T = batch["input_ids"].shape[1] - 1 + tokens
    assert logits.shape[:2] == targets.shape == (4, T)
    counted = targets[targets != IGNORE_INDEX]
    assert len(counted) == int(batch["loss_mask"].sum())  # every target token, and nothing else, is predicted
    assert not bundle.vocab.is_image(counted).any()
    counts = parameter_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["projector"] == sum(p.numel() for p in model.projector.parameters()) > 0


def test_qa_per_image_rows_chain_the_questions_about_one_image(bundle, world):
    from chameleon_lite.data.baseline_data import qa_groups
    from chameleon_lite.data.baseline_datamodule import BaselineDataModule
    samples, _ = load_image_text_samples(str(world / "val" / "*.tar"), bundle, progress=False)
    groups = qa_groups(samples)
    assert len(groups) == 8 and all(len(g) == 2 for g in groups)  # 8 scenes, 2 questions each
    assert all(len({int(samples.image_index[i]) for i in g}) == 1 for g in groups)
    a, b = groups[0]
    batch = vlm_batch(samples, [groups[0], a], bundle.vocab)
    v = bundle.vocab
    row = [v.bos, v.image_placeholder, *samples.prompt[a], *samples.target[a], *samples.prompt[b], *samples.target[b]]
    assert batch["input_ids"][0, : len(row)].tolist() == row
    assert batch["input_ids"][0][batch["loss_mask"][0]].tolist() == samples.target[a] + samples.target[b]
    assert batch["task"].tolist() == [1, 1]
    # what the model makes of a chained row: its first question is predicted exactly as in the single-question row
    # (same prefix, causal), its second with the first question and answer in context (not as when asked alone)
    model = _tiny_model(bundle).eval()
    three = vlm_batch(samples, [groups[0], a, b], v)
    assert torch.equal(three["images"][0], three["images"][1])  # one copy of the group's image
    with torch.no_grad():
        logits, targets = model(three["images"], three["input_ids"], three["loss_mask"])  # (3, T, V), (3, T)
    at = targets != IGNORE_INDEX  # (3, T) the predicted positions
    n_a = len(samples.target[a])
    chained = logits[0][at[0]]  # (n_a + n_b, V)
    assert targets[0][at[0]].tolist() == samples.target[a] + samples.target[b]
    torch.testing.assert_close(chained[:n_a], logits[1][at[1]], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(chained[n_a:], logits[2][at[2]], atol=1e-3)
    with pytest.raises(ValueError, match="share their image"):
        vlm_batch(samples, [[groups[0][0], groups[1][0]]], v)
    dm = BaselineDataModule(str(world / "val" / "*.tar"), None, tokenizer=str(BUNDLE), tasks=["caption", "qa"],
                            batch_size=4, qa_per_image=True)
    rows = dm.train_rows()
    assert len(rows) == 8 + 8 and dm.samples_per_row == pytest.approx(24 / 16)  # 8 captions, 8 question pairs
    assert sorted(i for r in rows for i in (r if isinstance(r, list) else [r])) == list(range(24))


def test_length_grouped_batches_are_seeded_disjoint_and_similar_in_length():
    from chameleon_lite.data.baseline_datamodule import length_grouped_batches

    lengths = [(i * 37) % 200 for i in range(1000)]
    a = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(1), window=10)
    b = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(1), window=10)
    assert a == b and len(a) == 1000 // 8 and all(len(x) == 8 for x in a)
    flat = [i for batch in a for i in batch]
    assert len(set(flat)) == len(flat)  # no row twice
    spread = sum(max(lengths[i] for i in x) - min(lengths[i] for i in x) for x in a) / len(a)
    assert spread < 20  # a random batch of 8 spans ~155 of the 200 lengths


def test_image_changes_the_prediction(bundle, world):
    model = _tiny_model(bundle).eval()
    samples, _ = load_image_text_samples(str(world / "val" / "*.tar"), bundle, progress=False)
    batch = vlm_batch(samples, [0, 0], bundle.vocab)
    batch["images"][1] = -batch["images"][1]
    logits, _ = model(batch["images"], batch["input_ids"], batch["loss_mask"])
    assert not torch.allclose(logits[0], logits[1])  # the image reaches the decoder


def _fit(recipe: Path, run: Path, world: Path, steps: int, extra: list[str]) -> dict[int, float]:
    from chameleon_lite.training.lightning_cli import run_lightning_cli

    run_lightning_cli(["fit", "--config", str(recipe),
                       f"--data.init_args.train_shards={world / 'train' / '*.tar'}",
                       f"--data.init_args.val_shards={world / 'val' / '*.tar'}",
                       f"--data.init_args.tokenizer={BUNDLE}", f"--model.init_args.tokenizer={BUNDLE}",
                       "--data.init_args.batch_size=8", "--data.init_args.val_samples=16",
                       f"--trainer.max_steps={steps}", "--trainer.val_check_interval=null",
                       "--trainer.check_val_every_n_epoch=1000", "--trainer.log_every_n_steps=1",
                       "--trainer.enable_progress_bar=false", "--model.init_args.warmup_steps=2",
                       f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
                       f"--trainer.callbacks.init_args.out_dir={run / 'out'}", *extra])
    (metrics,) = run.glob("logs/version_*/metrics.csv")
    with open(metrics) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def _drop(losses: dict[int, float], k: int = 3) -> float:
    steps = sorted(losses)
    return sum(losses[s] for s in steps[:k]) / k - sum(losses[s] for s in steps[-k:]) / k


def _fixed_batch_loss(model: BaselineVLM, batch: dict) -> float:
    """Mean next-token cross-entropy of ``model`` on one batch (eval mode, no gradient)."""
    with torch.no_grad():
        logits, targets = model.eval()(batch["images"], batch["input_ids"], batch["loss_mask"])  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                 ignore_index=IGNORE_INDEX)
    return float(loss)


def _with_fresh_projector(model: BaselineVLM, seed: int) -> BaselineVLM:
    """A copy of ``model`` whose projector is initialised anew (seeded); encoder and decoder unchanged."""
    torch.manual_seed(seed)
    fresh = BaselineVLM(model.config, model.vocab)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("projector.")}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("projector.") for k in missing)
    return fresh


def test_three_stages_train_freeze_and_export(bundle, world, tmp_path):
    """Encoder pretraining, stage 1 and stage 2 each lower their loss; stage 1 trains the projector only."""
    from chameleon_lite.training.lit_baseline import BaselineVLMModule, load_vision_encoder

    enc = _fit(CONFIGS / "encoder_tiny.yaml", tmp_path / "enc", world, 25, TINY_VIT)
    assert _drop(enc) > 0.3, enc
    encoder = load_vision_encoder(tmp_path / "enc" / "out")
    assert encoder.config.d_model == 32

    s1 = _fit(CONFIGS / "stage1_tiny.yaml", tmp_path / "s1", world, 25,
              [*TINY_VIT, *TINY_DECODER, "--model.init_args.lr=1e-2",
               f"--model.init_args.encoder_init={tmp_path / 'enc' / 'out'}"])
    stage1 = BaselineVLM.from_pretrained(tmp_path / "s1" / "out")
    # the logged loss drops only a little (a frozen random decoder leaves the projector little to align to, see
    # docs), so measure on fixed training rows: the trained projector beats every freshly initialised one
    train, _ = load_image_text_samples(str(world / "train" / "pairs-*.tar"), bundle, progress=False)
    rows = vlm_batch(train, list(range(32)), bundle.vocab)
    trained_loss = _fixed_batch_loss(stage1, rows)
    fresh_losses = [_fixed_batch_loss(_with_fresh_projector(stage1, seed), rows) for seed in range(4)]
    # measured: trained 7.45, fresh 7.55 .. 7.61 (their spread 0.06; the logged drop was about 0.04)
    assert trained_loss < min(fresh_losses) - 0.05, (trained_loss, fresh_losses, s1)
    for name, tensor in encoder.state_dict().items():  # frozen encoder: exported exactly as pretrained
        assert torch.equal(stage1.encoder.state_dict()[name], tensor), name

    s2 = _fit(CONFIGS / "stage2_tiny.yaml", tmp_path / "s2", world, 25,
              [*TINY_VIT, *TINY_DECODER, f"--model.init_args.init_from={tmp_path / 's1' / 'out'}"])
    assert _drop(s2) > 0.3, s2
    stage2 = BaselineVLM.from_pretrained(tmp_path / "s2" / "out")
    assert any(not torch.equal(stage2.decoder.state_dict()[k], v) for k, v in stage1.decoder.state_dict().items())
    for name, tensor in stage1.encoder.state_dict().items():  # train_encoder: false keeps it
        assert torch.equal(stage2.encoder.state_dict()[name], tensor), name

    # frozen parts receive no gradient in stage 1
    module = BaselineVLMModule(tokenizer=str(BUNDLE), vit=stage1.config.vit, projector=stage1.config.projector,
                               model=stage1.config.decoder, stage=1)
    samples, _ = load_image_text_samples(str(world / "val" / "pairs-*.tar"), bundle, progress=False)
    batch = vlm_batch(samples, list(range(4)), bundle.vocab)
    logits, targets = module._forward(batch)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX).backward()
    assert all(p.grad is None for p in module.vlm.encoder.parameters())
    assert all(p.grad is None for p in module.vlm.decoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.vlm.projector.parameters())
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.vlm.projector.parameters()}

    # generation on the tiny trained model, through the shared engine
    from PIL import Image

    qa, _ = load_image_text_samples(str(world / "val" / "qa-*.tar"), bundle, progress=False)
    image = Image.fromarray(qa.images[int(qa.image_index[0])].permute(1, 2, 0).numpy())  # (H, W, C) uint8
    out = stage2.generate([image, qa.questions[0]], max_new_tokens=8)
    assert len(out) == 1 and isinstance(out[0], str)
    batch_out = stage2.generate([[image, qa.questions[0]], [image]], max_new_tokens=8)
    assert batch_out[0] == out  # a batch gives each prompt's own result
    assert "".join(stage2.stream([image, qa.questions[0]], max_new_tokens=8)) == out[0]
    with pytest.raises(ValueError, match="only generates text"):
        stage2.generate([image], mode="image")
    with pytest.raises(ValueError, match="empty"):
        stage2.generate([" "])


def test_sample_loader_cache_gives_the_same_samples(bundle, world, tmp_path):
    import shutil

    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in (world / "val").glob("*.tar"):
        shutil.copy(shard, shards / shard.name)
    before = sorted(shards.rglob("*"))
    cache_dir = tmp_path / "cache"
    first, report = load_image_text_samples(str(shards / "*.tar"), bundle, progress=False, cache_dir=cache_dir)
    assert report.samples["qa"] > 0 and report.images < len(first)  # QA samples share their scene's image
    assert sorted(shards.rglob("*")) == before  # nothing is written beside the shards (issue 14)
    assert len(list(cache_dir.glob("baseline-*.npz"))) == 1
    second, report2 = load_image_text_samples(str(shards / "*.tar"), bundle, progress=False, cache_dir=cache_dir)
    assert report2 == report and torch.equal(first.images, second.images)
    assert (first.image_index == second.image_index).all() and first.target == second.target
    assert first.meta == second.meta and first.keys == second.keys
    third, _ = load_image_text_samples(str(shards / "*.tar"), bundle, tasks=["caption"], progress=False,
                                       cache_dir=cache_dir)
    assert len(third) == report.samples["caption"]  # another task selection is another cache entry
    assert len(list(cache_dir.glob("baseline-*.npz"))) == 2


def test_stage_initialisation_names_a_mismatched_field(bundle, tmp_path):
    from chameleon_lite.baseline.vlm import write_baseline_dir
    from chameleon_lite.training.lit_baseline import BaselineVLMModule
    model = _tiny_model(bundle)
    write_baseline_dir(model, BUNDLE, tmp_path / "stage1")
    c = model.config
    ok = BaselineVLMModule(tokenizer=str(BUNDLE), vit=c.vit, projector=c.projector, stage=2,
                           model=DecoderConfig(**{**c.decoder.__dict__, "z_loss_weight": 0.5}),  # a run setting
                           init_from=str(tmp_path / "stage1"))
    ok.setup("fit")
    assert torch.equal(ok.vlm.decoder.lm_head.weight, model.decoder.lm_head.weight)
    bad = BaselineVLMModule(tokenizer=str(BUNDLE), vit=c.vit, projector=ProjectorConfig(kind="linear"), stage=2,
                            model=c.decoder, init_from=str(tmp_path / "stage1"))
    with pytest.raises(ValueError, match="kind='mlp'"):
        bad.setup("fit")
    with pytest.raises(ValueError, match="stage=3"):
        BaselineVLMModule(tokenizer=str(BUNDLE), stage=3)
    with pytest.raises(ValueError, match="train_encoder"):
        BaselineVLMModule(tokenizer=str(BUNDLE), stage=1, train_encoder=True)
