"""The continued-pretraining loop (the shape of transformers' `run_clm_no_trainer.py`, minus its defects).

One optimizer step = `grad_accum` micro-batches on each of the N processes. Its loss is the sum of all token
losses of those micro-batches divided by their total number of target tokens, counted over all processes
(an all-reduce before the forward passes). So 2 processes x accumulation k and 1 process x accumulation 2k
compute the same gradient, and micro-batches with fewer tokens weigh less, not the same.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import hub
from .checkpoints import (
    TrainState,
    read_trainer_state,
    remove_stale_saves,
    resolve_resume,
    save_checkpoint,
    share_weights_with,
)
from .config import TrainConfig
from .data import PackedBlocks, TrainData, build_train_data, collate_blocks, epoch_blocks
from .evaluate import evaluate
from .metrics import MetricsLog, read_metrics, resolve_trackers
from .models import apply_train_mode, count_parameters, load_model, resolve_model_source
from .optim import build_optimizer, build_scheduler, schedule_horizon, schedule_lr
from .output import save_final_model
from .provenance import base_model_metadata


@dataclass
class TrainResult:
    """What a run produced and measured."""

    output_dir: Path
    final_dir: Path | None
    metrics_file: Path
    steps: int
    tokens: int
    eval_before: dict | None
    eval_after: dict | None
    train_seconds: float
    tokens_per_second: float
    summary: dict = field(default_factory=dict)


def build_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        # sync by micro-batch count only: the loop fetches a step's micro-batches ahead (to count tokens),
        # which would otherwise make Accelerate see the end of the data too early
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum, sync_with_dataloader=False),
        mixed_precision=cfg.mixed_precision,
        cpu=cfg.cpu,
        log_with=resolve_trackers(cfg.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
    )
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is not None and ds_plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        # DeepSpeed reads it from a prepared training dataloader; this loop prepares its loaders per epoch
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if accelerator.gradient_accumulation_steps != cfg.grad_accum:  # a DeepSpeed config can override it
        raise ValueError(
            "the Accelerate/DeepSpeed config sets gradient_accumulation_steps="
            f"{accelerator.gradient_accumulation_steps} but --grad-accum is {cfg.grad_accum}: remove it from the "
            "config (or set it to auto), or pass the same value."
        )
    return accelerator


def _loader(dataset, cfg: TrainConfig, accelerator):
    return accelerator.prepare_data_loader(
        DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers, drop_last=True,
                   collate_fn=collate_blocks)
    )


class _Batches:
    """Per-process micro-batches from optimizer step `start` on, epoch after epoch."""

    def __init__(self, data: TrainData, cfg: TrainConfig, accelerator):
        self.data, self.cfg, self.acc = data, cfg, accelerator
        per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
        self.per_step = per_step
        if data.train_blocks is not None:
            self.steps_per_epoch = len(data.train_blocks) // per_step
            if self.steps_per_epoch == 0:
                raise ValueError(
                    f"{len(data.train_blocks)} training blocks of {cfg.seq_len} tokens are fewer than one step "
                    f"({per_step} blocks: batch x accumulation x processes): add data or lower --seq-len/--batch-size."
                )
        else:
            self.steps_per_epoch = None

    def total_steps(self) -> int:
        return self.cfg.max_steps or self.cfg.epochs * self.steps_per_epoch

    def iterate(self, start: int) -> Iterator[dict]:
        accum = self.cfg.grad_accum
        if self.steps_per_epoch is None:
            # streaming: replay and discard what earlier steps consumed, then loop over passes. Replay on
            # purpose: a datasets stream's state_dict (what torchdata's StatefulDataLoader would restore)
            # drops the shuffle buffer's content on resume, so the resumed order would differ. Map-style
            # data (below) skips sampler indices instead and reads nothing twice.
            skip, epoch = start * accum, 0
            while True:
                self.data.train_stream.set_epoch(epoch)
                for batch in _loader(self.data.train_stream, self.cfg, self.acc):
                    if skip:
                        skip -= 1
                        continue
                    yield batch
                epoch += 1
        epoch, offset = divmod(start, self.steps_per_epoch)
        while True:
            blocks = epoch_blocks(self.data.train_blocks, epoch, self.cfg.seed, self.steps_per_epoch * self.per_step)
            loader = _loader(blocks, self.cfg, self.acc)
            if offset:
                loader = self.acc.skip_first_batches(loader, offset * accum)
            yield from loader
            epoch, offset = epoch + 1, 0


def _prepare_model(cfg: TrainConfig, accelerator):
    out = Path(cfg.output_dir)
    with accelerator.main_process_first():
        source = resolve_model_source(cfg, out / "converted", accelerator.is_main_process)
    model, tokenizer = load_model(source.path, cfg.dtype)
    model.config.use_cache = False
    if cfg.activation_checkpointing:
        # transformers 5.23 renamed it (the old name warns of its removal); 5.17-5.22 have the old name only
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_train_mode(model, cfg), tokenizer, source


def _finished_at(info: dict | None, cfg: TrainConfig) -> int | None:
    """The step at which the run of a checkpoint's `trainer_state.json` is complete for `cfg`, if known
    without loading the data (with --max-steps, or the same --epochs as before)."""
    if info is None:
        return None
    if cfg.max_steps:
        return cfg.max_steps
    if info.get("max_steps") is None and info.get("epochs") == cfg.epochs:
        return info.get("total_steps")
    return None


def _final_is_complete(out: Path, cfg: TrainConfig, step: int) -> bool:
    if cfg.save_final:
        summary = out / "final" / "training_summary.json"
        return summary.is_file() and json.loads(summary.read_text(encoding="utf-8")).get("steps") == step
    return (out / "metrics.jsonl").is_file() and any(r["step"] == step for r in read_metrics(out / "metrics.jsonl",
                                                                                                "summary"))


def _finished_result(out: Path, cfg: TrainConfig, info: dict) -> TrainResult:
    """The result of a run that was complete already, read from its files (nothing is loaded or written)."""
    metrics_file = out / "metrics.jsonl"
    records = read_metrics(metrics_file) if metrics_file.is_file() else []
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    train_rows = [r for r in records if r["kind"] == "train"]
    final_dir = out / "final" if cfg.save_final else None
    summary_file = out / "final" / "training_summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    return TrainResult(out, final_dir, metrics_file, info["step"], info.get("tokens", 0), evals.get(0),
                       evals.get(info["step"]), 0.0, (train_rows[-1].get("tokens_per_second") or 0.0)
                       if train_rows else 0.0, summary)


def _schedule_change(cfg: TrainConfig, info: dict | None, step: int, total_steps: int) -> str | None:
    """One line on how the LR schedule changes when a run continues with another length, else None."""
    old = (info or {}).get("schedule_steps")
    new = schedule_horizon(cfg, total_steps)
    if old is None or step >= total_steps or (old == new and step < old):
        return None
    lr_old, lr_new = schedule_lr(cfg, old, step), schedule_lr(cfg, new, step)
    head = f"continuing from step {step} to {total_steps}: "
    if old == new:
        return head + (f"the {cfg.scheduler} schedule keeps its horizon of {old} steps, so the learning rate "
                       f"stays at {lr_new:.3g}")
    return head + (f"the {cfg.scheduler} schedule's horizon grows from {old} to {new} steps, so the learning rate "
                   f"goes from {lr_old:.3g} to {lr_new:.3g} (pass --schedule-steps {old} to keep the old schedule)")


def _headline(m: dict | None) -> dict | None:
    """An evaluation without its per-batch lists (kept in metrics.jsonl for paired comparisons)."""
    return None if m is None else {k: v for k, v in m.items() if not k.startswith("batch_")}


def _eval_console(step: int, m: dict) -> str:
    ent = m.get("depth_entropy/mean")
    ent_text = f", depth-attention entropy {ent:.3f} (1 = uniform)" if ent is not None else ""
    return f"eval @ step {step}: loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f}{ent_text}"


def _summary_start(cfg, accelerator, model, source, data, batches, total_steps: int) -> dict:
    """The run's facts known before training (completed with results at the end, for the model card)."""
    trainable, total_params = count_parameters(model)
    config = accelerator.unwrap_model(model).config
    return {
        **base_model_metadata(source), "data": data.description, "train_mode": cfg.train_mode,
        "seq_len": cfg.seq_len, "global_batch": batches.per_step, "lr": cfg.lr, "attnres_lr": cfg.attnres_lr,
        "scheduler": cfg.scheduler, "mixed_precision": cfg.mixed_precision, "total_steps": total_steps,
        "trainable_parameters": trainable, "parameters": total_params, "processes": accelerator.num_processes,
        "attn_res_mode": config.attn_res_mode, "attn_res_block_size": config.attn_res_block_size,
        "push_to_hub": cfg.push_to_hub,
    }


