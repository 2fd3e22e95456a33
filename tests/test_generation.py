"""Tests of the generation engine (chameleon_lite.generation.native) on a tiny random decoder and vocabulary."""

from __future__ import annotations

import argparse
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from chameleon_lite.generation.native import (
    ImageCodeCache,
    build_prompt_ids,
    generate,
    generate_ids,
    join_stream,
    stream,
)
from chameleon_lite.generation.sampling import ModalityConstraint, SamplingParams, TopK, TopP
from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import Decoder
from chameleon_lite.tokenization.bundle import TokenizerBundle
from chameleon_lite.tokenization.image_tokenizer import VQImageTokenizer
from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig
from chameleon_lite.tokenization.vocab import Vocab

GRID = (2, 3)
VOCAB = Vocab(n_text=24, codebook_size=16)
SAMPLE = SamplingParams(temperature=1.0, image_temperature=1.0)
GREEDY = SamplingParams(temperature=0.0, image_temperature=0.0)


def make_decoder(vocab_size: int = VOCAB.size, max_seq_len: int = 64, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    config = DecoderConfig(vocab_size=vocab_size, pad_vocab_to_multiple_of=16, d_model=32, n_layers=2, n_heads=4,
                           n_kv_heads=2, max_seq_len=max_seq_len, init_std=0.3, attention_backend="sdpa")
    return Decoder(config).double().eval()  # float64: cached and uncached paths agree to ~1e-12


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    return make_decoder()


def text_prompt(n: int, start: int = 5) -> list[int]:
    return [VOCAB.bos] + [start + (i * 7) % (VOCAB.n_text - start) for i in range(n - 1)]


# ---------------------------------------------------------------------------------------------- processors
def test_top_k_and_top_p_filter_the_right_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(TopK(2)(logits)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(TopP(0.7)(logits)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(TopP(0.5)(logits)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(TopP(1e-6)(logits)).sum() == 1  # always at least one token survives
    assert torch.isfinite(TopP(1.0)(logits)).all()


def test_modality_constraint_masks() -> None:
    text = ModalityConstraint(VOCAB, GRID, "text")
    text.reset([[VOCAB.bos, 5]])
    allowed = text.allowed()[0]
    assert not allowed[VOCAB.image_offset :].any() and not allowed[VOCAB.boi] and not allowed[VOCAB.eoi]
    assert allowed[: VOCAB.n_text].all() and allowed[VOCAB.sep]
    inter = ModalityConstraint(VOCAB, GRID, "interleaved")
    inter.reset([[VOCAB.bos, 5]])
    assert inter.allowed()[0, VOCAB.boi]
    inter.advance(torch.tensor([VOCAB.boi]))
    for _ in range(GRID[0] * GRID[1]):
        row = inter.allowed()[0]
        assert row[VOCAB.image_offset :].all() and row.sum() == VOCAB.codebook_size
        inter.advance(torch.tensor([VOCAB.image_offset]))
    assert inter.allowed()[0].nonzero().flatten().tolist() == [VOCAB.eoi]
    inter.advance(torch.tensor([VOCAB.eoi]))
    assert torch.equal(inter.allowed()[0], inter.text_allowed)  # text resumes after <eoi>


# ---------------------------------------------------------------------------------------------- the engine
def reference_greedy(decoder: Decoder, prompt: list[int], n: int, mode: str) -> list[int]:
    """Greedy decoding by full recomputation (no cache), with the constraint written out by hand."""
    ids = list(prompt)
    h, w = GRID
    out = []
    for _ in range(n):
        logits = decoder(torch.tensor([ids]))[0, -1, : VOCAB.size]
        if mode == "text":
            allowed = list(range(VOCAB.n_text)) + [VOCAB.sep]
        else:
            allowed = [VOCAB.eoi] if len(out) == h * w else list(VOCAB.image_ids)
        token = allowed[int(logits[allowed].argmax())]
        out.append(token)
        ids.append(token)
        if token == VOCAB.eos or (mode == "image" and token == VOCAB.eoi):
            break
    return out


@pytest.mark.parametrize("mode", ["text", "image"])
def test_cached_greedy_equals_recomputation(decoder: Decoder, mode: str) -> None:
    prompt = text_prompt(5) + ([VOCAB.boi] if mode == "image" else [])
    got = generate_ids(decoder, VOCAB, GRID, [prompt], mode=mode, max_new_tokens=12, sampling=GREEDY)[0]
    assert got == reference_greedy(decoder, prompt, 12, mode)
    assert len(got) >= 7


def test_mixed_length_batch_equals_each_prompt_alone(decoder: Decoder) -> None:
    prompts = [text_prompt(2), text_prompt(9, start=7), text_prompt(5, start=11), [VOCAB.bos]]
    batched = generate_ids(decoder, VOCAB, GRID, prompts, max_new_tokens=10, sampling=GREEDY)
    alone = [generate_ids(decoder, VOCAB, GRID, [p], max_new_tokens=10, sampling=GREEDY)[0] for p in prompts]
    assert batched == alone
    assert len({tuple(x) for x in alone}) > 1  # the prompts really lead to different outputs


def test_image_mode_yields_exactly_one_image(decoder: Decoder) -> None:
    prompts = [text_prompt(3) + [VOCAB.boi], text_prompt(6, start=9) + [VOCAB.boi]]
    for seed in range(3):
        outs = generate_ids(decoder, VOCAB, GRID, prompts, mode="image", max_new_tokens=30, sampling=SAMPLE,
                            seed=seed, cfg_scale=2.0)
        for out in outs:
            assert len(out) == GRID[0] * GRID[1] + 1 and out[-1] == VOCAB.eoi
            assert all(VOCAB.is_image(t) for t in out[:-1])
            assert VOCAB.ids_to_image(out, GRID).shape == GRID


def test_image_mode_with_eol_rows(decoder: Decoder) -> None:
    out = generate_ids(decoder, VOCAB, GRID, [text_prompt(3) + [VOCAB.boi]], mode="image", max_new_tokens=20,
                       sampling=SAMPLE, use_eol=True)[0]
    h, w = GRID
    assert len(out) == h * (w + 1) + 1 and out[-1] == VOCAB.eoi
    rows = torch.tensor(out[:-1]).view(h, w + 1)
    assert (rows[:, -1] == VOCAB.eol).all() and VOCAB.is_image(rows[:, :-1]).all()


def test_text_mode_never_yields_image_codes(decoder: Decoder) -> None:
    # temperature 5 flattens the distribution: image codes would show up quickly if they were allowed
    hot = SamplingParams(temperature=5.0)
    outs = generate_ids(decoder, VOCAB, GRID, [text_prompt(4)] * 4, max_new_tokens=40, sampling=hot, seed=1)
    tokens = torch.tensor([t for out in outs for t in out])
    assert tokens.numel() > 20
    assert not VOCAB.is_image(tokens).any() and not (tokens == VOCAB.boi).any()


def test_interleaved_mode_opens_and_closes_images() -> None:
    decoder = make_decoder()
    with torch.no_grad():  # make <boi> very likely so the image path is exercised
        decoder.lm_head.weight[VOCAB.boi] = decoder.lm_head.weight[VOCAB.boi] * 0 + 3.0 * decoder.norm.weight.sign()
    outs = generate_ids(decoder, VOCAB, GRID, [text_prompt(3)] * 3, mode="interleaved", max_new_tokens=40,
                        sampling=SAMPLE, seed=0)
    n_images = 0
    for out in outs:
        i = 0
        while i < len(out):
            if out[i] == VOCAB.boi:
                body = out[i + 1 : i + 2 + GRID[0] * GRID[1]]
                if len(body) == GRID[0] * GRID[1] + 1:
                    assert body[-1] == VOCAB.eoi and all(VOCAB.is_image(t) for t in body[:-1])
                    n_images += 1
                i += len(body) + 1
            else:
                assert not VOCAB.is_image(out[i]) and out[i] != VOCAB.eoi
                i += 1
    assert n_images >= 1


def test_seed_reproduces_and_different_seed_differs(decoder: Decoder) -> None:
    prompts = [text_prompt(4), text_prompt(6, start=8)]
    a = generate_ids(decoder, VOCAB, GRID, prompts, max_new_tokens=15, sampling=SAMPLE, seed=7)
    b = generate_ids(decoder, VOCAB, GRID, prompts, max_new_tokens=15, sampling=SAMPLE, seed=7)
    c = generate_ids(decoder, VOCAB, GRID, prompts, max_new_tokens=15, sampling=SAMPLE, seed=8)
    assert a == b
    assert a != c


def test_stop_ids_end_a_row(decoder: Decoder) -> None:
    prompts = [text_prompt(3, start=9), text_prompt(4, start=5)]
    free = generate_ids(decoder, VOCAB, GRID, prompts, max_new_tokens=12, sampling=GREEDY)
    assert len(free[0]) == 12 and free[1][-1] == VOCAB.eos and len(free[1]) < 12  # <eos> ends row 1 early
    stop = free[0][3]
    stopped = generate_ids(decoder, VOCAB, GRID, prompts, max_new_tokens=12, sampling=GREEDY, stop_ids=[stop])
    assert stopped[0] == free[0][: free[0].index(stop) + 1] and stopped[1] == free[1]


def test_cfg_scale_one_equals_no_guidance(decoder: Decoder) -> None:
    prompts = [text_prompt(5) + [VOCAB.boi], text_prompt(3, start=6) + [VOCAB.boi]]
    uncond = [[VOCAB.bos, VOCAB.boi]] * 2
    for sampling in (GREEDY, SAMPLE):
        plain = generate_ids(decoder, VOCAB, GRID, prompts, mode="image", max_new_tokens=7, sampling=sampling)
        guided = generate_ids(decoder, VOCAB, GRID, prompts, mode="image", max_new_tokens=7, sampling=sampling,
                              cfg_scale=1.0, uncond_prompts=uncond)  # uncond given: the 2B-row path runs
        assert plain == guided
    strong = generate_ids(decoder, VOCAB, GRID, prompts, mode="image", max_new_tokens=7, sampling=GREEDY,
                          cfg_scale=4.0)
    assert strong != generate_ids(decoder, VOCAB, GRID, prompts, mode="image", max_new_tokens=7, sampling=GREEDY)


def test_cfg_matches_hand_computed_guidance(decoder: Decoder) -> None:
    prompt = text_prompt(5) + [VOCAB.boi]
    scale = 3.0
    got = generate_ids(decoder, VOCAB, GRID, [prompt], mode="image", max_new_tokens=7, sampling=GREEDY,
                       cfg_scale=scale)[0]
    cond_ids, uncond_ids, expected = list(prompt), [VOCAB.bos, VOCAB.boi], []
    for step in range(7):
        cond = decoder(torch.tensor([cond_ids]))[0, -1, : VOCAB.size]
        uncond = decoder(torch.tensor([uncond_ids]))[0, -1, : VOCAB.size]
        guided = uncond + scale * (cond - uncond)
        token = VOCAB.eoi if step == 6 else VOCAB.image_offset + int(guided[VOCAB.image_offset :].argmax())
        expected.append(token)
        cond_ids.append(token)
        uncond_ids.append(token)
    assert got == expected


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"sampling": "temperature"}, "temperature"),
        ({"sampling": "top_p0"}, "top_p"),
        ({"sampling": "top_p2"}, "top_p"),
        ({"sampling": "image_top_p"}, "image_top_p"),
        ({"cfg_scale": 0.5, "mode": "image"}, "cfg_scale"),
        ({"mode": "video"}, "mode"),
        ({"max_new_tokens": 60}, "max_seq_len"),
    ],
)
def test_engine_parameter_errors(decoder: Decoder, kwargs: dict, name: str) -> None:
    bad_sampling = {
        "temperature": lambda: SamplingParams(temperature=-1.0),
        "top_p0": lambda: SamplingParams(top_p=0.0),
        "top_p2": lambda: SamplingParams(top_p=1.5),
        "image_top_p": lambda: SamplingParams(image_top_p=0.0),
    }
    with pytest.raises(ValueError, match=name):
        kwargs = dict(kwargs)
        if "sampling" in kwargs:
            kwargs["sampling"] = bad_sampling[kwargs["sampling"]]()
        prompt = text_prompt(8) + ([VOCAB.boi] if kwargs.get("mode") == "image" else [])
        generate_ids(decoder, VOCAB, GRID, [prompt], **kwargs)


