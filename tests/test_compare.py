"""The comparison on a toy budget (seconds): both arms train, evaluate, and a complete metrics.json is written."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from chameleon_lite.data.pretokenize import tokenize_shards
from chameleon_lite.tokenization.bundle import load_bundle
from chameleon_lite.world.shapes_world import ShapesWorldSpec, write_shapes_world

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "tokenizers" / "shapes-64"
pytestmark = pytest.mark.skipif(not BUNDLE.is_dir(), reason="needs the shipped tokenizer bundle")

DECODER = ["d_model=32", "n_layers=2", "n_heads=4", "n_kv_heads=2"]
VIT = ["--model.init_args.vit.d_model=32", "--model.init_args.vit.n_layers=2", "--model.init_args.vit.n_heads=2"]
QUIET = ["--trainer.limit_val_batches=1"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    write_shapes_world(ShapesWorldSpec(train=40, val=8, test=8, seed=3, questions_per_scene=3), root / "raw",
                       progress=False)
    bundle = load_bundle(BUNDLE)
    for split in ("train", "val"):
        tokenize_shards(bundle, str(root / "raw" / split), root / "tokens" / split, num_workers=0, progress=False)
    return root


def _config(toy: Path, path: Path) -> Path:
    native = [f"--model.init_args.model.{x}" for x in DECODER] + ["--data.init_args.seq_len=256",
                                                                  "--model.init_args.model.max_seq_len=256",
                                                                  "--data.init_args.batch_size=4",
                                                                  "--model.init_args.warmup_steps=2", *QUIET]
    baseline_decoder = [f"--model.init_args.model.{x}" for x in DECODER] + ["--model.init_args.model.max_seq_len=256"]
    config = {
        "name": "toy", "train_samples": 48, "seeds": [0],
        "data": {"raw": str(toy / "raw"), "tokens": str(toy / "tokens"), "tokenizer": str(BUNDLE)},
        "native": {"overrides": native},
        "baseline": {"encoder_samples": 16, "stage1_fraction": 0.25,
                     "encoder_overrides": [*VIT, "--data.init_args.batch_size=8", *QUIET],
                     "stage1_overrides": [*VIT, *baseline_decoder, "--data.init_args.batch_size=4", *QUIET],
                     "stage2_overrides": [*VIT, *baseline_decoder, "--data.init_args.batch_size=4", *QUIET]},
        "eval": {"qa_questions": 12, "captions": 4, "text_to_image": 3, "cfg_scale": 2.0, "batch_size": 8},
        "stage3": {"pairs": 12, "val_pairs": 4, "extra_existence": 2, "negative_types": ["adversarial"],
                   "overrides": ["--data.init_args.batch_size=4", "--trainer.limit_val_batches=1"]},
    }
    OmegaConf.save(OmegaConf.create(config), path)
    return path


def test_compare_on_a_toy_budget_writes_a_complete_report(toy, tmp_path, monkeypatch):
    from chameleon_lite.comparison.run import compare

    monkeypatch.chdir(REPO)  # recipes are named relative to the repository, as in configs/compare/*.yaml
    out = tmp_path / "out"
    result = compare(_config(toy, tmp_path / "toy.yaml"), out, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["name"] == "toy" and metrics["seeds"] == [0] and metrics["config"]["train_samples"] == 48
    assert metrics["package_version"] and metrics["machine"]["torch"]
    assert metrics["matched_decoder"] is True, metrics.get("decoder_differences")
    for arm in ("native", "baseline"):
        run = metrics["arms"][arm]["per_seed"][0]
        qa = run["qa"]
        assert qa["overall"]["total"] == 12 == len(qa["records"])
        assert sum(c["total"] for c in qa["by_category"].values()) == 12
        assert sum(c["correct"] for c in qa["by_category"].values()) == qa["overall"]["correct"]
        assert set(qa["chance"]) >= set(qa["by_category"])
        assert {"all"} <= set(qa["pope"]) or "existence" not in qa["by_category"]
        assert run["captioning"]["n_samples"] == 4 and 0 <= run["captioning"]["bleu_4"] <= 1
        training = run["training"]
        assert training["samples_seen"] >= 48 and training["flops"] > 0 and training["loss_curve"]
        cost = run["cost"]
        assert cost["parameters"]["total"] > 0 and cost["latency"]["ttft_s"] > 0
        summary = metrics["arms"][arm]["summary"]
        assert summary["qa.overall.accuracy"]["n"] == 1 and summary["qa.overall.accuracy"]["std"] == 0.0
        _check_qa_records_are_the_models_answers(arm, run, toy)
        s3 = run["stage3"]  # DPO from this arm's model, on 12 pairs of training scenes, then evaluated again
        assert s3["training"]["pairs_seen"] == 12 and s3["training"]["steps"] == 3
        assert s3["pairs"]["pairs"] == 16 and sum(s3["pairs"]["by_kind"].values()) == 16
        assert s3["pairs"]["by_source"]["asked"] >= 2  # the extra existence questions reach the pairs
        assert s3["after"]["qa"]["overall"]["total"] == 12
        # the tuned model's records are kept like the untuned one's: the same questions, its own answers
        tuned = {"qa": s3["after"]["qa"], "model_dir": s3["training"]["model_dir"]}
        _check_qa_records_are_the_models_answers(arm, tuned, toy)
        assert "stage3.after.qa.overall.accuracy" in summary
        # the POPE ranking runs before and after stage 3 (empty here: the toy's few POPE questions are all "yes";
        # test_preference.py checks its numbers)
        assert qa["pope_ranking"] == {} == s3["after"]["qa"]["pope_ranking"]
        assert Path(s3["training"]["model_dir"]).is_dir() and s3["training"]["model_dir"] != run["model_dir"]
    native, baseline = (metrics["arms"][a]["per_seed"][0] for a in ("native", "baseline"))
    assert native["cost"]["visual_tokens_per_image"] == 66  # <boi> + 8x8 codes + <eoi>
    assert baseline["cost"]["visual_tokens_per_image"] == 64  # MLP projector: one token per 8x8 patch
    assert baseline["training"]["samples_seen"] == 48  # rows of one sample each: exactly the budget
    assert baseline["training"]["stages"]["encoder"]["charged_to_budget"] is False
    assert native["text_to_image"]["n_samples"] == 3 and "text_to_image" not in baseline
    assert metrics["vq_ceiling"]["n_samples"] == 3
    assert native["cost"]["parameters"]["decoder"] == baseline["cost"]["parameters"]["decoder"]  # same decoder
    for name in ("accuracy_per_category.png", "loss_curves.png", "generated_images.png", "vq_reconstructions.png"):
        assert (out / name).stat().st_size > 1000, name
    report = result["report"].read_text()
    for heading in ("Question answering by category", "POPE", "Captioning", "Text -> image", "Stage 3", "Cost"):
        assert heading in report
    assert "/12)" in report  # accuracies carry their counts

    # the trained models again, without text->image: no tokenizer ceiling is measured on zero images (it crashed)
    cfg = OmegaConf.load(tmp_path / "toy.yaml")
    cfg.eval.text_to_image, cfg.stage3.pairs = 0, 0
    cfg.native.model_dir, cfg.baseline.model_dir = native["model_dir"], baseline["model_dir"]
    OmegaConf.save(cfg, tmp_path / "no-t2i.yaml")
    again = compare(tmp_path / "no-t2i.yaml", tmp_path / "no-t2i", progress=False)["metrics"]
    assert "vq_ceiling" not in again and "text_to_image" not in again["arms"]["native"]["per_seed"][0]
    assert again["arms"]["native"]["per_seed"][0]["qa"]["records"] == native["qa"]["records"]


def _check_qa_records_are_the_models_answers(arm: str, run: dict, toy: Path) -> None:
    """The report's QA numbers are what the trained model answers: its records hold the shard's questions and
    reference answers in order, the predictions are the exported model's greedy answers (asked again here through
    the public generate, in the evaluation's batch of 8), and the counts follow from the records."""
    from chameleon_lite import ChameleonLite
    from chameleon_lite.baseline.vlm import BaselineVLM
    from chameleon_lite.data.readers import qa_dataset
    from chameleon_lite.eval.understanding import is_correct
    qa = run["qa"]
    records = qa["records"]
    samples = [s for _, s in zip(range(len(records)), qa_dataset(str(toy / "raw" / "test" / "qa-*.tar")))]
    assert [(r["key"], r["question"], r["answer"]) for r in records] == \
           [(s["key"], s["question"], s["answer"]) for s in samples]
    load = ChameleonLite.from_pretrained if arm == "native" else BaselineVLM.from_pretrained
    model = load(run["model_dir"])
    outputs = model.generate([[s["image"], s["question"]] for s in samples[:8]], max_new_tokens=12)
    again = [" ".join(x for x in out if isinstance(x, str)).strip() for out in outputs]
    assert [r["prediction"] for r in records[:8]] == again, arm
    # the public step iterator measure_latency times decodes the same greedy answer
    prompt = [[samples[0]["image"], samples[0]["question"]]]
    tokens = [int(tok[0]) for tok, emitted in model.token_steps(prompt, max_new_tokens=12) if bool(emitted[0])]
    vocab = model.bundle.vocab
    assert model.bundle.text.decode([t for t in tokens if t != vocab.eos]).strip() == again[0], arm
    assert qa["overall"]["correct"] == sum(is_correct(r["prediction"], r["answer"]) for r in records)
    for category, counts in qa["by_category"].items():
        mine = [r for r in records if r["category"] == category]
        assert counts["total"] == len(mine) and counts["correct"] == sum(is_correct(r["prediction"], r["answer"])
                                                                          for r in mine), category


