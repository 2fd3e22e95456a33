"""Issue 14, "nothing lost, nothing leaked", items 1 and 2: writers never delete or overwrite what they did not
write (manifest.json), and YAML read from disk is never interpolated. Loader errors: test_loader_errors.py;
checkpoints: test_checkpoint_safety.py.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from chameleon_lite.baseline.projectors import ProjectorConfig
from chameleon_lite.baseline.vision_encoder import ViTConfig
from chameleon_lite.baseline.vlm import BaselineConfig, BaselineVLM, load_baseline_dir, write_baseline_dir
from chameleon_lite.cli import main as cli_main
from chameleon_lite.model.config import DecoderConfig
from chameleon_lite.model.decoder import Decoder
from chameleon_lite.native.chameleon import (
    ChameleonLite,
    ModelDirConfig,
    export_checkpoint,
    export_model_dir,
    write_model_dir,
)
from chameleon_lite.tokenization.bundle import TokenizerBundle, load_bundle, save_bundle
from chameleon_lite.tokenization.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "tokenizers" / "shapes-64"
MANIFEST_FILE = "manifest.json"


def read_manifest(directory: Path) -> list[str] | None:
    from chameleon_lite.safe_io import read_manifest  # imported here: the rest of this file runs on older trees too

    return read_manifest(directory)


def load_plain_yaml(file: Path):
    from chameleon_lite.safe_io import load_plain_yaml

    return load_plain_yaml(file)


@pytest.fixture
def bundle(text_tokenizer) -> TokenizerBundle:
    vocab = Vocab(n_text=text_tokenizer.vocab_size, codebook_size=16)
    return TokenizerBundle(name="tiny", text=text_tokenizer, vocab=vocab, image_grid=(2, 2))


def tiny_decoder(bundle: TokenizerBundle, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    config = DecoderConfig(vocab_size=bundle.vocab.size, d_model=32, n_layers=1, n_heads=2, max_seq_len=32,
                           attention_backend="sdpa")
    return Decoder(config)


def tiny_baseline(bundle: TokenizerBundle) -> BaselineVLM:
    torch.manual_seed(0)
    config = BaselineConfig(
        vit=ViTConfig(image_size=32, patch_size=16, d_model=32, n_layers=2, n_heads=2),
        projector=ProjectorConfig(kind="mlp", n_queries=4),
        decoder=DecoderConfig(vocab_size=bundle.vocab.size, d_model=32, n_layers=1, n_heads=2, max_seq_len=32),
    )
    return BaselineVLM(config, bundle.vocab)


def tiny_checkpoint(bundle: TokenizerBundle, tmp_path: Path) -> Path:
    """A NativeLMModule-shaped Lightning checkpoint (plain types only) whose tokenizer is a bundle on disk."""
    bundle_dir = save_bundle(bundle, tmp_path / "ckpt-bundle")
    decoder = tiny_decoder(bundle)
    ckpt = {
        "hyper_parameters": {"model": dataclasses.asdict(decoder.config), "tokenizer": str(bundle_dir)},
        "state_dict": {f"decoder.{k}": v for k, v in decoder.state_dict().items()},
        "global_step": 3,
    }
    path = tmp_path / "run.ckpt"
    torch.save(ckpt, path)
    return path


def project_dir(root: Path) -> dict[str, bytes]:
    """The issue's case: a user's project directory that happens to hold a ``config.yaml``."""
    files = {"src/main.py": b"print('hello')\n", "NOTES.md": b"# my notes\n", "config.yaml": b"lr: 0.1\nepochs: 3\n"}
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return files


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- data loss
def cli_export(bundle, out: Path, tmp: Path) -> None:
    """`chameleon-lite export --out`; a refusal ends the command in one line (SystemExit naming the command), and the
    writer's own error is its cause."""
    try:
        cli_main(["export", "--ckpt", str(tiny_checkpoint(bundle, tmp)), "--out", str(out)])
    except SystemExit as exit_:
        assert str(exit_.code).startswith("chameleon-lite export: ")
        raise exit_.__cause__ from None


