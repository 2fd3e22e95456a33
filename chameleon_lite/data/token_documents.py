"""Token shards -> every sample in every task format, as flat arrays (the token datamodule's source).

::

    docs = load_token_documents("data/tokens/train", load_bundle("tokenizers/shapes-64", load_image_tokenizer=False))
    docs.ids[docs.doc_start[d]:docs.doc_start[d] + docs.doc_len[d]]  # document d, vocabulary ids

Token samples (``chameleon_lite.data.pretokenize``) become documents in every format of their kind, as
:mod:`chameleon_lite.data.task_formats` defines them (``I`` is an image, ``Vocab.image_to_ids``; the loss covers
the tokens in ``[...]``)::

    pair -> caption             <bos> I [caption <eos>]
         -> generation          <bos> caption <boi> [c_0 .. c_{h*w-1} <eoi>] <eos>
         -> generation_uncond   <bos> <boi> [c_0 .. c_{h*w-1} <eoi>] <eos>       (caption dropped, for CFG)
    qa   -> qa                  <bos> I question <sep> [answer <eos>]
         -> qa_per_image        <bos> I q_1 <sep> [a_1 <eos>] q_2 <sep> [a_2 <eos>] ..   (every question about I)
    doc  -> doc                 <bos> [text I text I .. <eos>]

Notable design choices:

- **Generation documents have no loss on their final ``<eos>``**: without its caption, ``<bos> I <eos>`` has the
  same prefix as a caption document, and teaching ``<eos>`` right after ``<eoi>`` there would fight the caption
  task. Generation stops by the grid size anyway.
- **Questions per image.** The questions about one picture (QA samples with identical codes: a scene's questions)
  also form one ``qa_per_image`` document, stored with the first of them:
  the image is read once for all its questions, about 2.7x fewer tokens per question in the 48-px world. Its first
  question sees exactly the single-question prompt, so evaluation prompts are unchanged. ``doc_samples`` counts
  the samples a document holds (the unit of a sample budget).
- **Validated once, cached.** Shards are checked against the bundle (``tokens.yaml`` field by field; code counts,
  code and text id ranges, no ``<bos>``/``<eos>``/``<pad>`` inside text; naming the shard and the sample), then
  the formatted arrays are cached in the package's cache directory (:mod:`chameleon_lite.data.cache`; never
  beside the shards), keyed by the token directory's path, the shard names, sizes and mtimes and the bundle's
  layout. Shapes world train split (93k samples): about 4 s to parse, 0.1 s from the cache.
- **A small tar reader** (headers and pax records; anything unusual falls back to ``tarfile``): ``tarfile``
  spends most of its time on pax headers and would triple the parse time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from chameleon_lite.data import cache as data_cache
from chameleon_lite.data.pretokenize import KINDS, RECORD_FILE, token_record
from chameleon_lite.data.readers import list_shards
from chameleon_lite.data.task_formats import (
    FORMATS,
    PAIR_FORMATS,
    QA_FORMATS,
    SAMPLE_FORMATS,
    column,
    control_ids,
    document_pieces,
)
from chameleon_lite.tokenization.bundle import TokenizerBundle
from chameleon_lite.tokenization.vocab import Vocab

__all__ = ["PAIR_FORMATS", "QA_FORMATS", "TokenDocuments", "load_token_documents", "check_token_record",
           "tokenize_hint"]

logger = logging.getLogger(__name__)

QA_PER_IMAGE_MAX = 12  # questions in one qa_per_image document (identical pictures of several scenes are chunked)
CACHE_VERSION = 3


def tokenize_hint(token_dir: str | os.PathLike, tokenizer: str | os.PathLike) -> str:
    """The commands that create ``token_dir`` (split name taken from the directory name)."""
    split = Path(token_dir).name or "train"
    return (f'chameleon-lite tokenize --tokenizer {tokenizer} --shards "data/shapes/{split}/*.tar" --out {token_dir}'
            " (raw shards come from: chameleon-lite data shapes --out data/shapes)")


@dataclass
class TokenDocuments:
    """Every sample of a token directory in every format it can take, as flat arrays.

    Attributes:
        ids: ``(N_tok,)`` int32, the formatted documents back to back (vocabulary ids).
        loss: ``(N_tok,)`` bool, True where a token is a loss target (predicted from the token before it).
        doc_start, doc_len: ``(N_doc,)`` int64, where each formatted document lies in ``ids``.
        doc_samples: ``(N_doc,)`` int64, how many samples a document holds (1, or the questions of a
            ``qa_per_image`` document).
        sample_kind: ``(N,)`` int8, index into ``KINDS``.
        sample_key: ``(N,)`` str, the sample's webdataset key.
        sample_formats: ``(N, 3)`` int64 document per format, columns as ``task_formats.SAMPLE_FORMATS`` (a pair
            has ``PAIR_FORMATS``, a QA sample ``QA_FORMATS`` (``qa_per_image`` is -1 unless it is the first question
            about its image), a doc ``("doc",)``; -1 where a sample has no such format).
    """

    ids: np.ndarray
    loss: np.ndarray
    doc_start: np.ndarray
    doc_len: np.ndarray
    doc_samples: np.ndarray
    sample_kind: np.ndarray
    sample_key: np.ndarray
    sample_formats: np.ndarray

    def __len__(self) -> int:
        return len(self.sample_kind)

    def counts(self) -> dict[str, int]:
        return {k: int((self.sample_kind == i).sum()) for i, k in enumerate(KINDS)}

    def max_len(self, qa_per_image: bool = False) -> np.ndarray:
        """``(N,)`` the longest formatted document of each sample, among the formats in use (for QA samples
        either the single-question document or, with ``qa_per_image``, the per-image one; 0 if it has none)."""
        formats = self.sample_formats.copy()
        is_qa = self.sample_kind == KINDS.index("qa")
        formats[is_qa, column("qa") if qa_per_image else column("qa_per_image")] = -1
        lens = np.where(formats >= 0, self.doc_len[np.maximum(formats, 0)], 0)
        return lens.max(axis=1)


def check_token_record(token_dir: Path, bundle: TokenizerBundle) -> str:
    """Raise ValueError naming the first ``tokens.yaml`` field that disagrees with ``bundle``; return its text."""
    path = token_dir / RECORD_FILE
    text = path.read_text(encoding="utf-8")
    record = OmegaConf.to_container(OmegaConf.create(text))
    for name, want in token_record(bundle).items():
        have = record.get(name) if isinstance(record, dict) else None
        if have != want:
            raise ValueError(f"{path}: {name}={have!r} but the tokenizer bundle {bundle.name!r} has {name}={want!r}; "
                             "these token shards were made with another tokenizer (re-tokenize them)")
    return text


def load_token_documents(token_dir: str | os.PathLike, bundle: TokenizerBundle, *, cache: bool = True,
                         tokenizer_hint: str = "tokenizers/shapes-64",
                         cache_dir: str | os.PathLike | None = None) -> TokenDocuments:
    """Read and validate every token shard of ``token_dir`` (cached, see the module docstring).

    ``cache_dir``: where the parsed documents are cached (default: ``data.cache.default_cache_dir()``); nothing is
    ever written in ``token_dir``. Only this package's earlier cache of the same ``token_dir`` is replaced.

    Raises:
        FileNotFoundError: no directory, no ``tokens.yaml`` or no shards (names the command that makes them).
        ValueError: ``tokens.yaml`` disagrees with ``bundle`` (names the field); a malformed sample, a wrong number
            of image codes, a code outside the codebook or a text id outside the text range (names the sample key).
    """
    token_dir = Path(token_dir)
    if not (token_dir / RECORD_FILE).is_file():
        raise FileNotFoundError(f"no token shards at {token_dir} (no {RECORD_FILE}); make them with: "
                                f"{tokenize_hint(token_dir, tokenizer_hint)}")
    record_text = check_token_record(token_dir, bundle)
    try:
        shards = list_shards(str(token_dir))
    except ValueError as err:
        raise FileNotFoundError(f"no token shards in {token_dir} ({err}); make them with: "
                                f"{tokenize_hint(token_dir, tokenizer_hint)}") from err
    start = time.perf_counter()
    stats = [(Path(s).name, os.stat(s).st_size, os.stat(s).st_mtime_ns) for s in shards]
    layout = {"version": CACHE_VERSION, "shards": stats, "record": record_text, "vocab": bundle.vocab.to_dict(),
              "grid": list(bundle.image_grid), "use_eol": bundle.use_eol}
    digest = hashlib.sha1(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]
    cache_file = None
    if cache:
        try:
            cache_file = data_cache.cache_file(data_cache.owned_cache_dir(cache_dir), "documents",
                                               data_cache.source_key(token_dir.resolve()), digest, ".npz")
        except OSError as err:
            logger.warning("no document cache (cannot create the cache directory): %s", err)
    if cache_file is not None and cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as z:
            docs = TokenDocuments(**{name: z[name] for name in TokenDocuments.__dataclass_fields__})
        source = "cache"
    else:
        docs = _parse_shards(shards, bundle)
        source = "shards"
        if cache_file is not None:
            _write_cache(docs, cache_file)
    logger.info("%s: %d samples %s from %s in %.2fs", token_dir, len(docs), docs.counts(), source,
                time.perf_counter() - start)
    return docs


def _write_cache(docs: TokenDocuments, cache_file: Path) -> None:
    """Write ``cache_file`` atomically, then drop this package's earlier cache of the same token directory."""
    try:
        tmp = cache_file.with_name(f".{cache_file.stem}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **{name: getattr(docs, name) for name in TokenDocuments.__dataclass_fields__})
        os.replace(tmp, cache_file)  # atomic: concurrent ranks write identical content
        data_cache.prune_stale(cache_file)  # only files named documents-<this source>-*.npz, in a tagged directory
    except OSError as err:
        logger.warning("could not write the document cache %s: %s", cache_file, err)


class _Samples:
    """Samples as parsed from JSON: segments refer to image rows and text spans collected here."""

    def __init__(self, grid_size: int):
        self.grid_size = grid_size
        self.keys: list[str] = []
        self.where: list[str] = []  # shard per sample, for error messages
        self.kinds: list[int] = []
        self.layouts: list[list[tuple[str, int]]] = []  # ("image" | "text" | "question" | "answer", index)
        self.images: list[list[int]] = []
        self.texts: list[list[int]] = []

    def fail(self, i: int, problem: str) -> ValueError:
        return ValueError(f"{self.where[i]}: sample {self.keys[i]!r}: {problem}")

    def add(self, key: str, shard: str, record: Any) -> None:
        i = len(self.keys)
        self.keys.append(key)
        self.where.append(shard)
        if not isinstance(record, dict) or record.get("kind") not in KINDS:
            kind = record.get("kind") if isinstance(record, dict) else None
            raise self.fail(i, f"'kind' is {kind!r}, expected one of {list(KINDS)}")
        kind = record["kind"]
        self.kinds.append(KINDS.index(kind))
        layout = []
        segments = record.get("tokens")
        if not isinstance(segments, list) or not segments:
            raise self.fail(i, "'tokens' must be a non-empty list of segments")
        for seg in segments:
            if not (isinstance(seg, dict) and len(seg) == 1 and isinstance(next(iter(seg.values())), list)):
                raise self.fail(i, f"a segment must be {{'text': [...]}} or {{'image': [...]}}, got {str(seg)[:80]}")
            ((name, values),) = seg.items()
            layout.append((name, self._store(i, name, values)))
        names = [name for name, _ in layout]
        if kind == "pair" and sorted(names) != ["image", "text"]:
            raise self.fail(i, f"a pair needs one image and one text segment, got {names}")
        if kind == "qa":
            if names != ["image"]:
                raise self.fail(i, f"a qa sample needs exactly one image segment, got {names}")
            for name in ("question", "answer"):
                if not isinstance(record.get(name), list):
                    raise self.fail(i, f"a qa sample needs a {name!r} list of text ids")
                layout.append((name, self._store(i, "text", record[name])))
        self.layouts.append(layout)

    def _store(self, i: int, name: str, values: list) -> int:
        if name == "image":
            if len(values) != self.grid_size:
                raise self.fail(i, f"an image has {len(values)} codes, the bundle's grid needs {self.grid_size}")
            self.images.append(values)
            return len(self.images) - 1
        if name != "text":
            raise self.fail(i, f"unknown segment type {name!r}")
        self.texts.append(values)
        return len(self.texts) - 1


def _int_array(values: list, what: str, owner: Any, samples: _Samples) -> np.ndarray:
    """``values`` (ints, or equal-length int lists) as int64; a non-integer raises naming its sample."""
    try:
        arr = np.array(values)
    except ValueError:  # ragged: a nested list where an int belongs
        arr = np.array([], dtype=object)
    if not values:
        return np.zeros(0, np.int64)
    if arr.dtype.kind not in "iu":
        for j, v in enumerate(values):
            if not all(type(c) is int for c in (v if isinstance(v, list) else [v])):
                raise samples.fail(owner(j), f"{what} must be integers")
    return arr.astype(np.int64)


def _parse_shards(shards: Sequence[str], bundle: TokenizerBundle) -> TokenDocuments:
    vocab, (h, w) = bundle.vocab, bundle.image_grid
    samples = _Samples(h * w)
    for shard in shards:
        for name, raw in _json_members(shard):
            key = name.split(".", 1)[0]  # webdataset's key: the member name up to its first dot
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{shard}: sample {key!r}: {name} is not valid JSON: {err}") from err
            samples.add(key, shard, record)
    # validate all codes and text ids at once, naming the first offending sample
    image_owner = np.zeros(len(samples.images), np.int64)
    text_owner = np.zeros(len(samples.texts), np.int64)
    for i, layout in enumerate(samples.layouts):
        for name, j in layout:
            (image_owner if name == "image" else text_owner)[j] = i
    codes = _int_array(samples.images, "image codes", lambda j: int(image_owner[j]), samples).reshape(-1, h * w)
    bad = ((codes < 0) | (codes >= vocab.codebook_size)).any(axis=1)
    if bad.any():
        row = int(bad.argmax())
        code = int(codes[row][(codes[row] < 0) | (codes[row] >= vocab.codebook_size)][0])
        problem = f"image code {code} is outside the codebook [0, {vocab.codebook_size})"
        raise samples.fail(int(image_owner[row]), problem)
    text_lens = np.fromiter((len(t) for t in samples.texts), np.int64, len(samples.texts))
    text_start = np.concatenate([[0], np.cumsum(text_lens)])

    def text_sample(pos: int) -> int:
        return int(text_owner[int(np.searchsorted(text_start, pos, side="right")) - 1])

    text = _int_array(list(chain.from_iterable(samples.texts)), "text ids", text_sample, samples)
    bad_text = (text < 0) | (text >= vocab.n_text)
    if bad_text.any():
        pos = int(bad_text.argmax())
        raise samples.fail(text_sample(pos), f"text id {int(text[pos])} is outside the text range [0, {vocab.n_text})")
    # the documents add <bos>/<eos> themselves and pad with <pad>: inside text these ids would end a document early
    # or be masked as padding (the sentencepiece tokenizer never writes them into a text)
    controls = {vocab.bos: "<bos>", vocab.eos: "<eos>", vocab.pad: "<pad>"}
    bad_text = np.isin(text, list(controls))
    if bad_text.any():
        pos = int(bad_text.argmax())
        raise samples.fail(text_sample(pos), f"text id {int(text[pos])} is {controls[int(text[pos])]}, which only the "
                           "document formats place; a text segment may not contain <bos>, <eos> or <pad>")
    # (N_img, n_img_tok): <boi> codes [<eol> per row] <eoi>
    images = vocab.image_to_ids(torch.from_numpy(codes).view(-1, h, w), eol=bundle.use_eol).int().numpy()
    return _format_documents(samples, images, text.astype(np.int32), text_start, vocab)


def _format_documents(samples: _Samples, images: np.ndarray, text: np.ndarray, text_start: np.ndarray,
                      vocab: Vocab) -> TokenDocuments:
    """Build every format of every sample (``task_formats.SAMPLE_FORMATS`` of its kind)."""
    controls = {name: np.array(ids, np.int32) for name, ids in control_ids(vocab).items()}
    pieces: list[np.ndarray] = []
    flags: list[bool] = []
    doc_len: list[int] = []
    formats = np.full((len(samples.keys), max(map(len, SAMPLE_FORMATS.values()))), -1, np.int64)
    group_sizes: dict[int, int] = {}  # document -> samples it holds, where more than one

    def doc(fmt: str, fields: dict, items: list[dict] | None = None) -> int:
        n = 0
        for arr, in_loss in document_pieces(FORMATS[fmt], fields, controls, items):
            pieces.append(arr)
            flags.append(in_loss)
            n += len(arr)
        doc_len.append(n)
        return len(doc_len) - 1

    def seg(name: str, j: int) -> np.ndarray:
        return images[j] if name == "image" else text[text_start[j]:text_start[j + 1]]

    qa_groups = _qa_groups(samples, images)
    for i, (kind, layout) in enumerate(zip(samples.kinds, samples.layouts)):
        parts = {name: seg(name, j) for name, j in layout}
        kind = KINDS[kind]
        if kind == "pair":
            fields = {"image": parts["image"], "caption": parts["text"]}
        elif kind == "qa":
            fields = parts
        else:
            fields = {"segments": [seg(name, j) for name, j in layout]}
        if i in qa_groups:  # the first question about this image: every question about it in one document
            questions = [{name: seg(name, j) for name, j in samples.layouts[q]} for q in qa_groups[i]]
            d = formats[i, column("qa_per_image")] = doc("qa_per_image", fields, questions)
            group_sizes[d] = len(questions)
        for name in SAMPLE_FORMATS[kind]:
            if name != "qa_per_image":
                formats[i, column(name)] = doc(name, fields)
    lens = np.fromiter((len(p) for p in pieces), np.int64, len(pieces))
    doc_len_arr = np.asarray(doc_len, np.int64)
    doc_samples = np.ones(len(doc_len), np.int64)
    doc_samples[list(group_sizes)] = list(group_sizes.values())
    return TokenDocuments(
        ids=np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32),
        loss=np.repeat(np.asarray(flags, bool), lens),
        doc_start=np.concatenate([[0], np.cumsum(doc_len_arr)[:-1]]).astype(np.int64),
        doc_len=doc_len_arr,
        doc_samples=doc_samples,
        sample_kind=np.asarray(samples.kinds, np.int8),
        sample_key=np.asarray(samples.keys, dtype=str),
        sample_formats=formats,
    )