def test_seed_summary_is_mean_and_std_of_each_number():
    from chameleon_lite.comparison.run import flatten_numbers, summarize_seeds

    runs = [{"seed": 0, "qa": {"overall": {"accuracy": 0.5, "total": 10}}, "name": "x", "flag": True},
            {"seed": 1, "qa": {"overall": {"accuracy": 0.7, "total": 10}}, "name": "y", "flag": False}]
    assert flatten_numbers(runs[0]) == {"seed": 0.0, "qa.overall.accuracy": 0.5, "qa.overall.total": 10.0}
    summary = summarize_seeds(runs)
    assert set(summary) == {"qa.overall.accuracy", "qa.overall.total"}  # the seed itself is not averaged
    assert summary["qa.overall.accuracy"]["mean"] == pytest.approx(0.6)
    assert summary["qa.overall.accuracy"]["std"] == pytest.approx(0.1414213, rel=1e-5)  # sample std of (0.5, 0.7)
    assert summary["qa.overall.total"] == {"mean": 10.0, "std": 0.0, "n": 2}


def test_peak_memory_sees_a_transient_allocation():
    import numpy as np

    from chameleon_lite.comparison.evaluate import PeakMemory

    with PeakMemory(interval=0.01) as quiet:
        pass
    with PeakMemory(interval=0.01) as busy:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        import time

        time.sleep(0.1)
        del block
    assert busy.peak_mb >= quiet.peak_mb + 40