def train(cfg: TrainConfig, *, on_step_end: Callable[[TrainState], None] | None = None) -> TrainResult:
    """Run (or resume) a continued-pretraining run; every process of an `accelerate launch` calls this."""
    from accelerate.utils import set_seed

    accelerator = build_accelerator(cfg)
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    echo = tqdm.write if accelerator.is_main_process else (lambda *_: None)
    if accelerator.is_main_process:  # the run owns its output folder: leftovers of killed saves are stale
        remove_stale_saves(out)
        hub.remove_stale_temporaries(out, ("final", "converted"))
    accelerator.wait_for_everyone()
    checkpoint = resolve_resume(cfg.resume, out)
    info = read_trainer_state(checkpoint) if checkpoint is not None else None
    done_at = _finished_at(info, cfg)
    if done_at is not None and info["step"] >= done_at and _final_is_complete(out, cfg, info["step"]):
        echo(f"{out} finished its {info['step']} steps already: nothing to do (pass a larger --max-steps to "
             "continue training).")
        accelerator.end_training()
        return _finished_result(out, cfg, info)
    model, tokenizer, source = _prepare_model(cfg, accelerator)
    data = build_train_data(cfg, tokenizer, accelerator.main_process_first)
    batches = _Batches(data, cfg, accelerator)
    total_steps = batches.total_steps()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    val_loader = None
    if data.val_blocks is not None:
        val_loader = accelerator.prepare_data_loader(
            DataLoader(PackedBlocks(data.val_blocks), batch_size=cfg.batch_size, shuffle=False))
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    metrics = MetricsLog(accelerator, out / "metrics.jsonl", echo=echo)

    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        metrics.truncate(state.step)
        echo(f"resumed from {checkpoint} at step {state.step} ({state.tokens} tokens seen)")
        change = _schedule_change(cfg, info, state.step, total_steps)
        if change:
            echo(change)
    summary = _summary_start(cfg, accelerator, model, source, data, batches, total_steps)
    if resolve_trackers(cfg.report_to):
        accelerator.init_trackers("hf-attnres", config={k: v for k, v in cfg.to_dict().items()
                                                        if isinstance(v, (int, float, str, bool))})
    echo(f"training {summary['trainable_parameters']:,} of {summary['parameters']:,} parameters ({cfg.train_mode}) "
         f"for {total_steps} steps of {batches.per_step} x {cfg.seq_len} tokens on "
         f"{accelerator.num_processes} process(es)")

    eval_before = None
    if val_loader is not None and cfg.eval_at_start and state.step == 0:
        eval_before = evaluate(model, val_loader, accelerator, per_batch=True)
        metrics.log("eval", 0, eval_before, console=_eval_console(0, eval_before))
    elif metrics.path.is_file():
        eval_before = next((r for r in read_metrics(metrics.path, "eval") if r["step"] == 0), None)

    checkpoint_info = {"total_steps": total_steps, "schedule_steps": schedule_horizon(cfg, total_steps),
                       "max_steps": cfg.max_steps, "epochs": cfg.epochs, "scheduler": cfg.scheduler}
    train_seconds, tokens_at_start = _train_loop(
        cfg, accelerator, model, optimizer, scheduler, batches, state, total_steps, val_loader, metrics, on_step_end,
        checkpoint_info)

    eval_after = None
    if val_loader is not None:
        eval_after = evaluate(model, val_loader, accelerator, per_batch=True)
        metrics.log("eval", state.step, eval_after, console=_eval_console(state.step, eval_after))
    tokens_per_second = (state.tokens - tokens_at_start) / train_seconds if train_seconds > 0 else 0.0
    if train_seconds == 0 and metrics.path.is_file():  # resumed a finished run: report the rate it trained at
        last = read_metrics(metrics.path, "train")[-1:]
        tokens_per_second = (last[0].get("tokens_per_second") or 0.0) if last else 0.0
    summary.update(steps=state.step, tokens=state.tokens, eval_before=_headline(eval_before),
                   eval_after=_headline(eval_after),
                   eval_tokens=(eval_after or {}).get("tokens"), train_seconds=round(train_seconds, 2),
                   tokens_per_second=round(tokens_per_second, 2))
    metrics.log("summary", state.step, {"tokens": state.tokens, "tokens_per_second": tokens_per_second,
                                        "train_seconds": train_seconds})
    final_dir = None
    if cfg.save_final:
        final_dir = save_final_model(accelerator, model, tokenizer, out / "final", summary,
                                     merge_lora=cfg.merge_lora, max_shard_size=cfg.max_shard_size,
                                     base_path=source.path)
        echo(f"saved the final model to {final_dir}")
        last = out / "checkpoints" / f"step_{state.step:08d}"
        is_peft = hasattr(accelerator.unwrap_model(model), "peft_config")  # final/ holds merged weights
        if accelerator.is_main_process and last.is_dir() and not is_peft:
            share_weights_with(last, final_dir)  # the same fp32 weights stored once: keeps a run under 2 GB
        if cfg.push_to_hub and accelerator.is_main_process:
            url = hub.push_folder(final_dir, cfg.push_to_hub, private=cfg.hub_private,
                                  commit_message="Upload AttnRes model trained with hf-attnres")[1]
            echo(f"pushed {final_dir} to {cfg.push_to_hub}: {url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(out, final_dir, metrics.path, state.step, state.tokens, eval_before, eval_after,
                       train_seconds, tokens_per_second, summary)


