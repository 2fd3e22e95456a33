"""Every input to ``generate`` either works or is refused with an error naming it, for both arms (issue 14).

The argument check is ``sampling.check_generation_args`` (+ ``SamplingParams``) and the prompt-image check
``image_preprocessing.check_image`` (through ``generation.check_segments``), shared by the native and baseline
arms. The explicit cases below come from the issue; ``test_fuzz_generate_inputs`` is a seeded fuzzer over the
public arguments and prompt images of both arms.
"""

from __future__ import annotations

import math
import random
import re
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chameleon_lite.baseline.projectors import ProjectorConfig
from chameleon_lite.baseline.vision_encoder import ViTConfig
from chameleon_lite.baseline.vlm import BaselineConfig, BaselineVLM
from chameleon_lite.generation.baseline import generate as baseline_generate
from chameleon_lite.generation.native import ImageCodeCache, generate_ids
from chameleon_lite.generation.native import generate as native_generate
from chameleon_lite.generation.sampling import SamplingParams
from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import Decoder
from chameleon_lite.tokenization.bundle import TokenizerBundle, load_bundle
from chameleon_lite.tokenization.image_tokenizer import VQImageTokenizer
from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig
from chameleon_lite.tokenization.vocab import Vocab

BUNDLE = Path(__file__).resolve().parents[1] / "tokenizers" / "shapes-64"
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes up to this (negative seeds wrap onto it)


# ---------------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def native(text_tokenizer) -> types.SimpleNamespace:
    torch.manual_seed(0)
    vq = VQImageTokenizer(ImageTokenizerConfig(image_size=16, base_channels=8, channel_mult=[1, 2, 4], latent_dim=8,
                                               codebook_size=16, kmeans_init=False)).eval()
    vocab = Vocab(n_text=text_tokenizer.vocab_size, codebook_size=16)
    bundle = TokenizerBundle(name="tiny", text=text_tokenizer, vocab=vocab, image_grid=vq.grid, image_tokenizer=vq)
    decoder = Decoder(DecoderConfig(vocab_size=vocab.size, pad_vocab_to_multiple_of=16, d_model=32, n_layers=2,
                                    n_heads=4, n_kv_heads=2, max_seq_len=96, init_std=0.3,
                                    attention_backend="sdpa")).eval()
    return types.SimpleNamespace(decoder=decoder, bundle=bundle, vocab=vocab, image_code_cache=ImageCodeCache())


@pytest.fixture(scope="module")
def baseline() -> BaselineVLM:
    if not BUNDLE.is_dir():
        pytest.skip("needs the shipped tokenizer bundle")
    bundle = load_bundle(BUNDLE, load_image_tokenizer=False)
    config = BaselineConfig(
        vit=ViTConfig(image_size=32, patch_size=16, d_model=32, n_layers=2, n_heads=2),
        projector=ProjectorConfig(kind="mlp"),
        decoder=DecoderConfig(vocab_size=bundle.vocab.size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              max_seq_len=96, init_std=0.3),
    )
    torch.manual_seed(0)
    model = BaselineVLM(config, bundle.vocab).eval()
    model.bundle = bundle
    return model


def picture(size: tuple[int, int] = (16, 16), mode: str = "RGB", colour: int = 0) -> Image.Image:
    rng = np.random.default_rng(colour)
    w, h = size
    image = Image.fromarray(rng.integers(0, 256, (max(h, 1), max(w, 1), 3), dtype=np.uint8), "RGB")
    if (w, h) != image.size:  # a zero side: PIL can make one, numpy arrays cannot
        image = Image.new("RGB", (w, h))
    return image.convert(mode) if mode != "RGB" else image


def arms(native, baseline):
    return {"native": lambda *a, **k: native_generate(native, *a, **k),
            "baseline": lambda *a, **k: baseline_generate(baseline, *a, **k)}


