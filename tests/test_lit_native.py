"""NativeLMModule (training step, logging, non-finite handling), FLOPs, and the model directory round trip."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers.logger import Logger
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import Decoder
from chameleon_lite.model.model_dir import CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE
from chameleon_lite.native.chameleon import ChameleonLite, export_checkpoint, export_model_dir
from chameleon_lite.tokenization.bundle import load_bundle
from chameleon_lite.training.lit_native import ExportModelDir, NativeLMModule, decoder_param_groups, flops_per_token
from chameleon_lite.training.schedules import warmup_cosine

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "tokenizers" / "shapes-64"
TINY = DecoderConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, attention_backend="sdpa")


@pytest.fixture(scope="module")
def vocab():
    return load_bundle(SHIPPED, load_image_tokenizer=False).vocab


def make_batch(vocab, batch_size: int = 2, seq_len: int = 40, seed: int = 0, image_weight: float = 0.5) -> dict:
    """Packed rows in the batch contract: [text <boi> codes <eoi>] documents, then padding with its own doc id."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.full((batch_size, seq_len), vocab.pad)
    document_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    for row in range(batch_size):
        t, doc = 0, 0
        while True:
            n_text, n_codes = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(3, 8, (1,), generator=g))
            length = n_text + n_codes + 2
            if t + length > seq_len - 2:
                break
            text = torch.randint(4, vocab.n_text, (n_text,), generator=g)
            codes = torch.randint(vocab.image_offset, vocab.size, (n_codes,), generator=g)
            image = torch.cat([torch.tensor([vocab.boi]), codes, torch.tensor([vocab.eoi])])
            input_ids[row, t : t + length] = torch.cat([text, image])
            document_ids[row, t : t + length] = doc
            t, doc = t + length, doc + 1
        document_ids[row, t:] = doc  # padding: its own document
    same_doc_next = torch.zeros_like(input_ids, dtype=torch.bool)
    same_doc_next[:, :-1] = document_ids[:, 1:] == document_ids[:, :-1]
    is_pad = input_ids == vocab.pad
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    targets[~same_doc_next | is_pad] = -100
    target_is_image = vocab.is_image(targets) & (targets != -100)
    weights = (targets != -100).float() * torch.where(target_is_image, image_weight, 1.0)
    positions = torch.zeros_like(input_ids)
    for row in range(batch_size):
        for t in range(1, seq_len):
            positions[row, t] = positions[row, t - 1] + 1 if document_ids[row, t] == document_ids[row, t - 1] else 0
    return {
        "input_ids": input_ids, "targets": targets, "weights": weights, "target_is_image": target_is_image,
        "position_ids": positions, "document_ids": document_ids,
    }


def loader(batches: list[dict]) -> DataLoader:
    """In-memory batches as a loader (a bare list would be read as a list of loaders)."""
    return DataLoader(batches, batch_size=None)


def tiny_module(**kwargs) -> NativeLMModule:
    defaults = dict(tokenizer=str(SHIPPED), model=TINY, lr=1e-2, warmup_steps=0, weight_decay=0.0)
    return NativeLMModule(**{**defaults, **kwargs})


def trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0, log_every_n_steps=1,
    )
    return L.Trainer(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------- module
def test_vocab_size_comes_from_the_bundle(vocab):
    module = tiny_module()
    assert module.config.vocab_size == vocab.size == module.decoder.config.vocab_size
    assert module.hparams["model"]["vocab_size"] == vocab.size and isinstance(module.hparams["model"], dict)
    with pytest.raises(ValueError, match="vocab_size=500"):
        tiny_module(model=dataclasses.replace(TINY, vocab_size=500))


def test_weight_decay_only_on_linear_weights():
    module = tiny_module()
    decay, no_decay = decoder_param_groups(module.decoder, 0.1)
    names = {id(p): n for n, p in module.decoder.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith("_proj.weight") or n == "lm_head.weight" for n in decayed)
    assert {"embed_tokens.weight", "norm.weight", "layers.0.attn.q_norm.weight", "layers.0.attn.q_norm.bias"} <= {
        names[id(p)] for p in no_decay["params"]
    }
    tied = tiny_module(model=dataclasses.replace(TINY, tie_embeddings=True))
    decay, _ = decoder_param_groups(tied.decoder, 0.1)
    assert all(p is not tied.decoder.embed_tokens.weight for p in decay["params"])


def test_text_and_image_loss_are_cross_entropy_over_their_positions(vocab):
    module = tiny_module().eval()
    batch = make_batch(vocab, image_weight=0.5)
    with torch.no_grad():
        out = module.compute_losses(batch)
        logits = module.decoder(batch["input_ids"], position_ids=batch["position_ids"],
                                document_ids=batch["document_ids"])
    targets, is_image = batch["targets"], batch["target_is_image"]
    manual = {}
    for name, where in (("text", (targets != -100) & ~is_image), ("image", is_image)):
        assert where.sum() > 3
        manual[name] = F.cross_entropy(logits[where], targets[where])  # unweighted mean over those positions
    torch.testing.assert_close(out["text_loss"], manual["text"])
    torch.testing.assert_close(out["image_loss"], manual["image"])
    # the training loss itself is the weighted mix (image positions count half)
    w = batch["weights"][targets != -100]
    ce_all = F.cross_entropy(logits[targets != -100], targets[targets != -100], reduction="none")
    torch.testing.assert_close(out["ce"], (w * ce_all).sum() / w.sum())
    # a batch without image targets: image loss is NaN (not logged), text loss still right
    text_only = dict(batch, target_is_image=torch.zeros_like(is_image), targets=torch.where(is_image, -100, targets))
    with torch.no_grad():
        out = module.compute_losses(text_only)
    assert math.isnan(out["image_loss"]) and out["image_n"] == 0
    torch.testing.assert_close(out["text_loss"], manual["text"])


def test_batch_contract_is_checked(vocab):
    module = tiny_module()
    batch = make_batch(vocab)
    with pytest.raises(ValueError, match="document_ids"):
        module.compute_losses({k: v for k, v in batch.items() if k != "document_ids"})
    with pytest.raises(ValueError, match="target_is_image"):
        module.compute_losses(dict(batch, target_is_image=batch["target_is_image"].long()))


class _Recorder(L.Callback):
    def __init__(self):
        self.metrics = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_training_lowers_loss_and_logs_every_step(tmp_path, vocab):
    batch = make_batch(vocab)
    module = tiny_module(peak_flops=1e12)
    before = module.compute_losses(batch)["loss"].item()
    recorder = _Recorder()
    trainer(tmp_path, 8, callbacks=[recorder]).fit(module, train_dataloaders=loader([batch] * 8))
    after = module.compute_losses(batch)["loss"].item()
    assert after < before - 0.5, (before, after)
    logged = recorder.metrics
    assert len(logged) == 8
    for key in ("train/loss", "train/ce", "train/text_loss", "train/image_loss", "train/z_loss", "train/max_logit",
                "train/grad_norm", "train/lr"):
        assert all(key in m and math.isfinite(m[key]) for m in logged), key
    assert all("train/tokens_per_s" in m and m["train/tokens_per_s"] > 0 for m in logged[1:])
    assert all(0 < m["train/mfu"] < 1 for m in logged[1:])
    assert logged[-1]["train/loss"] < logged[0]["train/loss"]
    assert logged[0]["train/grad_norm"] > 0


def test_peak_flops_auto_on_cpu_warns_and_logs_no_mfu(tmp_path, vocab):
    with pytest.raises(ValueError, match="'auto'"):
        tiny_module(peak_flops="max")
    module = tiny_module(peak_flops="auto")
    recorder = _Recorder()
    batch = make_batch(vocab)
    with pytest.warns(UserWarning, match="no datasheet peak for cpu"):
        trainer(tmp_path, 3, callbacks=[recorder]).fit(module, train_dataloaders=loader([batch] * 3))
    assert all("train/tokens_per_s" in m for m in recorder.metrics[1:])
    assert not any("train/mfu" in m for m in recorder.metrics)


class _CaptureLogger(Logger):
    name, version = "capture", 0

    def __init__(self):
        super().__init__()
        self.rows = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, metrics))

    def log_hyperparams(self, *args, **kwargs):
        pass


def test_loggers_get_every_metric_on_their_steps(tmp_path, vocab):
    capture = _CaptureLogger()
    trainer(tmp_path, 7, logger=capture, log_every_n_steps=3).fit(
        tiny_module(), train_dataloaders=loader([make_batch(vocab)] * 7)
    )
    assert [step for step, _ in capture.rows] == [2, 5]
    for _, metrics in capture.rows:
        assert {"train/loss", "train/ce", "train/text_loss", "train/image_loss", "train/z_loss", "train/max_logit",
                "train/grad_norm", "train/tokens_per_s", "train/lr"} <= set(metrics)
        assert metrics["train/tokens_per_s"] > 0


def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup_steps=4, decay_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert warmup_cosine(0, None, 0.1)(50) == 1.0


def test_nonfinite_loss_raises_naming_the_step(tmp_path, vocab):
    good, bad = make_batch(vocab, seed=0), make_batch(vocab, seed=1)
    bad["weights"] = bad["weights"] * float("nan")
    with pytest.raises(RuntimeError, match="global step 2"):
        trainer(tmp_path, 4).fit(tiny_module(), train_dataloaders=loader([good, good, bad, good]))


