"""Issue 14 item 4: every loader error names the file and says what is wrong with it."""

import argparse
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from test_safe_io import SHIPPED, tiny_baseline, tiny_checkpoint, tiny_decoder

from chameleon_lite.baseline.vlm import load_baseline_dir, write_baseline_dir
from chameleon_lite.cli import main as cli_main
from chameleon_lite.native.chameleon import export_checkpoint, export_model_dir
from chameleon_lite.tokenization.bundle import TokenizerBundle, load_bundle
from chameleon_lite.tokenization.vocab import Vocab


@pytest.fixture
def bundle(text_tokenizer) -> TokenizerBundle:
    vocab = Vocab(n_text=text_tokenizer.vocab_size, codebook_size=16)
    return TokenizerBundle(name="tiny", text=text_tokenizer, vocab=vocab, image_grid=(2, 2))


@pytest.fixture
def shipped_copy(tmp_path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(SHIPPED, out)
    return out


@pytest.mark.parametrize(
    "damage", ["truncate-half", "truncate-8", "empty", "random", "header-only", "huge-header-length"]
)
def test_a_damaged_image_tokenizer_file_is_named(shipped_copy, damage):
    """Issue 14 item 4: a truncated tokenizer/image_tokenizer.safetensors raised a bare SafetensorError."""
    weights = shipped_copy / "image_tokenizer.safetensors"
    data = weights.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    damaged = {
        "truncate-half": data[: len(data) // 2],
        "truncate-8": data[:8],
        "empty": b"",
        "random": os.urandom(4096),
        "header-only": data[: 8 + header_len],
        "huge-header-length": (2**40).to_bytes(8, "little") + data[8:100],
    }[damage]
    weights.write_bytes(damaged)
    with pytest.raises(ValueError, match=r"image_tokenizer\.safetensors is not a readable safetensors file"):
        load_bundle(shipped_copy)


GARBAGE_YAML = {
    "unclosed": ("kind: baseline\nvit: [unclosed\n", "not valid YAML"),
    "tab-indent": ("kind: baseline\nvit:\n\t- x\n", "not valid YAML"),
    "binary": (b"\x00\x01\x02\xff\xfe", "not UTF-8|not valid YAML"),
    "a list": ("- a\n- b\n", "must be a mapping"),
    "a string": ("just text", "must be a mapping"),
    "duplicate colon": ("kind: baseline: x\n", "not valid YAML"),
    "empty": ("", "must be a mapping"),
    "wrong schema": ("kind: baseline\nvit: 3\n", "is malformed"),
    "unknown key": ("kind: baseline\nvitt: {}\n", "is malformed: Key 'vitt'"),
}


@pytest.mark.parametrize("case", list(GARBAGE_YAML))
def test_garbage_yaml_in_a_baseline_directory_is_named(tmp_path, bundle, case):
    content, match = GARBAGE_YAML[case]
    base = write_baseline_dir(tiny_baseline(bundle), bundle, tmp_path / "baseline")
    cfg = base / "config.yaml"
    cfg.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=rf"{cfg}.*({match})"):
        load_baseline_dir(base)


@pytest.mark.parametrize("case", list(GARBAGE_YAML))
def test_generate_on_a_corrupt_config_names_it(tmp_path, bundle, case, capsys):
    content, match = GARBAGE_YAML[case]
    out = export_model_dir(tiny_decoder(bundle), bundle, tmp_path / "model")
    cfg = out / "config.yaml"
    cfg.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit, match=rf"--model {out}: {cfg}.*({match})"):
        cli_main(["generate", "--model", str(out), "--prompt", "hi", "--max-new-tokens", "1"])


def _zip_checkpoint(tmp_path: Path, bundle: TokenizerBundle) -> bytes:
    return tiny_checkpoint(bundle, tmp_path).read_bytes()


