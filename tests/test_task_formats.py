"""Task formats round trip: every format's training document and both arms' generation prompts agree.

For each format the prompt either arm builds at generation time is exactly the training document's prefix before
its loss-bearing response (native: ``load_token_documents`` vs ``generation.build_prompt_ids``; baseline:
``baseline_data.vlm_batch`` vs ``baseline_generation.build_baseline_prompt``), and the two arms' prompts are the
same ids with the image's ``<boi> codes <eoi>`` in place of the baseline's one placeholder.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from PIL import Image

from chameleon_lite.data.baseline_data import load_image_text_samples, qa_groups, vlm_batch
from chameleon_lite.data.pretokenize import KINDS, _write_record
from chameleon_lite.data.shards import write_shards
from chameleon_lite.data.token_documents import PAIR_FORMATS, QA_FORMATS, load_token_documents
from chameleon_lite.generation.baseline import build_baseline_prompt
from chameleon_lite.generation.image_code_cache import ImageCodeCache
from chameleon_lite.generation.native import build_prompt_ids
from chameleon_lite.tokenization.bundle import TokenizerBundle
from chameleon_lite.tokenization.image_tokenizer import VQImageTokenizer
from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig
from chameleon_lite.tokenization.vocab import Vocab

CAPTION, QUESTION, ANSWER = "a red square", "what colour is it?", "red"
QUESTION_2, ANSWER_2 = "how many shapes?", "one"
STORY = ("once upon a time", "the end")


def square(colour: tuple[int, int, int], size: int = 16) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    image.paste(colour, (4, 4, 12, 12))
    return image


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "eol"])
def bundle(request, text_tokenizer) -> TokenizerBundle:
    torch.manual_seed(0)
    vq = VQImageTokenizer(ImageTokenizerConfig(image_size=16, base_channels=8, channel_mult=[1, 2, 4], latent_dim=8,
                                               codebook_size=16, kmeans_init=False)).eval()
    vocab = Vocab(n_text=text_tokenizer.vocab_size, codebook_size=16)
    return TokenizerBundle(name="tiny", text=text_tokenizer, vocab=vocab, image_grid=vq.grid, image_tokenizer=vq,
                           use_eol=request.param)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return square((255, 0, 0))


@pytest.fixture(scope="module")
def documents(bundle, image, tmp_path_factory):
    """Native training documents of one pair, two questions about one image and one interleaved document."""
    codes = ImageCodeCache().codes([image], bundle.image_tokenizer)[0].flatten().tolist()
    enc = bundle.text.encode
    samples = [
        {"__key__": "p", "json": {"kind": "pair", "tokens": [{"image": codes}, {"text": enc(CAPTION)}]}},
        {"__key__": "q0", "json": {"kind": "qa", "tokens": [{"image": codes}], "question": enc(QUESTION),
                                   "answer": enc(ANSWER), "category": "colour"}},
        {"__key__": "q1", "json": {"kind": "qa", "tokens": [{"image": codes}], "question": enc(QUESTION_2),
                                   "answer": enc(ANSWER_2), "category": "count"}},
        {"__key__": "d", "json": {"kind": "doc", "tokens": [{"text": enc(STORY[0])}, {"image": codes},
                                                            {"text": enc(STORY[1])}]}},
    ]
    out = tmp_path_factory.mktemp("tokens")
    _write_record(bundle, out)
    for kind, prefix in (("pair", "pairs"), ("qa", "qa"), ("doc", "docs")):
        write_shards([s for s in samples if s["json"]["kind"] == kind], out, prefix=prefix, progress=False)
    docs = load_token_documents(out, bundle, cache=False)
    by_key = {str(k): i for i, k in enumerate(docs.sample_key)}

    def document(key: str, fmt: str) -> tuple[list[int], list[bool]]:
        i = by_key[key]
        columns = {"pair": PAIR_FORMATS, "qa": QA_FORMATS, "doc": ("doc",)}[KINDS[int(docs.sample_kind[i])]]
        column = columns.index(fmt)
        d = int(docs.sample_formats[i, column])
        assert d >= 0, (key, fmt)
        span = slice(int(docs.doc_start[d]), int(docs.doc_start[d] + docs.doc_len[d]))
        return docs.ids[span].tolist(), docs.loss[span].tolist()

    return document


def check_prefix(prompt: list[int], ids: list[int], loss: list[bool], *, response_in_loss: bool = True) -> None:
    """``prompt`` is ``ids``' prefix; no token of it is a loss target and the next token is (the response)."""
    assert ids[: len(prompt)] == prompt
    assert len(ids) > len(prompt)
    if response_in_loss:
        assert not any(loss[: len(prompt)])
        assert loss[len(prompt)]


def native_prompt(bundle, segments, mode) -> list[int]:
    return build_prompt_ids(segments, mode, bundle, ImageCodeCache())


def as_baseline(ids: list[int], bundle) -> list[int]:
    """Native ids with each ``<boi> .. <eoi>`` span replaced by the baseline's image placeholder."""
    out, inside = [], False
    for i in ids:
        if i == bundle.vocab.boi:
            inside = True
            out.append(bundle.vocab.image_placeholder)
        elif i == bundle.vocab.eoi:
            inside = False
        elif not inside:
            out.append(i)
    return out


def test_caption_round_trip(bundle, image, documents):
    ids, loss = documents("p", "caption")
    check_prefix(native_prompt(bundle, [image], "text"), ids, loss)


def test_generation_round_trip(bundle, documents):
    ids, loss = documents("p", "generation")
    prompt = native_prompt(bundle, [CAPTION], "image")
    check_prefix(prompt, ids, loss)
    assert prompt[-1] == bundle.vocab.boi