def test_engine_prompt_errors(decoder: Decoder) -> None:
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate_ids(decoder, VOCAB, GRID, [text_prompt(3), []], max_new_tokens=3)
    with pytest.raises(ValueError, match="prompts"):
        generate_ids(decoder, VOCAB, GRID, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate_ids(decoder, VOCAB, GRID, [[VOCAB.bos, VOCAB.size]], max_new_tokens=3)
    with pytest.raises(ValueError, match="inside an image"):
        generate_ids(decoder, VOCAB, GRID, [text_prompt(3)], mode="image", max_new_tokens=10)
    with pytest.raises(ValueError, match="max_new_tokens"):  # too small to finish the image
        generate_ids(decoder, VOCAB, GRID, [text_prompt(3) + [VOCAB.boi]], mode="image", max_new_tokens=3)
    with pytest.raises(ValueError, match="cfg_scale"):
        generate_ids(decoder, VOCAB, GRID, [text_prompt(3)], mode="text", max_new_tokens=3, cfg_scale=2.0)


# ---------------------------------------------------------------------------------------------- prompt_embeds
def embeds_of(decoder: Decoder, prompts: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [decoder.embed(torch.tensor(p)) for p in prompts]  # (T_i, d) each


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLE])
def test_prompt_embeds_of_the_ids_equal_the_ids_path(decoder: Decoder, sampling: SamplingParams) -> None:
    prompts = [text_prompt(6), text_prompt(3, start=8)]
    plain = generate_ids(decoder, VOCAB, GRID, prompts, max_new_tokens=10, sampling=sampling, seed=5)
    embedded = generate_ids(decoder, VOCAB, GRID, prompts, max_new_tokens=10, sampling=sampling, seed=5,
                            prompt_embeds=embeds_of(decoder, prompts))
    assert embedded == plain
    image_prompt = [text_prompt(4) + [VOCAB.boi]]
    plain = generate_ids(decoder, VOCAB, GRID, image_prompt, mode="image", max_new_tokens=7, sampling=sampling)
    assert generate_ids(decoder, VOCAB, GRID, image_prompt, mode="image", max_new_tokens=7, sampling=sampling,
                        prompt_embeds=embeds_of(decoder, image_prompt)) == plain


