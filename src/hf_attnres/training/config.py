"""Every knob of a continued-pretraining run in one dataclass, shared by the CLI, the Python API and the job.

Defaults are the ones that are safe for converting an existing Llama and training it further: a small
backbone learning rate, a higher one for the freshly zero-initialised pseudo-queries, no weight decay on
the AttnRes parameters (see `optim.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

TRAIN_MODES = ("full", "attnres-only", "lora")
SCHEDULERS = ("cosine", "wsd", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """A continued-pretraining run (`hf-attnres train --help` documents each field)."""

    model: str
    output_dir: str
    # data
    data: list[str] = field(default_factory=list)  # empty: the embedded corpus
    data_config: str | None = None
    data_split: str = "train"
    text_column: str = "text"
    streaming: bool = False
    validation_data: list[str] = field(default_factory=list)
    validation_split: str | None = None
    validation_fraction: float = 0.05
    validation_documents: int = 200  # streaming: the first N documents are held out
    max_eval_blocks: int | None = 64
    seq_len: int = 512
    # optimisation
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = None
    schedule_steps: int | None = None  # the LR schedule's horizon (default: the run's total steps)
    epochs: int = 1
    lr: float = 3e-5
    attnres_lr: float = 3e-4
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    decay_ratio: float = 0.2  # WSD: the final fraction of steps that decays
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    activation_checkpointing: bool = False
    # what trains
    train_mode: str = "full"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    merge_lora: bool = True
    # model input (conversion of Llama-family checkpoints)
    convert_mode: str = "block"
    block_size: int | None = None
    convert_verify: bool = True
    dtype: str | None = None
    # checkpoints, evaluation, logging
    save_every: int | None = 500
    keep_last: int = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    eval_every: int | None = 500
    eval_at_start: bool = True
    log_every: int = 10
    report_to: str = "auto"
    progress: bool = True
    # output
    save_final: bool = True
    max_shard_size: str = "2GB"
    push_to_hub: str | None = None
    hub_private: bool = False
    # runtime
    seed: int = 42
    cpu: bool = False
    num_workers: int = 0

    def __post_init__(self) -> None:
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
