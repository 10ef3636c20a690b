"""`hf-attnres eval`: perplexity of a model on text, with the same data pipeline and split as training.

    from hf_attnres.training.eval_job import EvalConfig, evaluate_model
    metrics = evaluate_model(EvalConfig(model="runs/cpt/final", data=["docs/"]))
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .config import DATA, MODEL, RUN, TrainConfig, arg, like


@dataclass
class EvalConfig:
    """An evaluation: `TrainConfig`'s model and data options (same defaults, same held-out split)."""

    model: str = like(TrainConfig, "model")
    data: list[str] = like(TrainConfig, "data")
    data_config: str | None = like(TrainConfig, "data_config")
    data_split: str = like(TrainConfig, "data_split")
    text_column: str = like(TrainConfig, "text_column")
    validation_data: list[str] = like(TrainConfig, "validation_data")
    validation_split: str | None = like(TrainConfig, "validation_split")
    validation_fraction: float = like(TrainConfig, "validation_fraction")
    all_data: bool = arg(False, "evaluate on all of --data, not its held-out split", group=DATA)
    max_eval_blocks: int | None = like(TrainConfig, "max_eval_blocks")
    seq_len: int = like(TrainConfig, "seq_len")
    seed: int = like(TrainConfig, "seed", help="seed of the document split (the same as train's)", group=DATA)
    batch_size: int = like(TrainConfig, "batch_size", help="blocks per batch per process", group=RUN)
    convert_mode: str = like(TrainConfig, "convert_mode")
    block_size: int | None = like(TrainConfig, "block_size")
    convert_verify: bool = like(TrainConfig, "convert_verify")
    dtype: str | None = like(TrainConfig, "dtype")
    output_dir: str | None = arg(None, "where a Llama-family MODEL is converted (default: a temporary folder)",
                                 group=MODEL)
    json: str | None = arg(None, "write every number to FILE as JSON ('-': print it instead of the summary)",
                           metavar="FILE", group=RUN)
    progress: bool = like(TrainConfig, "progress")
    cpu: bool = like(TrainConfig, "cpu", help="evaluate on the CPU even when a GPU is present")

    def __post_init__(self) -> None:
        self.max_eval_blocks = self.max_eval_blocks or None  # 0: all
        if self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("batch_size must be >= 1 and seq_len >= 2.")


def evaluate_model(cfg: EvalConfig) -> dict:
    """Metrics of `evaluate` for `cfg.model` on `cfg.data` (its held-out documents unless `all_data`), plus
    "model", "blocks" and "seconds"; written to `cfg.json` when given (a file; '-' prints them)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .data import PackedBlocks, load_documents, split_documents, tokenize_and_pack
    from .evaluate import evaluate
    from .models import load_model, resolve_model_source

    start = time.perf_counter()
    accelerator = Accelerator(cpu=cfg.cpu)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(cfg.output_dir or tmp)
        train_cfg = TrainConfig(model=cfg.model, output_dir=str(out), data=cfg.data, data_config=cfg.data_config,
                                data_split=cfg.data_split, text_column=cfg.text_column, seq_len=cfg.seq_len,
                                convert_mode=cfg.convert_mode, block_size=cfg.block_size,
                                convert_verify=cfg.convert_verify, dtype=cfg.dtype, seed=cfg.seed,
                                validation_fraction=cfg.validation_fraction)
        with accelerator.main_process_first():
            source = resolve_model_source(train_cfg, out / "converted", accelerator.is_main_process)
        model, tokenizer = load_model(source.path, train_cfg.dtype)
    load = dict(split=cfg.validation_split or cfg.data_split, config_name=cfg.data_config, text_column=cfg.text_column)
    with accelerator.main_process_first():
        if cfg.validation_data:
            docs = load_documents(cfg.validation_data, **load)
        else:
            docs = load_documents(cfg.data, **load)
            if not cfg.all_data and not cfg.validation_split:
                docs = split_documents(docs, cfg.validation_fraction, cfg.seed)[1]
        blocks = tokenize_and_pack(docs, tokenizer, cfg.seq_len, max_blocks=cfg.max_eval_blocks)
    model = accelerator.prepare(model)
    loader = accelerator.prepare_data_loader(DataLoader(PackedBlocks(blocks), batch_size=cfg.batch_size))
    batches = tqdm(loader, desc="evaluating", unit="batch", total=len(loader),
                   disable=not (cfg.progress and accelerator.is_local_main_process))
    metrics = {"model": cfg.model, **evaluate(model, batches, accelerator), "blocks": len(blocks),
               "seq_len": cfg.seq_len, "seconds": time.perf_counter() - start}
    if cfg.json and cfg.json != "-" and accelerator.is_main_process:
        Path(cfg.json).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def _num(x: float) -> str:
    """Four significant digits, without exponent for everyday sizes (12.35, 0.9312, 1235)."""
    return f"{x:.4g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.3e}"


def summary_lines(metrics: dict) -> list[str]:
    """The human summary of `evaluate_model`'s metrics: perplexity, loss, tokens, time, depth-attention entropy."""
    lines = [f"{metrics['model']}: perplexity {_num(metrics['perplexity'])} (loss {metrics['loss']:.4f} nats/token) "
             f"on {metrics['tokens']:,} tokens ({metrics['blocks']} blocks of {metrics['seq_len']}) "
             f"in {metrics['seconds']:.1f} s"]
    entropy = {k.removeprefix("depth_entropy/"): v for k, v in metrics.items()
               if k.startswith("depth_entropy/") and k != "depth_entropy/mean"}
    if "depth_entropy/mean" in metrics and entropy:
        lowest = min(entropy, key=entropy.get)
        lines.append(f"depth-attention entropy {metrics['depth_entropy/mean']:.3f} on average over {len(entropy)} "
                     f"sublayers (1 = uniform, as converted); lowest {entropy[lowest]:.3f} at {lowest}")
    else:
        lines.append("depth-attention entropy: - (standard residuals)")
    return lines


def print_summary(metrics: dict, cfg: EvalConfig) -> None:
    """The summary on stdout, or with `--json -` every number; where the full numbers went."""
    if cfg.json == "-":
        print(json.dumps(metrics, indent=2))
        return
    print("\n".join(summary_lines(metrics)))
    print(f"every number: {cfg.json}" if cfg.json else "every number (per sublayer): --json FILE")