def test_prompt_embeds_are_what_the_prefill_reads(decoder: Decoder) -> None:
    prompt = text_prompt(6)
    plain = generate_ids(decoder, VOCAB, GRID, [prompt], max_new_tokens=8, sampling=GREEDY)[0]
    (embeds,) = embeds_of(decoder, [prompt])
    perturbed = embeds.clone()
    perturbed[2] += 2.0 * torch.randn(perturbed.shape[-1], generator=torch.Generator().manual_seed(0),
                                      dtype=perturbed.dtype)
    changed = generate_ids(decoder, VOCAB, GRID, [prompt], max_new_tokens=8, sampling=GREEDY,
                           prompt_embeds=[perturbed])[0]
    assert changed != plain
    # the swapped embedding acts exactly like the recomputed reference with that embedding
    ids = list(prompt)
    x = perturbed[None]  # (1, T, d)
    expected = []
    for _ in range(8):
        logits = decoder(inputs_embeds=x)[0, -1, : VOCAB.size]
        allowed = list(range(VOCAB.n_text)) + [VOCAB.sep]
        token = allowed[int(logits[allowed].argmax())]
        expected.append(token)
        if token == VOCAB.eos:
            break
        ids.append(token)
        x = torch.cat([x, decoder.embed(torch.tensor([[token]]))], dim=1)
    assert changed == expected