# ---------------------------------------------------------------------------------------------- the cases
BAD_ARGUMENTS = [
    # (name, value, which arms have the argument, extra kwargs)
    ("temperature", math.inf, ("native", "baseline"), {}),
    ("temperature", math.nan, ("native", "baseline"), {}),
    ("temperature", True, ("native", "baseline"), {}),
    ("top_p", math.nan, ("native", "baseline"), {}),
    ("top_k", True, ("native", "baseline"), {}),
    ("image_temperature", math.inf, ("native",), {}),
    ("image_temperature", math.nan, ("native",), {}),
    ("cfg_scale", math.inf, ("native",), {"mode": "image"}),
    ("cfg_scale", math.nan, ("native",), {"mode": "image"}),
    ("cfg_scale", True, ("native",), {"mode": "image"}),
    ("seed", 1.5, ("native", "baseline"), {}),
    ("seed", 2**70, ("native", "baseline"), {}),
    ("seed", -1, ("native", "baseline"), {}),
    ("seed", True, ("native", "baseline"), {}),
    ("stop_ids", ["x"], ("native", "baseline"), {}),
    ("stop_ids", [10**9], ("native", "baseline"), {}),
    ("stop_ids", [-1], ("native", "baseline"), {}),
    ("stop_ids", "abc", ("native", "baseline"), {}),
    ("stop_ids", [1.0], ("native", "baseline"), {}),
]


BAD_CASES = [(arm, name, value, extra) for name, value, where, extra in BAD_ARGUMENTS for arm in where]


@pytest.mark.parametrize(("arm", "name", "value", "extra"), BAD_CASES,
                         ids=[f"{a}-{n}={v!r}" for a, n, v, _ in BAD_CASES])
def test_bad_generation_arguments_are_refused_naming_them(native, baseline, arm, name, value, extra):
    with pytest.raises((ValueError, TypeError), match=rf"(?<![a-z_]){name}"):
        arms(native, baseline)[arm]("a red circle", max_new_tokens=None if extra else 4, **{name: value}, **extra)


def test_baseline_stream_checks_its_arguments_when_called(baseline) -> None:
    """As the native ``stream``: a bad argument raises at the call, not at the first ``next()``."""
    from chameleon_lite.generation.baseline import stream

    for kwargs, name in [({"seed": 2**70}, "seed"), ({"temperature": math.inf}, "temperature"),
                         ({"stop_ids": ["x"]}, "stop_ids"), ({"mode": "image"}, "mode")]:
        with pytest.raises((ValueError, TypeError), match=name):
            stream(baseline, "a red circle", **kwargs)
    with pytest.raises(ValueError, match=r"prompt segment 0 \(an image\) is 0x4 pixels"):
        stream(baseline, [picture((0, 4)), "what is it?"])
    pieces = stream(baseline, [picture(), "what is it?"], max_new_tokens=6)
    assert "".join(pieces) == baseline_generate(baseline, [picture(), "what is it?"], max_new_tokens=6)[0]


def test_engine_refuses_what_the_high_level_api_refuses(native) -> None:
    prompt = [native.vocab.bos, 5, 6]
    for kwargs, name in [({"seed": 2**64}, "seed"), ({"seed": 0.5}, "seed"), ({"stop_ids": [native.vocab.size]},
                         "stop_ids"), ({"cfg_scale": math.inf, "mode": "image"}, "cfg_scale")]:
        ids = prompt + [native.vocab.boi] if kwargs.get("mode") == "image" else prompt
        with pytest.raises((ValueError, TypeError), match=name):
            generate_ids(native.decoder, native.vocab, native.bundle.image_grid, [ids], max_new_tokens=8, **kwargs)
    with pytest.raises(TypeError, match="temperature"):
        SamplingParams(temperature=True)


