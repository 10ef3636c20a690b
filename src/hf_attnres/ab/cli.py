"""`hf-attnres ab`: the command line of `run_ab` (the training options are `train`'s)."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  hf-attnres ab --output-dir runs/ab --max-steps 200                       # SmolLM2-135M: block vs Llama
  hf-attnres ab meta-llama/Llama-3.2-1B --data HuggingFaceFW/fineweb-edu --data-config sample-10BT \\
      --streaming --max-steps 2000 --mixed-precision bf16 --output-dir runs/ab-1b
  hf-attnres ab --from-scratch examples/ab/small.json --output-dir runs/ab-scratch --max-steps 1000 --seed 1
  accelerate launch -m hf_attnres.cli ab ...                                # every arm on every process
Re-run the same command to resume: finished arms are kept, an interrupted one continues from its checkpoint.
"""


def run(args: argparse.Namespace) -> int:
    from ..training.cli import config_from_args
    from .run import ABConfig, run_ab

    run_ab(config_from_args(args, ABConfig))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..training.cli import _add_data_args, _add_train_args

    p = subparsers.add_parser(
        "ab", help="does AttnRes pay off? train AttnRes and the same Llama alike, compare held-out loss",
        description="Two arms from the same function: MODEL converted to AttnRes, and the same weights as the "
        "plain Llama (attn_res_mode none); same data, order, seed and hyperparameters; both evaluated on the same "
        "held-out blocks. Writes OUTPUT/report.md, ab.json and ab.png (paired difference with a 95%% interval).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("model", nargs="?", default=None,
                   help="Llama-family folder, Hub id or .gguf (default: SmolLM2-135M-Instruct from PyPI)")
    g.add_argument("--from-scratch", default=None, metavar="CONFIG.json",
                   help="train baseline, Block and Full arms from one random initialisation of MODEL's "
                   "architecture with these config fields changed (e.g. examples/ab/small.json)")
    g.add_argument("--convert-mode", default="block", choices=["block", "full"],
                   help="the AttnRes arm of a continued-pretraining comparison (default: %(default)s)")
    g.add_argument("--block-size", type=int, default=None, help="sublayers per block (default: at most 8 blocks)")
    g.add_argument("--no-verify", dest="convert_verify", action="store_false", help="skip the conversion check")
    _add_data_args(p)
    _add_train_args(p)
    for action in p._actions:  # ab's own defaults for two of train's options
        if action.dest == "eval_every":
            action.default, action.help = None, "evaluate every arm every N steps (default: --max-steps / 8)"
        elif action.dest == "resume":
            action.default = "latest"
            action.help = "'latest' (default: every arm continues where it stopped) or a checkpoint folder"
    p.set_defaults(func=run)
