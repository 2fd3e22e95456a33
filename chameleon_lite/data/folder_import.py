"""Your own images: a folder of images plus captions (and optional questions) -> train/val/test shards in the
img2dataset layout every reader of this package takes (``chameleon-lite data import``).

::

    summary = import_folder("photos/", "runs/mydata", captions="photos/captions.csv", qa="photos/qa.jsonl",
                            val=0.05, test=0.1, seed=0)
    # runs/mydata/{train,val,test}/pairs-000000.tar (KEY.jpg KEY.txt KEY.json), qa-000000.tar, import.json

Captions come from one of:

- a CSV with a header naming ``file`` and ``caption`` columns (extra columns are kept in the sample's json; a
  ``split`` column, when present and not empty, puts the image in that split instead of the hashed one: an official
  test split stays the test split);
- a JSONL file of ``{"file": ..., "caption": ...}`` objects;
- sidecar text files: ``cat.jpg`` is captioned by ``cat.txt`` beside it (``captions=None``).

Questions (optional) are JSONL objects ``{"file", "question", "answer", "category"}`` (``category`` may be
omitted: ``""``; other fields such as ``pope_type`` are kept in the sample's json); they go to ``qa-*.tar`` of
the split their image falls in, so a test image's questions are never trained on. A JSONL captions record may
carry ``split`` too.

Notable choices:

- **The split is by image**, seeded: each image's split comes from a hash of its path and the seed, so adding
  images later does not move the old ones between splits (``val`` and ``test`` are fractions).
- **Bad input is counted, not fatal**, with the readers' own checks (``data.decoding.decode_image``: unreadable,
  truncated, empty, too large, extreme aspect ratio): each skip has a reason, and ``import.json`` holds the counts
  and the first examples of each. A caption or question naming a file that is not there, an image without a
  caption, an empty caption and a duplicate caption entry are counted too. A malformed captions file (no ``file``
  or ``caption`` column, a line that is not JSON) is an error naming the file and line.
- **Image bytes are written as given** for JPEG, PNG and WebP (no re-encoding loss); other formats (GIF, BMP,
  TIFF) are re-encoded as PNG. Pixels are not resized: the tokenizer and the baseline resize at read time.
- Writing follows every shard writer's rules (``data.shards.write_shards``): nothing the package did not write is
  replaced.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from chameleon_lite.data.decoding import ImageLimits, SkipSample, decode_image
from chameleon_lite.data.shards import DATA_KIND, check_shard_names, write_shards
from chameleon_lite.safe_io import check_listed, record_files

__all__ = ["import_folder", "ImportSummary", "IMAGE_SUFFIXES", "SPLITS"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
SUMMARY_FILE = "import.json"
_KEEP = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # written as given; anything else becomes PNG
_EXAMPLES = 5


@dataclass
class ImportSummary:
    """What an import wrote and skipped (also written to ``OUT/import.json``)."""

    pairs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    questions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> the first few files
    repaired: Counter = field(default_factory=Counter)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < _EXAMPLES:
            examples.append(where)

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "questions": self.questions, "skipped": dict(self.skipped),
                "skip_examples": self.examples, "repaired": dict(self.repaired)}


def _split_of(relpath: str, seed: int, val: float, test: float) -> str:
    """A stable split per image: a hash of its path and the seed, mapped to [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{relpath}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < test else "val" if u < test + val else "train"


def _read_captions(captions: Path) -> list[tuple[str, str, dict[str, Any], str]]:
    """``(file, caption, extra fields, where)`` rows of a CSV or JSONL captions file."""
    rows = []
    if captions.suffix.lower() == ".csv":
        with open(captions, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"file", "caption"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{captions}: the header must name the columns 'file' and 'caption' "
                                 f"(missing {sorted(missing)}; found {reader.fieldnames})")
            for line, row in enumerate(reader, start=2):
                extra = {k: v for k, v in row.items() if k not in ("file", "caption") and k is not None}
                rows.append((row["file"] or "", row["caption"] or "", extra, f"{captions}:{line}"))
        return rows
    for line, record in _jsonl(captions):
        if "file" not in record or "caption" not in record:
            raise ValueError(f"{captions}:{line}: a caption record needs 'file' and 'caption', got {sorted(record)}")
        extra = {k: v for k, v in record.items() if k not in ("file", "caption")}
        rows.append((str(record["file"]), str(record["caption"]), extra, f"{captions}:{line}"))
    return rows


def _jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError as err:
                raise ValueError(f"{path}:{line}: not a JSON object ({err})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line}: not a JSON object (got {type(record).__name__})")
            yield line, record


def _image_member(data: bytes, summary: ImportSummary, where: str) -> tuple[str, bytes] | None:
    """``(extension, bytes)`` to write, or None (counted) when the readers would skip the image."""
    try:
        image, repairs = decode_image(data, ImageLimits())
    except SkipSample as skip:
        summary.skip(skip.reason, where)
        return None
    summary.repaired.update(repairs)
    from PIL import Image

    fmt = Image.open(io.BytesIO(data)).format
    if fmt in _KEEP and "exif_orientation" not in repairs:
        return _KEEP[fmt], data
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # the decoded, upright RGB pixels
    return "png", buffer.getvalue()


def import_folder(images: str | os.PathLike, out: str | os.PathLike, *, captions: str | os.PathLike | None = None,
                  qa: str | os.PathLike | None = None, val: float = 0.05, test: float = 0.1, seed: int = 0,
                  shard_size: int = 1000, overwrite: bool = False, progress: bool = True) -> ImportSummary:
    """Import ``images`` (a folder, searched recursively) with their captions into ``out/{train,val,test}``.

    See the module docstring for the formats. Returns the summary (also written to ``out/import.json``).
    ``ValueError`` for bad arguments or a malformed captions / questions file; ``FileExistsError`` (before
    anything is written) when ``out`` holds shards or an ``import.json`` this package did not write.
    """
    images = Path(images)
    if not images.is_dir():
        raise ValueError(f"images={str(images)!r} is not a directory")
    if not (0.0 <= val < 1.0 and 0.0 <= test < 1.0 and val + test < 1.0):
        raise ValueError(f"need 0 <= val, test and val + test < 1; got val={val}, test={test}")
    out = Path(out)
    check_listed(out, [SUMMARY_FILE], kind=DATA_KIND)
    for split in SPLITS:  # every refusal before anything is written
        for prefix in ("pairs", "qa"):
            if check_shard_names(out / split, prefix) and not overwrite:
                raise ValueError(f"{out / split} already holds {prefix}-*.tar shards; pass overwrite=True "
                                 "(--overwrite) to replace the ones this package wrote")
    summary = ImportSummary()
    files = {p.relative_to(images).as_posix(): p for p in sorted(images.rglob("*"))
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    if captions is not None:
        rows = _read_captions(Path(captions))
    else:  # sidecar .txt files
        rows = []
        for rel, path in files.items():
            txt = path.with_suffix(".txt")
            if txt.is_file():
                rows.append((rel, txt.read_text(encoding="utf-8", errors="replace"), {}, str(txt)))
    caption_of: dict[str, tuple[str, dict[str, Any]]] = {}
    forced: dict[str, str] = {}  # a "split" field in the captions file overrides the hash (an official test split)
    for file, caption, extra, where in rows:
        rel = Path(file).as_posix().lstrip("./") if file else ""
        split = extra.pop("split", None)
        if split not in (None, "", *SPLITS):
            raise ValueError(f"{where}: split={split!r} must be one of {SPLITS} (or absent)")
        if rel not in files:
            summary.skip("caption_for_missing_file", where)
        elif not caption.strip():
            summary.skip("empty_caption", where)
        elif rel in caption_of:
            summary.skip("duplicate_caption", where)
        else:
            caption_of[rel] = (caption.strip(), extra)
            if split:
                forced[rel] = split
    for rel in files:
        if rel not in caption_of:
            summary.skip("image_without_caption", rel)
    questions: dict[str, list[tuple[dict[str, Any], str]]] = {}
    if qa is not None:
        for line, record in _jsonl(Path(qa)):
            where = f"{qa}:{line}"
            if not all(isinstance(record.get(k), str) and record[k].strip() for k in ("file", "question", "answer")):
                raise ValueError(f"{where}: a question record needs non-empty strings 'file', 'question' and "
                                 f"'answer', got {record}")
            rel = Path(record["file"]).as_posix().lstrip("./")
            if rel not in files:
                summary.skip("question_for_missing_file", where)
                continue
            questions.setdefault(rel, []).append((record, where))

    members: dict[str, dict[str, list[dict[str, Any]]]] = {s: {"pairs": [], "qa": []} for s in SPLITS}
    for i, rel in enumerate(tqdm(sorted(caption_of), desc="import", unit=" images", disable=not progress)):
        image = _image_member(files[rel].read_bytes(), summary, rel)
        if image is None:
            continue
        ext, data = image
        split = forced.get(rel) or _split_of(rel, seed, val, test)
        key = f"{split}-{i:07d}"
        caption, extra = caption_of[rel]
        meta = {"source": rel, "split": split, **({"extra": extra} if extra else {})}
        members[split]["pairs"].append({"__key__": key, ext: data, "txt": caption, "json": meta})
        summary.pairs[split] += 1
        for q, (record, _) in enumerate(questions.get(rel, [])):
            extra_q = {k: v for k, v in record.items() if k not in ("file", "question", "answer", "category")}
            qmeta = {**extra_q, "question": record["question"].strip(), "answer": record["answer"].strip(),
                     "category": str(record.get("category", "")), "source": rel, "split": split,
                     "scene_key": key}  # extra fields (e.g. pope_type) kept; these keys are the import's
            members[split]["qa"].append({"__key__": f"{key}-q{q}", ext: data, "json": qmeta})
            summary.questions[split] += 1
    if not any(summary.pairs.values()):
        raise ValueError(f"no usable image-caption pairs in {images} (skipped: {dict(summary.skipped)})")
    for split in SPLITS:
        for prefix, samples in members[split].items():
            if samples or overwrite:  # with overwrite, an empty list still removes the shards of a larger import
                write_shards(samples, out / split, prefix=prefix, max_count=shard_size, progress=False,
                             overwrite=overwrite)
    record_files(out, add=[SUMMARY_FILE], kind=DATA_KIND)
    (out / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=1), encoding="utf-8")
    return summary