@pytest.mark.parametrize("arm", ["native", "baseline"])
def test_seed_range_is_the_generators(native, baseline, arm) -> None:
    """The largest seed works and differs from its wrapped negative twin's refusal; the seed is not truncated."""
    run = arms(native, baseline)[arm]
    top = run("a red circle", max_new_tokens=6, temperature=1.0, seed=MAX_SEED)
    assert top == run("a red circle", max_new_tokens=6, temperature=1.0, seed=np.uint64(MAX_SEED))
    with pytest.raises(ValueError, match=r"seed=18446744073709551616 must be an int in \[0, 18446744073709551615\]"):
        run("a red circle", max_new_tokens=6, temperature=1.0, seed=MAX_SEED + 1)


@pytest.mark.parametrize("arm", ["native", "baseline"])
@pytest.mark.parametrize(("size", "problem"), [((0, 16), "0x16 pixels"), ((16, 0), "16x0 pixels"),
                                               ((5000, 1), "5000x1 pixels: aspect ratio 5000.0 is above 20"),
                                               ((2, 41), "2x41 pixels: aspect ratio 20.5 is above 20")])
def test_bad_prompt_images_are_refused_naming_them(native, baseline, arm, size, problem) -> None:
    run = arms(native, baseline)[arm]
    with pytest.raises(ValueError, match=rf"prompts\[1\] segment 0 \(an image\) is {re.escape(problem)}"):
        run([[picture()], [picture(size), "what is it?"]], max_new_tokens=4)
    assert run([picture((20, 1)), "what is it?"], max_new_tokens=4)  # aspect ratio 20 is what training reads


@pytest.mark.parametrize("arm", ["native", "baseline"])
def test_a_tiny_temperature_samples_like_greedy(native, baseline, arm) -> None:
    """A positive temperature far below 1e-38 (0 in float32) gave NaN probabilities; it is greedy in the limit."""
    run = arms(native, baseline)[arm]
    prompts = [[picture(), "what is it?"], ["a red circle"]]
    greedy = run(prompts, max_new_tokens=8)
    assert run(prompts, max_new_tokens=8, temperature=1e-300, seed=3) == greedy
    if arm == "native":
        images = native_generate(native, "a red circle", mode="image", image_temperature=1e-300)
        assert images[0].tobytes() == native_generate(native, "a red circle", mode="image",
                                                      image_temperature=0.0)[0].tobytes()


@pytest.mark.parametrize("arm", ["native", "baseline"])
def test_a_huge_temperature_is_finite_sampling(native, baseline, arm) -> None:
    out = arms(native, baseline)[arm]("a red circle", max_new_tokens=8, temperature=1e300, seed=1)
    assert isinstance(out, list) and len(out) <= 1


# ---------------------------------------------------------------------------------------------- the fuzzer
NAMES = ["temperature", "top_k", "top_p", "image_temperature", "image_top_k", "image_top_p", "cfg_scale", "seed",
         "stop_ids", "max_new_tokens", "mode"]
BASELINE_NAMES = {"temperature", "top_k", "top_p", "seed", "stop_ids", "max_new_tokens", "mode"}
ODD_VALUES = [0, 0.0, -0.0, 1, 0.5, 2.5, 1e-300, 1e300, 10**30, -1, -1e-9, math.inf, -math.inf, math.nan, True, False,
              None, "1", b"1", [1], (), 1 + 2j, np.float32(0.7), np.int64(3), np.bool_(True), torch.tensor(1.0),
              2**64 - 1, 2**64, 7, 1.0000001]
STOP_VALUES = [[], [0], (3, 4), [10**9], ["x"], "ab", [1.5], [True], None, 5, np.array([1, 2]), torch.tensor([2]),
               [-1], [np.int64(4)], {3}]
MODES = ["text", "image", "interleaved", "audio", None, 1]
IMAGE_MODES = ["RGB", "RGBA", "LA", "L", "1", "P", "P+t", "I;16", "I", "F", "CMYK", "YCbCr", "HSV"]


