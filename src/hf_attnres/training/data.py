"""Text in, fixed-length token blocks out: load documents, tokenise, pack with EOS between documents.

Packing (no padding) keeps every token a target, so the token count of a batch is known and the loss can
be normalised by it exactly. The train/validation split is by document, so validation text is unseen.
Shuffling is a seeded permutation of blocks per epoch, so a resumed run sees the same order.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from ..data import EMBEDDED_CORPUS_NAME, embedded_corpus

LOCAL_BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
EMBEDDED = "embedded"


def _local_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_BUILDERS)
    if not files:
        raise FileNotFoundError(f"{path} holds no {'/'.join(LOCAL_BUILDERS)} files: point --data at text data.")
    return files


def load_documents(
    specs: list[str],
    *,
    split: str = "train",
    config_name: str | None = None,
    text_column: str = "text",
    streaming: bool = False,
):
    """Documents as a `datasets.Dataset` (or `IterableDataset` when streaming) with one `text` column.

    `specs`: empty or ["embedded"] for the embedded corpus; local files/folders (.txt/.md: one document per
    file, .jsonl/.json/.parquet: one per row); or one Hub dataset name.
    """
    import datasets

    if not specs or specs == [EMBEDDED]:
        ds = datasets.Dataset.from_list([{"text": d["text"]} for d in embedded_corpus()])
        return ds.to_iterable_dataset() if streaming else ds
    local = [s for s in specs if os.path.exists(os.path.expanduser(s))]
    if local and len(local) != len(specs):
        missing = sorted(set(specs) - set(local))
        raise FileNotFoundError(f"data paths not found: {missing}")
    if local:
        files = [f for s in specs for f in _local_files(s)]
        builders = {LOCAL_BUILDERS[f.suffix] for f in files}
        if len(builders) > 1:
            raise ValueError(f"mixed data formats {sorted(builders)}: pass files of one kind (text, json or parquet).")
        builder = builders.pop()
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                   streaming=streaming, **kwargs)
    else:
        if len(specs) > 1:
            raise ValueError(f"{specs}: give one Hub dataset name, or local paths that exist.")
        try:
            ds = datasets.load_dataset(specs[0], config_name, split=split, streaming=streaming)
        except Exception as e:  # the datasets error names neither the flag nor the fix
            raise ValueError(
                f"could not load dataset {specs[0]!r} (config {config_name!r}, split {split!r}): {e}. "
                "Check the name/--data-config/--data-split, the network or HF_HUB_OFFLINE, or pass local files."
            ) from e
    columns = ds.column_names or []
    if columns and text_column not in columns:
        raise ValueError(f"the data has no {text_column!r} column (it has {columns}): pass --text-column.")
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    keep = [c for c in (ds.column_names or []) if c != "text"]
    return ds.remove_columns(keep) if keep else ds


def describe_data(specs: list[str]) -> str:
    return EMBEDDED_CORPUS_NAME if not specs or specs == [EMBEDDED] else ", ".join(specs)


def split_documents(ds, fraction: float, seed: int):
    """(train, validation) by document, deterministic for a seed; at least one document on each side."""
    n = len(ds)
    if n < 2:
        raise ValueError("need at least 2 documents to hold some out: add data or pass --validation-data.")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(fraction * n)))
    return ds.select(np.sort(order[n_val:])), ds.select(np.sort(order[:n_val]))


def tokenize_and_pack(ds, tokenizer, seq_len: int, *, num_proc: int | None = None) -> torch.Tensor:
    """Concatenate `doc + [eos]` for every document and cut into `(n_blocks, seq_len)` (remainder dropped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: set one (tokenizer.eos_token = ...) before packing.")

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}

    tokens = ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                    desc="tokenising")
    flat = np.fromiter(itertools.chain.from_iterable(tokens["ids"]), dtype=np.int64)
    n_blocks = len(flat) // seq_len
    if n_blocks == 0:
        raise ValueError(f"the data has {len(flat)} tokens, fewer than one block of --seq-len {seq_len}.")
    return torch.from_numpy(flat[: n_blocks * seq_len].reshape(n_blocks, seq_len).copy())


class PackedBlocks(Dataset):
    """Blocks in a fixed order; `__getitem__` gives model inputs (labels = inputs; the model shifts)."""

    def __init__(self, blocks: torch.Tensor, order: torch.Tensor | None = None):
        self.blocks, self.order = blocks, order if order is not None else torch.arange(len(blocks))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[self.order[i]]
        return {"input_ids": ids, "labels": ids}


def epoch_blocks(blocks: torch.Tensor, epoch: int, seed: int, n_use: int) -> PackedBlocks:
    """The first `n_use` blocks of the seeded permutation for `epoch` (same on every process and resume)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return PackedBlocks(blocks, torch.randperm(len(blocks), generator=g)[:n_use])


class PackedStream(IterableDataset):
    """Packs a streaming dataset on the fly (documents shuffled through a seeded buffer)."""

    def __init__(self, ds, tokenizer, seq_len: int):
        self.ds, self.tokenizer, self.seq_len = ds, tokenizer, seq_len

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        buffer: list[int] = []
        eos = self.tokenizer.eos_token_id
        for doc in self.ds:
            buffer += self.tokenizer(doc["text"], add_special_tokens=False)["input_ids"] + [eos]
            while len(buffer) >= self.seq_len:
                ids = torch.tensor(buffer[: self.seq_len])
                buffer = buffer[self.seq_len:]
                yield {"input_ids": ids, "labels": ids}


@dataclass
class TrainData:
    """What the trainer needs: training blocks (or a stream) and validation blocks."""

    train_blocks: torch.Tensor | None
    train_stream: PackedStream | None
    val_blocks: torch.Tensor | None
    description: str


def build_train_data(cfg, tokenizer, main_process_first) -> TrainData:
    """Load, split and pack the data of a `TrainConfig` (tokenisation runs on the main process first)."""
    load = dict(split=cfg.data_split, config_name=cfg.data_config, text_column=cfg.text_column)
    with main_process_first():
        docs = load_documents(cfg.data, streaming=cfg.streaming, **load)
        val_docs = None
        if cfg.validation_data or cfg.validation_split:
            val_load = dict(load, split=cfg.validation_split or load["split"])
            val_docs = load_documents(cfg.validation_data or cfg.data, streaming=False, **val_load)
        if cfg.streaming:
            if val_docs is None and cfg.validation_documents > 0:
                import datasets

                # held out before the shuffle: each pass re-shuffles (set_epoch), and a split after it would
                # hold out different documents per pass, training on the earlier passes' held-out ones
                val_docs = datasets.Dataset.from_list(list(docs.take(cfg.validation_documents)))
                docs = docs.skip(cfg.validation_documents)
            docs = docs.shuffle(seed=cfg.seed, buffer_size=1000)
            stream = PackedStream(docs, tokenizer, cfg.seq_len)
            train_blocks = None
        else:
            if val_docs is None and cfg.validation_fraction > 0:
                docs, val_docs = split_documents(docs, cfg.validation_fraction, cfg.seed)
            train_blocks, stream = tokenize_and_pack(docs, tokenizer, cfg.seq_len), None
        val_blocks = None
        if val_docs is not None:
            val_blocks = tokenize_and_pack(val_docs, tokenizer, cfg.seq_len)
            if cfg.max_eval_blocks:
                val_blocks = val_blocks[: cfg.max_eval_blocks]
    return TrainData(train_blocks, stream, val_blocks, describe_data(cfg.data))