def test_prompt_embeds_mixed_length_batch_equals_each_alone(decoder: Decoder) -> None:
    prompts = [text_prompt(2), text_prompt(9, start=7), text_prompt(5, start=11)]
    embeds = embeds_of(decoder, prompts)
    g = torch.Generator().manual_seed(3)
    embeds = [e + 0.5 * torch.randn(e.shape, generator=g, dtype=e.dtype) for e in embeds]  # not the ids' embeddings
    batched = generate_ids(decoder, VOCAB, GRID, prompts, max_new_tokens=10, sampling=GREEDY, prompt_embeds=embeds)
    alone = [generate_ids(decoder, VOCAB, GRID, [p], max_new_tokens=10, sampling=GREEDY, prompt_embeds=[e])[0]
             for p, e in zip(prompts, embeds)]
    assert batched == alone
    assert batched != generate_ids(decoder, VOCAB, GRID, prompts, max_new_tokens=10, sampling=GREEDY)


def test_prompt_embeds_errors(decoder: Decoder) -> None:
    prompts = [text_prompt(4), text_prompt(3)]
    good = embeds_of(decoder, prompts)
    d = decoder.config.d_model
    cases = [
        (good[:1], r"prompt_embeds has 1 tensors, prompts has 2"),
        ([good[0], good[1][:2]], r"prompt_embeds\[1\] has shape \(2, 32\), expected \(3, 32\)"),
        ([good[0], torch.zeros(3, d + 1, dtype=torch.float64)], r"prompt_embeds\[1\] has shape"),
        ([good[0].float(), good[1]], r"prompt_embeds\[0\] has dtype torch.float32"),
        ([good[0], [[0.0] * d] * 3], r"prompt_embeds\[1\] must be a tensor"),
        (torch.zeros(4, d), "prompt_embeds must be a list"),
    ]
    for embeds, message in cases:
        with pytest.raises(ValueError, match=message):
            generate_ids(decoder, VOCAB, GRID, prompts, max_new_tokens=3, prompt_embeds=embeds)
    image_prompts = [p + [VOCAB.boi] for p in prompts]
    with pytest.raises(ValueError, match="prompt_embeds cannot be combined with classifier-free guidance"):
        generate_ids(decoder, VOCAB, GRID, image_prompts, mode="image", max_new_tokens=7, cfg_scale=2.0,
                     prompt_embeds=embeds_of(decoder, image_prompts))


