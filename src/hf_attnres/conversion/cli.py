"""`hf-attnres convert SRC OUT`: argument parsing only; the work is `convert_checkpoint`."""

from __future__ import annotations

import argparse
import logging

from .convert import DTYPES, convert_checkpoint
from .verify import FP32_TOLERANCE


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a Llama/Mistral/Qwen2/Qwen3 checkpoint into an AttnRes model equal at initialisation",
        description="Convert a Llama-family checkpoint into a Hub-ready AttnRes folder that computes what the "
        "original computed (zero pseudo-queries), streaming shard by shard, verified against the source.",
    )
    p.add_argument("src", metavar="SRC", help="local checkpoint folder, Hub repo id, or .gguf file")
    p.add_argument("out", metavar="OUT", help="output folder (written to a temporary folder, renamed when complete)")
    p.add_argument("--mode", choices=("block", "full"), default="block", help="AttnRes variant (default: block)")
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="sublayers per block, even (default: smallest giving at most 8 blocks)",
    )
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="output dtype (default: the source's)")
    p.add_argument(
        "--max-shard-size",
        default="2GB",
        help="largest output shard, e.g. 2GB, 500MB (default: 2GB); output shards follow the source's shards and "
        "are split further only above this size",
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare with the source and fail above 1e-4 max |logit difference| in fp32 "
        "(default: on when a model fits in memory)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=FP32_TOLERANCE,
        help=f"largest max |logit difference| accepted in fp32 (default: {FP32_TOLERANCE:g})",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload the finished folder to this Hub repo")
    p.add_argument("--private", action="store_true", default=None, help="with --push-to-hub: create a private repo")
    p.add_argument("--base-model", default=None, help="model-card base_model when the source does not name it")
    p.add_argument("--license", default=None, help="model-card license when the source does not state it")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = convert_checkpoint(
        args.src,
        args.out,
        mode=args.mode,
        block_size=args.block_size,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        verify=args.verify,
        tolerance=args.tolerance,
        force=args.force,
        push_to_hub=args.push_to_hub,
        progress=args.progress,
        base_model=args.base_model,
        license=args.license,
        private=args.private,
    )
    print(report.summary())
    return 0
