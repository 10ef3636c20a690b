"""`hf-attnres inspect`: a thin command line over `inspect_model`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `inspect` subcommand to the `hf-attnres` parser."""
    p = subparsers.add_parser(
        "inspect",
        help="draw depth-attention maps and magnitude/gradient profiles of a model",
        description=(
            "Measure a model on some text and write PNG figures plus inspection.json (the numbers behind them): "
            "the depth-attention heatmap (AttnRes), hidden-state and sublayer-output RMS across depth, and the "
            "gradient norm of the language-modelling loss per sublayer. With --compare, both models are overlaid "
            "in the magnitude and gradient figures."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="AttnRes folder, Llama-style folder or Hub id")
    p.add_argument("--out", required=True, type=Path, help="folder for the PNGs and inspection.json")
    p.add_argument("--compare", metavar="MODEL2", help="second model drawn beside the first (e.g. the original Llama)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", action="append", help="text to run (repeatable); default: a few English paragraphs")
    src.add_argument("--data", type=Path, help='.txt (one text per paragraph) or .jsonl (a "text" field per line)')
    p.add_argument("--label", help="name of MODEL in the figures (default: from the path)")
    p.add_argument("--compare-label", help="name of MODEL2 in the figures")
    p.add_argument("--tokenizer", help="tokenizer folder/id when MODEL has none (used for MODEL2 too if it has none)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per text, longer ones are cut (default 256)")
    p.add_argument("--max-texts", type=int, default=64, help="at most this many texts from --data (default 64)")
    p.add_argument("--batch-size", type=int, default=4, help="texts per forward pass (default 4)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="weights dtype (default float32; RMS and gradient norms are summed in fp32 anyway)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub folder")
    p.add_argument("--no-gradients", action="store_true", help="skip the backward pass (no gradient figure)")
    p.add_argument("--no-plots", action="store_true", help="write only inspection.json (no matplotlib needed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .collect import read_texts
    from .report import inspect_model, load_model

    if args.max_tokens < 2:
        raise ValueError("--max-tokens must be at least 2.")
    if args.batch_size < 1 or args.max_texts < 1:
        raise ValueError("--batch-size and --max-texts must be positive.")
    if not args.no_plots:
        from .plots import require_matplotlib

        require_matplotlib()  # fail before loading models
    texts = read_texts(args.data, max_texts=args.max_texts) if args.data else args.text
    load = dict(dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    model, tokenizer = load_model(args.model, tokenizer=args.tokenizer, **load)
    compare = None
    if args.compare:
        try:
            compare = load_model(args.compare, **load)
        except FileNotFoundError:
            if not args.tokenizer:
                raise
            compare = load_model(args.compare, tokenizer=args.tokenizer, **load)
    report = inspect_model(
        model, tokenizer, texts, args.out,
        label=args.label or _label(args.model, model), compare_with=compare,
        compare_label=args.compare_label or (_label(args.compare, compare[0]) if compare else None),
        max_tokens=args.max_tokens, batch_size=args.batch_size,
        gradients=not args.no_gradients, plots=not args.no_plots,
    )
    for insp in report.models:
        loss = f", loss {insp.loss:.3f}" if insp.loss is not None else ""
        print(f"{insp.label}: {insp.num_sublayers} sublayers, {insp.num_tokens} tokens{loss}")
    for path in [*report.figures.values(), report.json_path]:
        print(f"wrote {path}")
    return 0


def _label(name: str, model) -> str:
    mode = getattr(model.config, "attn_res_mode", None)
    base = Path(name.rstrip("/")).name or name
    if mode is None:
        return base
    return f"{base} ({'AttnRes ' + mode if mode != 'none' else 'standard residuals'})"
