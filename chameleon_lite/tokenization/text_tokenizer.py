"""Text tokenizer: a thin wrapper over a sentencepiece BPE model with byte fallback.

Design choices (each one is about exact, safe round trips):
- BPE with ``byte_fallback``: any unicode string encodes, nothing maps to ``<unk>``.
- ``identity`` normalisation, no dummy prefix, whitespace kept as is: ``decode(encode(s)) == s`` for every
  valid unicode string (emoji, CJK, RTL, NUL bytes, runs of spaces, newlines).
- sentencepiece writes spaces as the meta symbol ``▁`` (U+2581), so a *literal* ``▁`` in user text would decode to
  a space. We split on it and emit its three UTF-8 byte pieces instead, which decode back to ``▁``.
- No ``user_defined_symbols``: sentencepiece matches those in raw text. The multimodal control tokens
  (``<boi>``, ``<eoi>``, ...) live outside the sentencepiece id range (see :mod:`chameleon_lite.tokenization.vocab`),
  and the
  text ``"</s>"`` encodes as ordinary pieces, never as the eos id.
- A requested vocabulary larger than the corpus supports is capped (with a warning) instead of failing.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

log = logging.getLogger(__name__)

META_SPACE = "\u2581"  # sentencepiece's whitespace symbol
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_MIN_VOCAB = 256 + 4 + 1  # byte pieces + unk/bos/eos/pad + at least one learned piece
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


class TextTokenizer:
    """Encode and decode text with a sentencepiece model.

    Ids are in ``[0, vocab_size)``; ``unk=0, bos=1, eos=2, pad=3``, then 256 byte pieces, then learned pieces.
    """

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        for name, want in (("unk", UNK_ID), ("bos", BOS_ID), ("eos", EOS_ID), ("pad", PAD_ID)):
            got = getattr(self.sp, f"{name}_id")()
            if got != want:
                raise ValueError(
                    f"sentencepiece model has {name}_id={got}, expected {want} (train it with TextTokenizer.train)"
                )
        self._meta_space_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in META_SPACE.encode("utf-8")]
        if any(self.sp.is_unknown(i) for i in self._meta_space_bytes):
            raise ValueError("sentencepiece model was trained without byte_fallback; exact round trips need it")

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(
        cls,
        corpus: Iterable[str] | str | Path | Sequence[str | Path],
        vocab_size: int = 1024,
        *,
        character_coverage: float = 1.0,
        max_sentence_length: int = 16384,
    ) -> TextTokenizer:
        """Train a BPE model from an iterable of strings, or from one or more text files (one sentence per line).

        A ``vocab_size`` larger than the corpus supports is capped to the largest size it supports, with a warning.
        """
        if vocab_size < _MIN_VOCAB:
            raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback alone needs {_MIN_VOCAB}")
        sentences = list(_iter_corpus(corpus))
        if not any(s.strip() for s in sentences):
            raise ValueError("the text corpus is empty: cannot train a tokenizer")
        kwargs = dict(
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_length,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            num_threads=1,  # BPE training is deterministic with one thread and the whole corpus (no sampling)
            minloglevel=2,
        )
        try:
            proto = _train_proto(sentences, vocab_size, kwargs)
        except RuntimeError as err:
            match = _TOO_HIGH.search(str(err))
            if match is None:
                raise
            capped = int(match.group(2))
            warnings.warn(
                f"text vocab_size={vocab_size} is larger than this corpus supports; capped to {capped}", stacklevel=2
            )
            proto = _train_proto(sentences, capped, kwargs)
        return cls(proto)

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load a ``.model`` file written by :meth:`save` (or by sentencepiece itself)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer model not found: {path}")
        try:
            return cls(path.read_bytes())
        except RuntimeError as err:  # sentencepiece's parse failure
            raise ValueError(f"{path} is not a valid sentencepiece model: {err}") from err

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self._proto)

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    bos_id, eos_id, pad_id, unk_id = BOS_ID, EOS_ID, PAD_ID, UNK_ID

    def id_to_piece(self, i: int) -> str:
        self._check_ids([i])
        return self.sp.id_to_piece(i)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids. Never yields a control id (bos/eos only when asked for with ``bos``/``eos``)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        _check_encodable(text)
        ids: list[int] = [BOS_ID] if bos else []
        for k, part in enumerate(text.split(META_SPACE)):
            if k:
                ids.extend(self._meta_space_bytes)
            if part:
                ids.extend(self.sp.encode(part))
        if eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Control pieces (bos/eos/pad) decode to nothing; ids outside the vocabulary raise ValueError."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self.sp.decode(ids)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def _check_ids(self, ids: Sequence[int]) -> None:
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the text vocabulary [0, {n})")


def _train_proto(sentences: list[str], vocab_size: int, kwargs: dict) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, **kwargs)
    return buf.getvalue()


def _iter_corpus(corpus: Iterable[str] | str | Path | Sequence[str | Path]) -> Iterable[str]:
    """Strings pass through; ``Path`` objects (alone or in a list) are read as text files, one sentence per line."""
    items = [corpus] if isinstance(corpus, (str, Path)) else corpus
    for item in items:
        if isinstance(item, Path):
            with open(item, encoding="utf-8") as f:
                for line in f:
                    yield line.rstrip("\n")
        elif isinstance(item, str):
            _check_encodable(item)
            yield from item.split("\n")
        else:
            raise TypeError(f"corpus items must be str or Path, got {type(item).__name__}")


def _check_encodable(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text is not valid unicode (lone surrogate at position {err.start})") from err
