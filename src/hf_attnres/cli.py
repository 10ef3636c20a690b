"""`hf-attnres`: a thin command line over the library; each subcommand lives beside the code it drives.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets `func` (called with the
parsed arguments; its return value is the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# Modules that provide subcommands; a module that is not (yet) part of the install is skipped.
SUBCOMMAND_MODULES = (
    "hf_attnres.demo",
    "hf_attnres.conversion.cli",
    "hf_attnres.training.cli",
    "hf_attnres.inspection.cli",
    "hf_attnres.ab.cli",
)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # parent package missing
        return False


def build_parser() -> argparse.ArgumentParser:
    from hf_attnres.modeling.configuration_attnres import ATTNRES_VERSION

    parser = argparse.ArgumentParser(
        prog="hf-attnres",
        description="Attention Residuals (AttnRes, arXiv 2603.15031) for HuggingFace transformers.",
    )
    parser.add_argument("--version", action="version", version=f"hf-attnres {ATTNRES_VERSION}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        if _module_exists(name):
            importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:  # user-facing errors
        print(f"hf-attnres {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
