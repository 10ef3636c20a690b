"""AdamW with two parameter groups and the learning-rate schedules (transformers' `get_scheduler`).

The pseudo-queries start at zero in a converted model and are the only new parameters, so they get their
own, higher learning rate; like norms, they (and the key-norm weights) get no weight decay, which would
pull the routing back towards uniform.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..modeling import is_attn_res_param


def param_groups(model: torch.nn.Module, lr: float, attnres_lr: float, weight_decay: float) -> list[dict]:
    """Trainable parameters in up to three groups: backbone (decayed), backbone norms/biases, AttnRes."""
    groups = {
        "backbone": {"params": [], "lr": lr, "weight_decay": weight_decay},
        "backbone_no_decay": {"params": [], "lr": lr, "weight_decay": 0.0},
        "attnres": {"params": [], "lr": attnres_lr, "weight_decay": 0.0},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "attnres" if is_attn_res_param(name) else "backbone" if p.ndim >= 2 else "backbone_no_decay"
        groups[key]["params"].append(p)
    out = [dict(g, name=k) for k, g in groups.items() if g["params"]]
    if not out:
        raise ValueError("the model has no trainable parameters: check --train-mode.")
    return out


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.lr, cfg.attnres_lr, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)


def schedule_horizon(cfg, total_steps: int) -> int:
    """The schedule's length in steps: `cfg.schedule_steps`, else the run's total steps."""
    return cfg.schedule_steps or total_steps


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> LambdaLR:
    """`transformers.get_scheduler` for `cfg.scheduler`, over `schedule_horizon(cfg, total_steps)` steps.

    cosine: linear warmup from 0, cosine to `min_lr_ratio` ("cosine_with_min_lr"); wsd: warmup from
    `min_lr_ratio`, flat, then a linear decay to `min_lr_ratio` over the last `decay_ratio` of the horizon
    ("warmup_stable_decay"); constant: linear warmup, then flat ("constant_with_warmup"). Past the horizon
    (a run continued with `schedule_steps` kept) the factor stays at its end value: transformers' cosine
    would climb back up, so the step is clamped to the horizon.
    """
    from transformers import get_scheduler

    horizon = schedule_horizon(cfg, total_steps)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * horizon)
    if cfg.scheduler == "cosine":
        name, extra = "cosine_with_min_lr", {"min_lr_rate": cfg.min_lr_ratio}
    elif cfg.scheduler == "wsd":
        decay = max(1, round(cfg.decay_ratio * horizon))
        name = "warmup_stable_decay"
        extra = {"num_decay_steps": decay, "num_stable_steps": max(0, horizon - warmup - decay),
                 "min_lr_ratio": cfg.min_lr_ratio, "decay_type": "linear"}
    else:
        name, extra = "constant_with_warmup", {}
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup,
                              num_training_steps=None if cfg.scheduler == "wsd" else horizon,
                              scheduler_specific_kwargs=extra)
    scheduler.lr_lambdas = [_clamped(f, horizon) for f in scheduler.lr_lambdas]
    return scheduler


def _clamped(fn, horizon: int):
    """`fn` evaluated at min(step, horizon). A plain function on purpose: LambdaLR's state_dict skips
    functions, so a resumed run uses the schedule built now, not the one pickled in the checkpoint."""
    def factor(step: int) -> float:
        return fn(min(step, horizon))

    return factor


def schedule_lr(cfg, horizon: int, step: int) -> float:
    """The backbone learning rate at 0-based step `step` of `cfg`'s schedule over `horizon` steps."""
    from dataclasses import replace

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    return lr_at(build_scheduler(probe, replace(cfg, schedule_steps=horizon), horizon), step)


def lr_at(scheduler: LambdaLR, step: int, group: int = 0) -> float:
    """The learning rate of param group `group` for 0-based optimizer step `step`."""
    return scheduler.base_lrs[group] * scheduler.lr_lambdas[group](step)
