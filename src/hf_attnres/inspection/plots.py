"""Figures of an inspection: the depth-attention heatmap and the magnitude / gradient profiles across depth.

matplotlib is an optional dependency (`pip install hf-attnres[plot]`) imported only here, and only through
its object-oriented API (`matplotlib.figure.Figure`), so drawing never changes a notebook's pyplot backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .collect import DepthAttentionMap, ModelInspection, sublayer_name

# Colours per model (first: the inspected model, second: the one compared with), colour-blind safe.
MODEL_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7")


class PlotDependencyError(ImportError, RuntimeError):
    """matplotlib is missing (a RuntimeError too, so the CLI reports it as a clear error)."""


def require_matplotlib() -> Any:
    """Import matplotlib or explain how to install it."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as e:
        raise PlotDependencyError(
            "Drawing the inspection figures needs matplotlib: pip install 'hf-attnres[plot]' "
            "(or pass plots=False / --no-plots to write only the JSON numbers)."
        ) from e
    return matplotlib


def _mode_text(insp: ModelInspection) -> str:
    if insp.attn_res_mode == "block":
        dm = insp.depth_attention
        if dm is None or not dm.block_size:
            return "Block AttnRes"
        blocks, size, rest = len(dm.columns) - 1, dm.block_size, insp.num_sublayers % dm.block_size
        return f"Block AttnRes, {blocks} blocks of {size} sublayers" + (f" (last: {rest})" if rest else "")
    if insp.attn_res_mode == "full":
        return "Full AttnRes"
    return "standard residuals" if insp.model_type == "attnres" else f"standard residuals ({insp.model_type})"


# --------------------------------------------------------------------------------------------------------
# Depth-attention heatmap
# --------------------------------------------------------------------------------------------------------
def _depth_values(insp: ModelInspection):
    import numpy as np

    dm: DepthAttentionMap | None = insp.depth_attention
    if dm is None:
        raise ValueError(f"{insp.label!r} has no depth attention (standard residuals): nothing to draw.")
    return dm, np.array([[np.nan if w is None else w for w in row] for row in dm.weights], dtype=float)


def _heatmap(ax, insp: ModelInspection, values, scale, cmap, annotate: bool, fmt: str = "{:.2f}",
             row_labels: bool = True, dark: Any = lambda t: t < 0.55):
    """Draw one depth map (weights or a difference) on `ax`: masked cells blank, partial sums hatched,
    block boundaries and the final aggregation ruled."""
    import numpy as np
    from matplotlib.patches import Rectangle

    dm = insp.depth_attention
    nrows, ncols = values.shape
    data = np.ma.masked_invalid(values)
    image = ax.imshow(data, cmap=cmap, norm=scale, aspect="auto", interpolation="nearest")
    for r, c in enumerate(dm.partial):
        if c is not None:
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch="//",
                                   edgecolor="white" if dark(scale(values[r, c])) else "black", linewidth=0.0,
                                   alpha=0.8))
    if annotate:
        size = 7 if nrows <= 40 else 5.5
        for r in range(nrows):
            for c in range(ncols):
                if not data.mask[r, c]:
                    v = values[r, c]
                    box = None
                    if dm.partial[r] == c:  # keep the number readable over the hatching
                        box = dict(boxstyle="square,pad=0.15", facecolor=cmap(scale(v)), edgecolor="none")
                    ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=size,
                            color="white" if dark(scale(v)) else "black", bbox=box)
    if dm.mode == "block" and dm.block_size:
        for r in range(dm.block_size, nrows - 1, dm.block_size):
            ax.axhline(r - 0.5, color="black", linewidth=0.8)
    ax.axhline(nrows - 1.5, color="black", linewidth=1.5)
    ax.set_xticks(range(ncols))
    rotate = ncols > 10
    ax.set_xticklabels(_column_labels(dm, insp.num_sublayers), rotation=60 if rotate else 0,
                       ha="right" if rotate else "center", fontsize=8 if ncols <= 30 else 6)
    step = 1 if nrows <= 80 else math.ceil(nrows / 80)
    ticks = list(range(0, nrows - 1, step)) + [nrows - 1]
    ax.set_yticks(ticks)
    ax.set_yticklabels([dm.rows[r] for r in ticks] if row_labels else [], fontsize=8 if nrows <= 40 else 6)
    ax.set_xlabel("source attended to (embedding, then " + ("earlier sublayer outputs)" if dm.mode == "full"
                  else "block sums of sublayer outputs)"))
    if row_labels:
        ax.set_ylabel("sublayer reading the sources (top = first)")
    ax.tick_params(axis="both", length=2)
    return image