def fuzz_image(rng: random.Random) -> tuple[Image.Image, bool]:
    """A random prompt image and whether it must be accepted (both sides >= 1 and aspect ratio <= 20)."""
    sides = [0, 1, 2, 3, 7, 16, 33, 64, 200, 401]
    w, h = rng.choice(sides), rng.choice(sides)
    mode = rng.choice(IMAGE_MODES)
    base = picture((w, h), colour=rng.randrange(1000))
    if mode == "P+t":
        image = base.convert("P") if min(w, h) else Image.new("P", (w, h))
        image.info["transparency"] = 0
    elif mode in ("I;16", "I", "F") and min(w, h):
        scale = {"I;16": 257, "I": 257, "F": 1 / 255}[mode]
        array = np.asarray(base.convert("L"), dtype=np.float64) * scale
        image = Image.fromarray(array.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    else:
        image = base.convert(mode) if min(w, h) else Image.new(mode.split("+")[0], (w, h))
    ok = min(w, h) >= 1 and max(w, h) / min(w, h) <= 20
    return image, ok


def fuzz_item(rng: random.Random) -> tuple[object, bool, str]:
    """A random prompt (one batch item), whether it must be accepted, and its class."""
    kind = rng.choice(["image", "image+text", "text", "blank", "bad-segment", "empty-list", "two-images"])
    if kind in ("image", "image+text", "two-images"):
        image, ok = fuzz_image(rng)
        kind = f"{kind} ({'fine' if ok else 'bad'} size)"
        if kind.startswith("image "):
            return [image], ok, kind
        if kind.startswith("two-images"):
            return [image, "and", picture(colour=rng.randrange(9))], ok, kind
        return [image, rng.choice(["what is it?", "how many objects are there?", "é ü 漢字 \x00"])], ok, kind
    if kind == "text":
        return [rng.choice(["a red circle", "x" * rng.randrange(1, 40), "two green triangles"])], True, kind
    if kind == "blank":
        return [rng.choice(["", "   ", "\n"])], False, kind
    if kind == "bad-segment":
        return ["hi", rng.choice([3, None, b"bytes", 1.5, ["nested"]])], False, kind
    return [], False, kind


def _named(err: BaseException, names: list[str]) -> bool:
    return any(re.search(rf"(?<![a-z_]){re.escape(n)}", str(err)) for n in names)


def test_fuzz_generate_inputs(native, baseline) -> None:
    """Seeded fuzzer over the public ``generate`` arguments and prompt images, both arms.

    Argument trials: one argument set to a random (often odd) value, the rest valid; the call must raise
    ValueError/TypeError naming that argument exactly when the documented rules say the value is bad
    (``_must_fail``), and succeed otherwise. Item trials: a batch of
    three prompts whose middle one is random (images of random size and PIL mode, blank text, bad segments); the
    call must raise naming ``prompts[1]`` exactly when the item is bad, and otherwise the two other rows must come
    out exactly as in a batch whose middle item is a plain one (greedy and seeded sampling).
    """
    rng = random.Random(14)
    run = arms(native, baseline)
    outcomes: Counter[tuple[str, str, str]] = Counter()
    classes: Counter[tuple[str, str]] = Counter()
    # ---- argument trials
    for trial in range(240):
        arm = "native" if trial % 2 == 0 else "baseline"
        names = NAMES if arm == "native" else sorted(BASELINE_NAMES)
        name = rng.choice(names)
        value = rng.choice(STOP_VALUES if name == "stop_ids" else MODES if name == "mode" else ODD_VALUES)
        kwargs = {name: value, "max_new_tokens": 4} if name != "max_new_tokens" else {name: value}
        if name in ("cfg_scale", "image_temperature", "image_top_k", "image_top_p") and rng.random() < 0.5:
            kwargs.update(mode="image", max_new_tokens=None)
        if kwargs.get("mode") == "image" and name == "mode":
            kwargs["max_new_tokens"] = None
        vocab_size = native.vocab.size if arm == "native" else baseline.bundle.vocab.size
        must_fail = _must_fail(name, value, arm, vocab_size, kwargs.get("mode", "text"))
        try:
            out = run[arm]("a red circle", **kwargs)
        except (ValueError, TypeError) as err:
            assert _named(err, [name]), f"{arm} {name}={value!r}: the error does not name it: {err}"
            assert must_fail, f"{arm} refused the good value {name}={value!r}: {err}"
            outcomes[(arm, "argument", "refused")] += 1
            classes[(f"argument {name}", "refused")] += 1
            continue
        assert not must_fail, f"{arm} accepted {name}={value!r}"
        assert isinstance(out, list)
        outcomes[(arm, "argument", "works")] += 1
        classes[(f"argument {name}", "works")] += 1
    # ---- batch-item trials
    anchors = [[picture(colour=1), "what is it?"], ["a red circle"]]
    plain = ["two green triangles"]
    settings = [dict(max_new_tokens=6), dict(max_new_tokens=6, temperature=1.3, seed=5)]
    reference = {(arm, i): run[arm]([anchors[0], plain, anchors[1]], **s)
                 for arm in run for i, s in enumerate(settings)}
    for trial in range(200):
        arm = "native" if trial % 2 == 0 else "baseline"
        item, ok, kind = fuzz_item(rng)
        which = rng.randrange(len(settings))
        try:
            out = run[arm]([anchors[0], item, anchors[1]], **settings[which])
        except (ValueError, TypeError) as err:
            assert not ok, f"{arm}: a good item was refused: {err}"
            assert "prompts[1]" in str(err), f"{arm}: the error does not name the item: {err}"
            outcomes[(arm, "item", "refused")] += 1
            classes[(f"item {kind}", "refused")] += 1
            continue
        assert ok, f"{arm}: a bad item was accepted: {item!r}"
        expected = reference[(arm, which)]
        assert _comparable(out[0]) == _comparable(expected[0]) and _comparable(out[2]) == _comparable(expected[2]), (
            f"{arm}: item {item!r} changed its batch-mates' outputs")
        outcomes[(arm, "item", "works")] += 1
        classes[(f"item {kind}", "works")] += 1
    print("fuzz outcomes:", dict(sorted(outcomes.items())))
    print("per class:", dict(sorted(classes.items())))
    for arm in run:  # every class was exercised on both arms
        for what in ("argument", "item"):
            assert outcomes[(arm, what, "works")] > 5 and outcomes[(arm, what, "refused")] > 5, outcomes


def _comparable(segments: list) -> list:
    return [s.tobytes() if isinstance(s, Image.Image) else s for s in segments]


def _must_fail(name: str, value: object, arm: str, vocab_size: int, mode: str = "text") -> bool:
    """Whether ``name=value`` must be refused (an oracle written from the documented rules, not from the code)."""
    is_bool = isinstance(value, (bool, np.bool_))
    if name in ("temperature", "image_temperature", "top_p", "image_top_p", "cfg_scale"):
        if is_bool or not isinstance(value, (int, float, np.floating, np.integer)):
            return True
        x = float(value)
        if not math.isfinite(x):
            return True
        if name.endswith("temperature"):
            return x < 0
        if name.endswith("top_p"):
            return not 0 < x <= 1
        return not 1 <= x <= 1e6 or (x != 1 and mode != "image")  # guidance is for image generation only
    if name in ("seed", "top_k", "image_top_k", "max_new_tokens"):
        if is_bool or not isinstance(value, (int, np.integer)):
            return True
        if name == "seed":
            return not 0 <= int(value) < 2**64
        if name == "max_new_tokens":
            return not 1 <= int(value) <= 50  # the prompt and the budget must fit max_seq_len=96
        return int(value) < 0
    if name == "stop_ids":
        if isinstance(value, (str, bytes, int)) or value is None:
            return True
        items = value.tolist() if hasattr(value, "tolist") else list(value)
        return any(isinstance(s, (bool, float, str)) or not 0 <= int(s) < vocab_size for s in items)
    return name == "mode" and value not in (("text",) if arm == "baseline" else ("text", "image", "interleaved"))
