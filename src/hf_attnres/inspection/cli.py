"""`hf-attnres inspect`: the options of `InspectConfig`; the work is `inspect_model`."""

from __future__ import annotations

import argparse

from ..cli import add_job
from .report import InspectConfig


def run(cfg: InspectConfig) -> int:
    from .report import inspect_model

    report = inspect_model(cfg)
    for insp in report.models:
        loss = f", loss {insp.loss:.3f}" if insp.loss is not None else ""
        print(f"{insp.label}: {insp.num_sublayers} sublayers, {insp.num_tokens} tokens{loss}")
    for path in [*report.figures.values(), report.json_path]:
        print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `inspect` subcommand to the `hf-attnres` parser."""
    add_job(subparsers, "inspect", InspectConfig, run,
            help="draw depth-attention maps and magnitude/gradient profiles of a model",
            description="Measure a model on some text and write PNG figures plus inspection.json (the numbers "
            "behind them): the depth-attention heatmap (AttnRes), hidden-state and sublayer-output RMS across "
            "depth, and the gradient norm of the language-modelling loss per sublayer. With --compare, both models "
            "are overlaid in the magnitude and gradient figures, and two AttnRes models' depth attention is drawn "
            "side by side with its change (depth_attention_compare.png).")