def test_eval_device_is_checked_and_auto_follows_cuda(monkeypatch):
    from chameleon_lite.comparison.config import EvalSpec

    with pytest.raises(ValueError, match="eval.device='tpu'"):
        EvalSpec(device="tpu")
    assert EvalSpec(device="cuda:1").resolved_device() == "cuda:1"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert EvalSpec().resolved_device() == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert EvalSpec().resolved_device() == "cuda"


def test_shipped_gpu_compare_config_loads_and_matches_the_demo_decoder():
    """configs/compare/gpu.yaml is the demo's comparison on a GPU: same world data layout, same recipes."""
    from chameleon_lite.comparison.config import load_compare_config

    gpu, demo = load_compare_config("configs/compare/gpu.yaml"), load_compare_config("configs/compare/demo.yaml")
    assert gpu.precision == "bf16-mixed" and gpu.seeds == [0, 1, 2]
    assert gpu.native.recipe == demo.native.recipe and gpu.data.tokenizer == demo.data.tokenizer
    for recipe in ("encoder_recipe", "stage1_recipe", "stage2_recipe"):
        assert getattr(gpu.baseline, recipe) == getattr(demo.baseline, recipe)
    overrides = [*gpu.native.overrides, *gpu.baseline.encoder_overrides, *gpu.baseline.stage1_overrides,
                 *gpu.baseline.stage2_overrides]
    assert overrides.count("--trainer.accelerator=gpu") == 4


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Data from outside the shapes world: random photos with captions and questions, through ``data import``."""
    import numpy as np
    from PIL import Image

    from chameleon_lite.data.folder_import import import_folder

    root = tmp_path_factory.mktemp("imported")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue"]
    with open(photos / "captions.jsonl", "w") as captions, open(photos / "qa.jsonl", "w") as qa:
        for i in range(48):
            c = i % 3
            pixels = np.zeros((40, 48, 3), np.uint8)
            pixels[..., c] = rng.integers(128, 256, (40, 48))  # non-square: the readers resize it
            Image.fromarray(pixels).save(photos / f"{i}.png")
            captions.write(json.dumps({"file": f"{i}.png", "caption": f"a {colours[c]} photo"}) + "\n")
            qa.write(json.dumps({"file": f"{i}.png", "question": "what colour is it?", "answer": colours[c],
                                 "category": "color"}) + "\n")
    import_folder(photos, root / "raw", captions=photos / "captions.jsonl", qa=photos / "qa.jsonl", val=0.15,
                  test=0.25, progress=False)
    bundle = load_bundle(BUNDLE)
    for split in ("train", "val"):
        tokenize_shards(bundle, str(root / "raw" / split), root / "tokens" / split, num_workers=0, progress=False)
    return root


def test_compare_on_imported_data_without_a_world(imported, tmp_path, monkeypatch):
    """Issue 17: no world.yaml. Understanding is scored on the imported test questions, captions as usual, and
    text->image by R-precision with the contrastive model of the baseline's ViT pretraining (no scene parser)."""
    from chameleon_lite.comparison.run import compare

    monkeypatch.chdir(REPO)
    assert not (imported / "raw" / "world.yaml").exists()
    out = tmp_path / "out"
    config = _config(imported, tmp_path / "imported.yaml")
    cfg = OmegaConf.load(config)
    cfg.stage3.pairs = 0
    OmegaConf.save(cfg, config)
    result = compare(config, out, progress=False)
    metrics = result["metrics"]
    assert metrics["world"] is None and metrics["data"]["splits"]["test"]["questions"] > 0
    for arm in ("native", "baseline"):
        run = metrics["arms"][arm]["per_seed"][0]
        assert set(run["qa"]["by_category"]) == {"color"} and run["qa"]["overall"]["total"] == 12
        assert run["qa"]["chance"]["color"]["chance"] > 0 and run["captioning"]["n_samples"] == 4
    t2i = metrics["arms"]["native"]["per_seed"][0]["text_to_image"]
    assert t2i["scorer"] == "r_precision" and t2i["r"] == 3  # three distinct test captions: r is capped
    for name in ("generated", "real", "vq_reconstruction"):
        assert t2i[name]["n"] == 3 and 0 <= t2i[name]["r_precision"] <= 1
    assert "text_to_image" not in metrics["arms"]["baseline"]["per_seed"][0] and "vq_ceiling" not in metrics
    scorer = metrics["arms"]["baseline"]["per_seed"][0]["training"]["stages"]["encoder"]["scorer_dir"]
    assert (Path(scorer) / "model.safetensors").is_file()
    report = result["report"].read_text()
    assert "imported data" in report and "scored by R-precision" in report and "scored by the scene" not in report
    from chameleon_lite.comparison.progress import headline_lines

    assert any("R-precision" in line for line in headline_lines(result["report"]))  # what the CLI prints at the end

    cfg.eval.text_to_image_scorer = "parser"  # no world to parse: refused before anything is trained
    OmegaConf.save(cfg, config)
    with pytest.raises(ValueError, match="parser needs a shapes world"):
        compare(config, tmp_path / "out3", progress=False)
    cfg.eval.text_to_image_scorer = "auto"

    cfg.stage3.pairs = 8  # preference pairs need a world's scenes: refused before anything is trained
    OmegaConf.save(cfg, config)
    with pytest.raises(ValueError, match="world.yaml"):
        compare(config, tmp_path / "out2", progress=False)


