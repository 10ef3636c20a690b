"""The model a run trains: load (converting a Llama-family checkpoint on the fly) and choose what learns.

Modes: `full` trains everything; `attnres-only` freezes the backbone so the routing (pseudo-queries and key
norms) learns first; `lora` trains LoRA adapters through PEFT with the AttnRes modules as `modules_to_save`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..conversion.convert import convert_checkpoint, parse_dtype
from ..modeling import ATTN_RES_MODULE_NAMES, is_attn_res_param

# Linear layers of an AttnRes decoder layer (Llama's): PEFT has no default list for model_type "attnres".
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelSource:
    """Where the trained model came from (for the model card and the summary)."""

    path: str  # an AttnRes folder or Hub id that from_pretrained loads
    base_model: str  # what the user gave (Llama folder, GGUF, Hub id)


def _local_model_type(src: str) -> str | None:
    config = Path(src) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type")
    return None


def _needs_conversion(src: str) -> bool:
    if src.endswith(".gguf"):
        return True
    model_type = _local_model_type(src)
    if model_type is None and os.path.isdir(src):
        raise FileNotFoundError(f"{src} has no config.json: point --model at a model folder, a .gguf or a Hub id.")
    if model_type is None:  # a Hub id
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(src).model_type
    return model_type != "attnres"


def resolve_model_source(cfg, converted_dir: Path, is_main: bool) -> ModelSource:
    """An AttnRes model path for `cfg.model`, converting into `converted_dir` when needed (main process).

    A conversion left by an earlier run of the same output folder is reused, so `--resume` does not
    convert again.
    """
    src = cfg.model
    if not _needs_conversion(src):
        return ModelSource(path=src, base_model=src)
    if (converted_dir / "config.json").is_file():
        return ModelSource(path=str(converted_dir), base_model=src)
    if not is_main:
        raise RuntimeError("conversion must run on the main process first")
    convert_checkpoint(src, converted_dir, mode=cfg.convert_mode, block_size=cfg.block_size, verify=cfg.convert_verify)
    return ModelSource(path=str(converted_dir), base_model=src)


def load_model(path: str, dtype: str | torch.dtype | None = None, *, device: str | None = None,
               tokenizer: str | None = None, trust_remote_code: bool = False, attnres_only: bool = True):
    """(model, tokenizer) from a model folder or Hub id: the package's one loader (training, evaluation,
    the run job, inspection).

    `dtype`: float32 (default), bfloat16, float16, or "auto" (the stored dtype), parsed by the converter's
    `parse_dtype`; `device`: "auto" (CUDA when available) or a device, default left on the CPU;
    `tokenizer`: another folder/id for the tokenizer; `attnres_only`: refuse non-AttnRes models.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_attnres  # noqa: F401  (registers the Auto classes)

    local = Path(os.path.expanduser(path))
    looks_local = str(path).startswith((".", "/", "~")) or str(path).count("/") > 1 or "\\" in str(path)
    if looks_local and not local.exists():
        raise FileNotFoundError(f"model folder {path} does not exist: pass a model folder or a Hub id.")
    if local.is_dir() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: it is not a transformers model folder.")
    torch_dtype = "auto" if str(dtype).lower() == "auto" else parse_dtype(dtype) or torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"could not load model {path}: {e}") from e
    if attnres_only and getattr(model.config, "model_type", None) != "attnres":
        raise ValueError(f"{path} is a {model.config.model_type!r} model, not AttnRes: convert it first "
                         "(hf-attnres convert).")
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load a tokenizer from {tokenizer or path} ({e}): pass --tokenizer.") from e
    if device is not None:
        model = model.to(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    return model, tok


def apply_train_mode(model, cfg):
    """Freeze or wrap `model` for `cfg.train_mode`; returns the model to train."""
    if cfg.train_mode == "full":
        model.requires_grad_(True)
        return model
    if cfg.train_mode == "attnres-only":
        for name, p in model.named_parameters():
            p.requires_grad_(is_attn_res_param(name))
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("attnres-only: this model has no AttnRes parameters (attn_res_mode 'none'?).")
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
        target_modules=cfg.lora_target_modules or DEFAULT_LORA_TARGETS,
        modules_to_save=list(ATTN_RES_MODULE_NAMES) if model.config.attn_res_mode != "none" else None,
    )
    return get_peft_model(model, lora)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    def numel(p) -> int:
        return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitions report 0 elements

    total = sum(numel(p) for p in model.parameters())
    return sum(numel(p) for p in model.parameters() if p.requires_grad), total
