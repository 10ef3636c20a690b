"""The final model: gathered from every process, unwrapped, LoRA merged or not, saved Hub-ready, pushed.

Under FSDP and DeepSpeed ZeRO-3 each process holds a shard: `accelerator.get_state_dict` gathers the full
weights (a collective, so every process calls it) and only the main process writes. A LoRA model is rebuilt
on the CPU from that state dict, so merging works the same whether or not the weights were sharded.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..hub import atomic_output_dir, save_for_hub
from ..model_card import render_model_card


def _merged_model(unwrapped, state_dict: dict, base_path: str):
    """A merged AttnResForCausalLM, rebuilt on the CPU from the base model and the full (gathered) PEFT state
    dict: the trained module itself may be sharded (FSDP2 DTensors, ZeRO-3 partitions) and cannot merge."""
    from peft import get_peft_model

    from .models import load_model

    rebuilt = get_peft_model(load_model(base_path)[0], unwrapped.peft_config["default"])
    result = rebuilt.load_state_dict({k: v.detach().cpu() for k, v in state_dict.items()}, strict=False)
    if result.unexpected_keys or result.missing_keys:
        raise RuntimeError(f"LoRA state dict does not match its base model: unexpected {result.unexpected_keys[:5]}, "
                           f"missing {result.missing_keys[:5]}")
    return rebuilt.merge_and_unload()


def _plain_model(unwrapped, state_dict: dict):
    """A fresh, unsharded AttnResForCausalLM holding the gathered weights.

    Under FSDP2 the trained module's class is swapped for an `FSDP...` subclass (its saved code and auto_map
    would name the wrong class) and under ZeRO-3 its parameters are empty partitions, so the final save goes
    through a plain CPU copy instead.
    """
    from ..modeling import AttnResForCausalLM

    dtype = next(iter(state_dict.values())).dtype
    # the class itself, not from_config: under ZeRO-3 from_config would partition the new parameters too
    model = AttnResForCausalLM(unwrapped.config).to(dtype)
    result = model.load_state_dict({k: v.detach().cpu() for k, v in state_dict.items()}, strict=False)
    missing = set(result.missing_keys) - set(getattr(model, "_tied_weights_keys", None) or {})
    if missing or result.unexpected_keys:
        raise RuntimeError(f"gathered state dict does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    return model


def model_card_text(summary: dict, model_id: str) -> str:
    """README.md of the trained model: what it was trained from, on what, for how long, how well."""
    settings = {k: summary.get(k) for k in (
        "base_model", "data", "train_mode", "steps", "tokens", "seq_len", "global_batch", "lr", "attnres_lr",
        "scheduler", "mixed_precision", "attn_res_mode", "attn_res_block_size")}
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    rows = [("validation perplexity", _fmt(before.get("perplexity")), _fmt(after.get("perplexity"))),
            ("validation loss", _fmt(before.get("loss")), _fmt(after.get("loss"))),
            ("depth-attention entropy (1 = uniform)", _fmt(before.get("depth_entropy/mean")),
             _fmt(after.get("depth_entropy/mean")))]
    from ..model_card import markdown_table

    figures = markdown_table(rows, header=("", "before training", "after training"))
    figures += f"\n\nValidation: {summary.get('eval_tokens', '-')} held-out tokens."
    if summary.get("comparison"):
        figures += f"\n\n**Measured comparison** (`hf-attnres ab`, same data, order and hyperparameters): " \
                   f"{summary['comparison']}"
    return render_model_card(
        title=f"{_short_name(summary)} + Attention Residuals, continued pretraining",
        summary=(
            f"An Attention Residuals (AttnRes) model converted from `{summary.get('base_model')}` and trained "
            f"further with `hf-attnres train` for {summary.get('steps')} steps ({summary.get('tokens')} tokens) "
            f"on {summary.get('data')}."
        ),
        settings=settings,
        model_id=model_id,
        base_model=summary.get("hub_base_model"),
        license=summary.get("license"),
        figures=figures,
        tags=["continued-pretraining"],
    )


def _short_name(summary: dict) -> str:
    name = summary.get("hub_base_model") or Path(str(summary.get("base_model", "model"))).name
    return str(name).split("/")[-1]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def save_final_model(accelerator, model, tokenizer, out_dir: Path, summary: dict, *, merge_lora: bool,
                     max_shard_size: str, base_path: str) -> Path:
    """Save the trained model to `out_dir` (replacing it atomically); call on every process."""
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP / ZeRO-3
    unwrapped = accelerator.unwrap_model(model)
    is_peft = hasattr(unwrapped, "peft_config")
    sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    card = model_card_text(summary, model_id=summary.get("push_to_hub") or str(out_dir))
    if accelerator.is_main_process:
        if is_peft and merge_lora:
            save_for_hub(_merged_model(unwrapped, state_dict, base_path), out_dir, tokenizer=tokenizer,
                         max_shard_size=max_shard_size, model_card=card, overwrite=True)
        elif is_peft:  # an adapter folder; the base is the converted AttnRes model
            with atomic_output_dir(out_dir, overwrite=True) as tmp:
                unwrapped.save_pretrained(tmp, state_dict=state_dict, save_function=accelerator.save)
                tokenizer.save_pretrained(tmp)
                (tmp / "README.md").write_text(card, encoding="utf-8")
        elif sharded:
            save_for_hub(_plain_model(unwrapped, state_dict), out_dir, tokenizer=tokenizer,
                         max_shard_size=max_shard_size, model_card=card, overwrite=True)
        else:
            save_for_hub(unwrapped, out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size,
                         model_card=card, overwrite=True, save_function=accelerator.save, state_dict=state_dict)
        (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    accelerator.wait_for_everyone()
    return out_dir


def refresh_model_card(folder: Path, comparison: str) -> None:
    """Rewrite a saved final folder's README.md to state a measured comparison (`hf-attnres ab`)."""
    summary_file = Path(folder) / "training_summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    summary["comparison"] = comparison
    card = model_card_text(summary, model_id=summary.get("push_to_hub") or str(folder))
    for path, text in ((summary_file, json.dumps(summary, indent=2, default=str)), (Path(folder) / "README.md", card)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)