def test_compare_on_imported_captions_without_questions(imported, tmp_path, monkeypatch):
    """A folder of images and a captions file is enough: no questions, so captions and text->image are compared
    and the report says so; questions in test but not in train are refused in one line by the CLI."""
    import shutil

    from chameleon_lite.cli import main
    from chameleon_lite.comparison.run import compare
    monkeypatch.chdir(REPO)
    raw = tmp_path / "raw"
    shutil.copytree(imported / "raw", raw)
    for shard in raw.glob("*/qa-*.tar"):
        shard.unlink()
    config = _config(imported, tmp_path / "captions.yaml")
    cfg = OmegaConf.load(config)
    cfg.data.raw, cfg.stage3.pairs, cfg.eval.text_to_image = str(raw), 0, 2
    OmegaConf.save(cfg, config)
    result = compare(config, tmp_path / "out", progress=False)
    for arm in ("native", "baseline"):
        run = result["metrics"]["arms"][arm]["per_seed"][0]
        assert "qa" not in run and run["captioning"]["n_samples"] == 4
    assert result["metrics"]["arms"]["native"]["per_seed"][0]["text_to_image"]["generated"]["n"] == 2
    report = result["report"].read_text()
    assert "No questions in this data" in report and "Question answering" not in report
    assert not (tmp_path / "out" / "accuracy_per_category.png").exists()

    shutil.copy(next((imported / "raw" / "test").glob("qa-*.tar")), raw / "test" / "qa-000000.tar")
    with pytest.raises(SystemExit, match="has questions .* but .* has none"):
        main(["compare", "--config", str(config), "--out", str(tmp_path / "out2"), "--no-progress"])


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "compare").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_comparisons_have_matched_decoders_and_a_mismatch_is_refused_before_training(path, monkeypatch):
    """Issue 16, item 5: a decoder mismatch between the arms is an error when the config is read (it used to show
    only after training, as matched_decoder: false)."""
    from chameleon_lite.comparison.config import CompareConfigError, load_compare_config
    from chameleon_lite.comparison.run import check_matched_decoders

    monkeypatch.chdir(REPO)
    check_matched_decoders(load_compare_config(path))
    cfg = load_compare_config(path, ["native.overrides=[--model.init_args.model.n_layers=7]"])
    with pytest.raises(CompareConfigError, match="n_layers: native 7 vs baseline"):
        check_matched_decoders(cfg)