# ---------------------------------------------------------------------------------------------- high-level API
@pytest.fixture(scope="module")
def tiny_model(request) -> types.SimpleNamespace:
    text = request.getfixturevalue("text_tokenizer")
    torch.manual_seed(0)
    vq = VQImageTokenizer(ImageTokenizerConfig(image_size=16, base_channels=8, channel_mult=[1, 2, 4], latent_dim=8,
                                               codebook_size=16, kmeans_init=False)).eval()
    vocab = Vocab(n_text=text.vocab_size, codebook_size=16)
    bundle = TokenizerBundle(name="tiny", text=text, vocab=vocab, image_grid=vq.grid, image_tokenizer=vq)
    decoder = make_decoder(vocab_size=vocab.size, max_seq_len=96).float()
    return types.SimpleNamespace(decoder=decoder, bundle=bundle, vocab=vocab, image_code_cache=ImageCodeCache())


def square(colour: tuple[int, int, int], size: int = 16) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    image.paste(colour, (4, 4, 12, 12))
    return image


def test_prompt_formats(tiny_model) -> None:
    bundle, vocab = tiny_model.bundle, tiny_model.vocab
    cache = ImageCodeCache()
    image = square((255, 0, 0))
    n_img = bundle.image_tokens
    question = bundle.text.encode("what colour is it?")
    qa = build_prompt_ids(["what colour is it?", image], "text", bundle, cache)  # image moved first
    assert qa[0] == vocab.bos and qa[1] == vocab.boi and qa[n_img] == vocab.eoi
    assert qa[n_img + 1 :] == question + [vocab.sep]
    caption = build_prompt_ids([image], "text", bundle, cache)
    assert caption == qa[: n_img + 1]
    gen = build_prompt_ids(["a red square"], "image", bundle, cache)
    assert gen == [vocab.bos, *bundle.text.encode("a red square"), vocab.boi]
    assert cache.misses == 1 and cache.hits == 1  # the same pixels were encoded once
    assert len(build_prompt_ids([image.copy()], "text", bundle, cache)) == n_img + 1
    assert cache.misses == 1 and cache.hits == 2  # a copy (same pixels, new object) hits too
    build_prompt_ids([square((0, 0, 255))], "text", bundle, cache)
    assert cache.misses == 2


