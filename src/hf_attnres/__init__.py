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
from . import kernels  # the modeling code finds it here (sys.modules) and builds the kernels on first use

__version__ = ATTNRES_VERSION

AutoConfig.register(AttnResConfig.model_type, AttnResConfig, exist_ok=True)
AutoModel.register(AttnResConfig, AttnResModel, exist_ok=True)
AutoModelForCausalLM.register(AttnResConfig, AttnResForCausalLM, exist_ok=True)

__all__ = [
    "ATTN_RES_MODULE_NAMES",
    "AttnResConfig",
    "AttnResForCausalLM",
    "AttnResModel",
    "__version__",
    "depth_attention",
    "save_for_hub",
]
