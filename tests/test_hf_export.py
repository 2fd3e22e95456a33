"""``chameleon-lite export --format transformers``: transformers loads the directory offline and reproduces our model.

A tiny random decoder over the shipped shapes-32 vocabulary (weights spread out, as in ``test_model``'s HF oracle,
so that no two logits nearly tie): HF's logits equal ours on every text and control id, image codes are masked,
and HF's greedy ``generate`` equals our greedy ``mode="text"`` generation token for token.
"""

import json

import pytest
import torch

from chameleon_lite.generation.engine import generate_ids
from chameleon_lite.generation.sampling import SamplingParams
from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import Decoder
from chameleon_lite.native.chameleon import ChameleonLite, export_model_dir
from chameleon_lite.shipped import resolve_path
from chameleon_lite.tokenization.bundle import load_bundle

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from chameleon_lite.cli import main

    tmp = tmp_path_factory.mktemp("hf_export")
    bundle = load_bundle(resolve_path("shapes-32", kind="bundle"))
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=bundle.vocab.size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=96, swin_norm=True))
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    export_model_dir(decoder, bundle, tmp / "model")
    assert main(["export", "--format", "transformers", "--model", str(tmp / "model"), "--out", str(tmp / "hf")]) == 0
    return tmp / "model", tmp / "hf"


def _prompt(vocab) -> list[int]:
    """A question about an image, laid out as the QA format: ``<bos> <boi> codes <eoi> question <sep>``."""
    codes = torch.randint(0, vocab.codebook_size, (16,), generator=torch.Generator().manual_seed(1))
    question = load_bundle(resolve_path("shapes-32", kind="bundle"), load_image_tokenizer=False).text.encode(
        "what colour is the triangle?")
    return [vocab.bos, vocab.boi, *(vocab.image_offset + codes).tolist(), vocab.eoi, *question, vocab.sep]


def test_transformers_loads_the_export_and_matches_our_logits_and_greedy_text(exported, monkeypatch):
    from transformers import ChameleonForConditionalGeneration

    model_dir, hf_dir = exported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = ChameleonLite.from_pretrained(model_dir)
    vocab = ours.bundle.vocab
    hf = ChameleonForConditionalGeneration.from_pretrained(hf_dir).eval()
    ids = _prompt(vocab)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]  # (T, V)
        mine = ours.decoder(torch.tensor([ids]))[0, :, : vocab.size].float()  # (T, V) padded columns dropped
    text = slice(0, vocab.image_offset)
    torch.testing.assert_close(theirs[:, text], mine[:, text], atol=1e-4, rtol=1e-4)
    assert (theirs[:, vocab.image_offset:] == torch.finfo(theirs.dtype).min).all()  # HF: text output only

    greedy = SamplingParams(temperature=0.0)
    (expected,) = generate_ids(ours.decoder, vocab, ours.bundle.image_grid, [ids], mode="text",
                               max_new_tokens=NEW_TOKENS, sampling=greedy)
    got = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS)[0, len(ids):].tolist()
    assert len(expected) >= 5 and got == expected


def test_export_directory_layout(exported):
    model_dir, hf_dir = exported
    config = json.loads((hf_dir / "config.json").read_text())
    vocab = load_bundle(hf_dir / "tokenizer", load_image_tokenizer=False).vocab  # prompts are made with it
    assert config["vocab_size"] == vocab.size and config["eos_token_id"] == vocab.eos
    names = config["vocabulary_map"]
    assert names["<boi>"] == vocab.boi and names["IMGIMGBCZ"] == vocab.image_offset + 12
    assert sum(n.startswith("IMGIMG") for n in names) == vocab.codebook_size
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert vocab.boi in generation["suppress_tokens"] and vocab.sep not in generation["suppress_tokens"]
    assert (hf_dir / "model.safetensors").is_file() and (hf_dir / "manifest.json").is_file()
