"""perf.py: MFU, the device table, the decode speed of light (hand-computed), measured rates, synthetic batches,
loss spikes and recipe shapes. All on CPU."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chameleon_lite.model.attention import positions_from_document_ids
from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import Decoder
from chameleon_lite.tokenization.vocab import Vocab
from chameleon_lite.training import perf
from chameleon_lite.training.lit_native import check_batch, flops_per_token

REPO = Path(__file__).resolve().parents[1]
# head_dim 4, GQA 2:1, padded vocab 128 (logical 100)
TINY = DecoderConfig(vocab_size=100, pad_vocab_to_multiple_of=64, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1,
                     mlp_hidden=16, max_seq_len=32, attention_backend="sdpa")


# ---------------------------------------------------------------------------------------------- MFU and peaks
def test_mfu_hand_computed_and_errors() -> None:
    assert perf.mfu(1000.0, 6e9, 1.2e13) == pytest.approx(0.5)
    assert perf.mfu(0.0, 6e9, 1e12) == 0.0
    with pytest.raises(ValueError, match="peak_flops"):
        perf.mfu(1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="tokens_per_s"):
        perf.mfu(-1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="flops_per_token"):
        perf.mfu(1.0, math.nan, 1.0)


@pytest.mark.parametrize(
    ("name", "flops", "bandwidth"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12, 3.35e12),
        ("NVIDIA H100 PCIe", 756.5e12, 2.0e12),
        ("NVIDIA H100 NVL", 835.5e12, 3.9e12),
        ("NVIDIA H200", 989.4e12, 4.8e12),
        ("NVIDIA H200 NVL", 835.5e12, 4.8e12),
        ("NVIDIA A100-SXM4-80GB", 312e12, 2.039e12),
        ("NVIDIA A100 80GB PCIe", 312e12, 1.935e12),
        ("NVIDIA A100-PCIE-40GB", 312e12, 1.555e12),
    ],
)
def test_device_table(name: str, flops: float, bandwidth: float) -> None:
    assert perf.device_peak_flops(name, torch.bfloat16) == flops
    assert perf.device_peak_flops(name, torch.float16) == flops
    assert perf.device_peak_bandwidth(name) == bandwidth


def test_unknown_device_or_dtype_gives_none() -> None:
    assert perf.device_peak_flops("NVIDIA GeForce RTX 4090") is None
    assert perf.device_peak_bandwidth("cpu") is None
    assert perf.device_peak_flops("NVIDIA H100 80GB HBM3", torch.float32) is None


def test_resolve_peak_flops(monkeypatch) -> None:
    assert perf.resolve_peak_flops(1e12, "cpu", "32-true") == 1e12  # a number passes through
    assert perf.resolve_peak_flops(None, "cuda", "bf16-mixed") is None
    assert perf.resolve_peak_flops("auto", "cpu", "bf16-mixed") is None  # no datasheet figure for a CPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert perf.resolve_peak_flops("auto", "cuda", "bf16-mixed") == 989.4e12
    assert perf.resolve_peak_flops("auto", "cuda:0", "16-mixed") == 989.4e12
    assert perf.resolve_peak_flops("auto", "cuda", "32-true") is None  # the table holds 16-bit figures only
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    assert perf.resolve_peak_flops("auto", "cuda", "bf16-mixed") is None
    with pytest.raises(ValueError, match="'auto'"):
        perf.resolve_peak_flops("max", "cuda", "bf16-mixed")


# ---------------------------------------------------------------------------------------------- measuring
class _FakeClock:
    """perf_counter replacement: returns the given times in order."""

    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def test_measured_matmul_flops_counts_2n3_per_repeat(monkeypatch) -> None:
    monkeypatch.setattr(perf.time, "perf_counter", _FakeClock(10.0, 12.0))
    got = perf.measured_matmul_flops("cpu", torch.float32, n=16, repeats=5, warmup=1)
    assert got == pytest.approx(2 * 16**3 * 5 / 2.0)


def test_measured_copy_bandwidth_counts_read_and_write(monkeypatch) -> None:
    monkeypatch.setattr(perf.time, "perf_counter", _FakeClock(0.0, 0.5))
    assert perf.measured_copy_bandwidth("cpu", nbytes=1000, repeats=4, warmup=0) == pytest.approx(2 * 1000 * 4 / 0.5)


class _RecordingClock:
    """The real perf_counter, remembering what it returned."""

    def __init__(self) -> None:
        self.readings: list[float] = []
        self._clock = time.perf_counter

    def __call__(self) -> float:
        self.readings.append(self._clock())
        return self.readings[-1]


class _CountOps(TorchDispatchMode):
    """Counts the matmuls' FLOPs (``2 n^3`` each, by hand) and the bytes copied, as they really run."""

    def __init__(self) -> None:
        super().__init__()
        self.mm_flops = 0
        self.copied_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out):
            (m, k), (_, n) = args[0].shape, args[1].shape
            self.mm_flops += 2 * m * k * n
        if func is torch.ops.aten.copy_.default:
            self.copied_bytes += args[1].numel() * args[1].element_size()
        return func(*args, **kwargs)


