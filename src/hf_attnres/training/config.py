"""Every knob of a continued-pretraining run in one dataclass, shared by the CLI, the Python API and the job.

Defaults are the ones that are safe for converting an existing Llama and training it further: a small
backbone learning rate, a higher one for the freshly zero-initialised pseudo-queries, no weight decay on
the AttnRes parameters (see `optim.py`).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field
from typing import Any

TRAIN_MODES = ("full", "attnres-only", "lora")
SCHEDULERS = ("cosine", "wsd", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")


def arg(default: Any = MISSING, help: str | None = None, *, default_factory: Any = MISSING, **metadata) -> Any:
    """A dataclass field with its command-line help (`hf_attnres.cli` builds the options from these)."""
    return field(default=default, default_factory=default_factory, metadata={"help": help, **metadata})


def like(cls: type, name: str, default: Any = MISSING, **metadata) -> Any:
    """Field `name` of dataclass `cls` (its default and help) for another job's config, so both stay one."""
    f = cls.__dataclass_fields__[name]
    if default is MISSING:
        default, factory = f.default, f.default_factory
    else:
        factory = MISSING
    return field(default=default, default_factory=factory, metadata={**f.metadata, **metadata})


# --help sections
MODEL, DATA, OPTIM = "model and run folder", "data", "optimisation"
WHAT, RUN = "what trains", "checkpoints, evaluation, output"


