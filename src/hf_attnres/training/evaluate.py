"""Validation loss, perplexity and the entropy of the depth attention, per sublayer.

The loss is the sum of token losses over the real number of target tokens, gathered over processes with
`gather_for_metrics` (which drops the samples Accelerate repeats to even out the last batch), so it does not
depend on the batch size or the number of processes. The entropy of the depth-attention weights, divided
by log(number of sources), is 1 for uniform weights (a freshly converted model) and falls as the routing
learns to prefer some sources.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (sum of next-token cross-entropy, number of targets), in fp32; -100 labels are ignored."""
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return losses.sum(1), (targets != -100).sum(1)


def sublayer_names(num_entries: int) -> list[str]:
    """Names of the depth-attention entries: layer t's attention and MLP, then the final aggregation."""
    names = [f"layer{i // 2}.{'attn' if i % 2 == 0 else 'mlp'}" for i in range(num_entries - 1)]
    return names + ["final"]


def normalised_entropy_sums(depth_attentions: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """Per-sample sums over tokens of H(alpha) / log(n_sources), shape (batch, entries); None if none."""
    if not depth_attentions:
        return None
    columns = []
    for alpha in depth_attentions:
        n = alpha.shape[-1]
        if n < 2:  # one source: the weight is 1, there is nothing to route
            columns.append(torch.full(alpha.shape[:1], float("nan"), device=alpha.device))
            continue
        entropy = -(alpha * alpha.clamp_min(1e-12).log()).sum(-1) / math.log(n)
        columns.append(entropy.sum(1))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def evaluate(model, dataloader, accelerator, *, depth_entropy: bool = True, per_batch: bool = False) -> dict:
    """{"loss", "perplexity", "tokens", "depth_entropy/<sublayer>"..., "depth_entropy/mean"} on `dataloader`.

    `per_batch` adds "batch_loss_sums" and "batch_tokens" (one entry per evaluation batch, all processes):
    two models evaluated on the same batches can then be compared pair by pair (`hf-attnres ab`).
    """
    was_training = model.training
    model.eval()
    loss_sum, count, entropy_sum, n_tokens_entropy, entries = 0.0, 0, None, 0, 0
    batch_sums, batch_counts = [], []
    for batch in dataloader:
        out = model(input_ids=batch["input_ids"], output_depth_attentions=depth_entropy, use_cache=False)
        sums, counts = token_loss_sums(out.logits, batch["labels"])
        ent = normalised_entropy_sums(out.depth_attentions) if depth_entropy else None
        gathered = accelerator.gather_for_metrics((sums, counts) if ent is None else (sums, counts, ent))
        batch_sums.append(gathered[0].double().sum().item())
        batch_counts.append(int(gathered[1].sum().item()))
        loss_sum += batch_sums[-1]
        count += batch_counts[-1]
        if ent is not None:
            entries = gathered[2].shape[1]
            s = gathered[2].double().sum(0)
            entropy_sum = s if entropy_sum is None else entropy_sum + s
            n_tokens_entropy += gathered[0].shape[0] * batch["input_ids"].shape[1]  # rows kept x tokens per row
    model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation data has no target tokens.")
    loss = loss_sum / count
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
    if per_batch:
        metrics.update(batch_loss_sums=batch_sums, batch_tokens=batch_counts)
    if entropy_sum is not None:
        per_entry = (entropy_sum / n_tokens_entropy).tolist()
        for name, value in zip(sublayer_names(entries), per_entry):
            if not math.isnan(value):
                metrics[f"depth_entropy/{name}"] = value
        valid = [v for v in per_entry if not math.isnan(v)]
        if valid:
            metrics["depth_entropy/mean"] = sum(valid) / len(valid)
    return metrics
