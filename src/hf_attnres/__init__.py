"""hf-attnres: Attention Residuals (arXiv 2603.15031) for transformers.

Importing the package registers the AttnRes classes with the Auto classes, so
``AutoModelForCausalLM.from_pretrained(folder)`` works without ``trust_remote_code``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling import (
    ATTN_RES_MODULE_NAMES,
    ATTNRES_VERSION,
    AttnResConfig,
    AttnResForCausalLM,
    AttnResModel,
    depth_attention,
)
from .hub import save_for_hub
from . import ops  # registers the package's depth-attention implementations (attn_res_implementation)

__version__ = ATTNRES_VERSION

AutoConfig.register(AttnResConfig.model_type, AttnResConfig, exist_ok=True)
AutoModel.register(AttnResConfig, AttnResModel, exist_ok=True)
AutoModelForCausalLM.register(AttnResConfig, AttnResForCausalLM, exist_ok=True)
# save_pretrained, push_to_hub and Trainer.save_model then copy the two code files beside the weights and write
# `auto_map`, so every folder saved from a native model loads with trust_remote_code where hf_attnres is absent
AttnResConfig.register_for_auto_class("AutoConfig")
AttnResModel.register_for_auto_class("AutoModel")
AttnResForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "ATTN_RES_MODULE_NAMES",
    "AttnResConfig",
    "AttnResForCausalLM",
    "AttnResModel",
    "__version__",
    "depth_attention",
    "save_for_hub",
]