WRITERS = {
    "save_pretrained": lambda b, out, tmp: ChameleonLite(
        tiny_decoder(b), b, ModelDirConfig(tokenizer=b.name, decoder=tiny_decoder(b).config)
    ).save_pretrained(out),
    "export_model_dir": lambda b, out, tmp: export_model_dir(tiny_decoder(b), b, out),
    "write_model_dir (ExportModelDir)": lambda b, out, tmp: write_model_dir(
        tiny_decoder(b).state_dict(), tiny_decoder(b).config, b, out, trained_steps=1
    ),
    "cli export --out": cli_export,
    "export_checkpoint": lambda b, out, tmp: export_checkpoint(tiny_checkpoint(b, tmp), out),
    "write_baseline_dir": lambda b, out, tmp: write_baseline_dir(tiny_baseline(b), b, out),
    "save_bundle": lambda b, out, tmp: save_bundle(b, out),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_writers_refuse_a_project_directory_and_keep_every_file(tmp_path, bundle, writer):
    """Issue 14 item 1: saving into src/main.py + NOTES.md + an unrelated config.yaml kept only the model files."""
    project = tmp_path / "project"
    project.mkdir()
    before = project_dir(project)
    with pytest.raises(FileExistsError, match=rf"{project}.*no {MANIFEST_FILE}.*refusing"):
        WRITERS[writer](bundle, project, tmp_path)
    assert snapshot(project) == before
    assert not [p.name for p in project.parent.iterdir() if p.name.startswith(".project.")]  # no temporaries left


@pytest.mark.parametrize("writer", list(WRITERS))
def test_writers_fill_an_empty_directory_and_list_what_they_wrote(tmp_path, bundle, writer):
    out = tmp_path / "out"
    out.mkdir()
    WRITERS[writer](bundle, out, tmp_path)
    listed = read_manifest(out)
    assert sorted(listed) == sorted(set(snapshot(out)) - {MANIFEST_FILE})
    if writer != "save_bundle":
        ours = {"config.yaml", "model.safetensors", "tokenizer/tokenizer.yaml", "tokenizer/manifest.json"}
        assert ours <= set(listed)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_rewrite_replaces_only_listed_files(tmp_path, bundle):
    out = export_model_dir(tiny_decoder(bundle, seed=0), bundle, tmp_path / "model")
    (out / "my-notes.txt").write_text("keep me")
    (out / "tokenizer" / "mine.txt").write_text("keep me too")
    first = (out / "model.safetensors").read_bytes()
    export_model_dir(tiny_decoder(bundle, seed=1), bundle, out)
    assert (out / "my-notes.txt").read_text() == "keep me"
    assert (out / "tokenizer" / "mine.txt").read_text() == "keep me too"
    assert (out / "model.safetensors").read_bytes() != first  # the listed file was replaced
    assert "my-notes.txt" not in read_manifest(out)
    loaded = ChameleonLite.from_pretrained(out)
    assert torch.equal(loaded.decoder.embed_tokens.weight, tiny_decoder(bundle, seed=1).embed_tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (tmp_path / "ref").mkdir()  # a new directory gets the umask's permissions (mkdtemp would make it 0700)
    assert out.stat().st_mode == (tmp_path / "ref").stat().st_mode


def test_rewrite_removes_only_files_it_wrote_before(tmp_path, bundle):
    out = save_bundle(bundle, tmp_path / "b", extra_files={"quality.json": "{}\n", "sub/grid.png": b"\x89PNG"})
    (out / "sub" / "user.txt").write_text("mine")
    save_bundle(bundle, out)  # this version has no quality.json or grid
    assert not (out / "quality.json").exists() and not (out / "sub" / "grid.png").exists()
    assert (out / "sub" / "user.txt").read_text() == "mine"
    assert sorted(read_manifest(out)) == ["README.md", "text.model", "tokenizer.yaml"]


def test_a_file_the_manifest_does_not_list_is_never_overwritten(tmp_path, bundle):
    out = save_bundle(bundle, tmp_path / "b")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["files"].remove("text.model")  # as if the user had put their own text.model there
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    (out / "text.model").write_bytes(b"the user's file")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=r"text\.model exists but .*does not list it"):
        save_bundle(bundle, out)
    assert snapshot(out) == before


@pytest.mark.parametrize("listed", ["../victim.txt", "/etc/passwd", "a/../../victim.txt", "./x"])
def test_a_manifest_pointing_outside_the_directory_is_refused(tmp_path, bundle, listed):
    out = save_bundle(bundle, tmp_path / "b")
    (tmp_path / "victim.txt").write_text("precious")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["files"].append(listed)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a plain relative path"):
        save_bundle(bundle, out)
    assert (tmp_path / "victim.txt").read_text() == "precious"


@pytest.mark.parametrize("content", ["not json", "{}", '{"format": "other", "files": []}', "[1, 2]"])
def test_a_foreign_or_broken_manifest_is_refused(tmp_path, bundle, content):
    out = tmp_path / "b"
    out.mkdir()
    (out / MANIFEST_FILE).write_text(content)
    (out / "data.bin").write_text("x")
    with pytest.raises(ValueError, match=f"{MANIFEST_FILE}"):
        save_bundle(bundle, out)
    assert (out / "data.bin").read_text() == "x"


def test_a_file_in_place_of_the_directory_is_refused(tmp_path, bundle):
    (tmp_path / "model").write_text("a file")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_model_dir(tiny_decoder(bundle), bundle, tmp_path / "model")
    assert (tmp_path / "model").read_text() == "a file"


@pytest.mark.parametrize("name", ["shapes-64", "shapes-48", "shapes-32"])
def test_shipped_bundles_list_their_files_and_load_without_a_manifest(tmp_path, name):
    """Shipped bundles carry the manifest their recipes write (so re-running a recipe replaces them); a bundle made
    before manifests existed (the same files, no manifest.json) still loads."""
    shipped = REPO / "tokenizers" / name
    assert sorted(read_manifest(shipped)) == sorted(p.name for p in shipped.iterdir() if p.name != "manifest.json")
    old = tmp_path / name
    shutil.copytree(shipped, old)
    (old / "manifest.json").unlink()
    assert read_manifest(old) is None
    assert load_bundle(old, load_image_tokenizer=False).name == name


# ---------------------------------------------------------------------------------------------- untrusted YAML
SECRET = "s3cr3t-value-from-the-environment"


def test_bundle_config_with_an_env_interpolation_is_refused(tmp_path, bundle, monkeypatch):
    """Issue 14 item 2: ``notes: ${oc.env:...}`` loaded with the real value and save_bundle wrote it back."""
    monkeypatch.setenv("CHAMELEON_TEST_SECRET", SECRET)
    out = save_bundle(bundle, tmp_path / "b")
    cfg = out / "tokenizer.yaml"
    cfg.write_text(cfg.read_text().replace("notes: ''", "notes: ${oc.env:CHAMELEON_TEST_SECRET}"))
    with pytest.raises(ValueError, match=r"tokenizer\.yaml: refusing to read notes='\$\{oc\.env") as err:
        load_bundle(out)
    assert SECRET not in str(err.value)
    with pytest.raises(ValueError, match=r"cannot write notes='\$\{oc\.env:CHAMELEON_TEST_SECRET\}'"):
        save_bundle(dataclasses.replace(bundle, notes="${oc.env:CHAMELEON_TEST_SECRET}"), tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "old, new, key",
    [("tokenizer: tiny", "tokenizer: ${oc.env:CHAMELEON_TEST_SECRET}", "tokenizer"),
     ("  d_model: 32", "  d_model: ${oc.decode:'32'}", r"decoder\.d_model"),
     ("trained_steps: null", "trained_steps: ${oc.env:CHAMELEON_TEST_SECRET,3}", "trained_steps"),
     ("kind: native", "kind: native${oc.env:CHAMELEON_TEST_SECRET}", "kind")],
)
def test_model_config_interpolations_are_refused(tmp_path, bundle, monkeypatch, old, new, key):
    monkeypatch.setenv("CHAMELEON_TEST_SECRET", SECRET)
    out = export_model_dir(tiny_decoder(bundle), bundle, tmp_path / "model")
    text = (out / "config.yaml").read_text()
    assert old in text
    (out / "config.yaml").write_text(text.replace(old, new))
    with pytest.raises(ValueError, match=rf"config\.yaml: refusing to read {key}=") as err:
        ChameleonLite.from_pretrained(out)
    assert SECRET not in str(err.value)


def test_baseline_world_encoder_and_token_record_yaml_are_not_interpolated(tmp_path, bundle, monkeypatch):
    from chameleon_lite.data.pretokenize import _check_record
    from chameleon_lite.training.lit_baseline import load_vision_encoder
    from chameleon_lite.world.shapes_world import ShapesWorldSpec, load_world_spec, write_shapes_world
    monkeypatch.setenv("CHAMELEON_TEST_SECRET", SECRET)
    evil = "${oc.env:CHAMELEON_TEST_SECRET}"
    base = write_baseline_dir(tiny_baseline(bundle), bundle, tmp_path / "baseline")
    text = (base / "config.yaml").read_text()
    (base / "config.yaml").write_text(text.replace("tokenizer: tiny", f"tokenizer: {evil}"))
    with pytest.raises(ValueError, match=r"config\.yaml: refusing to read tokenizer="):
        load_baseline_dir(base)

    world = tmp_path / "world"
    write_shapes_world(ShapesWorldSpec(train=2, val=1, test=1, seed=1, shard_size=8), world, progress=False)
    text = (world / "world.yaml").read_text()
    (world / "world.yaml").write_text(text.replace("  seed: 1\n", f"  seed: {evil}\n", 1))
    with pytest.raises(ValueError, match=r"world\.yaml: refusing to read spec\.seed="):
        load_world_spec(world)

    enc = tmp_path / "encoder"
    enc.mkdir()
    (enc / "config.yaml").write_text(f"image_size: {evil}\n")
    save_file({}, str(enc / "model.safetensors"))
    with pytest.raises(ValueError, match=r"config\.yaml: refusing to read image_size="):
        load_vision_encoder(enc)

    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "tokens.yaml").write_text(f"tokenizer: {evil}\n")
    with pytest.raises(ValueError, match=r"tokens\.yaml: refusing to read tokenizer="):
        _check_record(bundle, tokens)


