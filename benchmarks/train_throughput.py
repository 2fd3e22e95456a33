"""Training throughput of NativeLMModule under Lightning vs a plain PyTorch loop on the same model and batches.

Both arms start from the same decoder weights, use the same AdamW groups, LR schedule, gradient clipping (norm 1.0)
and the same random packed batches in the batch-contract format; precision is bf16-mixed on CUDA and fp32 on CPU.
The Lightning arm is ``Trainer(max_steps=N, logger=False, enable_checkpointing=False, enable_progress_bar=False)``
fitting the module on an in-memory loader, so it pays for everything the module does per step (text/image losses,
grad norm, the non-finite check, logging). The first ``--warmup`` steps of every run are not timed; the arms
alternate ``--repeats`` times and the median tokens/s of each is reported with the ratio (goal: >= 0.9).

    python benchmarks/train_throughput.py --steps 25 --warmup 5 --batch-size 4 --seq-len 512
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import next_token_loss
from chameleon_lite.tokenization.vocab import Vocab
from chameleon_lite.training.lit_native import NativeLMModule, decoder_param_groups
from chameleon_lite.training.schedules import warmup_cosine


def random_batches(vocab: Vocab, n: int, batch_size: int, seq_len: int, seed: int = 0) -> list[dict]:
    """``n`` packed batches: documents of text, then an image (``<boi>`` codes ``<eoi>``), padding at the end."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        input_ids = torch.full((batch_size, seq_len), vocab.pad)
        document_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        position_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        for row in range(batch_size):
            t, doc = 0, 0
            while True:
                n_text = int(torch.randint(8, 64, (1,), generator=g))
                length = n_text + 64 + 2  # an 8x8 image with <boi>/<eoi>
                if t + length > seq_len:
                    break
                text = torch.randint(4, vocab.n_text, (n_text,), generator=g)
                codes = torch.randint(vocab.image_offset, vocab.size, (64,), generator=g)
                input_ids[row, t : t + length] = torch.cat([text, torch.tensor([vocab.boi]), codes,
                                                            torch.tensor([vocab.eoi])])
                document_ids[row, t : t + length] = doc
                position_ids[row, t : t + length] = torch.arange(length)
                t, doc = t + length, doc + 1
            document_ids[row, t:] = doc
            position_ids[row, t:] = torch.arange(seq_len - t)
        targets = torch.full_like(input_ids, -100)
        targets[:, :-1] = input_ids[:, 1:]
        same_doc = torch.zeros_like(input_ids, dtype=torch.bool)
        same_doc[:, :-1] = document_ids[:, 1:] == document_ids[:, :-1]
        targets[~same_doc | (input_ids == vocab.pad)] = -100
        target_is_image = vocab.is_image(targets) & (targets != -100)
        batches.append({
            "input_ids": input_ids, "targets": targets, "weights": (targets != -100).float(),
            "target_is_image": target_is_image, "position_ids": position_ids, "document_ids": document_ids,
        })
    return batches


class _StepClock(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def _rate(times: list[float], tokens: list[int], warmup: int) -> float:
    """Tokens/s over steps ``warmup..end`` (the interval from the end of step ``warmup - 1``)."""
    return sum(tokens[warmup:len(times)]) / (times[-1] - times[warmup - 1])


def run_lightning(module: NativeLMModule, batches: list[dict], precision: str, warmup: int) -> float:
    clock = _StepClock()
    trainer = L.Trainer(
        max_steps=len(batches), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="auto", devices=1, precision=precision, gradient_clip_val=1.0,
        callbacks=[clock],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    tokens = [int((b["input_ids"] != module.vocab.pad).sum()) for b in batches]
    return _rate(clock.times, tokens, warmup)


def run_plain(module: NativeLMModule, batches: list[dict], device: torch.device, warmup: int) -> float:
    """The same training step written by hand: forward, loss, backward, clip, AdamW, LR schedule."""
    decoder = module.decoder.to(device).train()
    hp = module.hparams
    optimizer = torch.optim.AdamW(decoder_param_groups(decoder, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas),
                                  fused=True if device.type == "cuda" else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(hp.warmup_steps, hp.decay_steps or len(batches), hp.min_lr_ratio)
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, tokens = [], []
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            logits = decoder(batch["input_ids"], position_ids=batch["position_ids"],
                             document_ids=batch["document_ids"])
            loss = next_token_loss(logits, batch["targets"], batch["weights"], module.z_loss_weight)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        tokens.append(int((batch["input_ids"] != module.vocab.pad).sum()))
    return _rate(times, tokens, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="tokenizers/shapes-64")
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of every run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error("need 1 <= --warmup < --steps")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    config = DecoderConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                           max_seq_len=args.seq_len)
    template = NativeLMModule(tokenizer=args.tokenizer, model=config, warmup_steps=2, seed=0)
    batches = random_batches(template.vocab, args.steps, args.batch_size, args.seq_len)
    tokens = sum(int((b["input_ids"] != template.vocab.pad).sum()) for b in batches) / len(batches)
    n_params = template.decoder.num_parameters(non_embedding=False)
    print(f"device {device} ({precision}), torch threads {torch.get_num_threads()}; decoder {n_params / 1e6:.2f}M "
          f"params (d_model {args.d_model}, {args.layers} layers, {args.heads} heads); batch {args.batch_size} x "
          f"{args.seq_len} ({tokens:.0f} non-pad tokens); {args.steps} steps, {args.warmup} untimed")

    rates: dict[str, list[float]] = {"lightning": [], "plain": []}
    for repeat in range(args.repeats):
        for arm in ("plain", "lightning") if repeat % 2 == 0 else ("lightning", "plain"):
            module = copy.deepcopy(template)  # same initial weights for every run
            if arm == "plain":
                rates[arm].append(run_plain(module, batches, device, args.warmup))
            else:
                rates[arm].append(run_lightning(module, batches, precision, args.warmup))
            print(f"  run {repeat + 1} {arm:>9}: {rates[arm][-1]:,.0f} tokens/s")
    lightning, plain = statistics.median(rates["lightning"]), statistics.median(rates["plain"])
    print(f"median tokens/s   lightning {lightning:,.0f}   plain PyTorch {plain:,.0f}   "
          f"ratio {lightning / plain:.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