def test_measured_rates_on_cpu_are_the_work_done_over_the_time_taken(monkeypatch) -> None:
    """Real runs on the CPU: the reported rate is exactly the hand-counted work of the timed repeats (2 n^3 FLOPs
    per n x n matmul; 2 * nbytes per copy) over the measured interval, and the warmup runs are not counted."""
    n, repeats, warmup = 64, 3, 2
    clock = _RecordingClock()
    monkeypatch.setattr(perf.time, "perf_counter", clock)
    with _CountOps() as ops:
        flops = perf.measured_matmul_flops("cpu", torch.float32, n=n, repeats=repeats, warmup=warmup)
    start, end = clock.readings
    assert ops.mm_flops == 2 * n**3 * (repeats + warmup)  # every matmul ran, warmup included
    assert flops == pytest.approx(2 * n**3 * repeats / (end - start), rel=1e-12)
    clock.readings.clear()
    nbytes = 1 << 16
    with _CountOps() as ops:
        bandwidth = perf.measured_copy_bandwidth("cpu", nbytes=nbytes, repeats=repeats, warmup=warmup)
    start, end = clock.readings
    assert ops.copied_bytes == nbytes * (repeats + warmup)  # each copy reads nbytes and writes nbytes
    assert bandwidth == pytest.approx(2 * nbytes * repeats / (end - start), rel=1e-12)
    with pytest.raises(ValueError, match="n="):
        perf.measured_matmul_flops("cpu", torch.float32, n=0)
    with pytest.raises(ValueError, match="repeats"):
        perf.time_repeats(lambda: None, "cpu", repeats=0)
    with pytest.raises(ValueError, match="n="):
        perf.measured_matmul_flops("cpu", torch.float32, n=0)
    with pytest.raises(ValueError, match="repeats"):
        perf.time_repeats(lambda: None, "cpu", repeats=0)


# ---------------------------------------------------------------------------------------------- decode bound
def test_non_embedding_parameters_equal_the_module_count() -> None:
    # per block: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; QK-norm 2 * 4 * (2 + 1) = 24; SwiGLU 3 * 8 * 16 = 384;
    # two RMSNorms 16 -> 616; two blocks + final norm 8 = 1240
    assert perf.non_embedding_parameters(TINY) == 1240
    for config in (TINY, DecoderConfig(d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, qk_norm=False),
                   DecoderConfig(d_model=32, n_layers=2, n_heads=4, tie_embeddings=True, swin_norm=True)):
        decoder = Decoder(config)
        expected = decoder.num_parameters(non_embedding=True)
        if config.tie_embeddings:  # num_parameters leaves the tied table out entirely; ours never counts it
            expected = decoder.num_parameters(non_embedding=False) - decoder.embed_tokens.weight.numel()
        assert perf.non_embedding_parameters(config) == expected


def test_decode_bytes_per_step_hand_computed() -> None:
    # weights: 1240 non-embedding + head 100 * 8 + lookup 3 * 8 = 2064 elements * 2 bytes = 4128
    # KV: 2 (k, v) * 2 layers * 3 rows * 1 kv head * 4 head_dim * 10 tokens * 2 bytes = 960
    assert perf.decode_bytes_per_step(TINY, batch=3, context_len=10, dtype_bytes=2) == 4128 + 960
    # an fp8 cache halves the KV part only
    assert perf.decode_bytes_per_step(TINY, batch=3, context_len=10, dtype_bytes=2, kv_dtype_bytes=1) == 4128 + 480
    with pytest.raises(ValueError, match="context_len"):
        perf.decode_bytes_per_step(TINY, batch=1, context_len=0, dtype_bytes=2)


def test_speed_of_light_hand_computed() -> None:
    # 5088 bytes per step at 5.088 MB/s = 1000 steps/s, 3 tokens each
    assert perf.speed_of_light_tokens_per_s(5088, 5.088e6, batch=3) == pytest.approx(3000.0)
    with pytest.raises(ValueError, match="bandwidth"):
        perf.speed_of_light_tokens_per_s(5088, 0.0, batch=1)


