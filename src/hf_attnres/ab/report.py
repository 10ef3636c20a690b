"""The A/B report: `ab.json` (every number), `report.md` (the answer in a sentence, a table) and `ab.png`.

The model card of every arm's final folder is rewritten to state the comparison it took part in.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..model_card import markdown_table
from ..training.metrics import read_metrics
from .stats import PairedDifference, paired_difference

LEVEL = 0.95


def arm_record(arm_dir: Path) -> dict:
    """An arm's evaluations (step -> per-batch sums) and training speed, from its metrics.jsonl."""
    path = arm_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the arm has not been trained (run `hf-attnres ab` again).")
    evals = {r["step"]: r for r in read_metrics(path, "eval") if "batch_loss_sums" in r}
    train = read_metrics(path, "train")
    summaries = [r for r in read_metrics(path, "summary") if r.get("train_seconds")]
    step_seconds = [b["time"] - a["time"] for a, b in zip(train, train[1:]) if b["step"] == a["step"] + 1]
    tokens_per_step = (train[-1]["tokens"] // train[-1]["step"]) if train else 0
    return {
        "evals": evals,
        "steps": train[-1]["step"] if train else 0,
        "tokens": train[-1]["tokens"] if train else 0,
        # the median step, not the mean: one evaluation or checkpoint save between two steps is not training
        "tokens_per_second": tokens_per_step / statistics.median(step_seconds) if step_seconds else
        (summaries[-1]["tokens_per_second"] if summaries else None),
        "train_seconds": sum(s["train_seconds"] for s in summaries) if summaries else None,
    }


def compare(arm: dict, baseline: dict) -> dict[int, PairedDifference]:
    """arm - baseline at every step both evaluated."""
    out = {}
    for step in sorted(set(arm["evals"]) & set(baseline["evals"])):
        a, b = arm["evals"][step], baseline["evals"][step]
        if a["batch_tokens"] != b["batch_tokens"]:
            raise ValueError(f"step {step}: the arms were evaluated on different tokens; re-run with the same data.")
        out[step] = paired_difference(a["batch_loss_sums"], b["batch_loss_sums"], a["batch_tokens"], LEVEL)
    return out


def verdict(label: str, step: int, tokens: int, d: PairedDifference) -> str:
    """One sentence: the difference, its interval, and whether it is distinguishable from zero."""
    head = (f"At step {step} ({tokens:,} training tokens per arm), {label} minus baseline held-out loss is "
            f"{d.difference:+.4f} ({LEVEL:.0%} interval {d.low:+.4f} to {d.high:+.4f}, paired over {d.batches} "
            f"evaluation batches, {d.tokens:,} tokens): ")
    if d.high < 0:
        return head + f"{label} is better, and the difference is distinguishable from zero at this interval."
    if d.low > 0:
        return head + f"{label} is worse, and the difference is distinguishable from zero at this interval."
    return head + "the interval contains zero, so the difference is not distinguishable from zero."


def write_report(out: Path, arms: list[str], cfg, source_model: str) -> dict:
    from .run import ARM_LABELS, BASELINE

    records = {arm: arm_record(out / arm) for arm in arms}
    base = records[BASELINE]
    comparisons, sentences = {}, []
    for arm in arms:
        if arm == BASELINE:
            continue
        diffs = compare(records[arm], base)
        if not diffs:
            raise ValueError(f"{arm} and {BASELINE} share no evaluation step: nothing to compare.")
        last = max(diffs)
        sentences.append(verdict(ARM_LABELS[arm], last, records[arm]["tokens"], diffs[last]))
        comparisons[arm] = {"final_step": last, "final": diffs[last].to_dict(), "sentence": sentences[-1],
                            "by_step": {s: d.to_dict() for s, d in diffs.items()}}
    result = {
        "model": source_model, "from_scratch": cfg.from_scratch, "seed": cfg.seed, "data": cfg.data or "embedded",
        "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "lr": cfg.lr,
        "attnres_lr": cfg.attnres_lr, "max_steps": cfg.max_steps, "interval_level": LEVEL,
        "arms": {arm: {"label": ARM_LABELS[arm], "steps": r["steps"], "tokens": r["tokens"],
                       "tokens_per_second": r["tokens_per_second"], "train_seconds": r["train_seconds"],
                       "eval_loss": {s: e["loss"] for s, e in sorted(r["evals"].items())}}
                 for arm, r in records.items()},
        "comparisons": comparisons,
    }
    (out / "ab.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    figure = _plot(out / "ab.png", result)
    (out / "report.md").write_text(_markdown(result, sentences, figure), encoding="utf-8")
    _update_model_cards(out, arms, " ".join(sentences))
    print("\n".join(["", *sentences, f"report: {out / 'report.md'}"]), flush=True)
    return result


def _markdown(result: dict, sentences: list[str], figure: Path | None) -> str:
    arms = result["arms"]
    rows = []
    for arm, r in arms.items():
        losses = list(r["eval_loss"].values())
        final = result["comparisons"].get(arm, {}).get("final")
        rows.append((r["label"], r["steps"], f"{r['tokens']:,}", f"{losses[0]:.4f}" if losses else "-",
                     f"{losses[-1]:.4f}" if losses else "-",
                     f"{final['difference']:+.4f} [{final['low']:+.4f}, {final['high']:+.4f}]" if final else "-",
                     f"{r['tokens_per_second']:.1f}" if r["tokens_per_second"] else "-"))
    kind = f"from scratch ({result['from_scratch']})" if result["from_scratch"] else "continued pretraining"
    parts = [
        f"# A/B: does AttnRes pay off? ({kind})",
        *sentences,
        markdown_table(rows, header=("arm", "steps", "training tokens", "held-out loss at start",
                                     "held-out loss at end", f"minus baseline ({result['interval_level']:.0%} interval)",
                                     "tokens/s")),
        f"Model `{result['model']}`, data {result['data']}, seed {result['seed']}, batch {result['batch_size']} x "
        f"accumulation {result['grad_accum']} blocks of {result['seq_len']} tokens per step, lr {result['lr']} (AttnRes "
        f"parameters {result['attnres_lr']}). The interval is over evaluation batches shared by the arms: it "
        "measures how precisely these two trained models were compared, not the spread over training seeds. "
        "Tokens/s is the median step of each arm, measured one arm after the other on the same machine.",
    ]
    if figure is not None:
        parts.append(f"![held-out loss]({figure.name})")
    return "\n\n".join(parts) + "\n"


def _plot(path: Path, result: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: ab.png not drawn; pip install 'hf-attnres[plot]')")
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {arm: f"C{i}" for i, arm in enumerate(result["arms"])}  # one colour per arm in both panels
    for arm, r in result["arms"].items():
        steps = [int(s) for s in r["eval_loss"]]
        left.plot(steps, list(r["eval_loss"].values()), marker="o", label=r["label"], color=colors[arm])
    left.set(xlabel="optimizer step", ylabel="held-out loss", title="Held-out loss of each arm")
    left.legend()
    for arm, c in result["comparisons"].items():
        steps = [int(s) for s in c["by_step"]]
        d = list(c["by_step"].values())
        right.plot(steps, [x["difference"] for x in d], marker="o", label=result["arms"][arm]["label"],
                   color=colors[arm])
        right.fill_between(steps, [x["low"] for x in d], [x["high"] for x in d], alpha=0.25, color=colors[arm])
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set(xlabel="optimizer step", ylabel="loss minus baseline",
              title=f"Paired difference from the baseline ({result['interval_level']:.0%} interval)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _update_model_cards(out: Path, arms: list[str], comparison: str) -> None:
    from ..training.output import refresh_model_card

    for arm in arms:
        final = out / arm / "final"
        if (final / "training_summary.json").is_file():
            refresh_model_card(final, comparison)