def test_generate_shapes_and_stream_equals_generate(tiny_model) -> None:
    image = square((0, 255, 0))
    out = generate(tiny_model, [image, "what is it?"], max_new_tokens=8, temperature=1.0, seed=3)
    assert isinstance(out, list) and all(isinstance(s, str) for s in out)
    batch = generate(tiny_model, [[image], ["a green square"], "hello"], max_new_tokens=8, temperature=1.0, seed=3)
    assert len(batch) == 3
    images = generate(tiny_model, ["a green square"], mode="image", cfg_scale=2.0, seed=1)
    assert len(images) == 1 and isinstance(images[0], Image.Image) and images[0].size == (16, 16)
    for kwargs in ({"mode": "text"}, {"mode": "image", "cfg_scale": 3.0}, {"mode": "interleaved"}):
        for seed in range(3):
            args = dict(max_new_tokens=40, temperature=1.5, seed=seed, **kwargs)
            if kwargs["mode"] == "image":
                args["max_new_tokens"] = None
            expected = generate(tiny_model, [image, "a story"], **args)
            got = join_stream(list(stream(tiny_model, [image, "a story"], **args)))
            assert [x if isinstance(x, str) else x.tobytes() for x in got] == \
                   [x if isinstance(x, str) else x.tobytes() for x in expected]
    batch_pieces = list(stream(tiny_model, [["a"], ["b c"]], max_new_tokens=6, temperature=1.0))
    assert all(isinstance(p, tuple) and p[0] in (0, 1) for p in batch_pieces)