def accumulate_gradients(accelerator, model, micro: list[dict]) -> float:
    """Forward/backward over one optimizer step's micro-batches; returns the step's token-mean loss.

    The loss is normalised by the number of target tokens of the whole step on all processes (counted before
    any forward pass), not averaged per micro-batch: `run_clm_no_trainer.py`'s averaging weighs a short
    micro-batch like a full one.
    """
    world, accum = accelerator.num_processes, len(micro)
    local = sum((mb["labels"][:, 1:] != -100).sum() for mb in micro).to(accelerator.device)  # no per-batch sync
    n_items = accelerator.reduce(local, "sum")
    if int(n_items) == 0:
        raise ValueError("a training step has no target tokens (all labels are -100).")
    step_loss = torch.zeros((), device=accelerator.device)
    for mb in micro:
        with accelerator.accumulate(model):
            out = model(input_ids=mb["input_ids"], labels=mb["labels"], num_items_in_batch=n_items, use_cache=False)
            step_loss += out.loss.detach()
            # out.loss = (this micro-batch's token-loss sum) / (the step's global token count). Data-parallel
            # backends average gradients over processes and accelerator.backward divides by the accumulation
            # steps; undo both, so the step's gradient is exactly d(sum of token losses)/dw / n_items.
            accelerator.backward(out.loss * (world * accum))
    return accelerator.reduce(step_loss, "sum").item()


