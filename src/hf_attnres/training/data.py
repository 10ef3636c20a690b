"""Text in, fixed-length token blocks out: load documents, tokenise, pack with EOS between documents.

Packing (no padding) keeps every token a target, so the token count of a batch is known and the loss can
be normalised by it exactly. Tokenising and packing are two batched `datasets` maps (run_clm's
`group_texts`), cached on disk and lazy on streams, so the corpus is never held in memory. The
train/validation split is by document, so validation text is unseen. Shuffling is a seeded permutation of
blocks per epoch, so a resumed run sees the same order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import EMBEDDED_CORPUS_NAME, embedded_corpus

LOCAL_BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
EMBEDDED = "embedded"


def _local_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_BUILDERS)
    if not files:
        raise ValueError(f"{path} holds no documents (no {'/'.join(LOCAL_BUILDERS)} files): point --data at text data.")
    return files


def _is_empty(path: Path) -> bool:
    """True when `path` holds only whitespace (reads until the first other character)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _check_local_files(files: list[Path]) -> None:
    for f in files:
        if f.suffix != ".parquet" and _is_empty(f):
            what = "one document per file" if LOCAL_BUILDERS[f.suffix] == "text" else "one JSON object per line"
            raise ValueError(f"{f} is empty: add text ({what}) or leave it out of --data.")


def _json_error(files: list[Path], error: Exception) -> ValueError:
    """The first line of `files` that is not a JSON object, as one clear error (datasets' names no line)."""
    for f in files:
        if f.suffix != ".jsonl":
            continue
        with open(f, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    return ValueError(f"{f}:{number}: not valid JSON ({e.msg}): fix or remove that line.")
                if not isinstance(record, dict):
                    return ValueError(f"{f}:{number}: not a JSON object: write one object per line, e.g. "
                                      '{"text": "..."}.')
    cause = error.__cause__ or error
    return ValueError(f"could not read {', '.join(map(str, files))}: {cause}. Check that the files are valid "
                      "JSON Lines with the same fields on every line.")


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
        _check_local_files(files)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                       streaming=streaming, **kwargs)
        except (datasets.exceptions.DatasetGenerationError, StopIteration) as e:
            if builder != "json":
                raise
            raise _json_error(files, e) from e
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
        raise ValueError(f"the data holds {n} document(s) and a validation split needs at least 2 (.txt/.md files "
                         "are one document each): add documents, or pass --validation-data or "
                         "--validation-fraction 0.")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(fraction * n)))
    return ds.select(np.sort(order[n_val:])), ds.select(np.sort(order[:n_val]))


def pack_documents(ds, tokenizer, seq_len: int, *, num_proc: int | None = None):
    """`ds` (documents, or a stream of them) as blocks of `seq_len` tokens: a column `input_ids`.

    Two batched maps: tokenise each document and append EOS, then concatenate each batch of 1000 documents
    and cut it into blocks, dropping the batch's remainder (run_clm's `group_texts`). On a `Dataset` both
    are cached on disk (Arrow, memory-mapped); on an `IterableDataset` they run lazily while streaming.
    """
    import datasets

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: set one (tokenizer.eos_token = ...) before packing.")

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    def group(batch):
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i:i + seq_len] for i in range(0, n, seq_len)]}

    streaming = isinstance(ds, datasets.IterableDataset)
    opts = {} if streaming else {"num_proc": num_proc}
    tokens = ds.map(encode, batched=True, remove_columns=["text"],
                    **opts, **({} if streaming else {"desc": "tokenising"}))
    blocks = tokens.map(group, batched=True, **opts, **({} if streaming else {"desc": "packing"}))
    if not streaming and len(blocks) == 0:
        n_tokens = sum(len(x) for x in tokens["input_ids"])
        raise ValueError(f"the data has {n_tokens} tokens, fewer than one block of --seq-len {seq_len}: add data "
                         "or lower --seq-len.")
    return blocks.with_format("torch")


def tokenize_and_pack(ds, tokenizer, seq_len: int, *, num_proc: int | None = None,
                      max_blocks: int | None = None) -> torch.Tensor:
    """The first `max_blocks` blocks of `pack_documents` as one `(n_blocks, seq_len)` tensor (in memory: meant
    for validation data)."""
    blocks = pack_documents(ds, tokenizer, seq_len, num_proc=num_proc)
    if max_blocks:
        blocks = blocks.select(range(min(max_blocks, len(blocks))))
    return blocks[:]["input_ids"].reshape(len(blocks), seq_len)


class PackedBlocks(Dataset):
    """Blocks (a tensor or a packed `Dataset`) in a fixed order; items are model inputs (labels = inputs;
    the model shifts)."""

    def __init__(self, blocks, order: torch.Tensor | None = None):
        self.blocks, self.order = blocks, order if order is not None else torch.arange(len(blocks))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[int(self.order[i])]
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        return {"input_ids": ids, "labels": ids}


def epoch_blocks(blocks, epoch: int, seed: int, n_use: int) -> PackedBlocks:
    """The first `n_use` blocks of the seeded permutation for `epoch` (same on every process and resume)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return PackedBlocks(blocks, torch.randperm(len(blocks), generator=g)[:n_use])


def collate_blocks(items: list[dict]) -> dict[str, torch.Tensor]:
    """A batch of blocks (from `PackedBlocks` or a packed stream); the labels are the inputs."""
    ids = torch.stack([x["input_ids"] for x in items])
    return {"input_ids": ids, "labels": ids}


@dataclass
class TrainData:
    """What the trainer needs: training blocks (a packed `Dataset`) or a packed stream, validation blocks."""

    train_blocks: object | None  # datasets.Dataset with a torch `input_ids` column
    train_stream: object | None  # datasets.IterableDataset of the same
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
            stream, train_blocks = pack_documents(docs, tokenizer, cfg.seq_len), None
        else:
            if val_docs is None and cfg.validation_fraction > 0:
                docs, val_docs = split_documents(docs, cfg.validation_fraction, cfg.seed)
            train_blocks, stream = pack_documents(docs, tokenizer, cfg.seq_len), None
        val_blocks = None
        if val_docs is not None:
            val_blocks = tokenize_and_pack(val_docs, tokenizer, cfg.seq_len, max_blocks=cfg.max_eval_blocks)
    return TrainData(train_blocks, stream, val_blocks, describe_data(cfg.data))
