"""Fused CPU kernels for Block AttnRes (a compiled Python module; source: `depth_attention.cpp`).

The kernels do each block's phase 1 and each sublayer's phase 2 in one call, forward and backward. Decoding
runs the depth attention once per sublayer on a single token, where every PyTorch op's fixed cost is the whole
cost; on a prompt or a training batch the cost is memory traffic, and the kernels read each token's rows once
per call where the plain ops read every tensor once per op. In inference they also apply the RMSNorm that reads
each result (see `fusable_norms` in the modeling code). The modeling code (also a Hub folder's copy of it,
once this package is imported) asks `get()` for them on CPU (inference without depth weights, and the two
phases' autograd functions), and otherwise runs the same equations as plain torch ops, so a Hub folder needs
none of this.

Built once per torch version with the system's C++ compiler (under a minute, through
`torch.utils.cpp_extension` and ninja) into `~/.cache/hf_attnres/kernels` (`HF_ATTNRES_CACHE`), the first
time a Block AttnRes model of this package runs on CPU, or ahead of time with `hf-attnres build-kernels`. Set
`HF_ATTNRES_KERNELS=0` to never build or use them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

SOURCE = Path(__file__).with_name("depth_attention.cpp")
LIBRARY = "hf_attnres_kernels"
# With torch's own OpenMP (Linux wheels), the kernels split a prompt's tokens over torch's intra-op threads
# (at::parallel_for): the module then needs libgomp.so.1, which resolves to the copy torch has already loaded,
# so both share one thread pool. Elsewhere they run on the calling thread.
OPENMP = bool(getattr(torch._C, "has_openmp", False))
CFLAGS = ["-O3", "-fopenmp" if OPENMP else "-fopenmp-simd"]


def _cxx_runtime() -> list[str]:
    """Link flags naming the C++ runtime this process has loaded (torch's libstdc++), on Linux.

    A compiler whose libstdc++ is static only (/opt/gcc's GCC 13 on the GPU machine here) otherwise links a copy
    of it into the module, a second C++ runtime in the process whose stream locale is its own and never set up:
    the kernels' first error message with a number in it crashed the process there. Named ahead of the
    compiler's own `-lstdc++`, the loaded library resolves every C++ symbol, and nothing of a copy is linked in.
    """
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:  # not Linux: the compiler's default
        return []
    loaded = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    return sorted(loaded)[:1]  # the library's path: the linker records its soname, libstdc++.so.6


LDFLAGS = [*_cxx_runtime(), *(["-fopenmp"] if OPENMP else [])]

_module: ModuleType | None = None
_tried = False  # whether `load()` ran in this process: a failed build is not retried


def enabled() -> bool:
    """False when `HF_ATTNRES_KERNELS=0` (or `false`/`no`/`off`)."""
    return os.environ.get("HF_ATTNRES_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def build_directory() -> Path:
    """Where the library for this torch version and kernel source lives: a new source or torch gets its own."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = Path(os.environ.get("HF_ATTNRES_CACHE") or cache / "hf_attnres")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS + LDFLAGS).encode()).hexdigest()[:12]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return root / "kernels" / f"torch-{torch.__version__}-{python}-{digest}"


def _compile(directory: Path, verbose: bool) -> ModuleType:
    """Build and import the module in `directory` with torch's JIT extension builder."""
    from torch.utils.cpp_extension import load as jit_load

    try:  # the `ninja` wheel's binary, which is not on PATH unless the virtual environment is activated
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    except ImportError:
        pass
    # copies of the flags: it appends to its arguments, and build_directory() reads them
    return jit_load(name=LIBRARY, sources=[str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                    build_directory=str(directory), verbose=verbose)


def _import(library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(LIBRARY, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(build: bool = True, verbose: bool = False) -> ModuleType | None:
    """The kernels' module, building it first if needed and `build`; None where they are unavailable.
    Never raises for a missing compiler or a failed build: it warns once, and the models run without them.

    The build goes to a temporary folder renamed into place when complete, so an interrupted build leaves
    nothing that a later load would pick up.
    """
    global _module, _tried
    if _module is not None or _tried or not enabled():
        return _module
    directory = build_directory()
    library = directory / f"{LIBRARY}.so"
    if not library.is_file() and not build:
        return None
    _tried = True
    try:
        if library.is_file():
            _module = _import(library)
        else:
            logger.warning(f"hf_attnres: building the fused CPU kernels for Block AttnRes (once per torch "
                           f"version, under a minute) into {directory}; HF_ATTNRES_KERNELS=0 skips them.")
            directory.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
            try:
                _module = _compile(staging, verbose)
                try:
                    staging.rename(directory)
                except OSError:  # another process finished first: its build is as good as ours
                    pass
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except Exception as error:  # no compiler, no ninja, a failed build: run without the kernels
        last = str(error).strip().splitlines()[-1:] or [""]
        logger.warning(f"hf_attnres: the fused CPU kernels are unavailable ({type(error).__name__}: {last[0]}); "
                       f"Block AttnRes on CPU runs as plain torch ops, 5-15% slower. `hf-attnres "
                       f"build-kernels --verbose` shows the build.")
    return _module


def get(abi: int) -> ModuleType | None:
    """The kernels for a caller that knows their interface version `abi` (loaded, or built, on first call),
    or None: disabled, unavailable, or another version (e.g. a Hub folder's modeling code of another release)."""
    if not enabled():
        return None
    module = load()
    return module if module is not None and module.ABI == abi else None


__all__ = ["build_directory", "enabled", "get", "load"]
