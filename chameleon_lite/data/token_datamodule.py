"""Token documents -> packed training batches for the native early-fusion model.

::

    dm = TokenDataModule("data/tokens/train", "data/tokens/val", seq_len=512, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))  # dict of (B, T) tensors, the batch contract (below)
    dm.vocab, dm.bundle, dm.tokens_per_epoch

A batch holds (B, T = seq_len) tensors: ``input_ids`` (int64), ``targets`` (int64, already shifted, -100 where
nothing is predicted), ``weights`` (float32, per-modality loss weights multiplied in, 0 where targets is -100),
``target_is_image`` (bool, ``vocab.is_image(targets)``), ``position_ids`` (int64, restarting at 0 per document)
and ``document_ids`` (int64, 0, 1, ... per row; padding its own). Document formats and loss masks: see
``chameleon_lite.data.token_documents``.

Notable design choices:

- **Sampling between kinds:** by default every usable sample of each kind in ``kinds`` is used once per epoch
  (the natural mix: QA outnumbers pairs 7:1 in the shapes world). ``kind_repeats`` rescales a kind: ``2.0`` uses
  each sample twice per epoch, ``0.25`` a fresh seeded quarter of them each epoch. A pair becomes one document
  per use: a caption (probability ``caption_prob``) or a generation document (its caption dropped with
  probability ``cfg_dropout``); ``pair_formats="both"`` makes it both.
- **Per-modality weights:** targets that are image codes take ``image_loss_weight``; all others (text pieces and
  control tokens such as ``<eoi>``, ``<eos>``) take ``text_loss_weight``, matching ``target_is_image``.
- **Documents longer than seq_len are skipped**, counted per kind (``skipped_too_long``) and logged: truncation
  would cut an image's code grid or a document's end, and shapes-world documents are far shorter than any
  useful seq_len.
- **Packing** is greedy next-fit in the epoch's shuffled order: a document that does not fit closes the row,
  which is padded at its end (pad id, target -100, weight 0, its own document id, positions from 0).
- **One endless row stream.** Data epoch ``e`` (document choice, formats, order and packing: a pure function of
  ``(seed, e)``) is followed by data epoch ``e + 1``. Global batch ``g`` is rows ``[g*w*B, (g+1)*w*B)`` of the
  stream and rank ``r`` of ``w`` takes every ``w``-th of them, so ranks are disjoint and get equal counts and no
  row is ever dropped (a batch may straddle two data epochs). A Lightning epoch is ``len(loader)`` batches (data
  epoch 0's rows // (w*B)): Lightning fixes the length once, while packed epochs differ by a few rows.
- **Exact resume.** The train loader is stateful (Lightning saves its ``state_dict()`` in checkpoints and calls
  ``load_state_dict()`` before iterating). The state is the stream position, identical on all ranks, so a run
  resumed from any checkpoint sees exactly the batches of an uninterrupted run. A state saved under another
  configuration (seed, seq_len, batch size, world size, task mix, data) is refused, naming the field.
- **Validation** is a fixed packing (data epoch 0, no caption dropout, every sample once) of the val shards;
  rank ``r`` takes rows ``r::w`` of the first ``w * (rows // w)`` (fewer than ``w`` rows are left out, logged).
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import numpy as np
import torch

from chameleon_lite.data.pretokenize import KINDS
from chameleon_lite.data.task_formats import column
from chameleon_lite.data.token_documents import TokenDocuments, load_token_documents
from chameleon_lite.model.decoder import IGNORE_INDEX
from chameleon_lite.tokenization.bundle import TokenizerBundle, load_bundle
from chameleon_lite.tokenization.vocab import Vocab

__all__ = ["TaskMix", "EpochPlan", "DocumentPacker", "PackedBatchLoader", "FixedBatches", "TokenDataModule"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_STREAM_SUBSET, _STREAM_REPEAT, _STREAM_CAPTION, _STREAM_DROPOUT, _STREAM_ORDER = range(5)


# ------------------------------------------------------------------------------------------------ task mix


@dataclass(frozen=True)
class TaskMix:
    """Which documents an epoch holds and how they are weighted.

    Args:
        kinds: sample kinds to use (``pair``, ``qa``, ``doc``).
        kind_repeats: uses per epoch of each sample of a kind (default 1.0; fractions take a seeded subset).
        caption_prob: probability that a pair becomes a caption document rather than a generation document.
        qa_per_image: QA samples as ``qa_per_image`` documents (every question about an image after one copy of
            it; see ``token_documents``) instead of one document per question; ``kind_repeats["qa"]`` then
            counts images.
        both_pair_formats: emit every pair as both a caption and a generation document (ignores caption_prob).
        cfg_dropout: probability that a generation document loses its caption (for classifier-free guidance).
        text_loss_weight: loss weight of targets that are not image codes (text pieces and control tokens).
        image_loss_weight: loss weight of image-code targets.
        context_loss_weight: loss weight (times the modality weight) of the tokens a document is conditioned on,
            i.e. every token before its first target: the image and question of a QA document, the image of a
            caption document, the caption of a generation document. 0 (the default) trains on targets only;
            > 0 adds next-token loss on that context too ("loss on everything", as Chameleon trains), at no
            extra compute.
    """

    kinds: tuple[str, ...] = KINDS
    kind_repeats: Mapping[str, float] = field(default_factory=dict)
    caption_prob: float = 0.5
    qa_per_image: bool = False
    both_pair_formats: bool = False
    cfg_dropout: float = 0.1
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    context_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "kind_repeats", dict(self.kind_repeats))
        unknown = [k for k in (*self.kinds, *self.kind_repeats) if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown sample kind(s) {unknown}; known: {list(KINDS)}")
        if not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds must be non-empty and without duplicates, got {list(self.kinds)}")
        for kind, r in self.kind_repeats.items():
            if not r >= 0:
                raise ValueError(f"kind_repeats[{kind!r}]={r} must be >= 0")
        for name in ("caption_prob", "cfg_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("text_loss_weight", "image_loss_weight", "context_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")

    def repeats(self, kind: str) -> float:
        return float(self.kind_repeats.get(kind, 1.0))

    def fingerprint(self) -> dict[str, Any]:
        """The fields that decide which documents an epoch holds (weights do not)."""
        return {"kinds": list(self.kinds), "kind_repeats": {k: self.repeats(k) for k in self.kinds},
                "caption_prob": self.caption_prob, "both_pair_formats": self.both_pair_formats,
                "qa_per_image": self.qa_per_image,
                "cfg_dropout": self.cfg_dropout}


# ------------------------------------------------------------------------------------------------- packing


def _rng(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, *stream]))


@dataclass(frozen=True)
class EpochPlan:
    """One data epoch: documents in packing order and where each row starts."""

    order: np.ndarray  # (n_docs,) document ids (into TokenDocuments) in order
    row_starts: np.ndarray  # (n_rows + 1,) index into order of each row's first document; last = n_docs

    @property
    def n_rows(self) -> int:
        return len(self.row_starts) - 1


class DocumentPacker:
    """``(seed, epoch)`` -> the epoch's documents, formats, order and packing; rows -> batch tensors.

    Args:
        docs: the token documents.
        vocab: the vocabulary (named ids, image range).
        mix: task mix; ``samples``: sample indices to use (per kind filtering is done by the caller).
        seq_len: tokens per row.
        seed: base seed; data epoch ``e`` uses numpy generators seeded by ``(seed, e, stream)``.
    """

    def __init__(self, docs: TokenDocuments, vocab: Vocab, mix: TaskMix, samples: np.ndarray, seq_len: int,
                 seed: int):
        self.docs, self.vocab, self.mix, self.seq_len, self.seed = docs, vocab, mix, seq_len, seed
        self.samples = {k: samples[docs.sample_kind[samples] == KINDS.index(k)] for k in mix.kinds}
        if mix.qa_per_image and "qa" in self.samples:  # an image's document is stored with its first question
            qa = self.samples["qa"]
            self.samples["qa"] = qa[docs.sample_formats[qa, column("qa_per_image")] >= 0]
        self._plans: OrderedDict[int, EpochPlan] = OrderedDict()
        self._doc_loss: np.ndarray | None = None
        self.context: np.ndarray | None = None  # (N_tok,) context flags, computed when context_loss_weight > 0
        if mix.context_loss_weight > 0:  # True for a token before its document's first loss target
            seen = np.cumsum(docs.loss, dtype=np.int64)  # targets up to and including each token
            before_doc = np.repeat(seen[docs.doc_start] - docs.loss[docs.doc_start], docs.doc_len)
            self.context = seen - before_doc == 0

    def documents(self, epoch: int) -> np.ndarray:
        """Document ids of data epoch ``epoch``, unshuffled (kinds in ``mix.kinds`` order)."""
        chosen = []
        for kind in self.mix.kinds:
            samples = self.samples[kind]
            whole, frac = divmod(self.mix.repeats(kind), 1.0)
            picks = [np.tile(samples, int(whole))]
            if frac > 0:
                n = int(round(frac * len(samples)))
                rng = _rng(self.seed, epoch, _STREAM_REPEAT, KINDS.index(kind))
                picks.append(np.sort(rng.choice(samples, n, replace=False)))
            occurrences = np.concatenate(picks)
            formats = self.docs.sample_formats[occurrences]  # (n, 3), columns task_formats.SAMPLE_FORMATS[kind]
            if kind == "qa":
                chosen.append(formats[:, column("qa_per_image" if self.mix.qa_per_image else "qa")])
                continue
            if kind != "pair":
                chosen.append(formats[:, column(kind)])  # doc: its one format
                continue
            uncond = _rng(self.seed, epoch, _STREAM_DROPOUT).random(len(occurrences)) < self.mix.cfg_dropout
            generation = formats[np.arange(len(occurrences)),
                                 np.where(uncond, column("generation_uncond"), column("generation"))]
            captions = formats[:, column("caption")]
            if self.mix.both_pair_formats:
                chosen += [captions, generation]
            else:
                caption = _rng(self.seed, epoch, _STREAM_CAPTION).random(len(occurrences)) < self.mix.caption_prob
                chosen.append(np.where(caption, captions, generation))
        return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)

    def plan(self, epoch: int) -> EpochPlan:
        """Data epoch ``epoch``: its documents shuffled and packed next-fit into rows (cached, last few epochs)."""
        if epoch in self._plans:
            self._plans.move_to_end(epoch)
            return self._plans[epoch]
        order = _rng(self.seed, epoch, _STREAM_ORDER).permutation(self.documents(epoch))
        starts, fill = [], self.seq_len
        for i, n in enumerate(self.docs.doc_len[order].tolist()):
            if fill + n > self.seq_len:
                starts.append(i)
                fill = 0
            fill += n
        plan = EpochPlan(order=order, row_starts=np.asarray([*starts, len(order)], np.int64))
        self._plans[epoch] = plan
        if len(self._plans) > 4:
            self._plans.popitem(last=False)
        return plan

    def stats(self, epoch: int) -> dict[str, float]:
        """Documents, samples, rows, tokens (non-padding), loss targets and padding fraction of a data epoch."""
        plan = self.plan(epoch)
        tokens = int(self.docs.doc_len[plan.order].sum())
        if self._doc_loss is None:  # loss targets per document (every document has >= 2 tokens)
            self._doc_loss = np.add.reduceat(self.docs.loss.astype(np.int64), self.docs.doc_start)
        loss_tokens = int(self._doc_loss[plan.order].sum())
        rows = plan.n_rows
        samples = int(self.docs.doc_samples[plan.order].sum())
        return {"documents": len(plan.order), "samples": samples, "rows": rows, "tokens": tokens,
                "loss_tokens": loss_tokens, "padding": 1.0 - tokens / (rows * self.seq_len) if rows else 0.0}

    def batch(self, rows: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Rows ``(data epoch, row index)`` -> the batch of the contract, shapes ``(len(rows), seq_len)``."""
        T = self.seq_len
        B = len(rows)
        input_ids = np.full((B, T), self.vocab.pad, np.int64)
        targets = np.full((B, T), IGNORE_INDEX, np.int64)
        positions = np.zeros((B, T), np.int64)
        documents = np.zeros((B, T), np.int64)
        is_context = np.zeros((B, T), bool)  # targets that are context tokens (weighted by context_loss_weight)
        for b, (epoch, j) in enumerate(rows):
            plan = self.plan(epoch)
            docs = plan.order[plan.row_starts[j]:plan.row_starts[j + 1]]
            lens = self.docs.doc_len[docs]  # (n_docs_in_row,)
            ends = np.cumsum(lens)
            begins = ends - lens
            used = int(ends[-1])
            index = np.repeat(self.docs.doc_start[docs] - begins, lens) + np.arange(used)  # (used,)
            ids, loss = self.docs.ids[index], self.docs.loss[index]
            input_ids[b, :used] = ids
            if self.mix.context_loss_weight > 0:
                context = self.context[index]
                is_context[b, :used - 1] = context[1:]
                loss = loss | context
            targets[b, :used - 1] = np.where(loss[1:], ids[1:], IGNORE_INDEX)
            targets[b, ends - 1] = IGNORE_INDEX  # the last token of a document predicts nothing
            positions[b, :used] = np.arange(used) - np.repeat(begins, lens)
            positions[b, used:] = np.arange(T - used)  # padding is its own document
            documents[b, :used] = np.repeat(np.arange(len(docs)), lens)
            documents[b, used:] = len(docs)
        targets_t = torch.from_numpy(targets)
        is_image = self.vocab.is_image(targets_t)  # (B, T)
        weights = torch.where(is_image, self.mix.image_loss_weight, self.mix.text_loss_weight).float()
        if self.mix.context_loss_weight > 0:
            weights = torch.where(torch.from_numpy(is_context), weights * self.mix.context_loss_weight, weights)
        weights = weights.masked_fill(targets_t == IGNORE_INDEX, 0.0)
        return {"input_ids": torch.from_numpy(input_ids), "targets": targets_t, "weights": weights,
                "target_is_image": is_image, "position_ids": torch.from_numpy(positions),
                "document_ids": torch.from_numpy(documents)}


