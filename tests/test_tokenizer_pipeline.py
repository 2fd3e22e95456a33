"""VQ tokenizer bundles, evaluation, pre-tokenization and the shipped shapes-64 bundle."""

import json
from pathlib import Path

import pytest
import torch

from chameleon_lite.data.readers import pair_dataset
from chameleon_lite.eval.tokenizer_eval import evaluate_image_tokenizer
from chameleon_lite.tokenization.bundle import CONFIG_FILE, TokenizerBundle, load_bundle, save_bundle
from chameleon_lite.tokenization.image_tokenizer import VQImageTokenizer, preprocess_images
from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig
from chameleon_lite.tokenization.vocab import Vocab
from chameleon_lite.world.render import render_scene
from chameleon_lite.world.scenes import WorldConfig
from chameleon_lite.world.shapes_world import ShapesWorldSpec, write_shapes_world
from chameleon_lite.world.splits import CompositionalSplit

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "tokenizers" / "shapes-64"
TINY = dict(image_size=32, base_channels=8, channel_mult=[1, 2, 2, 2], latent_dim=8, codebook_size=16)
TINY["kmeans_init"] = False  # an untrained k-means codebook refuses to encode


@pytest.fixture
def tiny_bundle(text_tokenizer):
    torch.manual_seed(0)
    model = VQImageTokenizer(ImageTokenizerConfig(**TINY)).eval()
    vocab = Vocab(n_text=text_tokenizer.vocab_size, codebook_size=model.codebook_size)
    return TokenizerBundle(name="tiny", text=text_tokenizer, vocab=vocab, image_grid=model.grid, image_tokenizer=model)


def test_bundle_with_image_tokenizer_round_trip(tmp_path, tiny_bundle):
    save_bundle(tiny_bundle, tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.image_tokenizer.encode(x), tiny_bundle.image_tokenizer.encode(x))
    assert loaded.image_grid == (4, 4) and loaded.vocab.codebook_size == 16
    assert load_bundle(tmp_path / "b", load_image_tokenizer=False).image_tokenizer is None


@pytest.mark.parametrize(
    "old, new, match",
    [
        ("image_grid:\n- 4\n- 4", "image_grid:\n- 8\n- 8", "image_grid"),
        ("  codebook_size: 16\n  n_reserved", "  codebook_size: 32\n  n_reserved", "codebook_size"),
        ("  base_channels: 8", "  base_channels: 16", "base_channels"),
    ],
)
def test_bundle_config_weights_mismatch_is_named(tmp_path, tiny_bundle, old, new, match):
    save_bundle(tiny_bundle, tmp_path / "b")
    cfg = tmp_path / "b" / CONFIG_FILE
    text = cfg.read_text()
    assert old in text, text
    text = text.replace(old, new)
    if match == "codebook_size":  # keep the vocab section self-consistent so the VQ check is what fails
        v = Vocab(n_text=tiny_bundle.vocab.n_text, codebook_size=32)
        text = text.replace(f"size: {tiny_bundle.vocab.size}", f"size: {v.size}")
    cfg.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_bundle(tmp_path / "b")


class _Oracle:
    """A stand-in tokenizer whose reconstruction is exact (``lossless``) or blank."""

    codebook_size = 4

    def __init__(self, lossless: bool):
        self.lossless = lossless
        self.config = ImageTokenizerConfig(image_size=64, codebook_size=4)

    def preprocess(self, images):
        return preprocess_images(images, self.config)

    def encode(self, x):
        self._x = x
        return torch.arange(64).remainder(2).view(1, 8, 8).expand(x.shape[0], 8, 8)  # codes 0 and 1 only

    def decode(self, codes):
        return self._x.clone() if self.lossless else torch.ones_like(self._x)

    to_pil = staticmethod(VQImageTokenizer.to_pil)


def test_untrained_kmeans_codebook_refuses_to_encode():
    model = VQImageTokenizer(ImageTokenizerConfig(**{**TINY, "kmeans_init": True}))
    with pytest.raises(ValueError, match="not initialised"):
        model.encode(torch.zeros(1, 3, 32, 32))


def test_evaluation_scores_reconstructions():
    world = WorldConfig()
    sampler = CompositionalSplit().sampler("val", 5)
    images = [render_scene(sampler.sample()) for _ in range(20)]
    good = evaluate_image_tokenizer(_Oracle(True), images, world=world, batch_size=8, progress=False)
    assert good["parser_agreement"] == 1.0 and good["psnr"] > 100 and good["ssim"] > 0.999
    assert good["codebook_usage"] == 0.5 and good["dead_codes"] == 2 and good["images"] == 20
    assert good["code_perplexity"] == pytest.approx(2.0)
    blank = evaluate_image_tokenizer(_Oracle(False), images, world=world, progress=False)
    assert blank["parser_agreement"] == 0.0 and blank["parser_object_recall"] == 0.0
    assert blank["psnr"] < good["psnr"]


