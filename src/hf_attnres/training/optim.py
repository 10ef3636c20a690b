"""AdamW with two parameter groups and the learning-rate schedules.

The pseudo-queries start at zero in a converted model and are the only new parameters, so they get their
own, higher learning rate; like norms, they (and the key-norm weights) get no weight decay, which would
pull the routing back towards uniform.
"""

from __future__ import annotations

import math

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


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float, decay_ratio: float) -> float:
    """Multiplier of the peak learning rate at `step` (0-based optimizer steps).

    Linear warmup, then cosine to `min_ratio`; or WSD (warmup-stable-decay): flat, then a linear decay to
    `min_ratio` over the last `decay_ratio` of the steps; or constant.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(decay_ratio * total))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1.0 - min_ratio) * min(1.0, (step - decay_start + 1) / decay_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> LambdaLR:
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup, cfg.scheduler, cfg.min_lr_ratio, cfg.decay_ratio)

    return LambdaLR(optimizer, factor)