@pytest.mark.parametrize(
    "text, match",
    [
        ("a: &x [1, 2]\nb: [*x, *x, *x]\n", "aliases"),  # the seed of a billion-laughs file
        ("a: !!python/object/apply:os.system ['echo pwned']\n", "python/object"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply|not valid YAML"),
        ("${oc.env:HOME}: 1\n", r"refusing to read \$\{oc\.env:HOME\}="),
        ("a:\n  - {b: '${x}'}\n", r"refusing to read a\[0\]\.b="),
        ("a: [unclosed\n", "not valid YAML"),
    ],
)
def test_plain_yaml_loader_refuses_what_is_not_plain_data(tmp_path, text, match):
    file = tmp_path / "f.yaml"
    file.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        load_plain_yaml(file)
    assert str(file) in str(err.value)


def test_non_utf8_yaml_is_named(tmp_path):
    file = tmp_path / "f.yaml"
    file.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=rf"{file} is not UTF-8"):
        load_plain_yaml(file)


def test_compare_config_is_not_interpolated(tmp_path, monkeypatch):
    from chameleon_lite.comparison.config import load_compare_config

    monkeypatch.setenv("CHAMELEON_TEST_SECRET", SECRET)
    cfg = tmp_path / "compare.yaml"
    cfg.write_text("name: ${oc.env:CHAMELEON_TEST_SECRET}\ntrain_samples: 10\n")
    with pytest.raises(ValueError, match=r"compare\.yaml: refusing to read name=") as err:
        load_compare_config(cfg)
    assert SECRET not in str(err.value)
    assert load_compare_config(REPO / "configs" / "compare" / "tiny.yaml").name  # shipped configs still load


