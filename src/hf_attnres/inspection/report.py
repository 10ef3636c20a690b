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
class InspectConfig:
    """An inspection from the command line or a config file (`hf-attnres inspect --help` documents each field)."""

    model: str = field(metadata={"positional": "MODEL", "help": "AttnRes folder, Llama-style folder or Hub id"})
    out: str = field(metadata={"help": "folder for the PNGs and inspection.json"})
    compare: str | None = field(default=None, metadata={"metavar": "MODEL2", "help": "second model drawn beside "
                                "the first (e.g. the original Llama, or the model before training)"})
    text: list[str] | None = field(default=None, metadata={"help": "texts to run (repeatable; default: a few "
                                   "English paragraphs)"})
    data: str | None = field(default=None, metadata={"help": '.txt (one text per paragraph) or .jsonl (a "text" '
                             "field per line), instead of --text"})
    label: str | None = field(default=None, metadata={"help": "name of MODEL in the figures (default: from the "
                              "path)"})
    compare_label: str | None = field(default=None, metadata={"help": "name of MODEL2 in the figures"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder/id when MODEL has none (used "
                                  "for MODEL2 too if it has none)"})
    max_tokens: int = field(default=256, metadata={"help": "tokens per text, longer ones are cut"})
    max_texts: int = field(default=64, metadata={"help": "at most this many texts from --data"})
    batch_size: int = field(default=4, metadata={"help": "texts per forward pass"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:1, ... (auto: cuda if available)"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype (RMS and gradient norms are summed in "
                       "fp32 anyway)", "choices": ("float32", "bfloat16", "float16", "auto")})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the Hub folder"})
    gradients: bool = field(default=True, metadata={"help": "backward pass and gradients.png (--no-gradients: "
                            "skip it)"})
    plots: bool = field(default=True, metadata={"help": "draw the PNGs (--no-plots: only inspection.json, no "
                        "matplotlib needed)"})

    def __post_init__(self) -> None:
        if self.text and self.data:
            raise ValueError("give texts with --text or --data, not both.")
        if self.max_tokens < 2:
            raise ValueError("--max-tokens must be at least 2.")
        if self.batch_size < 1 or self.max_texts < 1:
            raise ValueError("--batch-size and --max-texts must be positive.")


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
    model: nn.Module | InspectConfig,
    tokenizer: Any = None,
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
    - `depth_attention.png` for a model with AttnRes block/full; `depth_attention_compare.png` when the compared
      model has one too: both maps side by side (the compared one first) and their difference;
    - `magnitudes.png`: hidden-state and output RMS across depth, both models overlaid;
    - `gradients.png`: output- and weight-gradient norms across depth (unless `gradients=False`).

    `texts` defaults to a few English paragraphs. matplotlib is needed only with `plots=True`; it is checked
    before any measurement so a missing install fails fast. `inspect_model(InspectConfig(...))` loads the
    models and texts the config names (what `hf-attnres inspect` runs).
    """
    if isinstance(model, InspectConfig):
        return _inspect_config(model)
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
        from .plots import plot_depth_attention, plot_depth_attention_compare, plot_gradients, plot_magnitudes

        maps = [insp.depth_attention is not None for insp in models]
        if maps[0]:
            report.figures["depth_attention"] = plot_depth_attention(models[0], out_dir / "depth_attention.png")
        if len(models) > 1 and maps[1]:  # the compared model on the left, this one beside it, and the change
            path = out_dir / "depth_attention_compare.png"
            report.figures["depth_attention_compare"] = (
                plot_depth_attention_compare(models[1], models[0], path) if maps[0]
                else plot_depth_attention(models[1], path))
        report.figures["magnitudes"] = plot_magnitudes(models, out_dir / "magnitudes.png")
        if gradients:
            report.figures["gradients"] = plot_gradients(models, out_dir / "gradients.png")
    report.json_path.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    return report


def _inspect_config(cfg: InspectConfig) -> InspectionReport:
    from .collect import read_texts

    if cfg.plots:
        from .plots import require_matplotlib

        require_matplotlib()  # fail before loading models
    texts = read_texts(cfg.data, max_texts=cfg.max_texts) if cfg.data else cfg.text
    load = dict(dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    model, tokenizer = load_model(cfg.model, tokenizer=cfg.tokenizer, **load)
    compare = None
    if cfg.compare:
        try:
            compare = load_model(cfg.compare, **load)
        except FileNotFoundError:
            if not cfg.tokenizer:
                raise
            compare = load_model(cfg.compare, tokenizer=cfg.tokenizer, **load)
    return inspect_model(
        model, tokenizer, texts, cfg.out,
        label=cfg.label or _path_label(cfg.model, model), compare_with=compare,
        compare_label=cfg.compare_label or (_path_label(cfg.compare, compare[0]) if compare else None),
        max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, gradients=cfg.gradients, plots=cfg.plots,
    )


def _path_label(name: str, model: nn.Module) -> str:
    mode = getattr(model.config, "attn_res_mode", None)
    base = Path(name.rstrip("/")).name or name
    if mode is None:
        return base
    return f"{base} ({'AttnRes ' + mode if mode != 'none' else 'standard residuals'})"


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
    """(model, tokenizer) ready to inspect: the package's one loader, accepting Llama-style models too."""
    from ..training.models import load_model as load

    model, tok = load(name, dtype, device=device, tokenizer=tokenizer, trust_remote_code=trust_remote_code,
                      attnres_only=False)
    return model.eval(), tok
