"""Depth attention arranged for decoding (`attn_res_implementation="stacked"`): CPU inference on a few tokens.

On a few tokens (a decoding step) the reference's cost is the fixed cost of its per-source ops, not their
arithmetic. Stacking the sources as the paper's pseudocode does takes a dozen ops per sublayer whatever the
number of sources; products and sums rather than matmuls, because on a few tokens a BLAS call costs several
times its arithmetic (benchmarks/RESULTS.md has the figures). Under autograd or on longer inputs the stacked
copy would cost memory, so the reference runs there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modeling.modeling_attnres import eager_depth_attention

# Inference on at most this many tokens (a decoding step) stacks the sources.
STACKED_MAX_TOKENS = 64


def stacked_depth_attention(module, sources: list[torch.Tensor], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """`depth_attention` over the stacked sources when decoding (no autograd, <= 64 tokens); the reference else."""
    if torch.is_grad_enabled() or sources[0][..., 0].numel() > STACKED_MAX_TOKENS:
        return eager_depth_attention(module, sources, **kwargs)
    dtype = torch.promote_types(sources[0].dtype, torch.float32)
    values = torch.stack(sources, dim=-2).to(dtype)  # [..., n, d]
    keys = F.rms_norm(values, values.shape[-1:], module.key_norm.weight.to(dtype), module.key_norm.variance_epsilon)
    alpha = (keys * module.pseudo_query.to(dtype)).sum(-1).softmax(dim=-1)
    return (alpha.unsqueeze(-1) * values).sum(-2).to(sources[0].dtype), alpha
