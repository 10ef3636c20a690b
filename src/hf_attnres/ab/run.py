"""`hf-attnres ab`: does converting pay off? Two (or three) arms trained alike from the same function.

Continued pretraining (the default): the Llama-family MODEL converted to AttnRes (`convert_mode`, block by
default) against the same weights converted with `attn_res_mode="none"`, which is the unmodified Llama on
the same code path. The conversion is exact, so both arms start as the same function. From scratch
(`from_scratch=CONFIG`): one random initialisation of MODEL's architecture with CONFIG's overrides,
converted to baseline (`none`), Block and Full arms.

Every arm is an ordinary `train` run (its own folder, resumable, `accelerate launch` works) with the same
data, split, order, seed, batch and backbone hyperparameters; the AttnRes parameters get `attnres_lr` as in
`train`. All arms are evaluated on the same held-out blocks at the same steps, batch by batch, so the
report can pair them (see `stats.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
from dataclasses import dataclass
from pathlib import Path

from ..training.config import TrainConfig

BASELINE = "none"
ARM_LABELS = {"none": "baseline (Llama)", "block": "Block AttnRes", "full": "Full AttnRes"}


@dataclass
class ABConfig(TrainConfig):
    """An A/B run: `TrainConfig`'s fields apply to every arm; `model` may be None (SmolLM2-135M from PyPI)."""

    from_scratch: str | None = None  # a JSON file of config overrides: train baseline, block and full from scratch
    eval_every: int | None = None  # default: 8 evaluations over `max_steps` (500 steps without it)
    resume: str | None = "latest"  # arms continue where they stopped

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.push_to_hub:
            raise ValueError("ab does not push: push an arm's final folder (OUTPUT/<arm>/final) with `hf-attnres "
                             "train ... --push-to-hub` or huggingface_hub, once you have read the report.")
        if self.from_scratch is None and self.convert_mode == BASELINE:
            raise ValueError("--convert-mode none would compare the baseline with itself: use block or full.")
        if self.eval_every is None:
            self.eval_every = max(1, self.max_steps // 8) if self.max_steps else 500
        if self.eval_every <= 0 or not self.eval_at_start:
            raise ValueError("ab compares the arms at every evaluation, from the start: keep --eval-every > 0 and "
                             "the evaluation at start.")

    def arms(self) -> list[str]:
        return [BASELINE, "block", "full"] if self.from_scratch else [BASELINE, self.convert_mode]


def random_init(model: str, overrides_file: str, out: Path, seed: int) -> Path:
    """A randomly initialised Llama of `model`'s architecture with the overrides of a JSON file, saved to `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..hub import atomic_output_dir

    if (out / "config.json").is_file():
        return out
    try:
        overrides = json.loads(Path(overrides_file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--from-scratch {overrides_file}: not a readable JSON file of config fields ({e}).") from e
    if not isinstance(overrides, dict):
        raise ValueError(f"--from-scratch {overrides_file}: expected a JSON object of config fields.")
    from ..conversion.sources import open_source

    source = open_source(model)  # the converter's reader: folders, Hub ids and .gguf files alike
    config, tokenizer = copy.deepcopy(source.config), source.load_tokenizer()
    if tokenizer is None:
        raise ValueError(f"{model} has no tokenizer: --from-scratch takes MODEL's tokenizer and architecture.")
    unknown = sorted(k for k in overrides if not hasattr(config, k))
    if unknown:
        raise ValueError(f"--from-scratch {overrides_file}: {unknown} are not fields of the {config.model_type} config.")
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    llama = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with atomic_output_dir(out, overwrite=True) as tmp:
        llama.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def prepare_arm(source: str, mode: str, cfg: ABConfig, start: Path) -> Path:
    """The arm's starting model: `source` converted with `mode` (an earlier conversion is reused)."""
    from ..conversion import convert_checkpoint

    if not (start / "config.json").is_file():
        convert_checkpoint(source, start, mode=mode, block_size=cfg.block_size, verify=cfg.convert_verify,
                           progress=cfg.progress)
    return start


def arm_config(cfg: ABConfig, arm: str, start: Path) -> TrainConfig:
    """The arm's `train` settings: everything from `cfg` but the model and the folder."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k in fields}
    values.update(model=str(start), output_dir=str(Path(cfg.output_dir) / arm), push_to_hub=None)
    return TrainConfig(**values)


def run_ab(cfg: ABConfig) -> dict:
    """Train every arm (resuming unfinished ones), then write the report; returns the contents of ab.json."""
    from accelerate import PartialState

    from ..training.trainer import train
    from .report import write_report

    state = PartialState(cpu=cfg.cpu)
    out = Path(cfg.output_dir)
    say = print if state.is_main_process else (lambda *_: None)
    model = cfg.model
    if model is None:
        from ..assets import smollm2_gguf

        with state.main_process_first():
            model = str(smollm2_gguf())
    arms = cfg.arms()
    say(f"[hf-attnres ab] arms: {', '.join(ARM_LABELS[a] for a in arms)}; "
        f"{'from scratch (' + cfg.from_scratch + ')' if cfg.from_scratch else 'continued pretraining'} of {model}")
    source = model
    with state.main_process_first():
        if state.is_main_process and cfg.from_scratch:  # one initialisation for every arm
            source = str(random_init(model, cfg.from_scratch, out / "init", cfg.seed))
    for arm in arms:  # a finished arm's `train` says so and returns (resume="latest")
        arm_dir = out / arm
        with state.main_process_first():
            if state.is_main_process:
                prepare_arm(source, arm, cfg, arm_dir / "start")
        say(f"[hf-attnres ab] training arm {arm} ({ARM_LABELS[arm]}) in {arm_dir}")
        train(arm_config(cfg, arm, arm_dir / "start"))
        gc.collect()
    state.wait_for_everyone()
    result = write_report(out, arms, cfg, source_model=model) if state.is_main_process else {}
    state.wait_for_everyone()
    return result
