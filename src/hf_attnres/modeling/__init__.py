"""Hub-portable AttnRes config and model (these two files are copied into saved model folders)."""

from .configuration_attnres import ATTNRES_VERSION, AttnResConfig, default_block_size
from .modeling_attnres import (
    ATTN_RES_MODULE_NAMES,
    AttnResDecoderLayer,
    AttnResForCausalLM,
    AttnResidual,
    AttnResModel,
    AttnResPreTrainedModel,
    depth_attention,
)


def is_attn_res_param(name: str) -> bool:
    """Whether a parameter name (plain, PEFT- or FSDP-prefixed) belongs to an AttnRes module."""
    return any(part in ATTN_RES_MODULE_NAMES for part in name.split("."))


__all__ = [
    "ATTNRES_VERSION",
    "ATTN_RES_MODULE_NAMES",
    "AttnResConfig",
    "AttnResDecoderLayer",
    "AttnResForCausalLM",
    "AttnResidual",
    "AttnResModel",
    "AttnResPreTrainedModel",
    "default_block_size",
    "depth_attention",
    "is_attn_res_param",
]
