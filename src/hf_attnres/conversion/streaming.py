"""Write safetensors shards one tensor at a time, so converting never holds a model (or a shard) in memory.

Every tensor's dtype and shape are known before a byte is written (from the source headers), so each output
file's header is computed first and the tensor data is then streamed into it: an in-kernel byte-range copy
when the dtype is unchanged (as fast as copying the file), chunked casts otherwise. Output shards mirror the
source's shards (split further only above `max_shard_size`), and each header is padded so the data keeps the
source's page alignment, which keeps the copy at `cp` speed. Peak memory is a 16 MiB chunk, or for sources
that are not safetensors (`.bin`, GGUF) what their loader holds.

Why not `safetensors.torch.load_file` + `huggingface_hub.save_torch_state_dict`: they hold the whole state dict
before writing. `benchmarks/convert.py` (SmolLM2-135M fp32, 538 MB, 2026-12-06, 2 shared cores) measured the
same time (one file: 0.41 s here, 0.42 s the library route; 64 MB shards: 0.38 s vs 0.32 s) but extra peak
memory of 9 MB here against 547 MB (the whole model) for the library route: a 70B checkpoint converts here on a
machine that cannot hold it.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils.hub import convert_file_size_to_int

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
CHUNK_BYTES = 16 << 20
PAGE = 4096
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class TensorRef:
    """A tensor to write: its name, shape and stored dtype, and where its data comes from (subclasses)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    origin: Path | None = None  # the source file holding it (output shards follow source files), if any

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        return self.numel * (dtype or self.dtype).itemsize

    def chunks(self, dtype: torch.dtype) -> Iterator[memoryview | torch.Tensor]:
        """The tensor's data in `dtype`, in storage order, as bytes-like pieces of at most ~CHUNK_BYTES."""
        raise NotImplementedError

    def write(self, f: io.FileIO, dtype: torch.dtype, on_bytes: Callable[[int], object]) -> None:
        """Append the tensor's data in `dtype` to the unbuffered file `f`."""
        for piece in self.chunks(dtype):
            data = piece if isinstance(piece, memoryview) else memoryview(piece.contiguous().view(torch.uint8).numpy())
            while data:  # a raw write may be partial
                data = data[f.write(data) :]
            on_bytes(len(piece) if isinstance(piece, memoryview) else piece.numel() * piece.element_size())


@dataclass
class StoredTensor(TensorRef):
    """A tensor inside the safetensors file `origin`, read straight from its byte range (`offset` is absolute)."""

    offset: int = 0

    def chunks(self, dtype: torch.dtype) -> Iterator[memoryview | torch.Tensor]:
        step = CHUNK_BYTES - CHUNK_BYTES % self.dtype.itemsize
        remaining = self.nbytes()
        with open(self.origin, "rb") as f:
            f.seek(self.offset)
            while remaining:
                buf = bytearray(min(step, remaining))
                if f.readinto(buf) != len(buf):
                    raise ValueError(f"{self.origin} ended inside tensor {self.name!r}: the file is truncated.")
                remaining -= len(buf)
                if dtype == self.dtype:
                    yield memoryview(buf)
                else:
                    yield torch.frombuffer(buf, dtype=self.dtype).to(dtype)

    def write(self, f: io.FileIO, dtype: torch.dtype, on_bytes: Callable[[int], object]) -> None:
        """Same dtype: a byte-range copy inside the kernel (`sendfile`, as `shutil.copyfile` does), no buffer."""
        if dtype != self.dtype or not hasattr(os, "sendfile"):
            return super().write(f, dtype, on_bytes)
        with open(self.origin, "rb") as src:
            offset, end = self.offset, self.offset + self.nbytes()
            while offset < end:
                try:
                    sent = os.sendfile(f.fileno(), src.fileno(), offset, min(end - offset, CHUNK_BYTES))
                except OSError as e:
                    if offset != self.offset or e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
                        raise
                    return super().write(f, dtype, on_bytes)  # sendfile unsupported here: copy through memory
                if sent == 0:
                    raise ValueError(f"{self.origin} ended inside tensor {self.name!r}: the file is truncated.")
                offset += sent
                on_bytes(sent)


