"""The ``chameleon-lite`` command.

Sub-commands import their heavy dependencies lazily, so ``chameleon-lite --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from chameleon_lite import __version__


def _bundle_info(args: argparse.Namespace) -> int:
    from chameleon_lite.bundle import load_bundle

    b = load_bundle(args.path, load_image_tokenizer=False)
    v = b.vocab
    h, w = b.image_grid
    print(f"bundle {b.name!r} at {args.path}")
    print(f"  text pieces      [0, {v.n_text})")
    print(f"  control tokens   [{v.n_text}, {v.image_offset}): {', '.join(v.control_tokens)} + {v.n_reserved} reserved")
    print(f"  image codes      [{v.image_offset}, {v.size}): codebook {v.codebook_size}, grid {h}x{w}")
    print(f"  ids per image    {b.image_tokens} (with <boi>/<eoi>)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chameleon-lite", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"chameleon-lite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("bundle-info", help="print the vocabulary layout of a tokenizer bundle")
    info.add_argument("path", help="bundle directory, e.g. tokenizers/shapes-64")
    info.set_defaults(func=_bundle_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