def test_stage3_pair_options_keep_the_pair_builders_recipe_unless_set():
    from chameleon_lite.comparison.config import PreferenceStage

    assert PreferenceStage().pair_options() == {"negated_twins": False}  # build_preference_pairs' own defaults
    assert PreferenceStage(extra_existence=0, negative_types=["random"]).pair_options() == {
        "extra_existence": 0, "negative_types": ["random"], "negated_twins": False}
    with pytest.raises(ValueError, match="extra_existence"):
        PreferenceStage(extra_existence=-1)
    with pytest.raises(ValueError, match="must be even"):  # refused before any model is trained
        PreferenceStage(extra_existence=1)


def test_report_names_the_held_out_validation_scenes_only_when_the_world_has_them():
    from chameleon_lite.comparison.report import _world_lines

    world = {"config": {"min_objects": 1, "max_objects": 3, "grid": 2, "image_size": 32, "shapes": ["circle"],
                        "colors": ["red"]},
             "splits": {"train": 5, "val": 2, "test": 3, "val_held_out": 4}, "held_out": [["red", "triangle"]],
             "test_held_out_fraction": 0.5, "image_grid": [4, 4], "codebook_size": 512, "tokenizer": "t"}
    assert "so are 4 more validation scenes, which `compare` does not read" in _world_lines({"world": world})[0]
    world["splits"]["val_held_out"] = 0
    assert "more validation scenes" not in _world_lines({"world": world})[0]
