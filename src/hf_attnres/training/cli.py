"""`hf-attnres train`, `hf-attnres eval` and `hf-attnres run` (the end-to-end job): options generated from
`TrainConfig`, `EvalConfig` and `RunConfig`.

`train` runs as a plain process or under `accelerate launch` (every process runs the same command).
"""

from __future__ import annotations

import argparse

from ..cli import add_job
from .config import TrainConfig
from .eval_job import EvalConfig, evaluate_model, print_summary
from .pipeline import RunConfig, run_pipeline

TRAIN_EPILOG = """examples:
  hf-attnres train converted/ --output-dir runs/cpt --max-steps 200
  hf-attnres train SmolLM2.gguf --output-dir runs/cpt --train-mode attnres-only   # converted on the fly
  hf-attnres train meta-llama/Llama-3.2-1B --data HuggingFaceFW/fineweb-edu --data-config sample-10BT \\
      --streaming --max-steps 2000 --mixed-precision bf16 --output-dir runs/llama
  hf-attnres train --config run.yaml --max-steps 400     # options from a YAML/JSON file, flags override it
  accelerate launch --config_file examples/accelerate/fsdp2.yaml -m hf_attnres.cli train ... (see README)
  hf-attnres train converted/ --output-dir runs/cpt --resume latest        # continue where it stopped
"""
EVAL_EPILOG = """examples:
  hf-attnres eval runs/cpt/final --data docs/ --json eval.json      # summary here, every number in eval.json
  hf-attnres eval runs/cpt/final --json -                           # every number as JSON on stdout
"""


def run_train(cfg: TrainConfig) -> int:
    from .trainer import train

    result = train(cfg)
    if result.final_dir is not None:
        print(f"final model: {result.final_dir}")
    print(f"metrics: {result.metrics_file}")
    return 0


def run_eval(cfg: EvalConfig) -> int:
    print_summary(evaluate_model(cfg), cfg)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_job(subparsers, "train", TrainConfig, run_train,
            help="continued pretraining of an AttnRes model (converting a Llama on the fly)",
            description="Continued pretraining with Accelerate: a plain process, or every process of `accelerate "
            "launch` (DDP, FSDP2, DeepSpeed; see examples/accelerate/).", epilog=TRAIN_EPILOG)
    add_job(subparsers, "eval", EvalConfig, run_eval, help="validation loss and perplexity of a model on text data",
            description="Perplexity of MODEL on --data (the held-out split of it, unless --all-data), with the "
            "depth-attention entropy per sublayer; prints a short summary, --json writes every number.",
            epilog=EVAL_EPILOG)
    add_job(subparsers, "run", RunConfig, run_pipeline,
            help="end-to-end: SmolLM2 -> Block AttnRes -> continued pretraining -> Hub folder -> reload",
            description=RunConfig.__doc__)