def test_unconditional_generation_round_trip(bundle, documents):
    ids, loss = documents("p", "generation_uncond")
    # the engine's default unconditional stream of classifier-free guidance (engine.generate_ids)
    check_prefix([bundle.vocab.bos, bundle.vocab.boi], ids, loss)
    from chameleon_lite.data import task_formats

    check_prefix(task_formats.prompt_ids("generation_uncond", {}, bundle.vocab), ids, loss)


def test_qa_round_trip(bundle, image, documents):
    prompt = native_prompt(bundle, [QUESTION, image], "text")
    ids, loss = documents("q0", "qa")
    check_prefix(prompt, ids, loss)
    per_image, per_image_loss = documents("q0", "qa_per_image")  # its first question sees the same prompt
    check_prefix(prompt, per_image, per_image_loss)
    head = 1 + bundle.image_tokens  # <bos> I
    second = native_prompt(bundle, [QUESTION_2, image], "text")[head:]  # the next question, then its answer
    assert per_image[len(ids):len(ids) + len(second)] == second
    assert not any(per_image_loss[len(ids):len(ids) + len(second)]) and per_image_loss[len(ids) + len(second)]


def test_document_round_trip(bundle, image, documents):
    ids, loss = documents("d", "doc")
    assert all(loss[1:]) and not loss[0]  # loss on everything after <bos>
    for segments in ([STORY[0]], [STORY[0], image], [STORY[0], image, STORY[1]]):
        for mode in ("interleaved", "text") if len(segments) == 1 else ("interleaved",):  # text + image: a question
            prompt = native_prompt(bundle, segments, mode)
            check_prefix(prompt, ids, loss, response_in_loss=False)


# ---------------------------------------------------------------------------------------------- baseline arm
@pytest.fixture(scope="module")
def baseline_rows(bundle, image, tmp_path_factory):
    """The baseline's training rows of the same pair and questions (raw shards, images as pixels)."""
    out = tmp_path_factory.mktemp("raw")
    write_shards([{"__key__": "p", "png": image, "txt": CAPTION}], out, prefix="pairs", progress=False)
    write_shards([{"__key__": f"q{i}", "png": image, "json": {"question": q, "answer": a, "category": "colour"}}
                  for i, (q, a) in enumerate([(QUESTION, ANSWER), (QUESTION_2, ANSWER_2)])],
                 out, prefix="qa", progress=False)
    samples, _ = load_image_text_samples(str(out / "*.tar"), bundle, image_size=16, progress=False,
                                         cache_dir=tmp_path_factory.mktemp("cache"))
    key = {k: i for i, k in enumerate(samples.keys)}

    def row(entry) -> tuple[list[int], list[bool]]:
        batch = vlm_batch(samples, [entry], bundle.vocab)
        return batch["input_ids"][0].tolist(), batch["loss_mask"][0].tolist()

    return types.SimpleNamespace(row=row, key=key, groups=qa_groups(samples))


def baseline_prompt(bundle, segments) -> list[int]:
    ids, images = build_baseline_prompt(segments, types.SimpleNamespace(bundle=bundle))
    assert len(images) == sum(isinstance(s, Image.Image) for s in segments)
    return ids


def test_baseline_caption_round_trip(bundle, image, baseline_rows):
    prompt = baseline_prompt(bundle, [image])
    ids, loss = baseline_rows.row(baseline_rows.key["p"])
    check_prefix(prompt, ids, loss)
    assert prompt == as_baseline(native_prompt(bundle, [image], "text"), bundle)


def test_baseline_qa_round_trip(bundle, image, baseline_rows):
    prompt = baseline_prompt(bundle, [QUESTION, image])
    ids, loss = baseline_rows.row(baseline_rows.key["q0"])
    check_prefix(prompt, ids, loss)
    assert prompt == as_baseline(native_prompt(bundle, [QUESTION, image], "text"), bundle)
    (group,) = baseline_rows.groups
    ids, loss = baseline_rows.row(group)  # per image: its first question sees the same prompt
    check_prefix(prompt, ids, loss)


def test_baseline_document_prompt_matches_native(bundle, image):
    for segments in ([STORY[0]], [STORY[0], image, STORY[1]], [image, image]):
        assert baseline_prompt(bundle, segments) == as_baseline(native_prompt(bundle, segments, "text"), bundle)


def test_baseline_rows_match_native_documents(bundle, baseline_rows, documents):
    """Both arms train on the same tokens around the image: the native document with its image replaced."""
    for key, fmt in (("p", "caption"), ("q0", "qa")):
        native_ids, native_loss = documents(key, fmt)
        ids, loss = baseline_rows.row(baseline_rows.key[key])
        assert ids == as_baseline(native_ids, bundle)
        n_img = bundle.image_tokens - 1
        assert loss == native_loss[:2] + native_loss[2 + n_img:]


def test_every_format_is_declared():
    from chameleon_lite.data import task_formats

    assert set(task_formats.FORMATS) == {f for fs in task_formats.SAMPLE_FORMATS.values() for f in fs}
    for name, fmt in task_formats.FORMATS.items():
        assert fmt.name == name and any(loss for _, loss in fmt.parts + fmt.repeated)
    assert dataclasses.is_dataclass(task_formats.TaskFormat)
    assert set(task_formats.SAMPLE_FORMATS) == set(KINDS)
    assert task_formats.SAMPLE_FORMATS["pair"] == PAIR_FORMATS and task_formats.SAMPLE_FORMATS["qa"] == QA_FORMATS
