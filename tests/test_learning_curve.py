"""The learning curve over a fake ``compare`` (no training): budgets run smallest first with their own
``train_samples``, finished budgets are read back, curve.json / curve.md / learning_curve.png hold the numbers, and
bad budgets are refused before anything runs.

The fake builds its metrics the way ``compare`` does: QA through ``summarize_qa`` on ``QARecord``s, text->image
through ``aggregate_generation_scores``, training through ``ArmTraining``, the per-arm summary through
``summarize_seeds`` with compare's own selection of numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from chameleon_lite.cli import main
from chameleon_lite.comparison import demo as demo_module
from chameleon_lite.comparison import run
from chameleon_lite.comparison.config import load_compare_config
from chameleon_lite.comparison.learning_curve import MIN_BUDGETS, check_budgets, learning_curve
from chameleon_lite.comparison.training import ArmTraining
from chameleon_lite.eval.generation_scores import GenerationScore, aggregate_generation_scores
from chameleon_lite.eval.understanding import QARecord, summarize_qa

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("count", "color", "shape", "existence")
ANSWERS = {"count": ["2", "3", "2", "4"], "color": ["red", "blue", "red", "red"], "shape": ["circle", "star",
                                                                                              "square", "circle"]}
EXISTENCE = [("yes", "positive"), ("yes", "positive"), ("no", "random"), ("no", "adversarial")]
REFERENCES = {"count": ["2", "2", "3"], "color": ["red", "red", "blue"], "shape": ["circle", "star", "circle"],
              "existence": ["yes", "yes", "no"]}


def _records(arm: str, budget: int, seed: int) -> list[QARecord]:
    """More budget, more right answers (the native arm a little more); always "yes" to existence questions."""
    records = []
    for c, category in enumerate(CATEGORIES):
        pairs = EXISTENCE if category == "existence" else [(a, None) for a in ANSWERS[category]]
        right = min(len(pairs), (budget.bit_length() + c + seed + (arm == "native")) % (len(pairs) + 1))
        for i, (answer, pope) in enumerate(pairs):
            if category == "existence":
                prediction = "yes"
            else:
                prediction = answer if i < right else "wrong"
            records.append(QARecord(prediction=prediction, answer=answer, category=category, pope_type=pope,
                                    held_out=i % 2 == 0, question=f"q{c}{i}", key=f"k{c}{i}"))
    return records


def _generation(n: int, correct: int) -> dict:
    scores = [GenerationScore(n_intended=1, n_generated=1, matched=1, precision=1.0, recall=1.0,
                              count_correct=True, attributes_correct=i < correct, binding_correct=i < correct,
                              relations_total=0, relations_satisfied=0, relations_correct=None,
                              position_correct=True, exact_match=i < correct, all_correct=i < correct)
              for i in range(n)]
    return aggregate_generation_scores(scores)


class FakeCompare:
    """Stands in for ``run.compare``: same arguments, metrics.json written last, real-shaped metrics returned."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, config, out, *, overrides=(), progress=True):
        cfg = load_compare_config(config, overrides)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.calls.append({"config": Path(config), "out": out, "overrides": list(overrides), "progress": progress,
                           "train_samples": cfg.train_samples})
        budget = cfg.train_samples
        metrics = {"name": cfg.name, "config": asdict(cfg), "seeds": list(cfg.seeds),
                   "budget": {"train_samples": budget}, "arms": {"native": {"per_seed": []},
                                                                 "baseline": {"per_seed": []}}}
        for seed in cfg.seeds:
            for arm in ("native", "baseline"):
                records = _records(arm, budget, seed)
                qa = summarize_qa(records, REFERENCES)
                qa["records"] = [r.to_dict() for r in records]
                stages = {"encoder": {"samples": 16, "steps": 2, "seconds": 1.5, "validation": {"val/loss": 2.0},
                                      "charged_to_budget": False}} if arm == "baseline" else {}
                training = ArmTraining(model_dir=str(out / arm), samples_seen=budget + seed, steps=budget // 8,
                                       seconds=budget / 100 + (arm == "baseline") + seed, tokens=40 * budget,
                                       flops=1e9 * budget, samples_per_s=100.0, tokens_per_s=4000.0,
                                       peak_memory_mb=512.0, loss_curve=[(1, 3.0), (2, 2.5)], stages=stages)
                result = {"qa": qa, "captioning": {"bleu_4": 0.1, "cider_d": 0.2, "n_samples": 4},
                          "cost": {"visual_tokens_per_image": 66, "parameters": {"total": 1000},
                                   "latency": {"ttft_s": 0.01, "decode_tokens_per_s": 100.0, "decoded_tokens": 5}},
                          "seed": seed, "model_dir": str(out / arm), "training": training.to_dict()}
                if arm == "native":
                    result["text_to_image"] = _generation(8, min(8, budget.bit_length() // 2 + seed))
                metrics["arms"][arm]["per_seed"].append(result)
        metrics["vq_ceiling"] = _generation(8, 7)
        for arm in ("native", "baseline"):  # exactly compare's summary
            runs = metrics["arms"][arm]["per_seed"]
            metrics["arms"][arm]["summary"] = run.summarize_seeds(
                [{k: v for k, v in r.items() if k not in ("model_dir",)} | {"qa": run._qa_numbers(r["qa"])}
                 for r in runs])
        metrics["seconds"] = 3.0
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str), encoding="utf-8")
        return {"metrics": metrics, "report": out / "report.md"}