@pytest.mark.parametrize(
    ("prompts", "kwargs", "name"),
    [
        ("", {}, "empty"),
        ([["ok"], ["  "]], {}, r"prompts\[1\]"),
        ([["ok"], [3]], {}, r"prompts\[1\]"),
        ("hi", {"max_new_tokens": 0}, "max_new_tokens"),
        ("hi", {"temperature": -0.1}, "temperature"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"top_p": 1.01}, "top_p"),
        ("hi", {"image_top_p": 2.0}, "image_top_p"),
        ("hi", {"top_k": -1}, "top_k"),
        ("hi", {"mode": "image", "cfg_scale": 0.9}, "cfg_scale"),
        ("hi", {"mode": "text", "cfg_scale": 2.0}, "cfg_scale"),
        ("hi", {"mode": "audio"}, "mode"),
        ("hi", {"max_new_tokens": 500}, "max_seq_len"),
    ],
)
def test_high_level_errors(tiny_model, prompts, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate(tiny_model, prompts, **kwargs)
    with pytest.raises(ValueError, match=name):
        stream(tiny_model, prompts, **kwargs)  # validated at call time, not on first next()


def test_cli_generate_writes_text_and_images(tmp_path, capsys) -> None:
    """`chameleon-lite generate` on an exported (random, tiny) model: text to stdout, images as PNG files."""
    from chameleon_lite.cli import main
    from chameleon_lite.native.chameleon import export_model_dir
    from chameleon_lite.tokenization.bundle import load_bundle
    bundle = load_bundle(Path(__file__).resolve().parents[1] / "tokenizers" / "shapes-64")
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=bundle.vocab.size, d_model=32, n_layers=1, n_heads=2, max_seq_len=160))
    export_model_dir(decoder, bundle, tmp_path / "model")
    from chameleon_lite import ChameleonLite

    render = Image.new("RGB", (64, 64), "white")
    render.paste((255, 0, 0), (20, 20, 44, 44))
    render.save(tmp_path / "scene.png")
    model = ChameleonLite.from_pretrained(tmp_path / "model")
    assert main(["generate", "--model", str(tmp_path / "model"), "--mode", "image", "--prompt", "a red circle",
                 "--cfg-scale", "2", "--seed", "5", "--out", str(tmp_path / "out")]) == 0
    (png,) = (tmp_path / "out").glob("*.png")
    (expected_image,) = model.generate("a red circle", mode="image", cfg_scale=2.0, seed=5)
    assert Image.open(png).tobytes() == expected_image.tobytes()  # the PNG is the model's image, pixel for pixel
    assert capsys.readouterr().out.splitlines() == [f"[image: {png}]"]
    args = ["--prompt", "How many objects are there?", "--max-new-tokens", "8", "--temperature", "1.5", "--seed", "3"]
    assert main(["generate", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "scene.png"), *args]) == 0
    expected = model.generate([render, "How many objects are there?"], max_new_tokens=8, temperature=1.5, seed=3)
    assert expected and all(isinstance(s, str) for s in expected)  # text mode writes text, never an image
    assert capsys.readouterr().out.splitlines() == expected  # the printed text is the model's, for these arguments
    # a transparent PNG is composited on white, as the training readers do (convert("RGB") would make it black)
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    clear.paste((255, 0, 0, 255), (20, 20, 44, 44))
    clear.save(tmp_path / "clear.png")
    from chameleon_lite.cli import _images

    (read,) = _images(argparse.Namespace(image=[str(tmp_path / "clear.png")]))
    assert read.mode == "RGB" and read.getpixel((0, 0)) == (255, 255, 255) and read.getpixel((30, 30)) == (255, 0, 0)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="bad.png"):
        main(["generate", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "bad.png")])


# ---------------------------------------------------------------------------------------------- GenerationConfig
def test_generation_config_checks_and_build() -> None:
    from chameleon_lite.generation.config import GenerationConfig

    config = GenerationConfig()
    assert config.sampling == SamplingParams(temperature=0.0) and config.mode == "text"
    assert GenerationConfig.build(config) is config
    hot = GenerationConfig.build(config, temperature=0.7, top_k=3)
    assert (hot.temperature, hot.top_k, hot.seed) == (0.7, 3, 0)
    with pytest.raises(TypeError, match="unexpected generation option"):
        GenerationConfig.build(temprature=0.7)
    with pytest.raises(ValueError, match="mode="):
        GenerationConfig(mode="video")
    with pytest.raises(ValueError, match="decode_step="):
        GenerationConfig(decode_step="graph")
    with pytest.raises(ValueError, match="cfg_scale=2.0 needs mode='image'"):
        GenerationConfig(cfg_scale=2.0)
    with pytest.raises(TypeError, match="seed"):
        GenerationConfig(seed=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises((TypeError, ValueError), match="temperature"):
        GenerationConfig(temperature=True)


def test_config_and_keyword_options_are_the_same_call(tiny_model) -> None:
    from chameleon_lite.generation.config import GenerationConfig
    from chameleon_lite.generation.generator import run_generate
    from chameleon_lite.generation.native import NativeGenerator

    image = square((0, 0, 255))
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=3)
    by_config = generate(tiny_model, [image, "what is it?"], config)
    assert by_config == generate(tiny_model, [image, "what is it?"], max_new_tokens=8, temperature=1.0, seed=3)
    assert by_config == run_generate(NativeGenerator(tiny_model), [image, "what is it?"], config)
    assert join_stream(list(stream(tiny_model, [image, "what is it?"], config))) == by_config
    # keyword options replace the config's fields
    assert generate(tiny_model, [image, "what is it?"], config, seed=4) == generate(
        tiny_model, [image, "what is it?"], GenerationConfig(max_new_tokens=8, temperature=1.0, seed=4))
