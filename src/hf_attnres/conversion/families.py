"""Which checkpoints convert exactly, and the AttnRes config that represents each of them.

The conversion is exact (spec §4) only for PreNorm decoders whose residual stream is read solely through
RMSNorms and whose layers are Llama's: rotary attention (the family's own module) plus a gated MLP. The
AttnRes model reuses that family's transformers attention class, so nothing is re-implemented.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import PretrainedConfig

from ..modeling import AttnResConfig, AttnResForCausalLM

# model_type -> AttnRes backbone (the transformers attention class the decoder layers use)
SUPPORTED_FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
SUPPORTED_TEXT = "Llama 1/2/3/3.x (model_type 'llama'), Mistral ('mistral'), Qwen2 ('qwen2') and Qwen3 ('qwen3')"
# Why common neighbours are refused: each breaks the "PreNorm RMSNorm stream + Llama layer" assumption.
REFUSAL_REASONS = {
    "attnres": "it is already an AttnRes model",
    "gpt2": "LayerNorm with bias and learned position embeddings, not RMSNorm + rotary",
    "gpt_neox": "LayerNorm and parallel attention/MLP residuals",
    "gemma": "embeddings scaled by sqrt(hidden) and (1 + weight) RMSNorms",
    "gemma2": "extra post-sublayer norms (sandwich norm) and logit soft-capping",
    "gemma3": "extra post-sublayer norms (sandwich norm)",
    "olmo2": "post-norm: each sublayer output is normalised before it is added to the stream",
    "phi3": "fused qkv/gate-up projections (different weights layout)",
    "mixtral": "a mixture-of-experts MLP",
    "qwen2_moe": "a mixture-of-experts MLP",
    "qwen3_moe": "a mixture-of-experts MLP",
    "deepseek_v3": "a mixture-of-experts MLP and multi-head latent attention",
    "llama4": "a mixture-of-experts MLP and chunked attention",
}

# Source config keys that are consumed by the mapping below (not lost) or meaningless for the output.
_CONSUMED_KEYS = {
    "model_type",
    "architectures",
    "auto_map",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
    "use_sliding_window",
    "max_window_layers",
    "output_attentions",  # runtime flags of every config, not architecture
    "output_hidden_states",
    "return_dict",
}
_ATTNRES_FIELDS = {f.name for f in dataclasses.fields(AttnResConfig)}
# Parameters of the source that are legitimately absent from the AttnRes state dict.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a non-persistent buffer that old checkpoints stored


class UnsupportedModelError(ValueError):
    """The source's architecture cannot be represented exactly by an AttnRes model."""


def check_supported(model_type: str | None) -> str:
    """The AttnRes backbone for `model_type`; raises `UnsupportedModelError` saying what is supported and why."""
    if model_type in SUPPORTED_FAMILIES:
        return SUPPORTED_FAMILIES[model_type]
    reason = REFUSAL_REASONS.get(model_type, "its architecture is not one of the supported families")
    raise UnsupportedModelError(
        f"cannot convert model_type={model_type!r}: {reason}. Supported: {SUPPORTED_TEXT}. The conversion is exact "
        "only for PreNorm decoders whose residual stream is read solely through RMSNorms (Llama-style attention + "
        "gated MLP layers); other architectures would not compute what the original computed."
    )


def attnres_config(
    source: PretrainedConfig, *, mode: str = "block", block_size: int | None = None, dtype: torch.dtype | None = None
) -> tuple[AttnResConfig, list[str]]:
    """The AttnResConfig equal to `source` (transformers' own config of the family), and the dropped keys.

    Every Llama field carries over (GQA, head_dim, rope_parameters incl. scaled rope, biases, tying). Mistral
    adds its sliding window; Qwen2/Qwen3 their per-layer `layer_types` and, when `use_sliding_window` is on,
    the window. Keys with no AttnRes meaning are returned so the report can name them.
    """
    backbone = check_supported(source.model_type)
    if mode not in ("block", "full", "none"):  # "none": the same Llama on AttnRes code (the baseline of `ab`)
        raise ValueError(f"mode={mode!r} is not valid: use 'block', 'full' or 'none'.")
    values = source.to_dict()
    kwargs = {k: v for k, v in values.items() if k in _ATTNRES_FIELDS and k not in _CONSUMED_KEYS}
    dropped = sorted(k for k in values if k not in _ATTNRES_FIELDS | _CONSUMED_KEYS and not k.startswith("_"))
    kwargs["sliding_window"] = None
    kwargs["layer_types"] = None
    if backbone == "mistral":
        kwargs["sliding_window"] = values.get("sliding_window")
    elif backbone in ("qwen2", "qwen3"):
        kwargs["layer_types"] = values.get("layer_types")
        if values.get("use_sliding_window"):
            kwargs["sliding_window"] = values.get("sliding_window")
    kwargs.update(attn_res_backbone=backbone, attn_res_mode=mode, attn_res_block_size=block_size)
    config = AttnResConfig(**kwargs)
    config.architectures = ["AttnResForCausalLM"]
    if dtype is not None:
        config.dtype = dtype
    return config, dropped


def expected_shapes(config: AttnResConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an AttnRes checkpoint with `config` stores (built on the meta device).

    A tied `lm_head.weight` is left out, as `save_pretrained` leaves it out.
    """
    with torch.device("meta"):
        model = AttnResForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def is_ignored_source_tensor(name: str) -> bool:
    return name.endswith(_IGNORED_SUFFIXES)


def some_names(names, limit: int = 5) -> str:
    """At most `limit` of `names`, sorted, for error messages."""
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
