"""Finish VQ tokenizer training by writing a tokenizer bundle: VQ weights, a text tokenizer, measured quality.

``ExportTokenizerBundle`` is a Lightning callback (add it under ``trainer.callbacks`` in a recipe). When fit ends it

1. trains the sentencepiece text tokenizer on the text of the same data (captions, questions and answers,
   document text) — see :func:`shard_texts`;
2. lays out the unified vocabulary (text pieces, control tokens, the VQ codebook) and saves the bundle;
3. evaluates the tokenizer on held-out images (:func:`evaluate_image_tokenizer`) and writes the figures, the
   recipe command and the training time into the bundle's README and ``quality.json``.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path

import lightning as L

from chameleon_lite.data.pretokenize import shards_by_kind
from chameleon_lite.data.readers import interleaved_dataset, pair_dataset, qa_dataset
from chameleon_lite.eval.tokenizer_eval import evaluate_image_tokenizer, format_report, reconstruction_grid
from chameleon_lite.safe_io import check_writable_dir
from chameleon_lite.tokenization.bundle import TokenizerBundle, save_bundle
from chameleon_lite.tokenization.text_tokenizer import TextTokenizer
from chameleon_lite.tokenization.vocab import Vocab

QUALITY_FILE = "quality.json"
GRID_FILE = "reconstructions.png"


def shard_texts(patterns: Sequence[str]) -> Iterator[str]:
    """Every piece of text in pair (``pairs-*``), QA (``qa-*``) and document (``docs-*``) shards.

    Each shard is read by its kind (``shard_kind``: from its file name; anything else is image–caption pairs).
    """
    for pattern in patterns:
        for kind, shards in shards_by_kind(pattern).items():
            if kind == "qa":
                for s in qa_dataset(shards):
                    yield s["question"]
                    yield s["answer"]
            elif kind == "doc":
                for s in interleaved_dataset(shards):
                    yield from (seg for seg in s["segments"] if isinstance(seg, str))
            else:
                for s in pair_dataset(shards):
                    yield s["text"]


class ExportTokenizerBundle(L.Callback):
    """Write ``out_dir`` as a tokenizer bundle when training ends (rank 0 only).

    Args:
        out_dir: bundle directory, e.g. ``tokenizers/shapes-64``.
        text_shards: shard patterns whose text trains the text tokenizer.
        text_vocab_size: requested sentencepiece vocabulary (capped, with a warning, if the text is too small).
        eval_shards: image–caption shards to measure the tokenizer on (held out from training).
        eval_images: at most this many images are evaluated.
        world: ``world.yaml`` of a shapes world; when given, parser agreement is measured too.
        name: bundle name (defaults to the directory name).
    """

    def __init__(
        self,
        out_dir: str,
        text_shards: list[str],
        text_vocab_size: int = 1024,
        eval_shards: str | None = None,
        eval_images: int = 1000,
        world: str | None = None,
        name: str | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.text_shards = list(text_shards)
        self.text_vocab_size = text_vocab_size
        self.eval_shards, self.eval_images = eval_shards, eval_images
        self.world = world
        self.name = name or self.out_dir.name
        self._start = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_writable_dir(self.out_dir)  # save_bundle would refuse it at the end: refuse before training
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        train_seconds = time.perf_counter() - self._start
        model = pl_module.tokenizer.cpu().eval()
        text = TextTokenizer.train(list(shard_texts(self.text_shards)), vocab_size=self.text_vocab_size)
        vocab = Vocab(n_text=text.vocab_size, codebook_size=model.codebook_size)
        bundle = TokenizerBundle(name=self.name, text=text, vocab=vocab, image_grid=model.grid, image_tokenizer=model)
        quality = {"train_seconds": round(train_seconds, 1), "steps": trainer.global_step}
        if self.eval_shards:
            world_config = None
            if self.world:
                from chameleon_lite.world.shapes_world import load_world_spec

                world_config = load_world_spec(self.world).world
            images = (s["image"] for s in islice(pair_dataset(self.eval_shards, require_text=False), self.eval_images))
            quality.update(evaluate_image_tokenizer(model, images, world=world_config, total=self.eval_images))
        extra: dict[str, str | bytes] = {QUALITY_FILE: json.dumps(quality, indent=2) + "\n"}
        if self.eval_shards:
            first = [s["image"] for s in islice(pair_dataset(self.eval_shards, require_text=False), 12)]
            png = io.BytesIO()
            reconstruction_grid(model, first, world=world_config).save(png, format="PNG")
            extra[GRID_FILE] = png.getvalue()
        # one write_dir: the bundle, its grid and quality are listed in manifest.json (files it did not write stay)
        save_bundle(bundle, self.out_dir, readme=bundle_readme(bundle, quality, command=_command_line()),
                    extra_files=extra)
        print(f"tokenizer bundle written to {self.out_dir}\n{format_report(quality)}")


def _command_line() -> str:
    return "chameleon-lite " + " ".join(sys.argv[1:]) if sys.argv and "chameleon-lite" in sys.argv[0] else ""


def bundle_readme(bundle: TokenizerBundle, quality: dict, command: str = "") -> str:
    """The README of a trained bundle: layout, recipe, measured quality."""
    v, (h, w) = bundle.vocab, bundle.image_grid
    cfg = bundle.image_tokenizer.config
    lines = [
        f"# Tokenizer bundle `{bundle.name}`",
        "",
        "Made by `chameleon_lite` (see the package README)."
        " Load it with `chameleon_lite.tokenization.bundle.load_bundle`.",
        "",
        "| part | value |",
        "|---|---|",
        f"| text | sentencepiece BPE with byte fallback, {v.n_text} pieces (ids 0..{v.n_text - 1}) |",
        f"| control tokens | {', '.join(v.control_tokens)} + {v.n_reserved} reserved"
        f" (ids {v.n_text}..{v.image_offset - 1}) |",
        f"| image codes | {v.codebook_size} codes at ids {v.image_offset}..{v.size - 1} |",
        f"| image | {cfg.image_size}x{cfg.image_size} -> {h}x{w} = {h * w} codes ({cfg.quantizer}, "
        f"downsampling {cfg.downsample_factor}) |",
        "",
    ]
    if command:
        lines += ["## Recipe", "", "```bash", command, "```", ""]
    lines += ["## Measured quality", "", "```", format_report(quality), "```", ""]
    judged = "; green: the scene parser reads the same objects" if "parser_agreement" in quality else ""
    lines += [f"Originals (top) and reconstructions (bottom){judged}.", ""]
    lines += [f"![reconstructions]({GRID_FILE})", ""]
    return "\n".join(lines)