def _weight_scale(ncols: int):
    """Many sources give small weights (~1/n): a square-root colour scale keeps them apart."""
    from matplotlib.colors import Normalize, PowerNorm

    return PowerNorm(0.5, vmin=0.0, vmax=1.0) if ncols > 12 else Normalize(vmin=0.0, vmax=1.0)


def _legend(fig, dm: DepthAttentionMap) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="white", edgecolor="grey", label="not available to this sublayer yet")]
    if any(c is not None for c in dm.partial):
        handles.insert(0, Patch(facecolor="#777777", edgecolor="white", hatch="///",
                                label="partial sum of the sublayer's own block"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)


def _size(nrows: int, ncols: int, panels: int = 1) -> tuple[tuple[float, float], bool]:
    annotate = ncols <= 16 and nrows <= 80
    cell_w = 0.62 if annotate else max(0.12, min(0.4, 12.0 / ncols))
    cell_h = 0.22 if nrows <= 40 else 0.16
    width = min(22.0 * panels, max(7.5, 2.6 + cell_w * ncols + 1.6) * panels)
    return (width, min(30.0, max(4.5, 2.0 + cell_h * nrows))), annotate


def plot_depth_attention(insp: ModelInspection, path: str | Path) -> Path:
    """Heatmap of the mean depth-attention weights: which earlier sources each sublayer reads from."""
    require_matplotlib()
    import matplotlib
    from matplotlib.figure import Figure

    dm, values = _depth_values(insp)
    (width, height), annotate = _size(*values.shape)
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    scale = _weight_scale(values.shape[1])
    image = _heatmap(ax, insp, values, scale, cmap, annotate)
    cbar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    cbar.set_label("mean depth-attention weight (each row sums to 1)"
                   + ("; square-root colour scale" if values.shape[1] > 12 else ""))
    _legend(fig, dm)
    fig.suptitle(f"Depth attention ({insp.label}): where each sublayer reads its input from", fontsize=11)
    ax.set_title(f"{_mode_text(insp)}; weights averaged over {insp.num_tokens} tokens of {insp.num_texts} "
                 "texts", fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=130)
    return path


def plot_depth_attention_compare(reference: ModelInspection, insp: ModelInspection, path: str | Path) -> Path:
    """Two depth-attention maps side by side (`reference`, e.g. before training, then `insp`) on one colour
    scale, and, when their layouts match, `insp` minus `reference`: what changed."""
    require_matplotlib()
    import matplotlib
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    (dm_a, a), (dm_b, b) = _depth_values(reference), _depth_values(insp)
    same = a.shape == b.shape and dm_a.sources == dm_b.sources
    panels = 3 if same else 2
    (width, height), annotate = _size(*max(a.shape, b.shape), panels=panels)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, panels, sharey=same)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    for ax, one, values in ((axes[0], reference, a), (axes[1], insp, b)):
        image = _heatmap(ax, one, values, _weight_scale(values.shape[1]), cmap, annotate,
                         row_labels=ax is axes[0] or not same)
        ax.set_title(f"{one.label}: {_mode_text(one)}", fontsize=9)
    fig.colorbar(image, ax=list(axes[:2]), fraction=0.04, pad=0.02).set_label("mean depth-attention weight")
    if same:
        diff = b - a
        bound = max(float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0, 1e-6)
        dcmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="white")
        image = _heatmap(axes[2], insp, diff, TwoSlopeNorm(0.0, -bound, bound), dcmap, annotate, fmt="{:+.2f}",
                         row_labels=False, dark=lambda t: abs(t - 0.5) > 0.35)
        axes[2].set_title(f"{insp.label} minus {reference.label} (largest change {bound:.3f})", fontsize=9)
        fig.colorbar(image, ax=axes[2], fraction=0.05, pad=0.02).set_label("weight difference")
    _legend(fig, dm_b)
    fig.suptitle(f"Depth attention, {reference.label} and {insp.label}: where each sublayer reads its input from "
                 f"({insp.num_tokens} tokens of {insp.num_texts} texts)", fontsize=11)
    path = Path(path)
    fig.savefig(path, dpi=130)
    return path


