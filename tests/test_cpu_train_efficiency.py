"""``benchmarks/cpu_train_efficiency.py --tiny`` runs one native and one baseline-stage recipe and reports finite,
positive rates (a smoke test of the script: its figures are not checked)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "cpu_train_efficiency.py"
pytestmark = pytest.mark.skipif(not (REPO / "tokenizers" / "shapes-64").is_dir(),
                                reason="needs the shipped tokenizer bundle")


def _load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("cpu_train_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_finite_positive_rates(tmp_path, monkeypatch, capsys):
    bench = _load_script(monkeypatch)
    monkeypatch.chdir(REPO)  # recipes name their tokenizer relative to the repository
    recipes = ["configs/native/tiny.yaml", "configs/baseline/stage1_tiny.yaml"]
    out = tmp_path / "efficiency.json"
    result = bench.main(["--tiny", "--threads", "1", "--recipes", *recipes, "--precisions", "32-true",
                         "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))

    assert set(result["peak_flops"]) == {"bf16", "fp32"}
    assert all(math.isfinite(v) and v > 0 for v in result["peak_flops"].values())
    assert result["fastest_cpu_precision"] in ("bf16-mixed", "32-true")
    runs = result["runs"]
    assert [(r["recipe"], r["kind"], r["precision"], r["compile"]) for r in runs] == [
        (recipes[0], "native", "32-true", False), (recipes[1], "baseline", "32-true", False)]
    for run in runs:
        assert run["steps"] == 1 and len(run["step_seconds"]) == 1 and run["batch_size"] == 2
        for key in ("seconds", "tokens", "flops", "steps_per_s", "tokens_per_s", "flops_per_s", "flops_per_token",
                    "pct_bf16_peak", "pct_fp32_peak", "pct_precision_peak"):
            assert math.isfinite(run[key]) and run[key] > 0, (run["recipe"], key, run[key])
        assert run["pct_precision_peak"] == run["pct_fp32_peak"]  # a 32-true run is measured against fp32
        assert run["flops_per_s"] == pytest.approx(run["flops"] / run["seconds"])
    native, baseline = runs
    assert native["tokens"] <= 2 * 512  # batch 2 x seq_len 512, padding not counted
    assert baseline["tokens"] > 2 * 64  # each row holds its image's 64 visual tokens (MLP projector, 8x8 patches)

    printed = capsys.readouterr().out
    assert "measured 256^3 matmul peaks" in printed  # --tiny: small peaks (bf16 is emulated on AVX2-only CPUs)
    assert sum(line.startswith(f"| {recipe} | 32-true |") for line in printed.splitlines() for recipe in recipes) == 2