@pytest.fixture
def fake(monkeypatch):
    fake = FakeCompare()
    monkeypatch.setattr(run, "compare", fake)
    return fake


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "toy.yaml"
    OmegaConf.save(OmegaConf.create({"name": "toy", "train_samples": 10, "seeds": [0],
                                     "data": {"raw": "raw", "tokens": "tokens", "tokenizer": "tok"}}), path)
    return path


def _metrics(out: Path, budget: int) -> dict:
    return json.loads((out / f"samples-{budget}" / "metrics.json").read_text())


def test_budgets_run_smallest_first_each_with_its_train_samples(fake, config, tmp_path):
    out = tmp_path / "curve"
    curve = learning_curve(config, out, [800, 100, 400, 200], overrides=["eval.captions=4"], progress=False)
    assert [c["train_samples"] for c in fake.calls] == [100, 200, 400, 800]
    for call in fake.calls:
        b = call["train_samples"]
        assert call["overrides"] == ["eval.captions=4", f"train_samples={b}"]
        assert call["out"] == out / f"samples-{b}" and call["config"] == config and call["progress"] is False
    assert curve["budgets"] == [100, 200, 400, 800] and curve["config"] == str(config)
    assert [p["train_samples"] for p in curve["points"]] == [100, 200, 400, 800]
    assert not any(p["resumed"] for p in curve["points"])


def test_curve_json_md_and_png_hold_every_number(fake, config, tmp_path):
    out = tmp_path / "curve"
    budgets = [1000, 2000, 4000, 8000, 16000]
    learning_curve(config, out, budgets, progress=False)
    curve = json.loads((out / "curve.json").read_text())
    assert curve["budgets"] == budgets and curve["config"] == str(config) and curve["name"] == "toy"
    md = (out / "curve.md").read_text()
    for point in curve["points"]:
        b = point["train_samples"]
        metrics = _metrics(out, b)
        row = next(line for line in md.splitlines() if line.startswith(f"| {b:,} |"))
        for arm in ("native", "baseline"):
            s, a = metrics["arms"][arm]["summary"], point["arms"][arm]
            assert a["qa_overall"] == s["qa.overall.accuracy"]["mean"]
            assert f"**{100 * a['qa_overall']:.1f}**" in row
            for c in CATEGORIES:
                assert a["qa_by_category"][c] == s[f"qa.by_category.{c}.accuracy"]["mean"]
                assert a["chance_by_category"][c] == s[f"qa.chance.{c}.chance"]["mean"]
            assert a["pope_yes_rate"] == s["qa.pope.all.yes_rate"]["mean"] == 1.0  # the fake always says yes
            assert a["train_seconds"] == s["training.seconds"]["mean"]
            assert a["samples_seen"] == s["training.samples_seen"]["mean"]
            totals = {c: s[f"qa.chance.{c}.evaluated_total"]["mean"] for c in CATEGORIES}
            expected_chance = sum(a["chance_by_category"][c] * totals[c] for c in CATEGORIES) / sum(totals.values())
            assert a["chance_overall"] == pytest.approx(expected_chance)
        native, baseline = point["arms"]["native"], point["arms"]["baseline"]
        assert native["t2i_all_correct"] == metrics["arms"]["native"]["summary"]["text_to_image.all_correct.mean"][
            "mean"]
        assert f"| {100 * native['t2i_all_correct']:.1f} |" in row + " |"
        assert baseline["t2i_all_correct"] is None  # the baseline generates no images
        assert point["t2i_vq_ceiling"] == metrics["vq_ceiling"]["all_correct"]["mean"]
        cost_row = [line for line in md.splitlines() if line.startswith(f"| {b:,} |")][1]
        assert f"{baseline['train_seconds']:.0f}" in cost_row and f"samples-{b}" in cost_row
    header = next(line for line in md.splitlines() if line.startswith("| training samples | native overall"))
    assert "native t2i all-correct" in header and "baseline t2i" not in header
    assert all(f"native {c}" in header and f"baseline {c}" in header for c in CATEGORIES)
    chance_row = next(line for line in md.splitlines() if line.startswith("| **chance**"))
    first = curve["points"][0]["arms"]["native"]["chance_by_category"]
    for c in CATEGORIES:
        assert f"| {100 * first[c]:.1f} |" in chance_row
    assert chance_row.count("|") == header.count("|")
    png = out / "learning_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curve["files"]["plot"] == png.name
    with Image.open(png) as image:
        assert image.width > 600 and image.height > 400