def _qa_groups(samples: _Samples, images: np.ndarray) -> dict[int, list[int]]:
    """First QA sample of each group -> the group: the QA samples about one distinct image, in sample order, in
    chunks of at most ``QA_PER_IMAGE_MAX``.

    Grouped by the image's codes, not by position: pre-tokenization interleaves the shards its workers read.
    """
    groups: dict[bytes, list[int]] = {}
    for i, (kind, layout) in enumerate(zip(samples.kinds, samples.layouts)):
        if KINDS[kind] == "qa":
            groups.setdefault(images[dict(layout)["image"]].tobytes(), []).append(i)
    chunks = [m[j:j + QA_PER_IMAGE_MAX] for m in groups.values() for j in range(0, len(m), QA_PER_IMAGE_MAX)]
    return {chunk[0]: chunk for chunk in chunks}


def _json_members(shard: str) -> Iterator[tuple[str, bytes]]:
    """``(member name, bytes)`` of the ``*.json`` members of a tar file, in order."""
    data = Path(shard).read_bytes()
    out: list[tuple[str, bytes]] = []
    pos, long_name = 0, None
    while pos + 512 <= len(data):
        header = data[pos:pos + 512]
        if not header.strip(b"\0"):
            break  # end-of-archive blocks
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            checksum_ok = int(header[148:156].rstrip(b"\0 "), 8) == sum(header) - sum(header[148:156]) + 8 * 32
        except ValueError:
            checksum_ok = False
        kind = header[156:157]
        if not checksum_ok or kind not in (b"0", b"\0", b"x", b"g", b"5"):
            yield from _json_members_tarfile(shard)  # an unusual tar: let the standard library read it
            return
        body = data[pos + 512:pos + 512 + size]
        pos += 512 + -(-size // 512) * 512
        if kind == b"x":  # pax records "LEN key=value\n": only a path override matters here
            for line in body.decode("utf-8").splitlines():
                key, _, value = line.partition(" ")[2].partition("=")
                if key == "path":
                    long_name = value
        elif kind in (b"0", b"\0"):
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
            name = long_name or header[:100].split(b"\0", 1)[0].decode("utf-8")
            name = f"{prefix}/{name}" if prefix and not long_name else name
            long_name = None
            if name.endswith(".json"):
                out.append((name, body))
    yield from out


def _json_members_tarfile(shard: str) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                yield member.name, tar.extractfile(member).read()
