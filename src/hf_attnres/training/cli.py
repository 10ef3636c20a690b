"""`hf-attnres train`, `hf-attnres eval` and `hf-attnres run` (the end-to-end job).

`train` runs as a plain process or under `accelerate launch` (every process runs the same command).
"""

from __future__ import annotations

import argparse
import json

from .config import MIXED_PRECISION, SCHEDULERS, TRAIN_MODES, TrainConfig

TRAIN_EPILOG = """examples:
  hf-attnres train converted/ --output-dir runs/cpt --max-steps 200
  hf-attnres train SmolLM2.gguf --output-dir runs/cpt --train-mode attnres-only   # converted on the fly
  hf-attnres train meta-llama/Llama-3.2-1B --data HuggingFaceFW/fineweb-edu --data-config sample-10BT \\
      --streaming --max-steps 2000 --mixed-precision bf16 --output-dir runs/llama
  accelerate launch --config_file examples/accelerate/fsdp2.yaml -m hf_attnres.cli train ... (see README)
  hf-attnres train converted/ --output-dir runs/cpt --resume latest        # continue where it stopped
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("model", help="AttnRes folder or Hub id; or a Llama/Mistral/Qwen2/Qwen3 folder, Hub id or .gguf "
                   "file, converted to AttnRes on the fly (into OUTPUT/converted)")
    g.add_argument("--convert-mode", default="block", choices=["block", "full", "none"],
                   help="AttnRes mode when converting (default: %(default)s)")
    g.add_argument("--block-size", type=int, default=None,
                   help="sublayers per block when converting (default: at most 8 blocks)")
    g.add_argument("--no-verify", dest="convert_verify", action="store_false",
                   help="skip the converter's logit check (faster)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype the weights are loaded in (default: float32; use --mixed-precision for bf16 compute)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=[], metavar="SOURCE",
                   help="a Hub dataset name, or local .txt/.md (a document per file), .jsonl/.json/.parquet (a "
                   "document per row) files or folders; default: the embedded corpus (Python 3.11 docs, PSF License)")
    g.add_argument("--data-config", default=None, help="Hub dataset configuration name")
    g.add_argument("--data-split", default="train", help="split to read (default: %(default)s)")
    g.add_argument("--text-column", default="text", help="column holding the text (default: %(default)s)")
    g.add_argument("--streaming", action="store_true", help="stream the Hub dataset (needs --max-steps)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per packed block (default: %(default)s)")
    g.add_argument("--validation-data", nargs="+", default=[], metavar="SOURCE",
                   help="separate validation data (default: hold out part of --data)")
    g.add_argument("--validation-split", default=None, help="validation split of the Hub dataset, e.g. 'validation'")
    g.add_argument("--validation-fraction", type=float, default=0.05,
                   help="fraction of documents held out for validation (default: %(default)s)")
    g.add_argument("--max-eval-blocks", type=int, default=64,
                   help="cap on validation blocks, to keep evaluation short (0: all; default: %(default)s)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--output-dir", required=True, help="run folder: checkpoints/, metrics.jsonl, logs/, final/")
    g.add_argument("--train-mode", default="full", choices=TRAIN_MODES,
                   help="full; attnres-only (backbone frozen, the routing learns); lora (PEFT adapters + AttnRes "
                   "parameters) (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=4,
                   help="blocks per micro-batch per process (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    g.add_argument("--epochs", type=int, default=1,
                   help="passes over the data when --max-steps is not given (default: %(default)s)")
    g.add_argument("--lr", type=float, default=3e-5,
                   help="backbone (or LoRA) peak learning rate (default: %(default)s)")
    g.add_argument("--attnres-lr", type=float, default=3e-4,
                   help="learning rate of pseudo-queries and key norms, no weight decay; Adam moves a routing logit by "
                   "up to about lr x hidden_size per step, so keep it ~10x the backbone's (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="backbone matrices only (default: %(default)s)")
    g.add_argument("--scheduler", default="cosine", choices=SCHEDULERS, help="after warmup (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: --warmup-ratio of the steps")
    g.add_argument("--warmup-ratio", type=float, default=0.05, help="warmup steps / steps (default: %(default)s)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr (default: %(default)s)")
    g.add_argument("--decay-ratio", type=float, default=0.2,
                   help="WSD: fraction of steps that decay (default: %(default)s)")
    g.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="gradient clipping, 0 to turn off (default: %(default)s)")
    g.add_argument("--mixed-precision", default="no", choices=MIXED_PRECISION,
                   help="autocast through Accelerate (bf16 also works on recent CPUs) (default: %(default)s)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=int, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-target-modules", nargs="+", default=None,
                   help="default: q/k/v/o_proj and gate/up/down_proj of every layer")
    g.add_argument("--no-merge-lora", dest="merge_lora", action="store_false",
                   help="save the LoRA adapter instead of a merged model")
    g.add_argument("--seed", type=int, default=42, help="data split, shuffling and init (default: %(default)s)")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")

    g = p.add_argument_group("checkpoints, evaluation, logging, output")
    g.add_argument("--save-every", type=int, default=500,
                   help="save_state every N steps, and at the end (default: %(default)s)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (default: %(default)s)")
    g.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="'latest' (the newest checkpoint of --output-dir; starts fresh if none) or a checkpoint folder")
    g.add_argument("--eval-every", type=int, default=500,
                   help="validation every N steps, and before and after (default: %(default)s)")
    g.add_argument("--no-eval-at-start", dest="eval_at_start", action="store_false")
    g.add_argument("--log-every", type=int, default=10,
                   help="console line every N steps; metrics.jsonl gets every step (default: %(default)s)")
    g.add_argument("--report-to", default="auto",
                   help="trackers: auto (tensorboard if installed), all, none, or e.g. tensorboard,wandb")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--max-shard-size", default="2GB",
                   help="safetensors shard size of the final model (default: %(default)s)")
    g.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the final folder to this Hub repo")
    g.add_argument("--hub-private", action="store_true", help="create the Hub repo private")


def config_from_args(args: argparse.Namespace, cls: type = TrainConfig):
    fields = cls.__dataclass_fields__
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    kwargs["max_eval_blocks"] = kwargs.get("max_eval_blocks") or None
    kwargs["max_grad_norm"] = kwargs.get("max_grad_norm") or None
    return cls(**kwargs)


def run_train(args: argparse.Namespace) -> int:
    from .trainer import train

    result = train(config_from_args(args))
    if result.final_dir is not None:
        print(f"final model: {result.final_dir}")
    print(f"metrics: {result.metrics_file}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .eval_job import evaluate_model

    metrics = evaluate_model(args)
    print(json.dumps(metrics, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="continued pretraining of an AttnRes model (converting a Llama on the fly)",
        description="Continued pretraining with Accelerate: a plain process, or every process of `accelerate "
        "launch` (DDP, FSDP2, DeepSpeed; see examples/accelerate/).",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    _add_data_args(p)
    _add_train_args(p)
    p.set_defaults(func=run_train)

    p = subparsers.add_parser("eval", help="validation loss and perplexity of a model on text data",
                              description="Perplexity of MODEL on --data (the held-out split of it, unless "
                              "--all-data), with the depth-attention entropy per sublayer.")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--all-data", action="store_true", help="evaluate on all of --data, not its held-out split")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--output-dir", default=None, help="where a Llama-family MODEL is converted (default: a temp dir)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the metrics to this file")
    p.add_argument("--seed", type=int, default=42, help="seed of the document split (same as train's)")
    p.add_argument("--cpu", action="store_true")
    p.set_defaults(func=run_eval)

    from .pipeline import register as register_pipeline

    register_pipeline(subparsers)
