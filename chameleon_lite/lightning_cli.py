"""``chameleon-lite fit|validate|test --config recipe.yaml``: LightningCLI over any LightningModule / DataModule.

Recipes name their classes (``model.class_path``, ``data.class_path``), so one entry point trains the VQ
tokenizer, the native model and the baseline. ``parser_mode="omegaconf"`` lets a recipe interpolate values
(``${data.init_args.image_size}``): recipes are the user's own files (files read from model directories and
bundles are never interpolated, see ``safe_io``). ``--print_config`` prints a complete recipe to start from.

``--ckpt_path`` must be a local file (or Lightning's ``last``/``best``...): Lightning downloads a path starting
with ``http`` and unpickles it with ``weights_only=False``, so such a path is refused (``check_ckpt_path``).
Local checkpoints are read with ``torch.load``'s default ``weights_only=True`` (``torch>=2.6``).
"""

from __future__ import annotations

from collections.abc import Sequence

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def check_ckpt_path(ckpt_path: object) -> None:
    """Raise ``ValueError`` for a ``ckpt_path`` Lightning would download and unpickle (one starting with ``http``).

    Lightning's loader forces ``weights_only=False`` for such paths, i.e. it would run whatever a remote file's
    pickle says. Download the checkpoint yourself and pass the local file: that is read weights-only.
    """
    if isinstance(ckpt_path, str) and ckpt_path.strip().lower().startswith("http"):
        raise ValueError(
            f"ckpt_path={ckpt_path!r}: a checkpoint URL is refused, because Lightning would download it and unpickle "
            "it with weights_only=False (running any code it holds). Download it yourself, check where it comes from, "
            "and pass the local path (local checkpoints are loaded with weights_only=True)."
        )


def _cli_class():
    """``LightningCLI`` that checks ``ckpt_path`` right after parsing, before Lightning reads the checkpoint."""
    from lightning.pytorch.cli import LightningCLI

    class CheckedLightningCLI(LightningCLI):
        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            subcommand = self.config.get("subcommand")
            if subcommand:
                check_ckpt_path(self.config[subcommand].get("ckpt_path"))

    return CheckedLightningCLI


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with each ``--config``/``-c`` value resolved by ``chameleon_lite.shipped.resolve_path``.

    A recipe path that exists is kept; otherwise a shipped recipe may be named from any directory, by a short name
    (``native/tiny``) or as recipes name each other (``configs/native/demo.yaml``).
    """
    from chameleon_lite.shipped import resolve_path

    out, args = [], list(args)
    for i, arg in enumerate(args):
        if i and args[i - 1] in ("--config", "-c"):
            arg = str(resolve_path(arg, kind="config"))
        elif arg.startswith("--config="):
            arg = "--config=" + str(resolve_path(arg.split("=", 1)[1], kind="config"))
        out.append(arg)
    return out


def run_lightning_cli(args: Sequence[str], run: bool = True):
    """Run LightningCLI on ``args`` (``["fit", "--config", ...]``); with ``run=False`` only parse and instantiate.

    ``--config`` may name a shipped recipe (``resolve_config_args``).
    """
    import sys
    import warnings

    import lightning as L

    args = resolve_config_args(args)
    # called from Python (tests, `chameleon-lite compare`) the args are ours; sys.argv belongs to another program
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended", category=UserWarning)
    return _cli_class()(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=None if args == sys.argv[1:] else args,  # from the console script: let LightningCLI read sys.argv
        run=run,
    )


def parse_recipe(path: str):
    """Parse and type-check a recipe without instantiating anything (GPU recipes can be checked on a CPU machine).

    Returns the parsed ``jsonargparse.Namespace``; unknown keys and wrong types raise.
    """
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    class _ParseOnly(LightningCLI):
        def instantiate_classes(self) -> None:  # parsing already validated every class_path and init_args
            pass

    cli = _ParseOnly(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=resolve_config_args(["--config", str(path)]),
        run=False,
    )
    return cli.config
