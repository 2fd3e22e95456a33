"""``chameleon-lite fit|validate|test --config recipe.yaml``: LightningCLI over any LightningModule / DataModule.

Recipes name their classes (``model.class_path``, ``data.class_path``), so one entry point trains the VQ
tokenizer, the native model and the baseline. The parser mode (``RECIPE_PARSER_MODE``: jsonargparse's ``omegaconf``
plus decoder presets) lets a recipe interpolate values (``${data.init_args.image_size}``) and name a decoder preset
(``model: {preset: demo}``, :mod:`chameleon_lite.model.presets`): recipes are the user's own files (files read
from model directories and bundles are never interpolated, see ``safe_io``). ``--print_config`` prints a complete
recipe to start from.

``--ckpt_path`` must be a local file (or Lightning's ``last``/``best``...): Lightning downloads a path starting
with ``http`` and unpickles it with ``weights_only=False``, so such a path is refused (``check_ckpt_path``).
Local checkpoints are read with ``torch.load``'s default ``weights_only=True`` (``torch>=2.6``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric")
"""Loggers ``quiet_lightning`` raises to WARNING: the accelerator banners ("GPU available: ..."), the litlogger tip,
"Seed set to ...", "`Trainer.fit` stopped ..." and the other INFO lines Lightning prints for every fit."""
QUIET_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)
"""Messages (regular expressions) of the warnings ``quiet_lightning`` hides: torch's pytree deprecation, which
Lightning's own ``_pytree`` triggers on every fit (nothing the user can act on)."""


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Within the block, Lightning prints no INFO banners and the warnings in ``QUIET_WARNINGS`` are hidden.

    For the fits the comparison and the demo run (their own lines and progress bars stay); the model summary is
    a trainer switch (``--trainer.enable_model_summary=false``, set by ``comparison.training``). Levels and warning
    filters are restored on exit, so a plain ``chameleon-lite fit`` keeps Lightning's output.
    """
    import lightning  # noqa: F401  (importing it sets its loggers to INFO: import first, then raise them)

    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.setLevel(max(logging.WARNING, logger.level))
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


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


RECIPE_PARSER_MODE = "chameleon_lite"
"""jsonargparse's ``omegaconf`` mode plus decoder presets: a recipe is read as OmegaConf reads it (interpolations
resolved), then ``model.presets.expand_presets`` turns a decoder block's ``preset: NAME`` into that preset's
fields, updated by the keys beside it."""


def recipe_parser_mode() -> str:
    """Register (once) and return ``RECIPE_PARSER_MODE``."""
    import io

    import yaml
    from jsonargparse import get_loader, set_loader
    from omegaconf import OmegaConf

    from chameleon_lite.model.presets import expand_presets
    try:
        get_loader(RECIPE_PARSER_MODE)
        return RECIPE_PARSER_MODE
    except KeyError:
        pass
    yaml_load = get_loader("yaml")

    def load(text: str):  # jsonargparse's omegaconf loader, then the presets
        plain = yaml_load(text)
        if isinstance(plain, (str, int, float, bool)) or plain is None:
            return plain
        resolved = OmegaConf.to_object(OmegaConf.load(io.StringIO(text)))
        return expand_presets(plain if resolved == {text: None} else resolved)

    set_loader(RECIPE_PARSER_MODE, load, (yaml.YAMLError, ValueError))
    return RECIPE_PARSER_MODE


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


def run_lightning_cli(args: Sequence[str], run: bool = True, callbacks: Sequence[object] = ()):
    """Run LightningCLI on ``args`` (``["fit", "--config", ...]``); with ``run=False`` only parse and instantiate.

    ``--config`` may name a shipped recipe (``resolve_config_args``). ``callbacks``: Lightning callbacks (objects)
    added to the trainer's, after the recipe's (``comparison.progress`` counts a comparison's samples this way).
    """
    import sys

    import lightning as L

    args = resolve_config_args(args)
    # called from Python (tests, `chameleon-lite compare`) the args are ours; sys.argv belongs to another program
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended", category=UserWarning)
    return _cli_class()(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": recipe_parser_mode()},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": list(callbacks)} if callbacks else None,
        args=None if args == sys.argv[1:] else args,  # from the console script: let LightningCLI read sys.argv
        run=run,
    )


def parse_recipe(path: str, overrides: Sequence[str] = ()):
    """Parse and type-check a recipe (plus ``fit``-style ``overrides`` such as ``--model.init_args.lr=1e-3``)
    without instantiating anything (GPU recipes can be checked on a CPU machine).

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
        parser_kwargs={"parser_mode": recipe_parser_mode()},
        args=resolve_config_args(["--config", str(path), *overrides]),
        run=False,
    )
    return cli.config