@dataclass
class LoadedTensor(TensorRef):
    """A tensor produced by a loader (a `.bin` shard, a dequantised GGUF model, a new AttnRes parameter)."""

    load: Callable[[], torch.Tensor] = None

    def chunks(self, dtype: torch.dtype) -> Iterator[memoryview | torch.Tensor]:
        flat = self.load().detach().reshape(-1)
        step = max(1, CHUNK_BYTES // max(dtype.itemsize, self.dtype.itemsize))
        for start in range(0, flat.numel(), step):
            yield flat[start : start + step].to(dtype)


def plan_shards(tensors: Sequence[TensorRef], dtype: torch.dtype, max_shard_size: int | str) -> list[list[TensorRef]]:
    """Group tensors in order into shards: one per source file (tensors without one join the current shard),
    split further so none exceeds `max_shard_size` bytes (a bigger tensor gets its own)."""
    try:
        limit = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError) as e:
        raise ValueError(f"max_shard_size={max_shard_size!r} is not a size: use e.g. '2GB', '500MB' or bytes.") from e
    shards: list[list[TensorRef]] = [[]]
    size = 0
    origin = None
    for t in tensors:
        n = t.nbytes(dtype)
        new_file = t.origin is not None and origin is not None and t.origin != origin
        if shards[-1] and (size + n > limit or new_file):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
        origin = t.origin or origin
    return shards


def shard_names(count: int) -> list[str]:
    """transformers' file names: `model.safetensors`, or `model-00001-of-0000N.safetensors` with an index."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_safetensors(
    path: Path, tensors: Sequence[TensorRef], dtype: torch.dtype, on_bytes: Callable[[int], object]
) -> None:
    """One safetensors file holding `tensors` cast to `dtype`, streamed chunk by chunk."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        end = offset + t.nbytes(dtype)
        header[t.name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * _header_padding(len(raw), tensors[0], dtype)
    with open(path, "wb", buffering=0) as f:  # unbuffered: tensors may be appended by sendfile on the descriptor
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            start = f.tell()
            t.write(f, dtype, on_bytes)
            if f.tell() - start != t.nbytes(dtype):
                raise RuntimeError(f"tensor {t.name!r}: wrote {f.tell() - start} bytes, expected {t.nbytes(dtype)}.")


def _header_padding(header_len: int, first: TensorRef, dtype: torch.dtype) -> int:
    """Spaces after the JSON header: the data must start 8-byte aligned (as safetensors writes it); when the
    first tensor is copied byte for byte, at the same offset modulo the page size as in its source file, since
    an in-kernel copy between misaligned offsets is ~1.4x slower."""
    pad = -(8 + header_len) % 8
    if isinstance(first, StoredTensor) and first.dtype == dtype and first.offset % 8 == 0:
        pad = (first.offset - 8 - header_len) % PAGE
    return pad


def write_checkpoint(
    tensors: Sequence[TensorRef],
    folder: Path,
    dtype: torch.dtype,
    max_shard_size: int | str = "2GB",
    progress: bool = True,
) -> list[str]:
    """Write `tensors` (in order) as transformers-style safetensors shards plus index; returns the file names."""
    if dtype not in SAFETENSORS_NAMES:
        raise ValueError(f"dtype {dtype} is not supported: use float32, bfloat16 or float16.")
    shards = plan_shards(tensors, dtype, max_shard_size)
    names = shard_names(len(shards))
    total = sum(t.nbytes(dtype) for t in tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Writing shards", disable=not progress) as bar:
        for name, shard in zip(names, shards, strict=True):
            write_safetensors(folder / name, shard, dtype, bar.update)
    if len(names) > 1:
        index = {
            "metadata": {"total_parameters": sum(t.numel for t in tensors), "total_size": total},
            "weight_map": {t.name: name for name, shard in zip(names, shards, strict=True) for t in shard},
        }
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return names
