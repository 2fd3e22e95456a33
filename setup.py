"""Build hook: the wheel carries the repository's ``tokenizers/`` and ``configs/`` as package data.

The two folders stay at the top of the repository (where recipes and docs name them); ``build_py`` copies them
into ``chameleon_lite/_shipped/`` of the build, so a wheel or a non-editable ``pip install .`` has them
(``chameleon_lite.shipped`` reads them there). An editable install copies nothing: it reads the repository's own
folders. Everything else about the package is in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("tokenizers", "configs")
SKIP = ("__pycache__", "*.pyc", ".*")


class BuildPyWithShipped(build_py):
    """``build_py`` that also copies ``tokenizers/`` and ``configs/`` into ``chameleon_lite/_shipped/``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the repository's folders directly
        root = Path(__file__).resolve().parent
        target = Path(self.build_lib) / "chameleon_lite" / "_shipped"
        for name in SHIPPED:
            if (target / name).exists():
                shutil.rmtree(target / name)
            # copyfile, not copy2: installed files get ordinary permissions whatever the checkout's modes are
            shutil.copytree(root / name, target / name, ignore=shutil.ignore_patterns(*SKIP),
                            copy_function=shutil.copyfile)


setup(cmdclass={"build_py": BuildPyWithShipped})
