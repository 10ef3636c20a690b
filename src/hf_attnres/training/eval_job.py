"""`hf-attnres eval`: perplexity of a model on text, with the same data pipeline and split as training."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from torch.utils.data import DataLoader

from .config import TrainConfig
from .data import PackedBlocks, load_documents, split_documents, tokenize_and_pack
from .evaluate import evaluate
from .models import load_model, resolve_model_source


def evaluate_model(args: argparse.Namespace) -> dict:
    """Metrics of `evaluate` for `args.model` on `args.data` (its held-out documents unless --all-data)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.cpu)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output_dir or tmp)
        cfg = TrainConfig(model=args.model, output_dir=str(out), data=args.data, data_config=args.data_config,
                          data_split=args.data_split, text_column=args.text_column, seq_len=args.seq_len,
                          convert_mode=args.convert_mode, block_size=args.block_size,
                          convert_verify=args.convert_verify, dtype=args.dtype, seed=args.seed,
                          validation_fraction=args.validation_fraction)
        with accelerator.main_process_first():
            source = resolve_model_source(cfg, out / "converted", accelerator.is_main_process)
        model, tokenizer = load_model(source.path, cfg.dtype)
    load = dict(split=args.validation_split or cfg.data_split, config_name=cfg.data_config,
                text_column=cfg.text_column)
    with accelerator.main_process_first():
        if args.validation_data:
            docs = load_documents(args.validation_data, **load)
        else:
            docs = load_documents(cfg.data, **load)
            if not args.all_data and not args.validation_split:
                docs = split_documents(docs, cfg.validation_fraction, cfg.seed)[1]
        blocks = tokenize_and_pack(docs, tokenizer, cfg.seq_len)
    if args.max_eval_blocks:
        blocks = blocks[: args.max_eval_blocks]
    model = accelerator.prepare(model)
    loader = accelerator.prepare_data_loader(DataLoader(PackedBlocks(blocks), batch_size=args.batch_size))
    metrics = {"model": args.model, **evaluate(model, loader, accelerator)}
    if args.json and accelerator.is_main_process:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return metrics