def test_export_callbacks_refuse_the_target_before_training(tmp_path):
    """ExportModelDir, ExportBaselineDir, ExportVisionEncoder and ExportTokenizerBundle check their out_dir when fit
    starts, so a run is not trained only to be refused at the end; the project's files stay."""
    from types import SimpleNamespace

    from chameleon_lite.training.bundle_export import ExportTokenizerBundle
    from chameleon_lite.training.lit_baseline import ExportBaselineDir, ExportVisionEncoder
    from chameleon_lite.training.lit_native import ExportModelDir

    project = tmp_path / "project"
    project.mkdir()
    before = project_dir(project)
    trainer = SimpleNamespace(default_root_dir=str(tmp_path / "run"))
    callbacks = [ExportModelDir(out_dir=str(project)), ExportBaselineDir(str(project)),
                 ExportVisionEncoder(str(project)), ExportTokenizerBundle(str(project), text_shards=[])]
    for callback in callbacks:
        with pytest.raises(FileExistsError, match=rf"{project} is not empty and has no {MANIFEST_FILE}"):
            callback.on_fit_start(trainer, None)
    ExportModelDir().on_fit_start(trainer, None)  # <default_root_dir>/model: absent, fine
    assert snapshot(project) == before


def test_image_tokenizer_save_pretrained_keeps_other_files(tmp_path):
    from chameleon_lite.tokenization.image_tokenizer import VQImageTokenizer
    from chameleon_lite.tokenization.image_tokenizer_config import ImageTokenizerConfig

    model = VQImageTokenizer(ImageTokenizerConfig(image_size=32, base_channels=8, channel_mult=[1, 1, 2], latent_dim=8,
                                                  codebook_size=8))
    project = tmp_path / "project"
    project.mkdir()
    before = project_dir(project)
    with pytest.raises(FileExistsError, match="refusing"):
        model.save_pretrained(project)
    assert snapshot(project) == before
    out = tmp_path / "vq"
    model.save_pretrained(out)
    (out / "mine.txt").write_text("keep")
    model.save_pretrained(out)
    assert (out / "mine.txt").read_text() == "keep"
    assert sorted(read_manifest(out)) == ["image_tokenizer.safetensors", "image_tokenizer.yaml"]