def test_pretokenize_round_trip(tmp_path, tiny_bundle):
    from chameleon_lite.data.pretokenize import RECORD_FILE, tokenize_shards

    spec = ShapesWorldSpec(train=6, val=0, test=0, world=WorldConfig(image_size=32), seed=1)
    write_shapes_world(spec, tmp_path / "raw", progress=False)
    stats = tokenize_shards(tiny_bundle, str(tmp_path / "raw" / "train"), tmp_path / "tok", batch_size=5,
                            num_workers=2, progress=False)
    assert stats.samples > 12 and stats.images > 6 + 6 * 2
    text, model = tiny_bundle.text, tiny_bundle.image_tokenizer
    raw = {s["key"]: s for s in pair_dataset(str(tmp_path / "raw" / "train" / "pairs-*.tar"))}
    import webdataset as wds

    records = {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(str(tmp_path / "tok" / "pairs-000000.tar"),
                                                                          shardshuffle=False)}
    assert records.keys() == raw.keys()
    for key, rec in records.items():
        image_seg, text_seg = rec["tokens"]
        want = model.encode(preprocess_images([raw[key]["image"]], model.config)).flatten().tolist()
        assert image_seg["image"] == want  # batched encoding gives the codes of one-at-a-time encoding
        assert text.decode(text_seg["text"]) == raw[key]["text"]
        assert rec["kind"] == "pair" and rec["meta"] == raw[key]["meta"]
    qa = [json.loads(s["json"]) for s in wds.WebDataset(str(tmp_path / "tok" / "qa-000000.tar"), shardshuffle=False)]
    assert qa and all(text.decode(r["answer"]) for r in qa) and {r["kind"] for r in qa} == {"qa"}
    docs = [json.loads(s["json"]) for s in wds.WebDataset(str(tmp_path / "tok" / "docs-000000.tar"),
                                                         shardshuffle=False)]
    assert [list(seg) for seg in docs[0]["tokens"]] == [["text"], ["image"], ["text"], ["image"]]
    assert (tmp_path / "tok" / RECORD_FILE).is_file()
    assert all(0 <= c < 16 for d in docs for seg in d["tokens"] for c in seg.get("image", []))


def test_pretokenize_survives_a_full_image_cache(tmp_path, tiny_bundle, monkeypatch):
    """When the cache of known images overflows mid-batch, images the batch already knew keep their codes."""
    from chameleon_lite.data import pretokenize

    monkeypatch.setattr(pretokenize, "_KNOWN_MAX", 3)
    spec = ShapesWorldSpec(train=8, val=0, test=0, world=WorldConfig(image_size=32), seed=2)
    write_shapes_world(spec, tmp_path / "raw", progress=False)
    stats = pretokenize.tokenize_shards(tiny_bundle, str(tmp_path / "raw" / "train" / "qa-*.tar"), tmp_path / "tok",
                                        batch_size=10, num_workers=0, progress=False)
    assert stats.samples > 8  # several questions share each scene's picture: the case that used to raise KeyError


def test_interrupted_pretokenization_leaves_no_record(tmp_path, tiny_bundle, monkeypatch):
    """tokens.yaml is written last: a crash part-way leaves a directory that readers and the demo refuse."""
    from chameleon_lite.data import pretokenize

    spec = ShapesWorldSpec(train=4, val=0, test=0, world=WorldConfig(image_size=32), seed=3)
    write_shapes_world(spec, tmp_path / "raw", progress=False)
    pretokenize.tokenize_shards(tiny_bundle, str(tmp_path / "raw" / "train"), tmp_path / "tok", num_workers=0,
                                progress=False)
    assert (tmp_path / "tok" / pretokenize.RECORD_FILE).is_file()

    def crash(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(pretokenize, "_tokenize_kind", crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        pretokenize.tokenize_shards(tiny_bundle, str(tmp_path / "raw" / "train"), tmp_path / "tok", num_workers=0,
                                    progress=False)
    assert not (tmp_path / "tok" / pretokenize.RECORD_FILE).exists()


def test_every_config_parses(tmp_path, monkeypatch):
    """Every recipe type-checks; CPU recipes also instantiate (model, datamodule, trainer) without their data."""
    from chameleon_lite.comparison.config import load_compare_config
    from chameleon_lite.training.lightning_cli import parse_recipe, run_lightning_cli

    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert configs
    monkeypatch.chdir(tmp_path)  # nothing a config instantiates may need the data to exist
    for path in configs:
        if path.parent.name == "compare":  # comparison configs, not LightningCLI recipes: check their recipes exist
            cfg = load_compare_config(path)
            for recipe in (cfg.native.recipe, cfg.baseline.encoder_recipe, cfg.baseline.stage1_recipe,
                           cfg.baseline.stage2_recipe):
                assert (REPO / recipe).is_file(), (path, recipe)
            continue
        parsed = parse_recipe(str(path))
        assert parsed.model.class_path.startswith("chameleon_lite."), path
        if parsed.trainer.accelerator == "cpu":
            cli = run_lightning_cli(["--config", str(path)], run=False)
            assert cli.model is not None and cli.datamodule is not None, path


def test_unknown_recipe_key_is_rejected(tmp_path):
    from chameleon_lite.training.lightning_cli import parse_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs" / "tokenizer" / "shapes-64.yaml").read_text().replace("lr: 1.0e-3", "lr_typo: 1"))
    with pytest.raises(SystemExit):  # jsonargparse reports the bad key and exits, as a CLI does
        parse_recipe(str(bad))


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="tokenizers/shapes-64 is not built yet")
def test_shipped_bundle_meets_its_targets():
    """The shipped bundle on 500 freshly generated validation scenes: usage >= 90%, parser agreement >= 98%."""
    bundle = load_bundle(SHIPPED)
    assert bundle.image_grid == (8, 8)
    size = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert size < 10 * 2**20
    sampler = CompositionalSplit().sampler("val", 12345)  # a seed no recipe uses
    images = [render_scene(sampler.sample()) for _ in range(500)]
    metrics = evaluate_image_tokenizer(bundle.image_tokenizer, images, world=WorldConfig(), progress=False)
    assert metrics["codebook_usage"] >= 0.90, metrics
    assert metrics["parser_agreement"] >= 0.98, metrics
    codes = bundle.image_tokenizer.encode(bundle.image_tokenizer.preprocess(images[:4]))
    ids = bundle.vocab.image_to_ids(codes)  # (4, 66): <boi> 64 codes <eoi>, all inside the image range
    assert ids.shape == (4, bundle.image_tokens) and bundle.vocab.is_image(ids[:, 1:-1]).all()