@pytest.mark.parametrize(
    "case, match",
    [
        ("random", "not a Lightning checkpoint: torch.save and Lightning write a zip archive"),
        ("text", "not a Lightning checkpoint"),
        ("empty", "is empty"),
        ("object", "holds objects that weights_only loading refuses.*Unsupported global"),
        ("truncated", "truncated or damaged checkpoint"),
        ("truncated-tail", "truncated or damaged checkpoint"),
        ("zip-of-other-files", "damaged checkpoint"),
        ("corrupt-member", "damaged checkpoint"),
    ],
)
def test_export_checkpoint_says_what_is_wrong_with_the_file(tmp_path, bundle, case, match):
    """Issue 14 item 4: random bytes gave a misleading message, a truncated zip a raw RuntimeError."""
    good = _zip_checkpoint(tmp_path, bundle)
    path = tmp_path / "bad.ckpt"
    if case == "random":
        path.write_bytes(os.urandom(2048))
    elif case == "text":
        path.write_text("model: tiny\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "object":  # a pickled object that is not a tensor or plain container
        torch.save({"hyper_parameters": argparse.Namespace(model={}), "state_dict": {}}, path)
    elif case == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif case == "truncated-tail":
        path.write_bytes(good[:-10])
    elif case == "zip-of-other-files":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    else:  # a stored member's bytes flipped: the zip directory is intact, the pickle is not
        with zipfile.ZipFile(tmp_path / "run.ckpt") as src, zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                dst.writestr(info, bytes(255 - b for b in data) if info.filename.endswith("data.pkl") else data)
    with pytest.raises(ValueError, match=rf"{path}.*{match}|{path} {match}"):
        export_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- seeded fuzzing
def _mutations(text: str, n: int, seed: int) -> list[str]:
    """``n`` seeded corruptions of a YAML file: truncations, lost/doubled/swapped lines, odd characters, re-indents,
    interpolations."""
    import random

    rng = random.Random(seed)
    specials = list(":[]{}&*!|>'\"%@`#-,?\t\n\\")
    specials += ["${oc.env:HOME}", "${x}", "*a", "&a", "!!python/tuple", "\x00", "é"]
    out = []
    for _ in range(n):
        lines = text.splitlines(keepends=True)
        kind = rng.randrange(7)
        if kind == 0:
            s = text[: rng.randrange(len(text))]
        elif kind == 1:
            del lines[rng.randrange(len(lines))]
            s = "".join(lines)
        elif kind == 2:
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            s = "".join(lines)
        elif kind == 3:
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
            s = "".join(lines)
        elif kind == 4:
            i = rng.randrange(len(text))
            s = text[:i] + rng.choice(specials) + text[i + 1 :]
        elif kind == 5:
            i = rng.randrange(len(lines))
            lines[i] = " " * rng.choice([1, 3, 4]) + lines[i]
            s = "".join(lines)
        else:
            i = rng.randrange(len(text))
            s = text[:i] + rng.choice(specials) + text[i:]
        out.append(s)
    return out


def _fuzz(file: Path, load, n: int, seed: int) -> dict[str, int]:
    """Every mutation of ``file`` either loads or raises ValueError naming it; returns counts per outcome."""
    original = file.read_text()
    outcomes = {"loaded": 0, "ValueError naming the file": 0}
    for text in _mutations(original, n, seed):
        file.write_text(text, encoding="utf-8")
        try:
            load()
            outcomes["loaded"] += 1
        except ValueError as err:
            assert str(file) in str(err), (text, err)
            outcomes["ValueError naming the file"] += 1
    file.write_text(original)
    return outcomes


N_FUZZ = 150


def test_mutated_config_files_load_or_raise_naming_the_file(tmp_path, bundle):
    from chameleon_lite.native.chameleon import load_model_config
    from chameleon_lite.world.shapes_world import ShapesWorldSpec, load_world_spec, write_shapes_world
    native = export_model_dir(tiny_decoder(bundle), bundle, tmp_path / "native")
    base = write_baseline_dir(tiny_baseline(bundle), bundle, tmp_path / "baseline")
    world = tmp_path / "world"
    write_shapes_world(ShapesWorldSpec(train=2, val=1, test=1, seed=1, shard_size=8), world, progress=False)
    results = {
        "native config.yaml": _fuzz(native / "config.yaml", lambda: load_model_config(native / "config.yaml"),
                                    N_FUZZ, 1),
        "tokenizer.yaml": _fuzz(native / "tokenizer" / "tokenizer.yaml",
                                lambda: load_bundle(native / "tokenizer"), N_FUZZ, 2),
        "baseline config.yaml": _fuzz(base / "config.yaml", lambda: load_baseline_dir(base), N_FUZZ, 3),
        "world.yaml": _fuzz(world / "world.yaml", lambda: load_world_spec(world), N_FUZZ, 4),
    }
    for name, outcomes in results.items():
        assert sum(outcomes.values()) == N_FUZZ, name
        assert outcomes["ValueError naming the file"] > N_FUZZ // 4, (name, outcomes)  # the fuzzer does break files
    print(results)


def test_mutated_weights_and_checkpoints_load_or_raise_naming_the_file(tmp_path, bundle, shipped_copy):
    import random

    rng = random.Random(0)
    weights = shipped_copy / "image_tokenizer.safetensors"
    good_weights = weights.read_bytes()
    ckpt = tiny_checkpoint(bundle, tmp_path)
    good_ckpt = ckpt.read_bytes()
    outcomes = {"weights": {"loaded": 0, "ValueError": 0}, "checkpoint": {"loaded": 0, "ValueError": 0}}
    for trial in range(60):
        for name, file, good in (("weights", weights, good_weights), ("checkpoint", ckpt, good_ckpt)):
            data = bytearray(good)
            if trial % 3 == 0:
                data = data[: rng.randrange(len(data))]
            else:  # flip bytes, mostly in the header / zip directory where they matter
                region = 200 if trial % 3 == 1 else len(data)
                for _ in range(rng.randint(1, 8)):
                    i = rng.randrange(min(region, len(data))) if trial % 3 == 1 else len(data) - 1 - rng.randrange(200)
                    data[i] = rng.randrange(256)
            file.write_bytes(bytes(data))
            try:
                if name == "weights":
                    load_bundle(shipped_copy)
                else:
                    export_checkpoint(file, tmp_path / f"out-{trial}")
                outcomes[name]["loaded"] += 1
            except ValueError as err:
                assert str(file) in str(err), err
                outcomes[name]["ValueError"] += 1
    assert all(o["ValueError"] >= 20 for o in outcomes.values()), outcomes
    print(outcomes)


HUGE_OR_NEGATIVE = ["0", "-1", "1e309", ".nan", str(2**70)]  # the values that once hung or crashed a loader
WRONG_TYPES = ["x", "[]", "{}", "null", "true", "1.5", "'7'", "[1, 2, 3]"]
ODD_VALUES = HUGE_OR_NEGATIVE + WRONG_TYPES


def _odd_values_for_line(i: int, exhaustive: bool) -> list[str]:
    """Every odd value, or (default run) every huge/negative one plus two wrong types rotating with the line, so
    each wrong type still reaches a quarter of each file's lines at half the loads."""
    if exhaustive:
        return ODD_VALUES
    return HUGE_OR_NEGATIVE + [WRONG_TYPES[(2 * i + j) % len(WRONG_TYPES)] for j in range(2)]


@pytest.mark.parametrize("exhaustive", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_every_config_value_replaced_by_an_odd_one_loads_or_is_named(tmp_path, bundle, exhaustive):
    """Each scalar of a native and a baseline config.yaml, a tokenizer.yaml and a world.yaml replaced in turn by
    odd values (huge, infinite, NaN, wrong types; all of ``ODD_VALUES`` per line with ``-m slow``): the directory
    loads or a ValueError names the file, within seconds. A config asking for 2**70 layers used to keep the loader
    building layers for ever."""
    import re
    import signal

    from chameleon_lite.native.chameleon import ChameleonLite
    from chameleon_lite.world.shapes_world import ShapesWorldSpec, load_world_spec, write_shapes_world
    def too_slow(*args):
        raise TimeoutError("a load took more than 20 s")

    native = export_model_dir(tiny_decoder(bundle), bundle, tmp_path / "native")
    base = write_baseline_dir(tiny_baseline(bundle), bundle, tmp_path / "baseline")
    world = tmp_path / "world"
    write_shapes_world(ShapesWorldSpec(train=2, val=1, test=1, seed=1, shard_size=8), world, progress=False)
    targets = {
        "native": (native / "config.yaml", lambda: ChameleonLite.from_pretrained(native)),
        "bundle": (native / "tokenizer" / "tokenizer.yaml", lambda: load_bundle(native / "tokenizer")),
        "baseline": (base / "config.yaml", lambda: load_baseline_dir(base)),
        "world": (world / "world.yaml", lambda: load_world_spec(world)),
    }
    previous = signal.signal(signal.SIGALRM, too_slow)
    counts = {}
    try:
        for name, (file, load) in targets.items():
            original = file.read_text()
            lines = original.splitlines()
            counts[name] = {"loaded": 0, "named": 0}
            for i, line in enumerate(lines):
                m = re.match(r"^(\s*(?:- )?[A-Za-z_]+: )(.+)$", line) or re.match(r"^(\s*- )(.+)$", line)
                for value in _odd_values_for_line(i, exhaustive) if m else []:
                    file.write_text("\n".join([*lines[:i], m.group(1) + value, *lines[i + 1 :]]) + "\n")
                    signal.alarm(20)
                    try:
                        load()
                        counts[name]["loaded"] += 1
                    except (ValueError, FileNotFoundError) as err:
                        assert str(file) in str(err), (line, value, err)
                        counts[name]["named"] += 1
                    finally:
                        signal.alarm(0)
            file.write_text(original)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert all(c["named"] > (100 if exhaustive else 50) for c in counts.values()), counts
    print(counts)


def test_an_image_tokenizer_config_claiming_a_huge_model_is_refused_without_building_it(shipped_copy):
    """tokenizer.yaml and the weights' stored config both claim base_channels=256 (~2 GB of weights) while the file
    holds the 16-channel tensors: the shape check runs on the meta device and the loader stays small."""
    import json
    import subprocess
    import sys

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights = shipped_copy / "image_tokenizer.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = dict(f.metadata())
    stored = json.loads(metadata["config"])
    stored["base_channels"] = 256
    metadata["config"] = json.dumps(stored)
    save_file(load_file(str(weights)), str(weights), metadata=metadata)
    cfg = shipped_copy / "tokenizer.yaml"
    cfg.write_text(cfg.read_text().replace("base_channels: 16", "base_channels: 256"))
    code = ("import resource\nfrom chameleon_lite.tokenization.bundle import load_bundle\n"
            f"try:\n    load_bundle({str(shipped_copy)!r})\nexcept ValueError as err:\n    print('REFUSED', err)\n"
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            # VmHWM is this process image's own peak; ru_maxrss also carries the forking pytest process's size
            "import pathlib\nfor line in pathlib.Path('/proc/self/status').read_text().splitlines():\n"
            "    if line.startswith('VmHWM:'):\n        print('PEAK_KB', line.split()[1])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "REFUSED" in result.stdout and str(weights) in result.stdout, result.stdout + result.stderr
    assert "do not fit the config" in result.stdout
    peak_mb = int(result.stdout.split("PEAK_KB")[-1].split()[0]) / 1024  # VmHWM where /proc has it
    assert peak_mb < 1200, f"the loader peaked at {peak_mb:.0f} MB"  # building the claimed model takes > 2 GB


def test_a_vision_encoder_directory_names_its_faults(tmp_path):
    """load_vision_encoder (stage-1 ``encoder_init``): a damaged weights file, a config claiming 2**40 layers or
    other shapes than the file holds are ValueErrors naming the files, raised before anything is built."""
    from safetensors.torch import save_file

    from chameleon_lite.baseline.vision_encoder import VisionEncoder, ViTConfig
    from chameleon_lite.training.lit_baseline import load_vision_encoder

    enc = tmp_path / "encoder"
    enc.mkdir()
    config_text = "image_size: 32\npatch_size: 16\nd_model: 32\nn_layers: 2\nn_heads: 2\n"
    (enc / "config.yaml").write_text(config_text)
    state = {k: v.contiguous() for k, v in VisionEncoder(ViTConfig(image_size=32, patch_size=16, d_model=32,
                                                                   n_layers=2, n_heads=2)).state_dict().items()}
    save_file(state, str(enc / "model.safetensors"))
    assert load_vision_encoder(enc) is not None
    (enc / "config.yaml").write_text(config_text.replace("n_layers: 2", f"n_layers: {2**40}"))
    with pytest.raises(ValueError, match=rf"model\.safetensors .*config\.yaml.*n_layers={2**40} but the file"):
        load_vision_encoder(enc)
    (enc / "config.yaml").write_text(config_text.replace("d_model: 32", "d_model: 64"))
    with pytest.raises(ValueError, match=r"config\.yaml\).*weights do not match the config"):
        load_vision_encoder(enc)
    (enc / "config.yaml").write_text(config_text)
    data = (enc / "model.safetensors").read_bytes()
    (enc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_vision_encoder(enc)
