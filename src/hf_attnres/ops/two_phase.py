"""The paper's two-phase computation of Block AttnRes (spec §5) as a depth-attention implementation.

The pseudo-queries are parameters, so when a block opens, the queries of all its S sublayers are known.
Phase 1 attends all of them at once over the sources complete at that point (the embedding and the finished
blocks): it reads each source once per block instead of once per sublayer, and returns every sublayer's
result over those sources with its log-sum-exp. Phase 2, at the j-th sublayer, adds the one source phase 1
could not see, the block's partial sum p, by an online softmax: with L = logaddexp(lse_j, l_p),

    h_j = exp(lse_j - L) * phase1_j + exp(l_p - L) * p  =  sum_i alpha_{i->j} v_i      (exact)

Phase 1 is one autograd function per block that keeps for backward only the sources (alive anyway) and
per-token statistics, and recomputes the probabilities in backward; phase 2 is plain torch ops. Phase 1's
results live in the forward's `depth_context` (see `DepthAttentionInterface`), keyed by the block and checked
against the very source tensors, so nothing outlives a forward and no backward depends on another's state.
Where the model gives no context (activation checkpointing) or the block's later queries are not plain local
tensors (sharded by FSDP or ZeRO-3, offloaded), each sublayer runs phase 1 for its own query alone: the same
function, without the sharing.

Written here because no maintained kernel has this form: FLA's and Liger's fused AttnRes take one query and
all sources per call (they are the GPU path, one call per sublayer).
"""

from __future__ import annotations

import torch
from torch import nn


class BlockPhase1(torch.autograd.Function):
    """Queries [S, d] (fp32) over sources [..., d] -> (mixed [..., S, d], lse [..., S], weights [..., n, S]).

    `mixed[..., j, :] = sum_i softmax_i(z_ij) v_i` with `z_ij = q_j . v_i / rms(v_i)`, in fp32; `weights` are
    those softmax weights (returned for `output_depth_attentions`, without gradient: `mixed` and `lse` carry it).
    """

    @staticmethod
    def forward(ctx, queries: torch.Tensor, eps: float, *sources: torch.Tensor):
        values = [value.to(queries.dtype) for value in sources]
        inv_rms = [torch.rsqrt(value.pow(2).mean(-1, keepdim=True) + eps) for value in values]
        logits = torch.stack([(value @ queries.T) * r for value, r in zip(values, inv_rms)], dim=-2)  # [..., n, S]
        lse = logits.logsumexp(dim=-2)
        weights = (logits - lse.unsqueeze(-2)).exp()
        mixed = sum(weights[..., i, :, None] * value.unsqueeze(-2) for i, value in enumerate(values))
        ctx.save_for_backward(queries, lse, torch.cat(inv_rms, dim=-1), *sources)
        ctx.mark_non_differentiable(weights)
        return mixed, lse, weights

    @staticmethod
    def backward(ctx, grad_mixed: torch.Tensor, grad_lse: torch.Tensor, _):
        queries, lse, inv_rms, *sources = ctx.saved_tensors
        d = queries.shape[-1]
        grad_mixed = torch.zeros(lse.shape + (d,), dtype=queries.dtype, device=lse.device) if grad_mixed is None else grad_mixed
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        values = [v.to(queries.dtype) for v in sources]
        # recompute the probabilities and <grad_mixed_j, v_i> source by source (no stacked copy)
        dots = [v @ queries.T for v in values]  # q_j . v_i, [..., S] each
        probs = [(dot * inv_rms[..., i, None] - lse).exp() for i, dot in enumerate(dots)]
        g_dot_v = [(grad_mixed @ v.unsqueeze(-1)).squeeze(-1) for v in values]  # [..., S]
        g_dot_mixed = sum(p * g for p, g in zip(probs, g_dot_v))
        grad_queries = torch.zeros_like(queries)
        grad_sources = []
        for i, (v, p, g, dot) in enumerate(zip(values, probs, g_dot_v, dots)):
            r = inv_rms[..., i, None]
            grad_logit = p * (g - g_dot_mixed + grad_lse)  # [..., S]
            # d(q.v r)/dv = r q - (q.v) r^3 v / d
            grad_v = (p.unsqueeze(-2) @ grad_mixed).squeeze(-2) + (grad_logit * r) @ queries
            grad_v = grad_v - ((grad_logit * dot).sum(-1, keepdim=True) * r.pow(3) / d) * v
            grad_queries += (grad_logit * r).reshape(-1, queries.shape[0]).T @ v.reshape(-1, d)
            grad_sources.append(grad_v.to(sources[i].dtype))
        return grad_queries, None, *grad_sources


def _block_modules(module: nn.Module, depth_modules: tuple) -> tuple[int, list[nn.Module]]:
    """The first sublayer of `module`'s block and the AttnResiduals of that block (the final aggregation: itself)."""
    config = module.config
    if module.sublayer == config.num_sublayers:
        return module.sublayer, [module]
    size = config.sublayers_per_block
    start = module.sublayer - module.sublayer % size
    return start, list(depth_modules[start : min(start + size, config.num_sublayers)])


def _local(module: nn.Module, like: torch.Tensor) -> bool:
    """Whether `module`'s query parameters are plain tensors on `like`'s device (not sharded or offloaded)."""
    params = (module.pseudo_query, module.key_norm.weight)
    return all(type(p) in (nn.Parameter, torch.Tensor) and p.device == like.device and p.numel() > 0 for p in params)


def _query(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """w * gamma: RMSNorm(v) = gamma * v / rms(v), so w . RMSNorm(v) = (w * gamma) . v / rms(v)."""
    return module.pseudo_query.to(dtype) * module.key_norm.weight.to(dtype)


def two_phase_depth_attention(
    module: nn.Module, sources: list[torch.Tensor], depth_context: dict | None = None,
    depth_modules: tuple = (), **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`depth_attention`'s function for `module`, computed in two phases (module docstring)."""
    dtype = torch.promote_types(sources[0].dtype, torch.float32)
    eps = module.key_norm.variance_epsilon
    start, block = _block_modules(module, depth_modules)
    opens_block = module.sublayer == start
    complete = sources if opens_block else sources[:-1]

    entry = depth_context.get(start) if depth_context is not None else None
    if entry is None or len(entry[0]) != len(complete) or any(a is not b for a, b in zip(entry[0], complete)):
        shared = depth_context is not None and all(_local(m, sources[0]) for m in block)
        if not shared:  # this sublayer's query alone
            block, start = [module], module.sublayer
        queries = torch.stack([_query(m, dtype) for m in block])
        entry = (tuple(complete), *BlockPhase1.apply(queries, eps, *complete))
        if shared:
            depth_context[start] = entry
    _, mixed, lse, weights = entry
    j = module.sublayer - start
    mixed, lse, weights = mixed[..., j, :], lse[..., j], weights[..., j]
    if opens_block:  # every source is complete: phase 1 is all of it
        return mixed.to(sources[0].dtype), weights

    # phase 2: merge the block's partial sum by an online softmax
    partial = sources[-1].to(dtype)
    logit = (partial @ _query(module, dtype)) * torch.rsqrt(partial.pow(2).mean(-1) + eps)
    total = torch.logaddexp(lse, logit)
    kept, new = (lse - total).exp(), (logit - total).exp()
    h = kept.unsqueeze(-1) * mixed + new.unsqueeze(-1) * partial
    alpha = torch.cat([weights * kept.unsqueeze(-1), new.unsqueeze(-1)], dim=-1)
    return h.to(sources[0].dtype), alpha
