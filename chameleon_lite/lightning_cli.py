"""``chameleon-lite fit|validate|test --config recipe.yaml``: LightningCLI over any LightningModule / DataModule.

Recipes name their classes (``model.class_path``, ``data.class_path``), so one entry point trains the VQ
tokenizer, the native model and the baseline. ``parser_mode="omegaconf"`` lets a recipe interpolate values
(``${data.init_args.image_size}``); ``--print_config`` prints a complete recipe to start from.
"""

from __future__ import annotations

from collections.abc import Sequence

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def run_lightning_cli(args: Sequence[str], run: bool = True):
    """Run LightningCLI on ``args`` (``["fit", "--config", ...]``); with ``run=False`` only parse and instantiate."""
    import sys
    import warnings

    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    args = list(args)
    # called from Python (tests, `chameleon-lite compare`) the args are ours; sys.argv belongs to another program
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended", category=UserWarning)
    return LightningCLI(
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
        args=["--config", str(path)],
        run=False,
    )
    return cli.config
