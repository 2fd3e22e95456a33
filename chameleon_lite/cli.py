"""The ``chameleon-lite`` command.

Sub-commands import their heavy dependencies lazily, so ``chameleon-lite --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from chameleon_lite import __version__
from chameleon_lite.training.lightning_cli import LIGHTNING_SUBCOMMANDS, run_lightning_cli

if TYPE_CHECKING:
    from chameleon_lite.generation.config import GenerationConfig


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _bundle(name: str) -> str:
    """A bundle path, or the shipped bundle a name such as ``shapes-64`` or ``tokenizers/shapes-64`` means."""
    from chameleon_lite.shipped import resolve_path

    return str(resolve_path(name, kind="bundle"))


def _recipe(name: str) -> str:
    """A YAML path, or the shipped recipe a name such as ``compare/demo`` or ``configs/compare/demo.yaml`` means."""
    from chameleon_lite.shipped import resolve_path

    return str(resolve_path(name, kind="config"))


def _bundle_info(args: argparse.Namespace) -> int:
    from chameleon_lite.shipped import describe_shipped
    from chameleon_lite.tokenization.bundle import load_bundle
    if args.list or args.path is None:
        print(describe_shipped())
        return 0
    path = _bundle(args.path)
    b = load_bundle(path, load_image_tokenizer=False)
    v = b.vocab
    h, w = b.image_grid
    print(f"bundle {b.name!r} at {path}")
    print(f"  text pieces      [0, {v.n_text})")
    print(f"  control tokens   [{v.n_text}, {v.image_offset}): {', '.join(v.control_tokens)} + {v.n_reserved} reserved")
    print(f"  image codes      [{v.image_offset}, {v.size}): codebook {v.codebook_size}, grid {h}x{w}")
    print(f"  ids per image    {b.image_tokens} (with <boi>/<eoi>)")
    return 0


def _data_shapes(args: argparse.Namespace) -> int:
    from chameleon_lite.world.scenes import WorldConfig
    from chameleon_lite.world.shapes_world import ShapesWorldSpec, write_shapes_world

    given = {name: value for name, value in
             {"image_size": args.image_size, "grid": args.grid, "max_objects": args.max_objects}.items()
             if value is not None}  # the rest keep WorldConfig's defaults (64 px, grid 3, 6 objects)
    if args.demo_world:
        from chameleon_lite.comparison.demo import DEMO_WORLD

        if given:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise SystemExit(f"chameleon-lite data shapes: --demo-world sets the world (the demo's 32-px, 2x2-grid "
                             f"world of 1-3 objects); it cannot be combined with {flags}")
        world = WorldConfig(**DEMO_WORLD["world"])
    else:
        world = WorldConfig(**given)
    spec = ShapesWorldSpec(
        train=args.train, val=args.val, test=args.test, val_held_out=args.val_held_out, seed=args.seed, world=world,
        shard_size=args.shard_size,
    )
    counts = write_shapes_world(spec, args.out, num_workers=args.num_workers)
    total = sum(sum(c.values()) for c in counts.values())
    print(f"wrote {total} samples to {args.out} (record: {args.out}/world.yaml)")
    return 0


def _data_import(args: argparse.Namespace) -> int:
    import json

    from chameleon_lite.data.folder_import import import_folder

    try:
        summary = import_folder(args.images, args.out, captions=args.captions, qa=args.qa, val=args.val,
                                test=args.test, seed=args.seed, shard_size=args.shard_size, overwrite=args.overwrite)
    except ValueError as err:
        raise SystemExit(f"chameleon-lite data import: {err}") from err
    print(f"pairs {summary.pairs}, questions {summary.questions}, skipped {json.dumps(dict(summary.skipped))} "
          f"-> {args.out} (details: {args.out}/import.json)")
    return 0


def _data_fashion_mnist(args: argparse.Namespace) -> int:
    from chameleon_lite.world.fashion_mnist import write_fashion_mnist_folder

    try:
        counts = write_fashion_mnist_folder(args.src, args.out, train=args.train, test=args.test, seed=args.seed)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        raise SystemExit(f"chameleon-lite data fashion-mnist: {err}") from err
    print(f"{counts} images with captions.jsonl and qa.jsonl in {args.out}; next: chameleon-lite data import "
          f"--images {args.out} --captions {args.out}/captions.jsonl --qa {args.out}/qa.jsonl --test 0 --out DIR "
          "(--test 0: the test split is Fashion-MNIST's own)")
    return 0


def _data_preference_pairs(args: argparse.Namespace) -> int:
    import json

    from chameleon_lite.comparison.config import PreferenceStage
    from chameleon_lite.world.preference_pairs import build_preference_pairs, write_preference_shards

    try:  # checked before a model is loaded
        stage = PreferenceStage(extra_existence=args.extra_existence, negated_twins=args.negated_twins,
                                negative_types=args.negative_types.split(",") if args.negative_types else None)
    except ValueError as err:
        raise SystemExit(f"chameleon-lite data preference-pairs: {err}") from err
    answer_fn = None
    if args.model:
        from chameleon_lite.comparison.evaluate import answer_questions
        from chameleon_lite.training.lit_preference import load_policy
        try:
            model = load_policy(args.model).eval()
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"--model {args.model}: {err}") from err

        def answer_fn(images, questions):
            return answer_questions(model, images, questions)

    pairs, summary = build_preference_pairs(args.raw, pairs=args.pairs, seed=args.seed, answer_fn=answer_fn,
                                            **stage.pair_options())
    written = write_preference_shards(pairs, args.out, overwrite=args.overwrite)
    print(f"{len(pairs)} preference pairs in {len(written)} shard(s) -> {args.out}: {json.dumps(summary)}")
    return 0


def _eval_tokenizer(args: argparse.Namespace) -> int:
    from itertools import islice

    from chameleon_lite.data.readers import pair_dataset
    from chameleon_lite.eval.tokenizer_eval import evaluate_image_tokenizer, format_report
    from chameleon_lite.tokenization.bundle import load_bundle

    bundle = load_bundle(_bundle(args.tokenizer))
    if bundle.image_tokenizer is None:
        raise SystemExit(f"{args.tokenizer} has no image tokenizer to evaluate")
    world = None
    if args.world:
        from chameleon_lite.world.shapes_world import load_world_spec

        world = load_world_spec(args.world).world
    dataset = pair_dataset(args.shards, require_text=False)
    images = (s["image"] for s in islice(dataset, args.limit))
    metrics = evaluate_image_tokenizer(bundle.image_tokenizer, images, world=world, batch_size=args.batch_size)
    print(format_report(metrics))
    if args.grid:
        from chameleon_lite.eval.tokenizer_eval import reconstruction_grid

        first = [s["image"] for s in islice(pair_dataset(args.shards, require_text=False), 12)]
        reconstruction_grid(bundle.image_tokenizer, first, world=world).save(args.grid)
        print(f"reconstruction grid written to {args.grid}")
    dataset.log_summary()
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from chameleon_lite.data.pretokenize import tokenize_shards
    from chameleon_lite.tokenization.bundle import load_bundle
    bundle = load_bundle(_bundle(args.tokenizer))
    stats = tokenize_shards(
        bundle, args.shards, args.out, batch_size=args.batch_size, num_workers=args.num_workers
    )
    print(
        f"{stats.samples} samples, {stats.images} images in {stats.seconds:.1f} s "
        f"({stats.images_per_second:.0f} images/s) -> {args.out}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from chameleon_lite.native.chameleon import export_checkpoint

    if args.format == "model-dir":
        if not args.ckpt or args.model:
            raise SystemExit("export --format model-dir: give --ckpt (a Lightning checkpoint)")
        out = export_checkpoint(args.ckpt, args.out)
        print(f"model directory written to {out}")
        return 0
    if bool(args.ckpt) == bool(args.model):
        raise SystemExit("export --format transformers: give either --model (a model directory) or --ckpt")
    try:
        from chameleon_lite.native.hf_export import export_transformers
    except ImportError as err:
        raise SystemExit(f"export --format transformers needs transformers ({err}); pip install transformers") from err
    with tempfile.TemporaryDirectory() as tmp:
        model = export_checkpoint(args.ckpt, Path(tmp) / "model") if args.ckpt else args.model
        out = export_transformers(model, args.out)
    print(f"transformers directory written to {out} (ChameleonForConditionalGeneration.from_pretrained; "
          "text output only; prompts are ids from its tokenizer/ bundle)")
    return 0


def _images(args: argparse.Namespace) -> list:
    from PIL import Image

    from chameleon_lite.tokenization.image_preprocessing import to_rgb

    images = []
    for path in args.image or []:
        try:
            with Image.open(path) as im:
                images.append(to_rgb(im.copy())[0])  # as the training readers: alpha on white
        except (OSError, ValueError) as err:
            raise SystemExit(f"--image {path}: cannot read it as an image ({err})") from err
    return images


def _from_pretrained(cls: type, path: str):
    """``cls.from_pretrained(path)``; a missing or malformed file ends the command with its message."""
    try:
        return cls.from_pretrained(path)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"--model {path}: {err}") from err


def _generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The ``GenerationConfig`` of ``chameleon-lite generate``'s options (its checks name the field)."""
    from chameleon_lite.generation.config import GenerationConfig

    try:
        return GenerationConfig(mode=args.mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, image_temperature=args.image_temperature,
                                image_top_k=args.image_top_k, cfg_scale=args.cfg_scale, seed=args.seed)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"generate: {err}") from err


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from chameleon_lite import ChameleonLite
    from chameleon_lite.baseline.vlm import BaselineVLM
    from chameleon_lite.model.model_dir import model_dir_kind

    try:
        kind = model_dir_kind(args.model)  # validated (plain YAML, a mapping) before anything reads it
    except ValueError as err:
        raise SystemExit(f"--model {args.model}: {err}") from err
    if kind == "baseline":
        if args.mode != "text":
            raise SystemExit(f"--mode {args.mode}: {args.model} is an encoder-projector baseline (text output only)")
        prompt = [*_images(args), *([args.prompt] if args.prompt else [])]
        if not prompt:
            raise SystemExit("give --prompt and/or --image")
        model = _from_pretrained(BaselineVLM, args.model)
        for segment in model.generate(prompt, _generation_config(args)):
            print(segment)
        return 0
    model = _from_pretrained(ChameleonLite, args.model)
    segments: list = _images(args)
    if args.prompt:
        segments.append(args.prompt)
    if not segments:
        raise SystemExit("give --prompt and/or --image")
    out = model.generate(segments, _generation_config(args))
    out_dir = Path(args.out)
    n_images = 0
    for segment in out:
        if isinstance(segment, str):
            print(segment)
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"image-{n_images}.png"
            segment.save(path)
            n_images += 1
            print(f"[image: {path}]")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from chameleon_lite.comparison.config import CompareConfigError
    from chameleon_lite.comparison.progress import headline_lines
    from chameleon_lite.comparison.run import compare
    from chameleon_lite.training.lightning_cli import quiet_lightning
    try:
        with quiet_lightning():  # the comparison's own lines and progress bar, not Lightning's banners per stage
            result = compare(_recipe(args.config), args.out, overrides=args.set or [], progress=not args.no_progress)
    except CompareConfigError as err:  # found before anything was trained: one line, no traceback
        raise SystemExit(f"chameleon-lite compare: {err}") from err
    print("\n".join(headline_lines(result["report"], result.get("metrics"))))  # the QA table, then the report's path
    return 0