def test_small_recipe_shape_and_its_flops() -> None:
    vocab_size = 1932  # the shapes-64 bundle
    config, batch_size, seq_len = perf.recipe_decoder_config(REPO / "configs/native/small.yaml", vocab_size)
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads) == (768, 16, 12, 4)
    assert (config.max_seq_len, batch_size, seq_len, config.vocab_size) == (2048, 32, 2048, vocab_size)
    n = perf.non_embedding_parameters(config) + config.d_model * config.padded_vocab_size
    assert flops_per_token(config, seq_len) == 6 * n + 12 * 16 * 12 * 64 * 2048
    with pytest.raises(ValueError, match="native recipe"):
        perf.recipe_decoder_config(REPO / "configs/tokenizer/" / _first_yaml("configs/tokenizer"), vocab_size)


def _first_yaml(folder: str) -> str:
    return sorted(p.name for p in (REPO / folder).glob("*.yaml"))[0]


# ---------------------------------------------------------------------------------------------- synthetic batches
def test_synthetic_packed_batch_follows_the_contract() -> None:
    vocab = Vocab(n_text=40, codebook_size=32)
    batch = perf.synthetic_packed_batch(vocab, 3, 50, image_tokens=6, text_len=(2, 5), alphabet=7, seed=1)
    assert check_batch(batch) == (3, 50)
    ids, docs, targets = batch["input_ids"], batch["document_ids"], batch["targets"]
    assert torch.equal(batch["position_ids"], positions_from_document_ids(docs))
    assert (docs[:, 1:] >= docs[:, :-1]).all() and (docs[:, 0] == 0).all() and (docs[:, -1] >= 2).all()
    assert not (ids == vocab.pad).any()
    same = docs[:, 1:] == docs[:, :-1]
    assert torch.equal(targets[:, :-1][same], ids[:, 1:][same])
    assert (targets[:, :-1][~same] == -100).all() and (targets[:, -1] == -100).all()
    assert torch.equal(batch["weights"], (targets != -100).float())
    assert torch.equal(batch["target_is_image"], vocab.is_image(targets) & (targets != -100))
    text = ids[(ids < vocab.n_text)]
    codes = ids[vocab.is_image(ids)] - vocab.image_offset
    assert text.min() >= 4 and text.max() < 4 + 7 and codes.max() < 7  # the alphabet limit
    # every complete document is text <boi> 6 codes <eoi>
    row, doc = ids[0], docs[0]
    first = row[doc == 0].tolist()
    assert first[-8] == vocab.boi and first[-1] == vocab.eoi and all(vocab.is_image(t) for t in first[-7:-1])
    again = perf.synthetic_packed_batch(vocab, 3, 50, image_tokens=6, text_len=(2, 5), alphabet=7, seed=1)
    assert all(torch.equal(batch[k], again[k]) for k in batch)


# ---------------------------------------------------------------------------------------------- spikes
def test_loss_spikes() -> None:
    falling = [8.0 * 0.99**i for i in range(300)]
    assert perf.find_loss_spikes(falling) == []
    jumped = list(falling)
    jumped[200] = 3.0 * falling[199]  # the trailing median is ~1.28 x falling[199]
    jumped[250] = math.nan
    spikes = perf.find_loss_spikes(jumped, window=50)
    assert [s.step for s in spikes] == [200, 250]
    assert spikes[0].median == pytest.approx(statistics.median(falling[150:200]))
    assert perf.find_loss_spikes([1.0, 5.0], min_history=10) == []  # too little history
    assert [s.step for s in perf.find_loss_spikes(jumped, steps=[10 * i for i in range(300)])] == [2000, 2500]
    with pytest.raises(ValueError, match="factor"):
        perf.find_loss_spikes(falling, factor=1.0)


def test_spikes_from_a_csv_logger_file(tmp_path, capsys) -> None:
    path = tmp_path / "metrics.csv"
    rows = ["epoch,step,train/loss,val/loss"]
    for step in range(40):
        loss = 10.0 if step == 30 else 4.0 - 0.01 * step
        rows.append(f"0,{step},{loss},")
    rows.append("0,39,,3.5")  # a validation row without the metric
    path.write_text("\n".join(rows) + "\n")
    steps, values = perf.read_metric_csv(path)
    assert len(values) == 40 and steps[30] == 30
    perf.main(["spikes", str(path), "--window", "20"])
    out = capsys.readouterr().out
    assert "1 spikes" in out and "step 30: 10.0000" in out
    with pytest.raises(ValueError, match="columns"):
        perf.read_metric_csv(path, "train/nope")
