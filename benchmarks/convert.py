"""Conversion time and peak memory on SmolLM2-135M, against simply copying the checkpoint folder.

Two source layouts of the real checkpoint (dequantised from its GGUF once): one 538 MB `model.safetensors`,
and the same weights in 64 MB shards. For each, measured side by side in one run:

- time: `convert_checkpoint(..., verify=False)` in this process against `shutil.copytree` of the same folder,
  interleaved (copy, convert, copy, ...) after a warm-up so both read from the page cache; median of repeats.
  Target: conversion within 2x the copy time.
- peak RSS: the conversion in a fresh subprocess (its own high-water mark), minus the peak of a subprocess
  that only imports the same modules; compared with the largest input shard. Target: the extra
  memory stays below the largest shard (streaming never holds a shard, let alone the model).
- the library route, timed and measured the same way: each shard read with `safetensors.torch.load_file`,
  the zero pseudo-queries and unit key norms added, the whole state dict written with
  `huggingface_hub.save_torch_state_dict` (which shards it). It must hold every tensor before writing; our
  streaming copy holds 16 MiB. This is why the converter keeps its own writer (issue 22 asked for the number).

    python benchmarks/convert.py                 # ~1-2 min on 2 cores
    python benchmarks/convert.py --repeats 5 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIME_TARGET = 2.0
IMPORTS = "import torch, transformers; from hf_attnres.conversion import convert_checkpoint"


_REPORT_PEAK = """
try:
    status = open("/proc/self/status").read()
    print(int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM:"))) * 1024)
except OSError:  # no /proc (macOS, where ru_maxrss is in bytes; Linux reports KiB)
    import resource, sys
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024))
"""


def peak_rss(code: str) -> int:
    """Peak resident memory (bytes) of a fresh Python process running `code` (fails loudly if it fails).

    The child reports its own high-water mark (`VmHWM`, reset by exec). `ru_maxrss` of a child, from
    RUSAGE_CHILDREN or `wait4`, would also count the parent's memory at fork, i.e. a loaded model here.
    """
    proc = subprocess.run([sys.executable, "-c", code + "\n" + _REPORT_PEAK], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"subprocess failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return int(proc.stdout.split()[-1])


def conversion_memory(src: Path, out: Path) -> dict[str, float]:
    """Peak RSS of converting `src` (no verification) and of a process importing the same modules, in MB,
    with the largest input shard for comparison."""
    args = {"verify": False, "progress": False}
    convert = f"{IMPORTS}\nconvert_checkpoint({str(src)!r}, {str(out)!r}, **{args!r})"
    baseline, peak = peak_rss(IMPORTS), peak_rss(convert)
    library = peak_rss(f"{IMPORTS}\n{LIBRARY}\nlibrary_convert({str(src)!r}, {str(out) + '-library'!r})")
    shutil.rmtree(str(out) + "-library", ignore_errors=True)
    largest = max(p.stat().st_size for p in src.glob("*.safetensors"))
    return {
        "library_extra_mb": (library - baseline) / 1e6,
        "baseline_mb": baseline / 1e6,
        "peak_mb": peak / 1e6,
        "extra_mb": (peak - baseline) / 1e6,
        "largest_shard_mb": largest / 1e6,
        "extra_over_largest_shard": (peak - baseline) / largest,
    }


LIBRARY = """
import torch
from pathlib import Path
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from transformers import AutoConfig
from hf_attnres.conversion.families import attnres_config, expected_shapes

def library_convert(src, dst):
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    config, _ = attnres_config(AutoConfig.from_pretrained(src), mode="block")
    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(shard))
    for name, shape in expected_shapes(config).items():  # the AttnRes parameters at their initial values
        if name not in state:
            state[name] = (torch.zeros if name.endswith("pseudo_query") else torch.ones)(shape, dtype=torch.float32)
    save_torch_state_dict(state, dst, max_shard_size="2GB")
    config.save_pretrained(dst)
"""


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def prepare_sources(work: Path) -> dict[str, Path]:
    """SmolLM2-135M-Instruct saved as one file and as 64 MB shards (reused when already there)."""
    layouts = {"single file": (work / "smollm2-single", "50GB"), "64MB shards": (work / "smollm2-sharded", "64MB")}
    if not all((path / "config.json").is_file() for path, _ in layouts.values()):
        from hf_attnres.assets import load_smollm2

        model, tokenizer = load_smollm2()
        for path, shard in layouts.values():
            model.save_pretrained(path, max_shard_size=shard)
            tokenizer.save_pretrained(path)
    return {name: path for name, (path, _) in layouts.items()}


def time_against_copy(src: Path, work: Path, repeats: int) -> dict[str, float]:
    from hf_attnres.conversion import convert_checkpoint

    def copy(dst: Path) -> None:
        shutil.copytree(src, dst)

    def convert(dst: Path) -> None:
        convert_checkpoint(src, dst, verify=False, progress=False)

    namespace: dict = {}
    exec(LIBRARY, namespace)

    def library(dst: Path) -> None:
        namespace["library_convert"](src, dst)

    times: dict[str, list[float]] = {"copy": [], "convert": [], "library": []}
    for i in range(repeats + 1):  # the first round warms the page cache and is not counted
        for name, fn in (("copy", copy), ("convert", convert), ("library", library)):
            dst = work / f"{name}-{i}"
            start = time.perf_counter()
            fn(dst)
            elapsed = time.perf_counter() - start
            shutil.rmtree(dst)
            if i:
                times[name].append(elapsed)
    copy_s, convert_s = statistics.median(times["copy"]), statistics.median(times["convert"])
    library_s = statistics.median(times["library"])
    return {"copy_s": copy_s, "convert_s": convert_s, "convert_over_copy": convert_s / copy_s,
            "library_s": library_s, "convert_over_library": convert_s / library_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="folder for the sources (kept) and outputs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="hf-attnres-convert-bench-"))
    sources = prepare_sources(work)
    results = {}
    for name, src in sources.items():
        row = time_against_copy(src, work, args.repeats)
        row.update(conversion_memory(src, work / "memory-out"))
        shutil.rmtree(work / "memory-out")
        results[name] = row

    print(
        f"SmolLM2-135M-Instruct (fp32, {_size(sources['single file']) / 1e6:.0f} MB), "
        f"median of {args.repeats}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'layout':<13} {'copy s':>7} {'convert s':>9} {'ratio':>6}  {'peak MB':>8} {'baseline':>8} {'extra':>6} "
        f"{'largest shard':>13} {'extra/shard':>11}  {'library s':>9} {'library extra MB':>16}"
    )
    ok = True
    for name, r in results.items():
        print(
            f"{name:<13} {r['copy_s']:7.2f} {r['convert_s']:9.2f} {r['convert_over_copy']:6.2f}  {r['peak_mb']:8.0f} "
            f"{r['baseline_mb']:8.0f} {r['extra_mb']:6.0f} {r['largest_shard_mb']:13.0f} "
            f"{r['extra_over_largest_shard']:11.2f}  {r['library_s']:9.2f} {r['library_extra_mb']:16.0f}"
        )
        ok &= r["convert_over_copy"] <= TIME_TARGET and r["extra_over_largest_shard"] <= 1.0
    print(
        f"targets: convert <= {TIME_TARGET}x copy time; extra peak RSS <= largest shard: {'met' if ok else 'NOT met'}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.work is None:
        shutil.rmtree(work)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
