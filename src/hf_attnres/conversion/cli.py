"""`hf-attnres convert SRC OUT`: the options of `ConvertConfig`; the work is `convert_checkpoint`."""

from __future__ import annotations

import argparse
import logging

from ..cli import add_job
from .convert import ConvertConfig


def run(cfg: ConvertConfig) -> int:
    from .convert import convert_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(convert_checkpoint(cfg).summary())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_job(subparsers, "convert", ConvertConfig, run,
            help="convert a Llama/Mistral/Qwen2/Qwen3 checkpoint into an AttnRes model equal at initialisation",
            description="Convert a Llama-family checkpoint into a Hub-ready AttnRes folder that computes what the "
            "original computed (zero pseudo-queries), streaming shard by shard, verified against the source.")