def test_several_seeds_show_their_spread(fake, config, tmp_path):
    out = tmp_path / "curve"
    learning_curve(config, out, [64, 128, 256, 512], overrides=["seeds=[0,1]"], progress=False)
    curve = json.loads((out / "curve.json").read_text())
    native = curve["points"][0]["arms"]["native"]
    assert native["n_seeds"] == 2
    assert native["std"]["train_seconds"] == _metrics(out, 64)["arms"]["native"]["summary"]["training.seconds"]["std"]
    assert " ± " in (out / "curve.md").read_text()


def test_finished_budgets_are_read_back_not_retrained(fake, config, tmp_path, capsys):
    out = tmp_path / "curve"
    learning_curve(config, out, [100, 200, 400, 800], progress=False)
    first = json.loads((out / "curve.json").read_text())
    (out / "samples-400" / "metrics.json").unlink()  # interrupted during this budget
    (out / "samples-800" / "metrics.json").write_text('{"name": "to')  # a truncated file is not finished
    fake.calls.clear()
    capsys.readouterr()
    curve = learning_curve(config, out, [100, 200, 400, 800], progress=False)
    log = capsys.readouterr().out
    assert [c["train_samples"] for c in fake.calls] == [400, 800]
    assert [p["resumed"] for p in curve["points"]] == [True, True, False, False]
    assert "samples-100" in log and "reading it back instead of retraining" in log and "unreadable" in log
    assert [p["arms"] for p in curve["points"]] == [p["arms"] for p in first["points"]]
    fake.calls.clear()
    learning_curve(config, out, [100, 200, 400, 800, 1600], progress=False)  # extend the curve
    assert [c["train_samples"] for c in fake.calls] == [1600]


def test_a_finished_budget_with_another_config_is_refused(fake, config, tmp_path):
    out = tmp_path / "curve"
    learning_curve(config, out, [100, 200, 400, 800], progress=False)
    fake.calls.clear()
    with pytest.raises(ValueError, match=r"different configuration \(eval.captions: 100 -> 7\)"):
        learning_curve(config, out, [100, 200, 400, 800], overrides=["eval.captions=7"], progress=False)
    assert not fake.calls


@pytest.mark.parametrize(("budgets", "message"), [
    ([100, 200, 400], f"at least {MIN_BUDGETS} budgets, got 3"),
    ([100, 200, 200, 400], r"distinct, got \[200\] more than once"),
    ([0, 100, 200, 400], r"positive .*got \[0\]"),
    ([-5, 100, 200, 400], r"positive .*got \[-5\]"),
    ([1.5, 100, 200, 400], "integers"),
])
def test_bad_budgets_are_refused_before_anything_runs(fake, config, tmp_path, budgets, message):
    with pytest.raises(ValueError, match=message):
        learning_curve(config, tmp_path / "curve", budgets, progress=False)
    assert not fake.calls and not (tmp_path / "curve").exists()


