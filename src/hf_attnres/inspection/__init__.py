"""Inspection of what the depth attention learned: depth-attention heatmaps and PreNorm diagnostics
(hidden-state / output magnitude and gradient size across depth), for AttnRes and plain Llama-style models.

    from hf_attnres.inspection import inspect_model
    report = inspect_model(model, tokenizer, texts, "out/", compare_with=llama)   # PNGs + inspection.json

The command line is `hf-attnres inspect MODEL --out DIR`, which runs `inspect_model(InspectConfig(...))`.
"""

from .collect import (
    DEFAULT_TEXTS,
    DepthAttentionMap,
    ModelInspection,
    collect_inspection,
    depth_attention_map,
    read_texts,
    tokenize_batches,
)
from .report import InspectConfig, InspectionReport, inspect_model, load_model

__all__ = [
    "DEFAULT_TEXTS",
    "DepthAttentionMap",
    "InspectConfig",
    "InspectionReport",
    "ModelInspection",
    "collect_inspection",
    "depth_attention_map",
    "inspect_model",
    "load_model",
    "read_texts",
    "tokenize_batches",
]
