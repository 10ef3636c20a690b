"""`inspect_model`: measure one model (optionally beside a second one) and write figures plus JSON numbers."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .collect import DEFAULT_TEXTS, ModelInspection, collect_inspection

JSON_NAME = "inspection.json"
JSON_FORMAT = "hf-attnres-inspection"
JSON_VERSION = 1

# What each number means, copied into the JSON so the file explains itself.
DEFINITIONS = {
    "input_rms": "per sublayer: mean over non-padding tokens of sqrt(mean(x**2)) over the hidden dim, x = what "
    "the sublayer's RMSNorm reads (residual stream, or the depth-attention mix with AttnRes)",
    "output_rms": "per sublayer: the same RMS of the attention / MLP output",
    "final_input_rms": "the same RMS of what the final norm reads",
    "output_grad_norm": "per sublayer: L2 norm over all non-padding tokens of d(loss)/d(sublayer output); loss = "
    "mean next-token cross-entropy over all texts",
    "param_grad_norm": "per sublayer: L2 norm of d(loss)/d(weights) of the attention (q,k,v,o) or MLP "
    "(gate,up,down) weights; norms and pseudo-queries excluded",
    "pseudo_query_grad_norm": "AttnRes: L2 norm of d(loss)/d(pseudo-query), per sublayer then the final one",
    "depth_attention": "AttnRes: depth-attention weights averaged over non-padding tokens; row i over its first "
    "len(sources[i]) columns, null = not available; partial[i] = column holding the partial block sum",
}


@dataclass
class InspectionReport:
    """What `inspect_model` measured and wrote: one `ModelInspection` per model, figure and JSON paths."""

    models: list[ModelInspection]
    out_dir: Path
    json_path: Path
    figures: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "definitions": DEFINITIONS,
            "figures": {name: path.name for name, path in self.figures.items()},
            "models": [m.to_dict() for m in self.models],
        }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def inspect_model(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str] | str | None = None,
    out_dir: str | Path = "inspection",
    *,
    label: str | None = None,
    compare_with: nn.Module | tuple[nn.Module, Any] | None = None,
    compare_label: str | None = None,
    max_tokens: int = 256,
    batch_size: int = 4,
    gradients: bool = True,
    plots: bool = True,
) -> InspectionReport:
    """Measure `model` (and `compare_with`, a model or (model, tokenizer), e.g. the Llama it was converted
    from, or the same model before training) on `texts` and write into `out_dir`:

    - `inspection.json`: every number behind the figures (format described in its "definitions");
    - `depth_attention.png` (and `depth_attention_compare.png`) for models with AttnRes block/full;
    - `magnitudes.png`: hidden-state and output RMS across depth, both models overlaid;
    - `gradients.png`: output- and weight-gradient norms across depth (unless `gradients=False`).

    `texts` defaults to a few English paragraphs. matplotlib is needed only with `plots=True`; it is checked
    before any measurement so a missing install fails fast.
    """
    if plots:
        from .plots import require_matplotlib

        require_matplotlib()
    texts = list(DEFAULT_TEXTS) if texts is None else ([texts] if isinstance(texts, str) else list(texts))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    options = dict(max_tokens=max_tokens, batch_size=batch_size, gradients=gradients)
    models = [collect_inspection(model, tokenizer, texts, label=label or _default_label(model), **options)]
    if compare_with is not None:
        other, other_tok = compare_with if isinstance(compare_with, tuple) else (compare_with, tokenizer)
        other_label = compare_label or _default_label(other)
        if other_label == models[0].label:
            other_label += " (compared)"
        models.append(collect_inspection(other, other_tok, texts, label=other_label, **options))

    report = InspectionReport(models=models, out_dir=out_dir, json_path=out_dir / JSON_NAME)
    if plots:
        from .plots import plot_depth_attention, plot_gradients, plot_magnitudes

        for i, insp in enumerate(models):
            if insp.depth_attention is not None:
                name = "depth_attention" if i == 0 else "depth_attention_compare"
                report.figures[name] = plot_depth_attention(insp, out_dir / f"{name}.png")
        report.figures["magnitudes"] = plot_magnitudes(models, out_dir / "magnitudes.png")
        if gradients:
            report.figures["gradients"] = plot_gradients(models, out_dir / "gradients.png")
    report.json_path.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    return report


def _default_label(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", "") or ""
    base = Path(name).name if name else type(model).__name__
    mode = getattr(config, "attn_res_mode", None)
    if mode is None:
        return base or type(model).__name__
    return f"{base} ({'AttnRes ' + mode if mode != 'none' else 'standard residuals'})" if base else mode


def load_model(
    name: str,
    *,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    tokenizer: str | None = None,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from an AttnRes folder, a Llama-style folder or a Hub id, ready to inspect."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_attnres  # noqa: F401  (registers the AttnRes Auto classes)

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if dtype not in dtypes:
        raise ValueError(f"dtype={dtype!r} is not valid: use one of {sorted(dtypes)}.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    local = Path(name)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local and not local.exists():
        raise FileNotFoundError(f"Model folder {name!r} does not exist.")
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"{name!r} is a path but has no config.json: not a transformers model folder.")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtypes[dtype], trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"Could not load model {name!r}: {e}") from e
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"Could not load a tokenizer from {tokenizer or name!r} ({e}); pass --tokenizer PATH."
        ) from e
    return model.to(device).eval(), tok