def test_nonfinite_loss_skip_leaves_parameters_and_counts(tmp_path, vocab):
    good, bad = make_batch(vocab, seed=0), make_batch(vocab, seed=1)
    bad["weights"] = bad["weights"] * float("inf")

    class Snapshot(L.Callback):
        def __init__(self):
            self.params = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.params.append([p.detach().clone() for p in pl_module.parameters()])

    snap, recorder = Snapshot(), _Recorder()
    module = tiny_module(on_nonfinite="skip")
    with pytest.warns(UserWarning, match="global step 1.*skipped"):
        trainer(tmp_path, 3, callbacks=[snap, recorder]).fit(module, train_dataloaders=loader([good, bad, good]))
    assert module.nonfinite_skips == 1
    assert all(torch.equal(a, b) for a, b in zip(snap.params[0], snap.params[1]))  # step 1 skipped
    assert not all(torch.equal(a, b) for a, b in zip(snap.params[1], snap.params[2]))  # step 2 trained
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert recorder.metrics[-1]["train/nonfinite_skips"] == 1.0


def test_validation_logs_epoch_losses(tmp_path, vocab):
    module = tiny_module()
    batches = [make_batch(vocab, seed=s) for s in range(3)]
    run = trainer(tmp_path, 1, limit_val_batches=1.0)
    metrics = run.validate(module, dataloaders=loader(batches), verbose=False)[0]
    assert {"val/loss", "val/ce", "val/text_loss", "val/image_loss", "val/accuracy"} <= set(metrics)
    # by hand, without the module's loss code: every packed document through the decoder on its own (no packing,
    # no document mask), log-softmax at each target, summed over the whole epoch per modality
    text, image, weighted, weight_sum = [], [], 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            for row in range(batch["input_ids"].shape[0]):
                for doc in batch["document_ids"][row].unique():
                    at = (batch["document_ids"][row] == doc).nonzero().flatten()  # this document's positions
                    logits = module.decoder(batch["input_ids"][row, at][None])[0, :, : vocab.size]  # (n, V)
                    logp = logits.double().log_softmax(-1)
                    for j, t in enumerate(at.tolist()):
                        target = int(batch["targets"][row, t])
                        if target == -100:
                            continue
                        ce = -float(logp[j, target])
                        (image if vocab.is_image(target) else text).append(ce)
                        w = float(batch["weights"][row, t])
                        weighted, weight_sum = weighted + w * ce, weight_sum + w
    assert text and image
    assert metrics["val/text_loss"] == pytest.approx(sum(text) / len(text), rel=1e-5)
    assert metrics["val/image_loss"] == pytest.approx(sum(image) / len(image), rel=1e-5)
    assert metrics["val/ce"] == pytest.approx(weighted / weight_sum, rel=1e-5)


def test_flops_per_token_hand_computed():
    config = DecoderConfig(vocab_size=100, pad_vocab_to_multiple_of=64, d_model=64, n_layers=2, n_heads=4,
                           n_kv_heads=2, mlp_hidden=128)
    # per block: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288; qk-norm 2*16*(4+2) = 192; mlp 3*64*128 = 24576;
    # norms 2*64 = 128 -> 37184. N = 2*37184 + 64 (final norm) + 64*128 (head, padded vocab) = 82624.
    assert flops_per_token(config, 32) == 6 * 82624 + 12 * 2 * 4 * 16 * 32
    decoder = Decoder(config)
    n = sum(p.numel() for p in decoder.parameters()) - decoder.embed_tokens.weight.numel()
    assert flops_per_token(config, 1) == 6 * n + 12 * 2 * 4 * 16
    tied = dataclasses.replace(config, tie_embeddings=True)  # the head matmul still costs the same
    assert flops_per_token(tied, 32) == flops_per_token(config, 32)