# ------------------------------------------------------------------------------------------------- loaders


class PackedBatchLoader:
    """The training iterable: the endless row stream cut into batches for one rank; stateful for exact resume.

    Each ``iter()`` yields one Lightning epoch of ``len(self)`` batches from the current stream position (after
    ``load_state_dict`` of a mid-epoch state: the rest of that epoch). Only batches actually taken advance the
    position, so unused iterators change nothing.

    Args:
        packer: makes the data epochs and their batches.
        batch_size: rows per batch on this rank.
        rank, world_size: this process's share: rows ``r, r + w, ...`` of each global batch of ``w * B`` rows.
        fingerprint: configuration a saved state must match to be loaded (seed, data, task mix, ...).
    """

    def __init__(self, packer: DocumentPacker, batch_size: int, rank: int = 0, world_size: int = 1,
                 fingerprint: Mapping[str, Any] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.packer, self.batch_size, self.rank, self.world_size = packer, batch_size, rank, world_size
        self.fingerprint = {"seed": packer.seed, "seq_len": packer.seq_len, "batch_size": batch_size,
                            "world_size": world_size, **packer.mix.fingerprint(), **(fingerprint or {})}
        self.batches_done = 0  # global batches taken since the start of training (same on every rank)
        self.epoch_batches_done = 0  # of them, in the current Lightning epoch
        self._continue_epoch = False
        self._rows_per_epoch: list[int] = []  # rows of data epochs 0, 1, ... planned so far
        self._first_row: list[int] = [0]  # cumulative: first stream row of each data epoch
        if self._epoch_rows(0) == 0:
            raise ValueError("no training documents: every sample was filtered out or too long for seq_len")

    def _epoch_rows(self, epoch: int) -> int:
        while len(self._rows_per_epoch) <= epoch:
            rows = self.packer.plan(len(self._rows_per_epoch)).n_rows
            self._rows_per_epoch.append(rows)
            self._first_row.append(self._first_row[-1] + rows)
        return self._rows_per_epoch[epoch]

    def __len__(self) -> int:
        return max(1, self._epoch_rows(0) // (self.world_size * self.batch_size))

    def rows(self, g: int) -> list[tuple[int, int]]:
        """``(data epoch, row)`` of this rank's rows of global batch ``g``."""
        out = []
        for q in range(g * self.world_size * self.batch_size + self.rank,
                       (g + 1) * self.world_size * self.batch_size, self.world_size):
            while q >= self._first_row[-1]:
                self._epoch_rows(len(self._rows_per_epoch))
            e = bisect.bisect_right(self._first_row, q) - 1
            out.append((e, q - self._first_row[e]))
        return out

    def batch(self, g: int) -> dict[str, torch.Tensor]:
        """This rank's global batch ``g`` (any ``g``: a pure function of the configuration)."""
        return self.packer.batch(self.rows(g))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self)
        if not self._continue_epoch:
            self.epoch_batches_done = 0
        self._continue_epoch = False
        while self.epoch_batches_done < n:
            batch = self.batch(self.batches_done)
            self.batches_done += 1  # counted before the yield: a checkpoint taken now includes this batch
            self.epoch_batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Stream position (plain Python types) plus the configuration it is valid for."""
        return {"version": STATE_VERSION, "batches_done": int(self.batches_done),
                "epoch_batches_done": int(self.epoch_batches_done),
                "rows_per_epoch": [int(r) for r in self._rows_per_epoch], "fingerprint": dict(self.fingerprint)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; raises ValueError naming the first setting that differs from it."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION}")
        saved = state["fingerprint"]
        for name in sorted(set(saved) | set(self.fingerprint)):
            if saved.get(name) != self.fingerprint.get(name):
                raise ValueError(f"cannot resume the data stream: the checkpoint has {name}={saved.get(name)!r}, "
                                 f"this run has {name}={self.fingerprint.get(name)!r}")
        rows = [int(r) for r in state["rows_per_epoch"]]
        if rows and rows[0] != self._epoch_rows(0):
            raise ValueError(f"cannot resume the data stream: data epoch 0 packed into {rows[0]} rows when the "
                             f"checkpoint was written and into {self._epoch_rows(0)} now (different data?)")
        self._rows_per_epoch = rows
        self._first_row = [0, *np.cumsum(rows).tolist()]
        self.batches_done = int(state["batches_done"])
        self.epoch_batches_done = int(state["epoch_batches_done"])
        self._continue_epoch = 0 < self.epoch_batches_done < len(self)


class FixedBatches:
    """A fixed list of packed rows, batched (the last batch may be smaller); for validation."""

    def __init__(self, packer: DocumentPacker, rows: Sequence[tuple[int, int]], batch_size: int):
        self.packer, self.rows, self.batch_size = packer, list(rows), batch_size

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, len(self.rows), self.batch_size):
            yield self.packer.batch(self.rows[i:i + self.batch_size])


# ---------------------------------------------------------------------------------------------- datamodule


class TokenDataModule(L.LightningDataModule):
    """Packed batches of token documents for the native model (batch format: module docstring and contract).

    Args:
        train_tokens: token directory (``chameleon-lite tokenize --out``) for training.
        val_tokens: token directory for validation (None: no validation loader).
        tokenizer: tokenizer bundle directory the shards were made with (checked against ``tokens.yaml``).
        seq_len: tokens per packed row.
        batch_size: rows per batch and process; ``val_batch_size`` defaults to it.
        kinds: sample kinds to use (default all: ``pair``, ``qa``, ``doc``).
        kind_repeats: uses per epoch of each sample of a kind, e.g. ``{qa: 0.5, pair: 2}`` (default 1 each).
        caption_prob: probability that a pair becomes a caption (image -> text) rather than a generation document.
        qa_per_image: train on one document per image holding all its questions (``TaskMix.qa_per_image``);
            validation keeps one document per question, the evaluation format.
        pair_formats: ``sample`` (one format per pair and epoch, by caption_prob) or ``both``.
        cfg_dropout: probability that a training generation document loses its caption.
        text_loss_weight: weight of text (and control token) targets; image_loss_weight: of image-code targets.
        context_loss_weight: loss weight of the context tokens of training documents (``TaskMix``); validation
            always measures the targets only.
        seed: seed of document choice, formats, order and packing (data epoch e uses (seed, e)).
        max_documents: use at most this many training samples (a seeded subset, the same every epoch).
        val_max_documents: use at most this many validation samples (a seeded subset).
        cache: cache parsed shards in the package's cache directory (``data.cache``; see ``load_token_documents``).
    """

    def __init__(
        self,
        train_tokens: str = "data/tokens/train",
        val_tokens: str | None = "data/tokens/val",
        tokenizer: str = "tokenizers/shapes-64",
        seq_len: int = 512,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        kinds: list[str] | None = None,
        kind_repeats: dict[str, float] | None = None,
        caption_prob: float = 0.5,
        qa_per_image: bool = False,
        pair_formats: Literal["sample", "both"] = "sample",
        cfg_dropout: float = 0.1,
        text_loss_weight: float = 1.0,
        image_loss_weight: float = 1.0,
        context_loss_weight: float = 0.0,
        seed: int = 0,
        max_documents: int | None = None,
        val_max_documents: int | None = None,
        cache: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {val_batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if pair_formats not in ("sample", "both"):
            raise ValueError(f"pair_formats must be 'sample' or 'both', got {pair_formats!r}")
        for name, cap in (("max_documents", max_documents), ("val_max_documents", val_max_documents)):
            if cap is not None and cap < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {cap}")
        self.train_tokens, self.val_tokens, self.tokenizer = train_tokens, val_tokens, tokenizer
        self.seq_len, self.seed, self.cache = seq_len, seed, cache
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.max_documents, self.val_max_documents = max_documents, val_max_documents
        self.mix = TaskMix(kinds=tuple(kinds or KINDS), kind_repeats=kind_repeats or {}, caption_prob=caption_prob,
                           qa_per_image=qa_per_image, both_pair_formats=pair_formats == "both",
                           cfg_dropout=cfg_dropout,
                           text_loss_weight=text_loss_weight, image_loss_weight=image_loss_weight,
                           context_loss_weight=context_loss_weight)
        self.val_mix = TaskMix(kinds=self.mix.kinds, caption_prob=caption_prob,
                               both_pair_formats=self.mix.both_pair_formats, cfg_dropout=0.0,
                               text_loss_weight=text_loss_weight, image_loss_weight=image_loss_weight)
        self.skipped_too_long: dict[str, dict[str, int]] = {}  # split -> kind -> samples skipped
        self._bundle: TokenizerBundle | None = None
        self._packers: dict[str, DocumentPacker] = {}
        self._train_loader: PackedBatchLoader | None = None

    # ------------------------------------------------------------------ bundle and data
    @property
    def bundle(self) -> TokenizerBundle:
        """The tokenizer bundle (loaded on first use, without the VQ weights)."""
        if self._bundle is None:
            from chameleon_lite.shipped import resolve_path  # a shipped bundle's name works from any directory

            self._bundle = load_bundle(resolve_path(self.tokenizer, kind="bundle"), load_image_tokenizer=False)
        return self._bundle

    @property
    def vocab(self) -> Vocab:
        return self.bundle.vocab

    def _packer(self, split: str) -> DocumentPacker:
        if split not in self._packers:
            token_dir = self.train_tokens if split == "train" else self.val_tokens
            docs = load_token_documents(token_dir, self.bundle, cache=self.cache, tokenizer_hint=self.tokenizer)
            mix, cap = (self.mix, self.max_documents) if split == "train" else (self.val_mix, self.val_max_documents)
            wanted = np.isin(docs.sample_kind, [KINDS.index(k) for k in mix.kinds])
            too_long = wanted & (docs.max_len(mix.qa_per_image) > self.seq_len)
            self.skipped_too_long[split] = {k: int((too_long & (docs.sample_kind == KINDS.index(k))).sum())
                                            for k in mix.kinds}
            if too_long.any():
                logger.warning("%s: skipped %d samples longer than seq_len=%d (by kind: %s), e.g. %r", token_dir,
                               int(too_long.sum()), self.seq_len, self.skipped_too_long[split],
                               str(docs.sample_key[too_long.argmax()]))
            usable = np.flatnonzero(wanted & ~too_long)
            if cap is not None and cap < len(usable):
                usable = np.sort(_rng(self.seed, 0, _STREAM_SUBSET).choice(usable, cap, replace=False))
            for kind in mix.kinds:
                if not (docs.sample_kind[usable] == KINDS.index(kind)).any():
                    logger.warning("%s: no usable %r samples", token_dir, kind)
            packer = DocumentPacker(docs, self.vocab, mix, usable, self.seq_len, self.seed)
            stats = packer.stats(0)
            logger.info("%s (%s): epoch 0 packs %d documents into %d rows of %d, %.1f%% padding", token_dir, split,
                        stats["documents"], stats["rows"], self.seq_len, 100 * stats["padding"])
            self._packers[split] = packer
        return self._packers[split]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._packer("train")
        if stage in (None, "fit", "validate") and self.val_tokens is not None:
            self._packer("val")

    @property
    def tokens_per_epoch(self) -> int:
        """Non-padding tokens in data epoch 0 of the training set (all ranks together)."""
        return int(self._packer("train").stats(0)["tokens"])

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self, rank: int | None = None, world_size: int | None = None) -> PackedBatchLoader:
        """The stateful training loader of this process (created once, so its position survives reloads)."""
        if rank is None or world_size is None:
            rank, world_size = self._rank_and_world_size()
        loader = self._train_loader
        if loader is None or (loader.rank, loader.world_size) != (rank, world_size):
            packer = self._packer("train")
            data = {"samples": int(sum(len(s) for s in packer.samples.values())),
                    "max_documents": self.max_documents}
            self._train_loader = PackedBatchLoader(packer, self.batch_size, rank, world_size, data)
        return self._train_loader

    def val_dataloader(self, rank: int | None = None, world_size: int | None = None) -> FixedBatches | list:
        """Fixed validation batches: rows ``rank::world_size`` of data epoch 0 (no caption dropout)."""
        if self.val_tokens is None:
            return []
        if rank is None or world_size is None:
            rank, world_size = self._rank_and_world_size()
        packer = self._packer("val")
        n_rows = packer.plan(0).n_rows
        used = n_rows - n_rows % world_size
        if used != n_rows:
            logger.info("validation: %d of %d rows left out so that %d ranks get equal counts", n_rows - used, n_rows,
                        world_size)
        return FixedBatches(packer, [(0, j) for j in range(rank, used, world_size)], self.val_batch_size)
