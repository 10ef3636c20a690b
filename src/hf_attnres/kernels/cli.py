"""`hf-attnres build-kernels`: build (or find) the fused CPU kernels for Block AttnRes ahead of first use."""

from __future__ import annotations

import argparse


def build_kernels(verbose: bool = False) -> int:
    """Build or load the kernels; exit code 0 if they are usable, 1 if not (the reason is logged)."""
    from . import build_directory, enabled, load

    if not enabled():
        print("HF_ATTNRES_KERNELS disables the fused kernels: unset it to build them")
        return 1
    if load(verbose=verbose) is None:
        print("the fused CPU kernels could not be built (see the warning above); models run without them")
        return 1
    print(f"fused CPU kernels ready: {build_directory()}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("build-kernels", help="build the fused CPU kernels for Block AttnRes now",
                              description=__doc__ + " They are otherwise built the first time a Block AttnRes "
                              "model runs on CPU (once per torch version, with the system's C++ compiler and ninja).",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    p.set_defaults(func=lambda a: build_kernels(a.verbose))
