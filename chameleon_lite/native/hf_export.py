"""Export a model directory to one that transformers' ``ChameleonForConditionalGeneration.from_pretrained`` loads.

``chameleon-lite export --format transformers --model DIR --out OUT`` writes::

    config.json             ChameleonConfig: the decoder's shape, bos/eos/pad ids and a ``vocabulary_map`` naming the
                            control tokens and every image code (``IMGIMG<code, digits as letters A-J>Z``, as Meta's
                            Chameleon names them), so HF knows which ids are image codes
    model.safetensors       the decoder under HF names (``hf_port.export_hf_chameleon_state``) and HF's VQ-VAE: HF
                            builds one in every Chameleon model; this one is tiny and untrained (never used for text)
    generation_config.json  greedy decoding, ``<eos>`` stops, and ``suppress_tokens`` = the control ids our text mode
                            never emits (all but ``<sep>``)
    tokenizer/              this package's tokenizer bundle (sentencepiece text model, VQ image tokenizer)
    manifest.json           the files written (``safe_io.write_dir``; a later export may replace them)

What carries over: HF's forward gives our logits on every text and control id, and HF sets the logits of image
codes to the dtype minimum (its Chameleon emits text only), so ``generate(ids, do_sample=False)`` reproduces our
greedy ``mode="text"`` generation token for token (checked by a test). What does not: image output (HF's Chameleon
and vLLM's never emit image codes) and an HF tokenizer: prompts are ids made with ``tokenizer/``
(``chameleon_lite.tokenization.bundle.load_bundle``; ``chameleon_lite.generation.native.build_prompt_ids`` lays out a
question about an
image). ``transformers`` is needed for the export only (``pip install transformers``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from chameleon_lite.model.hf_port import export_hf_chameleon_state, hf_chameleon_config
from chameleon_lite.model.model_dir import TOKENIZER_DIR
from chameleon_lite.native.chameleon import ChameleonLite
from chameleon_lite.safe_io import check_writable_dir, write_dir
from chameleon_lite.tokenization.vocab import Vocab

__all__ = ["export_transformers", "image_code_name", "transformers_vocabulary_map", "text_mode_suppressed_ids"]

KIND = "transformers"


def image_code_name(code: int) -> str:
    """HF Chameleon's name of image code ``code``: ``IMGIMG`` + its decimal digits as letters (0 -> A) + ``Z``."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def transformers_vocabulary_map(vocab: Vocab) -> dict[str, int]:
    """``vocabulary_map`` of the exported config: control tokens by name, image codes as ``image_code_name``."""
    names = {"<s>": vocab.bos, "</s>": vocab.eos, "<pad>": vocab.pad}
    names.update({token: vocab.n_text + i for i, token in enumerate(vocab.control_tokens)})
    names.update({image_code_name(code): vocab.image_offset + code for code in range(vocab.codebook_size)})
    return names


def text_mode_suppressed_ids(vocab: Vocab) -> list[int]:
    """Control ids ``mode="text"`` never emits (every id between the text pieces and the image codes but ``<sep>``).

    Image codes are not listed: HF masks them itself (they are named ``IMGIMG...`` in ``vocabulary_map``).
    """
    return [i for i in range(vocab.n_text, vocab.image_offset) if i != vocab.sep]


def export_transformers(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` (see the module docstring) from the model directory ``model_dir``; returns ``out_dir``.

    ``out_dir`` may be absent, empty, or an earlier export (``safe_io.write_dir``); anything else is refused with
    ``FileExistsError`` before any work. Raises ``ValueError`` for a decoder HF cannot express (``qk_norm=False``).
    """
    from transformers import ChameleonForConditionalGeneration, GenerationConfig

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_writable_dir(out_dir)
    model = ChameleonLite.from_pretrained(model_dir)
    vocab, decoder = model.bundle.vocab, model.decoder
    config = hf_chameleon_config(
        decoder.config, vocabulary_map=transformers_vocabulary_map(vocab),
        bos_token_id=vocab.bos, eos_token_id=vocab.eos, pad_token_id=vocab.pad,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)  # HF's tiny VQ-VAE is initialised randomly: the same bytes for the same model
        hf_model = ChameleonForConditionalGeneration(config).eval()
    missing, unexpected = hf_model.load_state_dict(export_hf_chameleon_state(decoder), strict=False)
    if unexpected or any("vqmodel" not in name for name in missing):
        raise ValueError(f"HF Chameleon does not take these weights: missing {missing}, unexpected {unexpected}")
    hf_model.generation_config = GenerationConfig(
        bos_token_id=vocab.bos, eos_token_id=vocab.eos, pad_token_id=vocab.pad, do_sample=False,
        max_new_tokens=64, suppress_tokens=text_mode_suppressed_ids(vocab),
    )

    def build(tmp: Path) -> None:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        shutil.copytree(model_dir / TOKENIZER_DIR, tmp / TOKENIZER_DIR)

    return write_dir(out_dir, build, kind=KIND)
