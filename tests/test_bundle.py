import subprocess
import sys
from pathlib import Path

import pytest

from chameleon_lite.safe_io import read_manifest
from chameleon_lite.tokenization.bundle import CONFIG_FILE, TEXT_FILE, TokenizerBundle, load_bundle, save_bundle
from chameleon_lite.tokenization.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bundle(text_tokenizer):
    vocab = Vocab(n_text=text_tokenizer.vocab_size, codebook_size=64)
    return TokenizerBundle(name="test", text=text_tokenizer, vocab=vocab, image_grid=(4, 6))


def test_round_trip(tmp_path, bundle):
    save_bundle(bundle, tmp_path / "b")
    files = ["README.md", CONFIG_FILE, TEXT_FILE]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted([*files, "manifest.json"])
    assert sorted(read_manifest(tmp_path / "b")) == sorted(files)
    loaded = load_bundle(tmp_path / "b")
    assert loaded.vocab == bundle.vocab
    assert loaded.image_grid == (4, 6)
    assert loaded.name == "test"
    assert loaded.image_tokens == 4 * 6 + 2
    s = "a red circle <boi> 😀"
    assert loaded.text.encode(s) == bundle.text.encode(s)


def test_missing_files_are_named(tmp_path, bundle):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_bundle(tmp_path / "nowhere")
    save_bundle(bundle, tmp_path / "b")
    (tmp_path / "b" / TEXT_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=TEXT_FILE):
        load_bundle(tmp_path / "b")
    save_bundle(bundle, tmp_path / "c")
    (tmp_path / "c" / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_bundle(tmp_path / "c")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s + "\nunknown_key: 1\n", r"tokenizer\.yaml is malformed: Key 'unknown_key' not in 'BundleConfig'"),
        (lambda s: s.replace("name: test", "name: [unclosed"),
         r"tokenizer\.yaml is not valid YAML: while parsing a flow sequence"),
        (lambda s: s.replace("codebook_size: 64", "codebook_size: lots"), r"(?s)'lots'.*vocab\.codebook_size"),
        (lambda s: s.replace("image_offset:", "image_offset: 1\n  x_image_offset:"),
         r"Key 'x_image_offset' not in 'VocabSpec'"),
        (lambda s: "- a\n- list", r"top level must be a mapping, got list"),
        (lambda s: "just a string", r"top level must be a mapping, got str 'just a string'"),
    ],
)
def test_malformed_config_is_named(tmp_path, bundle, edit, match):
    save_bundle(bundle, tmp_path / "b")
    cfg = tmp_path / "b" / CONFIG_FILE
    cfg.write_text(edit(cfg.read_text()))
    with pytest.raises(ValueError, match=match):
        load_bundle(tmp_path / "b")


def test_config_disagreeing_with_text_model(tmp_path, bundle):
    save_bundle(bundle, tmp_path / "b")
    cfg = tmp_path / "b" / CONFIG_FILE
    n = bundle.vocab.n_text
    v2 = Vocab(n_text=n + 5, codebook_size=64)
    text = cfg.read_text().replace(f"n_text: {n}", f"n_text: {n + 5}")
    text = text.replace(f"image_offset: {bundle.vocab.image_offset}", f"image_offset: {v2.image_offset}")
    text = text.replace(f"size: {bundle.vocab.size}", f"size: {v2.size}")
    cfg.write_text(text)
    with pytest.raises(ValueError, match="n_text"):
        load_bundle(tmp_path / "b")


def test_tokenizers_folder_does_not_shadow_hf_tokenizers():
    """`tokenizers/` holds artifacts only: no Python, and `import tokenizers` from the repo root is not our folder."""
    assert not list((REPO / "tokenizers").rglob("*.py"))
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('tokenizers')\n"
        "ns = spec and 'NAMESPACE:' + str(list(spec.submodule_search_locations))\n"
        "print('ABSENT' if spec is None else (spec.origin or ns))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ABSENT" or ("site-packages" in out and "NAMESPACE" not in out), out