@dataclass
class TrainConfig:
    """A continued-pretraining run (`hf-attnres train --help` documents each field)."""

    model: str = arg(help="AttnRes folder or Hub id; or a Llama/Mistral/Qwen2/Qwen3 folder, Hub id or .gguf file, "
                     "converted to AttnRes on the fly (into OUTPUT/converted)", positional="MODEL", group=MODEL)
    output_dir: str = arg(help="run folder: checkpoints/, metrics.jsonl, logs/, final/", group=MODEL)
    # data
    data: list[str] = arg(default_factory=list, metavar="SOURCE", group=DATA,
                          help="a Hub dataset name, or local .txt/.md (a document per file), .jsonl/.json/.parquet (a "
                          "document per row) files or folders (default: the embedded corpus, Python 3.11 docs, "
                          "PSF License)")
    data_config: str | None = arg(None, "Hub dataset configuration name", group=DATA)
    data_split: str = arg("train", "split to read", group=DATA)
    text_column: str = arg("text", "column holding the text", group=DATA)
    streaming: bool = arg(False, "stream the Hub dataset (needs --max-steps)", group=DATA)
    validation_data: list[str] = arg(default_factory=list, metavar="SOURCE", group=DATA,
                                     help="separate validation data (default: hold out part of --data)")
    validation_split: str | None = arg(None, "validation split of the Hub dataset, e.g. 'validation'", group=DATA)
    validation_fraction: float = arg(0.05, "fraction of documents held out for validation", group=DATA)
    validation_documents: int = arg(200, "streaming: the first N documents are held out for validation", group=DATA)
    max_eval_blocks: int | None = arg(64, "cap on validation blocks, to keep evaluation short (0: all)", group=DATA)
    seq_len: int = arg(512, "tokens per packed block", group=DATA)
    # optimisation
    batch_size: int = arg(4, "blocks per micro-batch per process", group=OPTIM)
    grad_accum: int = arg(1, "micro-batches per optimizer step", group=OPTIM)
    max_steps: int | None = arg(None, "optimizer steps (default: --epochs over the data)", group=OPTIM)
    schedule_steps: int | None = arg(None, "learning-rate schedule horizon in steps (default: the run's total "
                                     "steps); pass the old value when raising --max-steps on resume to keep the "
                                     "schedule", group=OPTIM)
    epochs: int = arg(1, "passes over the data when --max-steps is not given", group=OPTIM)
    lr: float = arg(3e-5, "backbone (or LoRA) peak learning rate", group=OPTIM)
    attnres_lr: float = arg(3e-4, "learning rate of pseudo-queries and key norms, no weight decay; Adam moves a "
                            "routing logit by up to about lr x hidden_size per step, so keep it ~10x the backbone's",
                            group=OPTIM)
    weight_decay: float = arg(0.1, "backbone matrices only", group=OPTIM)
    adam_betas: tuple[float, float] = arg((0.9, 0.95), "AdamW betas", metavar="BETA", group=OPTIM)
    adam_eps: float = arg(1e-8, "AdamW epsilon", group=OPTIM)
    scheduler: str = arg("cosine", "learning-rate schedule after warmup", choices=SCHEDULERS, group=OPTIM)
    warmup_steps: int | None = arg(None, "linear warmup steps (default: --warmup-ratio of the steps)", group=OPTIM)
    warmup_ratio: float = arg(0.05, "warmup steps / steps, when --warmup-steps is not given", group=OPTIM)
    min_lr_ratio: float = arg(0.1, "final lr / peak lr", group=OPTIM)
    decay_ratio: float = arg(0.2, "WSD: the final fraction of steps that decays", group=OPTIM)
    max_grad_norm: float | None = arg(1.0, "gradient clipping (0: off)", group=OPTIM)
    mixed_precision: str = arg("no", "autocast through Accelerate (bf16 also works on recent CPUs)",
                               choices=MIXED_PRECISION, group=OPTIM)
    activation_checkpointing: bool = arg(False, "recompute activations in backward (less memory, ~30% slower)",
                                         group=OPTIM)
    # what trains
    train_mode: str = arg("full", "full; attnres-only (backbone frozen, the routing learns); lora (PEFT adapters "
                          "+ AttnRes parameters)", choices=TRAIN_MODES, group=WHAT)
    lora_r: int = arg(16, "LoRA rank (--train-mode lora)", group=WHAT)
    lora_alpha: int = arg(32, "LoRA scaling numerator: the adapter update is scaled by alpha / r", group=WHAT)
    lora_dropout: float = arg(0.0, "dropout on the LoRA adapters' input", group=WHAT)
    lora_target_modules: list[str] | None = arg(None, "modules that get LoRA adapters (default: q/k/v/o_proj and "
                                                "gate/up/down_proj of every layer)", metavar="NAME", group=WHAT)
    merge_lora: bool = arg(True, "merge the LoRA adapter into the saved model (--no-merge-lora: save the adapter)",
                           group=WHAT)
    # model input (conversion of Llama-family checkpoints)
    convert_mode: str = arg("block", "AttnRes mode when converting", choices=("block", "full", "none"), group=MODEL)
    block_size: int | None = arg(None, "sublayers per block when converting (default: at most 8 blocks)",
                                 group=MODEL)
    convert_verify: bool = arg(True, "check the conversion's logits against the source (--no-verify: faster)",
                               flag="--verify", group=MODEL)
    dtype: str | None = arg(None, "dtype the weights are loaded in (default: float32; use --mixed-precision for "
                            "bf16 compute)", choices=("float32", "bfloat16", "float16"), group=MODEL)
    # checkpoints, evaluation, logging
    save_every: int | None = arg(500, "save_state every N steps, and at the end", group=RUN)
    keep_last: int = arg(2, "checkpoints kept", group=RUN)
    resume: str | None = arg(None, "'latest' (the newest checkpoint of --output-dir; starts fresh if none) or a "
                             "checkpoint folder", metavar="latest|PATH", group=RUN)
    eval_every: int | None = arg(500, "validation every N steps, and before and after", group=RUN)
    eval_at_start: bool = arg(True, "evaluate before the first step", group=RUN)
    log_every: int = arg(10, "console line every N steps; metrics.jsonl gets every step", group=RUN)
    report_to: str = arg("auto", "trackers: auto (tensorboard if installed), all, none, or e.g. tensorboard,wandb",
                         group=RUN)
    progress: bool = arg(True, "progress bar", group=RUN)
    # output
    save_final: bool = arg(True, "save the trained model to OUTPUT/final", group=RUN)
    max_shard_size: str = arg("2GB", "safetensors shard size of the final model", group=RUN)
    push_to_hub: str | None = arg(None, "upload the final folder to this Hub repo", metavar="REPO", group=RUN)
    hub_private: bool = arg(False, "create the Hub repo private", group=RUN)
    # runtime
    seed: int = arg(42, "data split, shuffling and init", group=RUN)
    cpu: bool = arg(False, "train on the CPU even when a GPU is present", group=RUN)
    num_workers: int = arg(0, "DataLoader workers", group=RUN)

    def __post_init__(self) -> None:
        self.max_eval_blocks = self.max_eval_blocks or None  # 0: all
        self.max_grad_norm = self.max_grad_norm or None  # 0: no clipping
        self.data = list(self.data or [])
        self.validation_data = list(self.validation_data or [])
        self.adam_betas = tuple(self.adam_betas)
        checks = [
            (self.train_mode in TRAIN_MODES, f"train_mode={self.train_mode!r}: use one of {TRAIN_MODES}"),
            (self.scheduler in SCHEDULERS, f"scheduler={self.scheduler!r}: use one of {SCHEDULERS}"),
            (self.mixed_precision in MIXED_PRECISION, f"mixed_precision: use one of {MIXED_PRECISION}"),
            (self.seq_len >= 2, "seq_len must be at least 2 (one input and one target token)"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (0 <= self.validation_fraction < 1, "validation_fraction must be in [0, 1)"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (not (self.streaming and self.max_steps is None), "streaming data has no length: pass --max-steps"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict:
        return asdict(self)
