"""chameleon_lite: native multimodal models over discrete tokens, and an encoder-projector baseline to compare.

Images become VQ codes in the same vocabulary as text pieces; one early-fusion decoder reads and writes both.

``from chameleon_lite import ChameleonLite`` loads lazily: importing the package imports neither torch nor
Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY_ATTRIBUTES = {  # name -> module that defines it
    "ChameleonLite": "chameleon_lite.pretrained",
    "GenerationConfig": "chameleon_lite.generation_config",
}

__all__ = ["ChameleonLite", "GenerationConfig", "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY_ATTRIBUTES.get(name)
    if module is None:
        raise AttributeError(f"module 'chameleon_lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES))
