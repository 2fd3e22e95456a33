"""Issue 14 item 3: no checkpoint is unpickled beyond tensors and plain containers, and none comes from a URL."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_torch_floor_loads_weights_only_by_default_and_keeps_the_upper_bound():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert torch_req.specifier.contains("2.6.0") and torch_req.specifier.contains("2.13.0")
    assert not torch_req.specifier.contains("2.5.1")  # torch.load unpickled by default before 2.6
    assert not torch_req.specifier.contains("2.13.1") and not torch_req.specifier.contains("2.14.0")


@pytest.mark.parametrize("url", ["https://example.com/last.ckpt", "http://10.0.0.1/x.ckpt", "HTTPS://EXAMPLE.COM/a"])
def test_fit_refuses_a_checkpoint_url_before_anything_runs(tmp_path, url, monkeypatch):
    from chameleon_lite.training.lightning_cli import run_lightning_cli

    def no_download(*args, **kwargs):
        raise AssertionError("a URL checkpoint was fetched")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    args = ["fit", "--config", str(REPO / "configs" / "native" / "tiny.yaml"), "--ckpt_path", url,
            f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(ValueError, match=r"ckpt_path=.*a checkpoint URL is refused.*weights_only=False"):
        run_lightning_cli(args)


def test_local_and_special_checkpoint_paths_are_accepted():
    from chameleon_lite.training.lightning_cli import check_ckpt_path

    for ok in (None, "last", "best", "runs/x/last.ckpt", "/abs/path.ckpt", "s3://bucket/x.ckpt"):
        check_ckpt_path(ok)