def _column_labels(dm: DepthAttentionMap, num_sublayers: int) -> list[str]:
    """Say what each source holds in the names the rows use: a block's decoder layers, a sublayer's name."""
    if dm.mode == "full":
        return ["embedding"] + [f"{sublayer_name(j - 1)} out" for j in range(1, len(dm.columns))]
    labels = ["embedding"]
    size = dm.block_size or num_sublayers
    for n in range(1, len(dm.columns)):
        first, last = (n - 1) * size // 2, (min(n * size, num_sublayers) - 1) // 2
        labels.append(f"block {n}\n(layer{'s' if last > first else ''} {first}{f'-{last}' if last > first else ''})")
    return labels


# --------------------------------------------------------------------------------------------------------
# Profiles across depth
# --------------------------------------------------------------------------------------------------------
def _depth_positions(insp: ModelInspection) -> list[float]:
    """Attention of layer t at x = t, its MLP at x = t + 0.5."""
    return [layer + (0.0 if kind == "attention" else 0.5) for layer, kind in zip(insp.sublayer_layers,
                                                                                 insp.sublayer_kinds)]


def _profile(ax, insps: Sequence[ModelInspection], key: str, final_key: str | None = None) -> bool:
    """Draw one quantity per model, attention and MLP as separate series; return whether anything was drawn."""
    drawn = False
    all_values: list[float] = []
    for m, insp in enumerate(insps):
        values = getattr(insp, key)
        if values is None:
            continue
        color = MODEL_COLORS[m % len(MODEL_COLORS)]
        x = _depth_positions(insp)
        for kind, marker, style in (("attention", "o", "-"), ("mlp", "^", "--")):
            idx = [i for i, k in enumerate(insp.sublayer_kinds) if k == kind]
            ys = [values[i] for i in idx]
            ax.plot([x[i] for i in idx], ys, linestyle=style, marker=marker, markersize=3.5, linewidth=1.3,
                    color=color, label=f"{insp.label}: {'attention' if kind == 'attention' else 'MLP'}")
            all_values += ys
        if final_key is not None:
            final = getattr(insp, final_key)
            ax.plot([insp.num_hidden_layers], [final], marker="*", markersize=10, linestyle="none", color=color,
                    label=f"{insp.label}: final output (before final norm)")
            all_values.append(final)
        drawn = True
    positive = [v for v in all_values if v > 0 and math.isfinite(v)]
    if positive and max(positive) / min(positive) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("decoder layer (attention at t, MLP at t + ½)")
    ax.grid(True, which="major", alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return drawn


def _profile_figure(insps: Sequence[ModelInspection], panels: list[tuple[str, str | None, str, str]],
                    title: str, path: Path) -> Path:
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.2 * len(panels), 5.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, final_key, panel_title, ylabel) in zip(axes, panels):
        drawn = _profile(ax, insps, key, final_key)
        ax.set_title(panel_title, fontsize=10)
        ax.set_ylabel(ylabel + (" (log scale)" if ax.get_yscale() == "log" else ""))
        if not drawn:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="grey")
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
                   ncol=min(3, len(handles)) if len(insps) == 1 else len(insps), fontsize=8, frameon=False)
    models = "\n".join(f"{i.label}: {_mode_text(i)}" for i in insps)
    fig.suptitle(f"{title} ({insps[0].num_tokens} tokens of {insps[0].num_texts} texts)\n{models}", fontsize=11)
    fig.savefig(path, dpi=130)
    return path


def plot_magnitudes(insps: ModelInspection | Sequence[ModelInspection], path: str | Path) -> Path:
    """Hidden-state (sublayer input) RMS and sublayer output RMS across depth, models overlaid."""
    insps = [insps] if isinstance(insps, ModelInspection) else list(insps)
    panels = [
        ("input_rms", "final_input_rms", "Hidden state read by each sublayer (input of its RMSNorm)",
         "RMS over hidden dim, mean over tokens"),
        ("output_rms", None, "Output of each sublayer (attention / MLP)", "RMS over hidden dim, mean over tokens"),
    ]
    return _profile_figure(insps, panels, "Magnitudes across depth", Path(path))


def plot_gradients(insps: ModelInspection | Sequence[ModelInspection], path: str | Path) -> Path:
    """Gradient norms of the language-modelling loss across depth, models overlaid."""
    insps = [insps] if isinstance(insps, ModelInspection) else list(insps)
    panels = [
        ("output_grad_norm", None, "Gradient w.r.t. each sublayer's output",
         "L2 norm of d(loss)/d(output) over all tokens"),
        ("param_grad_norm", None, "Gradient w.r.t. each sublayer's weights",
         "L2 norm of d(loss)/d(weights)"),
    ]
    return _profile_figure(insps, panels, "Gradients of the next-token loss across depth", Path(path))
