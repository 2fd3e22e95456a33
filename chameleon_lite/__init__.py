"""chameleon_lite: native multimodal models over discrete tokens, and an encoder-projector baseline to compare.

Images become VQ codes in the same vocabulary as text pieces; one early-fusion decoder reads and writes both.

``from chameleon_lite import ChameleonLite`` (and the other public names below) loads lazily: importing the
package imports neither torch nor Lightning. The folders are the pipeline, bottom to top: ``tokenization`` (text
and VQ image tokenizers, bundles, ``Vocab``), ``model`` (the decoder both arms share), ``data``, ``world`` (the
shapes world and its scene parser), ``generation``, ``native`` and ``baseline`` (the two arms), ``eval``,
``training`` (the only place with LightningModules), ``comparison``; ``tests/test_layers.py`` keeps imports
pointing down.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY_ATTRIBUTES = {  # name -> module that defines it
    "ChameleonLite": "chameleon_lite.native.chameleon",
    "BaselineVLM": "chameleon_lite.baseline.vlm",
    "TokenizerBundle": "chameleon_lite.tokenization.bundle",
    "load_bundle": "chameleon_lite.tokenization.bundle",
    "Vocab": "chameleon_lite.tokenization.vocab",
    "DecoderConfig": "chameleon_lite.model.config",
    "GenerationConfig": "chameleon_lite.generation.config",
}

__all__ = ["__version__", *_LAZY_ATTRIBUTES]


def __getattr__(name: str) -> Any:
    module = _LAZY_ATTRIBUTES.get(name)
    if module is None:
        raise AttributeError(f"module 'chameleon_lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES))