# ---------------------------------------------------------------------------------------------- model directory
def test_export_round_trip_gives_identical_logits(tmp_path, vocab):
    module = tiny_module(model=dataclasses.replace(TINY, tie_embeddings=True))
    out = export_model_dir(module, SHIPPED, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, "manifest.json", WEIGHTS_FILE, TOKENIZER_DIR]
    loaded = ChameleonLite.from_pretrained(out)
    assert loaded.config.decoder == module.config and loaded.vocab == vocab
    assert loaded.bundle.image_tokenizer is not None
    batch = make_batch(vocab)
    kwargs = dict(position_ids=batch["position_ids"], document_ids=batch["document_ids"])
    with torch.no_grad():
        expected = module.decoder.eval()(batch["input_ids"], **kwargs)
    assert torch.equal(loaded(batch["input_ids"], **kwargs), expected)
    assert torch.equal(loaded.logits(batch["input_ids"], **kwargs), expected[..., : vocab.size])
    # re-export replaces the files it wrote (each renamed into place whole), nothing left beside it
    export_model_dir(loaded.decoder, loaded.bundle, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_from_pretrained_needs_no_lightning(tmp_path):
    out = export_model_dir(tiny_module(), SHIPPED, tmp_path / "model")
    code = (
        "import sys; import chameleon_lite; assert 'torch' not in sys.modules; "
        "from chameleon_lite import ChameleonLite; "
        f"m = ChameleonLite.from_pretrained({str(out)!r}); print(m.logits([1, 2, 3]).shape); "
        "assert not any(k.startswith('lightning') for k in sys.modules), 'lightning imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 3," in result.stdout


def test_export_from_lightning_checkpoint_with_weights_only(tmp_path, vocab):
    batch = make_batch(vocab)
    module = tiny_module()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    export_cb = ExportModelDir()
    trainer(tmp_path, 2, enable_checkpointing=True, callbacks=[ckpt_cb, export_cb]).fit(
        module, train_dataloaders=loader([batch] * 2)
    )
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    torch.load(ckpt, map_location="cpu", weights_only=True)  # plain types only
    out = export_checkpoint(ckpt, tmp_path / "exported")
    loaded = ChameleonLite.from_pretrained(out)
    assert loaded.config.trained_steps == 2
    expected = {k: v for k, v in module.decoder.state_dict().items()}
    assert all(torch.equal(v, expected[k]) for k, v in loaded.decoder.state_dict().items())
    # the callback wrote <default_root_dir>/model with the same weights
    assert export_cb.written == tmp_path / "model"
    from_callback = load_file(tmp_path / "model" / WEIGHTS_FILE)
    assert all(torch.equal(v, expected[k]) for k, v in from_callback.items())


def test_missing_and_mismatched_files_are_named(tmp_path):
    out = export_model_dir(tiny_module(), SHIPPED, tmp_path / "model")
    weights = load_file(out / WEIGHTS_FILE)
    config_text = (out / CONFIG_FILE).read_text()

    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        ChameleonLite.from_pretrained(out)

    bad = dict(weights)
    bad["layers.1.mlp.up_proj.weight"] = torch.zeros(7, 32)
    del bad["norm.weight"]
    save_file(bad, str(out / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight: \(7, 32\).*\(128, 32\)") as err:
        ChameleonLite.from_pretrained(out)
    assert "norm.weight" in str(err.value)

    save_file(weights, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(config_text.replace("vocab_size: 1932", "vocab_size: 1900"))
    with pytest.raises(ValueError, match="vocab_size=1900.*1932"):
        ChameleonLite.from_pretrained(out)
    (out / CONFIG_FILE).write_text(config_text.replace("d_model: 32", "d_modle: 32"))
    with pytest.raises(ValueError, match=f"{CONFIG_FILE}.*d_modle"):
        ChameleonLite.from_pretrained(out)

    (out / CONFIG_FILE).write_text(config_text)
    assert ChameleonLite.from_pretrained(out) is not None
    with pytest.raises(FileExistsError):  # never clobbers a directory that is not a model directory
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "precious.txt").write_text("x")
        export_model_dir(tiny_module(), SHIPPED, tmp_path / "data")
    with pytest.raises(ValueError, match="not a NativeLMModule checkpoint"):
        torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
        export_checkpoint(tmp_path / "other.ckpt", tmp_path / "x")


def test_checkpoint_resume_is_exact(tmp_path, vocab):
    # one repeated batch: Lightning's own bookkeeping of a resumed epoch (which batch comes next) is not under test
    batches = loader([make_batch(vocab)] * 2)
    straight = tiny_module(warmup_steps=1, decay_steps=4)
    trainer(tmp_path / "a", 4).fit(straight, train_dataloaders=batches)

    first = tiny_module(warmup_steps=1, decay_steps=4)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "b", -1, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt_cb]).fit(
        first, train_dataloaders=batches
    )
    resumed = tiny_module(warmup_steps=1, decay_steps=4, seed=123)  # other init: all must come from the checkpoint
    trainer(tmp_path / "b", 4).fit(resumed, train_dataloaders=batches, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for (name, a), b in zip(straight.decoder.named_parameters(), resumed.decoder.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    reloaded = NativeLMModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert reloaded.config == first.config
    assert all(torch.equal(a, b) for a, b in zip(reloaded.parameters(), first.parameters()))


@pytest.mark.slow
def test_compiled_decoder_trains_and_exports(tmp_path, vocab):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    batch = make_batch(vocab)
    module = tiny_module(compile=True)
    trainer(tmp_path, 3, callbacks=[ExportModelDir()]).fit(module, train_dataloaders=loader([batch] * 3))
    assert module._compiled
    # the backend is resolved before compiling: one graph, no break, no recompile over 3 steps
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    loaded = ChameleonLite.from_pretrained(tmp_path / "model")
    assert all(torch.equal(v, module.decoder.state_dict()[k]) for k, v in loaded.decoder.state_dict().items())