def test_train_samples_override_is_refused(fake, config, tmp_path):
    with pytest.raises(ValueError, match="sets train_samples itself"):
        learning_curve(config, tmp_path / "curve", [1, 2, 3, 4], overrides=["train_samples=5"], progress=False)
    assert not fake.calls
    assert check_budgets([8, 1, 4, 2]) == [1, 2, 4, 8]


def test_cli_refuses_bad_budgets(fake, config, tmp_path):
    base = ["learning-curve", "--config", str(config), "--out", str(tmp_path / "curve")]
    with pytest.raises(SystemExit, match=f"--budgets: a learning curve needs at least {MIN_BUDGETS} budgets"):
        main([*base, "--budgets", "100", "200", "400"])
    with pytest.raises(SystemExit, match="--budgets: budgets must be distinct"):
        main([*base, "--budgets", "100", "200", "200", "400"])
    with pytest.raises(SystemExit, match="--budgets: budgets must be positive"):
        main([*base, "--budgets", "0", "200", "300", "400"])
    with pytest.raises(SystemExit, match="sets train_samples itself"):
        main([*base, "--budgets", "100", "200", "300", "400", "--set", "train_samples=3"])
    assert not fake.calls


def test_cli_demo_world_prepares_the_data_first(fake, config, tmp_path, monkeypatch, capsys):
    prepared = []

    def fake_prepare(out, config_path, *, world=None, progress=True):
        prepared.append((Path(out), config_path, progress))
        return [f"data.raw={out}/data", f"data.tokens={out}/tokens", "data.tokenizer=tok48"]

    monkeypatch.setattr(demo_module, "prepare_demo_data", fake_prepare)
    out = tmp_path / "curve"
    assert main(["learning-curve", "--config", str(config), "--out", str(out), "--budgets", "50", "100", "25", "75",
                 "--set", "eval.captions=3", "--demo-world", "--no-progress"]) == 0
    assert prepared == [(out, str(config), False)]
    assert [c["train_samples"] for c in fake.calls] == [25, 50, 75, 100]
    assert fake.calls[0]["overrides"] == [f"data.raw={out}/data", f"data.tokens={out}/tokens", "data.tokenizer=tok48",
                                          "eval.captions=3", "train_samples=25"]
    assert "| **chance**" in capsys.readouterr().out
    assert (out / "learning_curve.png").is_file()


def test_demo_uses_prepare_demo_data(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(demo_module, "prepare_demo_data",
                        lambda out, config, *, world=None, progress=True: ["data.raw=R", "data.tokens=T"])
    monkeypatch.setattr(run, "compare", lambda config, out, *, overrides=(), progress=True: calls.append(
        (str(config), Path(out), list(overrides))) or {"report": Path(out) / "report.md"})
    report = demo_module.demo(tmp_path / "demo", overrides=["eval.captions=2"], progress=False)
    assert report == tmp_path / "demo" / "report.md"
    assert calls == [(demo_module.DEMO_CONFIG, tmp_path / "demo", ["data.raw=R", "data.tokens=T", "eval.captions=2"])]
    assert "[demo] 3/3 training and comparing both arms" in capsys.readouterr().out


def test_prepare_demo_data_generates_then_reuses(tmp_path, capsys):
    bundle = REPO / "tokenizers" / "shapes-64"
    if not bundle.is_dir():
        pytest.skip("needs the shipped tokenizer bundle")
    cfg = tmp_path / "compare.yaml"
    OmegaConf.save(OmegaConf.create({"name": "x", "train_samples": 4, "data": {"tokenizer": str(bundle)}}), cfg)
    world = {"train": 6, "val": 2, "test": 2, "seed": 1, "world": {"image_size": 64}}
    out = tmp_path / "demo"
    overrides = demo_module.prepare_demo_data(out, cfg, world=world, progress=False)
    assert overrides == [f"data.raw={out / 'data'}", f"data.tokens={out / 'tokens'}", f"data.tokenizer={bundle}"]
    assert (out / "data" / "world.yaml").is_file() and list((out / "tokens" / "train").glob("*.tar"))
    assert "1/3 generating" in capsys.readouterr().out
    assert demo_module.prepare_demo_data(out, cfg, world=world, progress=False) == overrides
    log = capsys.readouterr().out
    assert "reusing the shapes world" in log and "reusing the token shards" in log and "generating" not in log
