import os
import random

import pytest

from chameleon_lite.tokenization.text_tokenizer import TextTokenizer

CORPUS = [
    "a small red circle left of a large blue square",
    "two green triangles above the yellow star",
    "how many objects are there? three",
    "is there no purple diamond in the picture? yes",
    "what colour is the triangle? orange",
    "the blue square moves to the right of the red circle",
] * 20


@pytest.fixture(scope="session", autouse=True)
def package_cache_dir(tmp_path_factory):
    """The package's data caches (``chameleon_lite.data.cache``) go to a temporary directory, never ~/.cache."""
    path = tmp_path_factory.mktemp("chameleon_lite_cache")
    old = os.environ.get("CHAMELEON_LITE_CACHE")
    os.environ["CHAMELEON_LITE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CHAMELEON_LITE_CACHE", None)
    else:
        os.environ["CHAMELEON_LITE_CACHE"] = old


@pytest.fixture(scope="session")
def text_corpus() -> list[str]:
    return list(CORPUS)


@pytest.fixture(scope="session")
def text_tokenizer() -> TextTokenizer:
    """A small sentencepiece model trained on a fixed corpus (shared by tests; training takes ~0.1 s)."""
    return TextTokenizer.train(CORPUS, vocab_size=320)


@pytest.fixture
def rng() -> random.Random:
    return random.Random(0)