# ---------------------------------------------------------------------------------------------- seeded fuzzing
N_DIRS = 120


def _random_target(root: Path, bundle: TokenizerBundle, rng) -> None:
    """A directory as users leave them: their own files, an earlier save with files added, removed or clashing,
    a tampered manifest, a linked folder pointing outside."""
    names = ["config.yaml", "README.md", "text.model", "tokenizer.yaml", "notes.txt", "src/main.py", "sub/x.bin",
             "quality.json", "sub/grid.png"]
    scenario = rng.randrange(4)
    if scenario == 0:  # nothing, or an empty directory
        if rng.random() < 0.5:
            root.mkdir()
        return
    if scenario >= 2:  # an earlier save
        save_bundle(bundle, root, extra_files={"sub/x.bin": b"old"} if rng.random() < 0.5 else None)
    root.mkdir(exist_ok=True)
    for _ in range(rng.randrange(4)):  # the user's own files (may take a name we write)
        name = rng.choice(names)
        if not (root / name).exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(f"user {rng.random()}".encode())
    if scenario == 3 and (root / MANIFEST_FILE).exists():
        manifest = json.loads((root / MANIFEST_FILE).read_text())
        action = rng.randrange(5)
        if action == 0 and manifest["files"]:
            manifest["files"].remove(rng.choice(manifest["files"]))  # a listed file becomes the user's
        elif action == 1:
            manifest["files"].append(rng.choice(["../outside.txt", "/etc/hostname", "sub/../../x", "a//b"]))
        elif action == 2:
            manifest["format"] = "something else"
        elif action == 3 and manifest["files"]:
            (root / rng.choice(manifest["files"])).unlink(missing_ok=True)  # a listed file already gone
        else:  # a linked folder: writing sub/x.bin would land outside
            shutil.rmtree(root / "sub", ignore_errors=True)
            (root.parent / "elsewhere").mkdir(exist_ok=True)
            (root / "sub").symlink_to(root.parent / "elsewhere")
            manifest["files"].append("sub/x.bin")
        (root / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_random_targets_never_lose_a_file_the_writer_did_not_write(tmp_path, bundle):
    """Seeded fuzzing of save_bundle targets: a write either succeeds, keeping every file its old manifest did not
    list byte for byte, or is refused with FileExistsError/ValueError leaving the directory exactly as it was."""
    import random

    rng = random.Random(14)
    outcomes = {"written": 0, "FileExistsError": 0, "ValueError": 0}
    for i in range(N_DIRS):
        case = tmp_path / f"case-{i}"
        case.mkdir()
        root = case / "bundle"
        (case / "outside.txt").write_text("precious")
        _random_target(root, bundle, rng)
        before = snapshot(root) if root.exists() else None
        outside = snapshot(case / "elsewhere") if (case / "elsewhere").exists() else None
        try:
            listed = set(read_manifest(root) or []) if root.exists() else set()
        except ValueError:
            listed = None
        extra = {"sub/x.bin": b"new"} if rng.random() < 0.5 else None
        try:
            save_bundle(bundle, root, extra_files=extra)
        except (FileExistsError, ValueError) as err:
            assert str(root) in str(err), err
            assert (snapshot(root) if root.exists() else None) == before, (i, err)
            outcomes[type(err).__name__] += 1
        else:
            assert listed is not None, i  # a broken manifest is never written over
            after = snapshot(root)
            for name, content in (before or {}).items():
                if name not in listed and name != MANIFEST_FILE:
                    assert after.get(name) == content, (i, name)
            ours = set(read_manifest(root))
            assert ours == {"README.md", "text.model", "tokenizer.yaml", *(extra or {})}, (i, ours)
            assert load_bundle(root).name == bundle.name
            outcomes["written"] += 1
        assert (case / "outside.txt").read_text() == "precious"
        if outside is not None:
            assert snapshot(case / "elsewhere") == outside, i
        assert not [p for p in case.iterdir() if p.name.startswith(".bundle.")], i  # no temporaries left
    assert all(outcomes.values()), outcomes
    print(outcomes)


def test_a_failed_build_or_an_interrupted_install_leaves_every_file_accounted_for(tmp_path, bundle, monkeypatch):
    import chameleon_lite.safe_io as safe_io

    out = save_bundle(bundle, tmp_path / "b", extra_files={"old.json": "{}"})
    (out / "mine.txt").write_text("mine")
    before = snapshot(out)

    def broken_build(self, path):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:  # the build fails: nothing changes, no temporary directory is left
        m.setattr(type(bundle.text), "save", broken_build)
        with pytest.raises(RuntimeError, match="disk full"):
            save_bundle(bundle, out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]

    real_replace, calls = os.replace, []

    def crash_on_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies halfway through the renames
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(safe_io.os, "replace", crash_on_third)
        with pytest.raises(KeyboardInterrupt):
            save_bundle(bundle, out, extra_files={"new.json": "{}"})
    listed = set(read_manifest(out))  # written ahead: old and new files
    assert {"old.json", "new.json", "README.md", "text.model", "tokenizer.yaml"} <= listed
    assert (out / "mine.txt").read_text() == "mine" and "mine.txt" not in listed
    save_bundle(bundle, out)  # the next write finishes the job
    assert set(read_manifest(out)) == {"README.md", "text.model", "tokenizer.yaml"}
    assert not (out / "old.json").exists() and not (out / "new.json").exists()
    assert (out / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
