"""Fashion-MNIST (Xiao et al. 2017) as a folder of images with captions and questions, for ``data import``.

Debian ships the data set offline (``apt-get install dataset-fashion-mnist``: the four IDX files under
``/usr/share/datasets/fashion-mnist``); nothing is downloaded::

    write_fashion_mnist_folder("/usr/share/datasets/fashion-mnist", "runs/fmnist-folder", train=10000, test=1000)
    import_folder("runs/fmnist-folder", "data/fmnist", captions="runs/fmnist-folder/captions.jsonl",
                  qa="runs/fmnist-folder/qa.jsonl", val=0.05, test=0.0)   # test: Fashion-MNIST's own

Each 28x28 greyscale product photo gets one caption from its label ("a photo of a sneaker", seeded templates)
and three questions, so both arms' understanding reads as classification accuracy:

- ``class``: "What is this?" -> the class name (10 classes: chance 10 %; a small CNN reaches ~90-92 %);
- ``footwear``: "Is this footwear?" -> yes for sandals, sneakers and ankle boots (30 % of the images);
- ``existence``: "Is there a <class> in this photo?" -> yes for the true class, no for another class drawn at
  random (half each, seeded), so POPE precision, recall, F1 and yes-rate apply.

The official test images keep a ``"split": "test"`` field, which ``import_folder`` honours, so the comparison's test
split is Fashion-MNIST's own; training images are split into train and validation by the import's hash.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from chameleon_lite.world.language import with_article

__all__ = ["CLASSES", "FOOTWEAR", "read_idx", "write_fashion_mnist_folder", "DEBIAN_DIR"]

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
FOOTWEAR = frozenset({"sandal", "sneaker", "ankle boot"})
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_TEMPLATES = ("a photo of {}.", "a black and white photo of {}.", "{} on a black background.",
              "a small picture of {}.", "a product photo of {}.")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (``.gz`` or raw) as a uint8 array: ``(N,)`` labels or ``(N, H, W)`` images.

    ``ValueError`` naming the file for a wrong magic number, a non-uint8 type or a size that does not match.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX type 0x{data[2]:02x} is not unsigned bytes (0x08)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated (header)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f"{path}: the header says {shape} = {int(np.prod(shape))} bytes, the file has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find(src: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (src / name).is_file():
            return src / name
    raise FileNotFoundError(f"{src / stem}(.gz) not found (Debian: apt-get install dataset-fashion-mnist, which puts "
                            f"the files in {DEBIAN_DIR})")


def write_fashion_mnist_folder(src: str | os.PathLike, out: str | os.PathLike, *, train: int | None = None,
                               test: int | None = None, seed: int = 0) -> dict[str, int]:
    """Write the first ``train`` training and ``test`` test images (all when None) of the IDX files in ``src`` as
    PNGs under ``out/{train,test}/``, with ``out/captions.jsonl`` and ``out/qa.jsonl`` (module docstring).

    Returns the number of images written per split. ``out`` must be absent or empty (``FileExistsError``).
    """
    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; write the folder into a new directory")
    rng = random.Random(seed)
    counts = {}
    captions, questions = [], []
    for split, limit in (("train", train), ("test", test)):
        images = read_idx(_find(src, _FILES[split][0]))
        labels = read_idx(_find(src, _FILES[split][1]))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{src}: {split} images {images.shape} and labels {labels.shape} do not match")
        if labels.max(initial=0) >= len(CLASSES):
            raise ValueError(f"{src}: {split} label {int(labels.max())} is not one of the {len(CLASSES)} classes")
        n = len(images) if limit is None else min(limit, len(images))
        (out / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = CLASSES[int(labels[i])]
            file = f"{split}/{i:05d}.png"
            Image.fromarray(images[i], mode="L").save(out / file)
            record = {"file": file, "label": name, **({"split": "test"} if split == "test" else {})}
            captions.append({**record, "caption": rng.choice(_TEMPLATES).format(with_article(name))})
            other = rng.choice([c for c in CLASSES if c != name])
            asked = name if rng.random() < 0.5 else other
            questions += [
                {"file": file, "question": "What is this?", "answer": name, "category": "class"},
                {"file": file, "question": "Is this footwear?", "answer": "yes" if name in FOOTWEAR else "no",
                 "category": "footwear"},
                {"file": file, "question": f"Is there {with_article(asked)} in this photo?",
                 "answer": "yes" if asked == name else "no", "category": "existence",
                 "pope_type": "positive" if asked == name else "random"},
            ]
        counts[split] = n
    for name, rows in (("captions.jsonl", captions), ("qa.jsonl", questions)):
        with open(out / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return counts