def _demo(args: argparse.Namespace) -> int:
    from chameleon_lite.comparison.demo import demo
    from chameleon_lite.comparison.progress import headline_lines
    report = demo(args.out, overrides=args.set or [], progress=not args.no_progress)
    print("\n".join(headline_lines(report)))  # the QA table, then the report's path
    return 0


def _learning_curve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from chameleon_lite.comparison.config import load_compare_config
    from chameleon_lite.comparison.learning_curve import check_budgets, check_overrides, learning_curve

    args.config = _recipe(args.config)
    try:
        budgets = check_budgets(args.budgets)
    except ValueError as err:
        raise SystemExit(f"--budgets: {err}") from err
    try:  # before any data is generated
        overrides = check_overrides(args.set or [])
        load_compare_config(args.config, [*overrides, f"train_samples={budgets[0]}"])
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"learning-curve: {err}") from err
    if args.demo_world:
        from chameleon_lite.comparison.demo import prepare_demo_data

        overrides = [*prepare_demo_data(args.out, args.config, progress=not args.no_progress), *overrides]
    from chameleon_lite.training.lightning_cli import quiet_lightning

    with quiet_lightning():
        learning_curve(args.config, args.out, budgets, overrides=overrides, progress=not args.no_progress)
    print(Path(args.out, "curve.md").read_text(encoding="utf-8").split("## Training time")[0])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from chameleon_lite.shipped import describe_shipped

    parser = argparse.ArgumentParser(prog="chameleon-lite", description=__doc__.splitlines()[0],
                                     epilog=describe_shipped(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"chameleon-lite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("bundle-info", help="print the vocabulary layout of a tokenizer bundle, or list the shipped "
                                              "bundles and recipes")
    info.add_argument("path", nargs="?", help="bundle directory or shipped bundle name, e.g. shapes-64; none: --list")
    info.add_argument("--list", action="store_true", help="list the shipped tokenizer bundles and recipes")
    info.set_defaults(func=_bundle_info)

    data = sub.add_parser("data", help="generate, import or derive data sets")
    data = data.add_subparsers(dest="data_command", required=True)
    shapes = data.add_parser("shapes", help="write the procedural shapes world to webdataset shards")
    shapes.add_argument("--out", required=True, help="output directory")
    shapes.add_argument("--train", type=int, default=10000, help="training scenes")
    shapes.add_argument("--val", type=int, default=500, help="validation scenes")
    shapes.add_argument("--test", type=int, default=1000, help="test scenes")
    shapes.add_argument("--val-held-out", type=int, default=0,
                        help="scenes of a second validation split, each built around a held-out combo (0: none)")
    shapes.add_argument("--image-size", type=int, help="rendered image side in pixels (default 64)")
    shapes.add_argument("--max-objects", type=int, help="most objects in a scene (default 6)")
    shapes.add_argument("--grid", type=int, help="positions form a grid x grid layout (default 3)")
    shapes.add_argument("--demo-world", action="store_true",
                        help="the world of `chameleon-lite demo` (32 px, 2x2 grid, 1-3 objects, 4 shapes, 4 colours) "
                             "instead of --image-size/--grid/--max-objects; the counts and seed still come from "
                             "--train/--val/--test/--seed")
    shapes.add_argument("--shard-size", type=int, default=2000, help="samples per shard")
    shapes.add_argument("--seed", type=int, default=0, help="base seed (splits use disjoint streams of it)")
    shapes.add_argument("--num-workers", type=_positive_int, default=1,
                        help="processes rendering the scenes (default 1); the samples are the same for any number")
    shapes.set_defaults(func=_data_shapes)
    imp = data.add_parser("import", help="a folder of images + captions (CSV/JSONL/sidecar .txt) and optional QA "
                                         "JSONL -> train/val/test shards in the img2dataset layout")
    imp.add_argument("--images", required=True, help="the image folder (searched recursively)")
    imp.add_argument("--out", required=True, help="output directory (OUT/{train,val,test}/pairs-*.tar, qa-*.tar)")
    imp.add_argument("--captions", help="CSV with 'file' and 'caption' columns, or JSONL of {file, caption}; "
                                        "default: a .txt beside each image")
    imp.add_argument("--qa", help="JSONL of {file, question, answer, category}")
    imp.add_argument("--val", type=float, default=0.05, help="share of images in the validation split")
    imp.add_argument("--test", type=float, default=0.1, help="share of images in the test split")
    imp.add_argument("--seed", type=int, default=0, help="the split's seed")
    imp.add_argument("--shard-size", type=_positive_int, default=1000, help="samples per shard")
    imp.add_argument("--overwrite", action="store_true", help="replace shards an earlier import wrote")
    imp.set_defaults(func=_data_import)
    fm = data.add_parser("fashion-mnist", help="Fashion-MNIST's IDX files (Debian: dataset-fashion-mnist) -> a folder "
                                              "of PNGs with captions.jsonl and qa.jsonl for data import")
    fm.add_argument("--src", default="/usr/share/datasets/fashion-mnist", help="the directory of the 4 IDX files")
    fm.add_argument("--out", required=True, help="a new folder")
    fm.add_argument("--train", type=_positive_int, help="the first N training images (default all 60,000)")
    fm.add_argument("--test", type=_positive_int, help="the first N test images (default all 10,000)")
    fm.add_argument("--seed", type=int, default=0, help="caption templates and existence questions")
    fm.set_defaults(func=_data_fashion_mnist)
    prefs = data.add_parser("preference-pairs",
                            help="DPO preference pairs from a shapes world's training split (stage 3)")
    prefs.add_argument("--raw", required=True, help="the world directory (world.yaml, train/)")
    prefs.add_argument("--out", required=True, help="output directory for prefs-NNNNNN.tar")
    prefs.add_argument("--pairs", type=_positive_int, default=2000, help="how many pairs (default 2000)")
    prefs.add_argument("--model", help="a trained model directory of either arm: its wrong greedy answers become the "
                                       "rejected side of non-yes/no questions (on-policy); without it a wrong answer "
                                       "is drawn from the category's answers")
    prefs.add_argument("--seed", type=int, default=0, help="scene order and perturbations")
    prefs.add_argument("--extra-existence", type=int,
                       help="per scene, this many more existence questions asked of its ground truth, an even "
                            "number (default 2, the shipped recipe; 0 = only the split's own questions)")
    prefs.add_argument("--negative-types",
                       help="POPE types of those questions' absent objects, comma-separated (default: adversarial)")
    prefs.add_argument("--negated-twins", action="store_true",
                       help="follow each extra existence question with its negated twin ('... there is no ...?')")
    prefs.add_argument("--overwrite", action="store_true", help="replace prefs shards this command wrote before")
    prefs.set_defaults(func=_data_preference_pairs)
    ev = sub.add_parser("eval-tokenizer", help="measure a bundle's image tokenizer on image shards")
    ev.add_argument("--tokenizer", required=True, help="bundle directory or shipped bundle name (shapes-64)")
    ev.add_argument("--shards", required=True, help="image-caption shards, e.g. 'data/shapes/val/pairs-*.tar'")
    ev.add_argument("--world", help="world.yaml of a shapes world: adds scene-parser agreement")
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--grid", help="also write originals over reconstructions (the first 12 images) to this PNG")
    ev.set_defaults(func=_eval_tokenizer)

    tok = sub.add_parser("tokenize", help="pre-tokenize raw shards (pairs, QA, docs) into token shards")
    tok.add_argument("--tokenizer", required=True, help="bundle directory or shipped bundle name, e.g. shapes-64")
    tok.add_argument("--shards", required=True, help="raw shards, e.g. 'data/shapes/train/*.tar'")
    tok.add_argument("--out", required=True, help="output directory for token shards")
    tok.add_argument("--batch-size", type=int, default=256, help="images per VQ encoder batch")
    tok.add_argument("--num-workers", type=int, default=2, help="processes decoding images and text")
    tok.set_defaults(func=_tokenize)

    exp = sub.add_parser("export", help="write a model directory (config.yaml, model.safetensors, tokenizer/), "
                                        "or a transformers Chameleon directory")
    exp.add_argument("--ckpt", help="Lightning checkpoint of a native model run")
    exp.add_argument("--model", help="model directory to convert (--format transformers)")
    exp.add_argument("--format", default="model-dir", choices=["model-dir", "transformers", "hf"],
                     help="model-dir (default), or transformers (alias hf): a directory "
                          "ChameleonForConditionalGeneration.from_pretrained loads (docs/install.md)")
    exp.add_argument("--out", required=True, help="directory to write")
    exp.set_defaults(func=_export)

    gen = sub.add_parser("generate", help="generate text, images or both with a model directory")
    gen.add_argument("--model", required=True, help="model directory (config.yaml, model.safetensors, tokenizer/)")
    gen.add_argument("--prompt", help="text of the prompt (a question when an --image is given)")
    gen.add_argument("--image", action="append", help="prompt image (repeatable); it comes before the text")
    gen.add_argument("--mode", default="text", choices=["text", "image", "interleaved"])
    gen.add_argument("--out", default="generated", help="directory for generated images")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: 64 text tokens, or one image")
    gen.add_argument("--temperature", type=float, default=0.0, help="text sampling temperature (0 = greedy)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--image-temperature", type=float, default=1.0, help="image-code temperature (0 = greedy)")
    gen.add_argument("--image-top-k", type=int, default=0)
    gen.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance for images (>= 1)")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_generate)

    cmp = sub.add_parser("compare", help="train/load the native and baseline arms, evaluate both, write a report")
    cmp.add_argument("--config", required=True, help="configs/compare/<name>.yaml or a shipped name (compare/demo)")
    cmp.add_argument("--out", required=True, help="output directory (report.md, metrics.json, plots, runs)")
    cmp.add_argument("--set", action="append", help="override a config value, e.g. --set eval.captions=20")
    cmp.add_argument("--no-progress", action="store_true", help="no progress bars")
    cmp.set_defaults(func=_compare)

    dem = sub.add_parser("demo", help="the whole pipeline at tiny scale on CPU: data, both arms, the comparison")
    dem.add_argument("--out", default="runs/demo", help="output directory")
    dem.add_argument("--set", action="append", help="override a value of configs/compare/demo.yaml")
    dem.add_argument("--no-progress", action="store_true", help="no progress bars")
    dem.set_defaults(func=_demo)

    lc = sub.add_parser("learning-curve", help="the comparison at several sample budgets: accuracy against samples")
    lc.add_argument("--config", required=True, help="configs/compare/<name>.yaml (its train_samples is replaced)")
    lc.add_argument("--out", required=True, help="output directory (curve.md, curve.json, learning_curve.png, "
                                                 "samples-<budget>/ runs)")
    lc.add_argument("--budgets", required=True, type=int, nargs="+", metavar="N",
                    help="training samples per arm, at least 4 distinct positive integers, e.g. 3750 7500 15000 30000")
    lc.add_argument("--set", action="append", help="override a config value for every run, e.g. --set seeds=[0,1]")
    lc.add_argument("--demo-world", action="store_true",
                    help="first generate and pre-tokenize the demo's shapes world under OUT, as `demo` does")
    lc.add_argument("--no-progress", action="store_true", help="no progress bars")
    lc.set_defaults(func=_learning_curve)

    for name in LIGHTNING_SUBCOMMANDS:  # listed for --help; parsed by LightningCLI
        sub.add_parser(name, help=f"LightningCLI {name} (see chameleon-lite {name} --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        run_lightning_cli(argv)
        return 0
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FileExistsError as err:  # a safe writer refused a directory holding files it did not write
        raise SystemExit(f"chameleon-lite {argv[0]}: {err}") from err


if __name__ == "__main__":
    sys.exit(main())