def _train_loop(cfg, accelerator, model, optimizer, scheduler, batches, state, total_steps, val_loader,
                metrics, on_step_end, checkpoint_info: dict) -> tuple[float, int]:
    """Optimizer steps from `state.step` to `total_steps`; returns (seconds spent in steps, tokens at start)."""
    accum = cfg.grad_accum
    stream = batches.iterate(state.step)
    tokens_at_start, seconds = state.tokens, 0.0
    progress = tqdm(total=total_steps, initial=state.step, desc="training", unit="step", dynamic_ncols=True,
                    disable=not (cfg.progress and accelerator.is_local_main_process))
    model.train()
    while state.step < total_steps:
        t0 = time.perf_counter()
        micro = [next(stream) for _ in range(accum)]
        loss = accumulate_gradients(accelerator, model, micro)
        grad_norm = None
        if cfg.max_grad_norm and accelerator.sync_gradients:
            # the parameter list is taken now: FSDP2 swaps sharded/unsharded parameter objects between passes
            trainable = [p for p in model.parameters() if p.requires_grad]
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # DTensor
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += batches.per_step * cfg.seq_len
        seconds += time.perf_counter() - t0
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        record = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": state.tokens,
                  "tokens_per_second": (state.tokens - tokens_at_start) / seconds}
        record.update({f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups})
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        log_now = state.step % max(1, cfg.log_every) == 0 or state.step == total_steps
        metrics.log("train", state.step, record, console=(
            f"step {state.step}/{total_steps}: loss {loss:.4f}, {record['tokens_per_second']:.1f} tokens/s"
            if log_now else None))
        if val_loader is not None and cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total_steps:
            m = evaluate(model, val_loader, accelerator, per_batch=True)
            metrics.log("eval", state.step, m, console=_eval_console(state.step, m))
        if (cfg.save_every and state.step % cfg.save_every == 0) or state.step == total_steps:
            save_checkpoint(accelerator, cfg.output_dir, state.step, cfg.keep_last,
                            {"tokens": state.tokens, **checkpoint_info})
        if on_step_end is not None:
            on_step_end(state)
    progress.close()
    return seconds, tokens_at_start
