"""Attention Residuals (AttnRes; Kimi Team, arXiv 2603.15031) for transformers.

A standard PreNorm decoder adds every sublayer output into one running sum with weight 1. AttnRes replaces
that sum with softmax attention over depth: before each attention or MLP sublayer l, a learned pseudo-query
w_l attends over earlier sources v_i,

    alpha_{i->l} = softmax_i( w_l . RMSNorm(v_i) ),        h_l = sum_i alpha_{i->l} v_i,

where the sources are the token embedding and every earlier sublayer output (Full AttnRes) or the block
sums of those outputs (Block AttnRes). Everything else is the Llama decoder, reused from transformers.

Hub-portable: imports only torch, transformers, the standard library and the config file beside it.
"""

import itertools
import math
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention
from transformers.utils import TransformersKwargs, can_return_tuple, logging

from .configuration_attnres import AttnResConfig

logger = logging.get_logger(__name__)

# Attention module of each supported family; MLP, RMSNorm and rotary embedding are Llama's in all of them.
ATTENTION_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaAttention,
    "mistral": MistralAttention,
    "qwen2": Qwen2Attention,
    "qwen3": Qwen3Attention,
}

# transformers 5.24 renamed the KV cache `past_key_values` -> `cache`: as the argument that `generate`, the
# decoder layers and the masks take, and as the output field that `generate` reads back. The installed release's
# name, read off its own output class (Hub code runs on whatever release the user has).
CACHE_ARG = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# Child modules holding every AttnRes parameter (pseudo-queries and key norms), e.g. for PEFT's modules_to_save.
ATTN_RES_MODULE_NAMES = ["self_attn_res", "mlp_res", "final_res"]


# --------------------------------------------------------------------------------------------------------
# Depth attention (spec §2)
# --------------------------------------------------------------------------------------------------------
# Inference on at most this many tokens (decoding) stacks the sources per sublayer in Full AttnRes (Block
# AttnRes goes through the source stack there); larger inputs go source by source, or two-phase in Block AttnRes.
STACKED_MAX_TOKENS = 64


def _decoding(hidden: torch.Tensor) -> bool:
    """Inference on at most STACKED_MAX_TOKENS tokens: the number of ops is the cost there, not memory."""
    return not torch.is_grad_enabled() and hidden.numel() <= STACKED_MAX_TOKENS * hidden.shape[-1]


def _times_queries(value: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """value [..., d] @ queries [d, k], computed as (queries^T @ value^T)^T: CPU BLAS is several times
    slower on the tall-skinny form [tokens, d] @ [d, k] than on its transpose for small k > 1."""
    flat = value.reshape(-1, value.shape[-1])
    return (queries.mT @ flat.mT).mT.reshape(*value.shape[:-1], queries.shape[-1])


def _key_logits(value: torch.Tensor, queries: torch.Tensor, eps: float):
    """(q_k . v / rms(v) for the k query columns, q . v, 1 / rms(v)), per token, in the queries' dtype."""
    value32 = value.to(queries.dtype)
    dot = _times_queries(value32, queries)
    inv_rms = torch.rsqrt(torch.linalg.vector_norm(value32, dim=-1, keepdim=True).square() / value.shape[-1] + eps)
    return dot * inv_rms, dot, inv_rms


def _key_logits_backward(grad, value, queries, dot, inv_rms) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `_key_logits` for `value` (fp32) and `queries`, from its saved (cheap) results."""
    d = value.shape[-1]
    value32 = value.to(queries.dtype)
    grad_dot = grad * inv_rms
    # d(q.v * inv_rms)/dv = inv_rms * q - q.v * inv_rms^3 * v / d
    grad_rms = -(grad * dot).sum(-1, keepdim=True) * inv_rms.pow(3) / d
    grad_value = (grad_dot @ queries.mT).addcmul_(grad_rms, value32)
    grad_queries = (grad_dot.reshape(-1, queries.shape[-1]).mT @ value32.reshape(-1, d)).mT
    return grad_value, grad_queries


class _KeyLogits(torch.autograd.Function):
    """Autograd for `_key_logits` that keeps only `v` itself for backward.

    `v` is alive anyway as a source, so no fp32 or normalised copy is kept: the depth attention adds no
    activation memory per source, in bf16 as in fp32.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, queries: torch.Tensor, eps: float) -> torch.Tensor:
        logits, dot, inv_rms = _key_logits(value, queries, eps)
        ctx.save_for_backward(value, queries, dot, inv_rms)
        return logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        value, queries, dot, inv_rms = ctx.saved_tensors
        grad_value, grad_queries = _key_logits_backward(grad, value, queries, dot, inv_rms)
        return grad_value.to(value.dtype), grad_queries, None


def key_logits(value: torch.Tensor, queries: torch.Tensor, eps: float) -> torch.Tensor:
    """w_k . RMSNorm(v) for every column of `queries` (the pseudo-queries times their key-norm weights)."""
    if torch.is_grad_enabled():
        return _KeyLogits.apply(value, queries, eps)
    return _key_logits(value, queries, eps)[0]


def query_parameters(attn_residuals: list["AttnResidual"]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The pseudo-queries w and key-norm weights gamma of `attn_residuals`, in order. Read from the modules'
    own dicts where they are plain AttnResiduals (decoding gathers them per token; see `_attn_residuals`), by
    attribute otherwise (e.g. a wrapper of PEFT's `modules_to_save`)."""
    plain = [type(r) is AttnResidual for r in attn_residuals]
    return (
        [r._parameters["pseudo_query"] if p else r.pseudo_query for r, p in zip(attn_residuals, plain)],
        [r._modules["key_norm"]._parameters["weight"] if p else r.key_norm.weight for r, p in zip(attn_residuals, plain)],
    )


def effective_queries(params: tuple[list[torch.Tensor], list[torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """[d, k] matrix of w * gamma (`params`: see `query_parameters`): RMSNorm(v) = gamma * v / rms(v), so
    w . RMSNorm(v) = (w * gamma) . v / rms(v).

    Stored as k contiguous rows (the [d, k] matrix is their transpose), so one query `[:, j]` is contiguous:
    a strided vector makes the CPU matmuls with it about half again slower. Two stacks and one product, not
    one product per sublayer: decoding builds it for every token."""
    pseudo_queries, gammas = params
    return (_to(torch.stack(pseudo_queries), dtype) * _to(torch.stack(gammas), dtype)).mT


def _to(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` without a dispatch when it already is: decoding runs one depth attention per
    sublayer on a single token, where each op's fixed cost is the whole cost."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _mix(weights: list[torch.Tensor], values: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i weights_i v_i (added to `out` if given), in the weights' dtype (fp32): one rounding at the end
    under bf16, not one per source. A loop of fused multiply-adds: on CPU this beats a batched matmul of
    many tiny matrices. In place also under autograd, which keeps the weights and values, not the sum."""
    if out is None:
        out, weights, values = weights[0].unsqueeze(-1) * values[0], weights[1:], values[1:]
    for w, v in zip(weights, values):
        out = out.addcmul_(w.unsqueeze(-1), v)
    return out


def depth_attention(
    pseudo_query: torch.Tensor, key_norm: LlamaRMSNorm, sources: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_i = softmax_i(w . RMSNorm(v_i)) over the sources; returns h = sum_i alpha_i v_i and alpha.

    The key norm's weight folds into the query, so normalised keys are never materialised. Logits and
    softmax are fp32 whatever the model dtype; the values stay raw (un-normalised), as in the paper.
    """
    dtype = torch.promote_types(sources[0].dtype, torch.float32)  # fp32 under bf16/fp16
    query = _to(pseudo_query, dtype) * _to(key_norm.weight, dtype)
    eps, d = key_norm.variance_epsilon, sources[0].shape[-1]
    if _decoding(sources[0]):  # a handful of tokens: stack once
        values = _to(torch.stack(sources, dim=-2), dtype)
        inv_rms = torch.linalg.vecdot(values, values).div_(d).add_(eps).rsqrt_()
        alpha = (values @ query).mul_(inv_rms).softmax(dim=-1)
        return _to((alpha.unsqueeze(-2) @ values).squeeze(-2), sources[0].dtype), alpha
    alpha = torch.stack([key_logits(v, query[:, None], eps)[..., 0] for v in sources], dim=-1).softmax(dim=-1)
    return _mix(alpha.unbind(-1), sources).to(sources[0].dtype), alpha


# --------------------------------------------------------------------------------------------------------
# Two-phase computation for Block AttnRes (spec §5)
# --------------------------------------------------------------------------------------------------------
# Pseudo-queries are parameters, so when a block opens, all S of its queries are known. Phase 1 attends all
# of them at once over the sources completed so far (the embedding and the finished blocks), returning each
# sublayer's output over those sources and the softmax statistics (log-sum-exp). Phase 2, at sublayer j of
# the block, adds the one source phase 1 could not see, the partial sum p of the block, by an online
# softmax: with beta = sigmoid(w_j . RMSNorm(p) - lse_j) the weight of p,
#
#     h_j = (1 - beta) * phase1_j + beta * p  =  sum_i alpha_{i->j} v_i        (exact, not approximate)
#
# In training this is what keeps AttnRes cheap: phase 1's backward gives each completed source its gradient
# from all S sublayers at once (no per-sublayer temporaries and accumulations), each product <grad, v_i> is
# taken once (phase 2's backward hands its own to phase 1's), phase 2 merges into phase 1's buffer, and
# neither phase keeps for backward anything of size [tokens, d] that is not a source already.
@dataclass
class BlockPhase1:
    """Phase-1 results for one block: `mixed[j]` and `lse[..., j]` for its j-th sublayer, fp32."""

    sources: list[torch.Tensor]  # the completed sources phase 1 attended over
    queries: torch.Tensor  # [d, S] the block's effective queries (w * gamma), fp32
    eps: float  # the key norms' epsilon
    mixed: tuple[torch.Tensor, ...]  # sum_i softmax_i(logits_ij) v_i, one [..., d] per sublayer
    lse: torch.Tensor  # [..., S] log-sum-exp of the logits over the sources
    weights: torch.Tensor  # [..., n, S] softmax over the sources (no gradient: `mixed` carries it)
    merge_dots: dict  # backward only: column -> (grad of mixed, its dots with the sources), from phase 2
    keep_weights: bool = True  # whether the sublayers return their depth weights alpha
    stack: "SourceStack | FusedSourceStack | None" = None  # inference: the stack whose phase 2 the sublayers use
    # with a SourceStack: per sublayer (its query [d, 1], scaled as the stack's; lse [..., 1]); with a
    # FusedSourceStack: (the block's first query column,), its results staying in the kernels
    columns: tuple = ()
    normed: bool = False  # whether `mixed[0]` and phase 2's results come through the sublayers' RMSNorms already


# Devices where phase 1 in training stacks the block's sources into one [tokens, n, d] tensor and uses batched
# matmuls. On a GPU this reads each source once per block instead of once per sublayer (H100, bf16, 16 x 2048
# tokens: training step 0.426 -> 0.368 s); on CPU the loop of fused multiply-adds is faster (batched tiny
# matmuls are slow there), and hf_attnres's fused kernels faster still where they are loaded. Neither keeps the
# stack for backward: the backward restacks it. benchmarks/phase1.py times both. Inference goes through a
# source stack on every device.
PHASE1_STACKED_DEVICES = ("cuda",)


def _dots(x: torch.Tensor, ys: list[torch.Tensor], scratch: torch.Tensor | None = None) -> torch.Tensor:
    """[..., len(ys)]: the per-token dot products <x, y> for every y. One scratch buffer for all of them:
    `torch.linalg.vecdot` allocates a [tokens, d] product per call, and fresh memory costs page faults."""
    scratch = torch.empty_like(x) if scratch is None else scratch
    return torch.stack([torch.mul(x, y, out=scratch).sum(-1) for y in ys], dim=-1)


def _cpu_kernels(like: torch.Tensor):
    """hf_attnres's fused CPU kernels where they apply to `like` (a CPU tensor of a supported dtype, outside
    torch.compile), else None: for inference (`FusedSourceStack`) and the two phases' autograd functions."""
    if like.device.type != "cpu" or like.dtype not in _FUSED_DTYPES or torch.compiler.is_compiling():
        return None
    return _fused_kernels()


class _Phase1(torch.autograd.Function):
    """Phase 1: `(mixed_0, ..., mixed_{S-1}, lse, weights)` of the completed sources for the queries [d, S].

    Keeps for backward only the sources (alive anyway) and [tokens, n, S]-sized statistics.
    """

    @staticmethod
    def forward(ctx, queries: torch.Tensor, eps: float, merge_dots: dict, *sources: torch.Tensor):
        ctx.merge_dots = merge_dots
        ctx.stacked = sources[0].device.type in PHASE1_STACKED_DEVICES
        ctx.kernels = _cpu_kernels(sources[0])
        if ctx.kernels is not None:  # the same equations token by token (hf_attnres.kernels)
            *mixed, lse, weights, dot, inv_rms = ctx.kernels.train_phase1(queries, eps, list(sources))
        elif ctx.stacked:
            values = torch.stack(sources, dim=-2).to(queries.dtype)  # [..., n, d]
            logits, dot, inv_rms = _key_logits(values, queries, eps)  # [..., n, S], [..., n, S], [..., n, 1]
        else:
            logits, dot, inv_rms = (torch.stack(t, dim=-2) for t in zip(*(_key_logits(v, queries, eps) for v in sources)))
        if ctx.kernels is None:
            lse = logits.logsumexp(dim=-2)  # [..., S]
            weights = (logits - lse.unsqueeze(-2)).exp()  # [..., n, S]
            mixed = (weights.mT @ values).unbind(-2) if ctx.stacked else [_mix(w.unbind(-1), sources) for w in weights.unbind(-1)]
        ctx.save_for_backward(queries, dot, inv_rms, weights, *sources)
        ctx.mark_non_differentiable(weights)
        return (*mixed, lse, weights)

    @staticmethod
    def backward(ctx, *grads):
        queries, dot, inv_rms, weights, *sources = ctx.saved_tensors
        *grad_mixed, grad_lse, _ = grads  # unused outputs' gradients arrive as zeros (materialize_grads)
        # (gradient, its <grad_mixed_j, v_i>) that phase 2 handed down for column j (see _Phase2)
        merged = [ctx.merge_dots.pop(j, (None, None)) for j in range(len(grad_mixed))]
        if ctx.kernels is not None:
            handed_down = [dots if grad is g else None for (grad, dots), g in zip(merged, grad_mixed)]
            grad_queries, *grad_sources = ctx.kernels.train_phase1_backward(
                queries, list(grad_mixed), grad_lse, handed_down, weights, dot, inv_rms, sources)
            return grad_queries, None, None, *grad_sources

        def softmax_backward(grad_weights):  # weights = exp(logits - lse); d lse / d logits = weights
            return weights * (grad_weights - (weights * grad_weights).sum(-2, keepdim=True) + grad_lse.unsqueeze(-2))

        if ctx.stacked:  # the same equations on [..., n, d] and [..., S, d] stacks
            values = torch.stack(sources, dim=-2).to(weights.dtype)
            grad_mixed = torch.stack(grad_mixed, dim=-2).to(weights.dtype)
            grad_values, grad_queries = _key_logits_backward(
                softmax_backward(values @ grad_mixed.mT), values, queries, dot, inv_rms)
            grad_values += weights @ grad_mixed  # mixed_j = sum_i weights_ij v_i
            return grad_queries, None, None, *(g.to(v.dtype) for g, v in zip(grad_values.unbind(-2), sources))
        grad_mixed = [g.to(weights.dtype) for g in grad_mixed]
        values = [v.to(weights.dtype) for v in sources]
        # mixed_j = sum_i weights_ij v_i, so d/d weights_ij = <grad_mixed_j, v_i>: phase 2's, if for this very gradient
        grad_weights = torch.stack(
            [dots if grad is g else _dots(g, values) for (grad, dots), g in zip(merged, grad_mixed)], dim=-1
        )
        grad_logits = softmax_backward(grad_weights)
        grad_queries, grad_sources = 0, []
        for i, (v, source) in enumerate(zip(values, sources)):
            grad_v, grad_q = _key_logits_backward(grad_logits[..., i, :], v, queries, dot[..., i, :], inv_rms[..., i, :])
            grad_v = _mix(weights[..., i, :].unbind(-1), grad_mixed, out=grad_v)
            grad_queries = grad_queries + grad_q
            grad_sources.append(grad_v.to(source.dtype))
        return grad_queries, None, None, *grad_sources


class _Phase2(torch.autograd.Function):
    """Phase 2 of the block's sublayer `column`: h = mixed + beta * (partial - mixed), and beta.

    The partial sum's key logit is taken here, so the backward builds its whole gradient in one buffer.
    d h / d beta needs `mixed`, a [tokens, d] tensor per sublayer; the backward recomputes its products
    with the gradient from the sources (alive anyway) instead of keeping it. Those products, scaled, are
    also what phase 1's backward needs for the gradient of `mixed` handed down here, so they are left
    for it in `merge_dots`: phase 1 uses them only for that very gradient tensor.
    """

    @staticmethod
    def forward(ctx, mixed, partial, query, lse, weights, eps, merge_dots, column, *sources):
        ctx.merge_dots, ctx.column = merge_dots, column
        # phase 1's result is not needed again: merge into it, no new buffer (unless it is not phase 1's own
        # buffer; a view: the stacked phase 1)
        in_place = not (mixed.is_leaf or mixed._is_view())
        ctx.kernels = _cpu_kernels(partial)  # `mixed` is phase 1's fp32 result wherever they apply
        if ctx.kernels is not None:
            h, beta, dot, inv_rms = ctx.kernels.train_phase2(mixed, partial, query, lse, eps, in_place)
        else:
            logit, dot, inv_rms = _key_logits(partial, query[:, None], eps)
            beta = torch.sigmoid(logit[..., 0] - lse)  # the partial sum's share
            p, weight = partial.to(mixed.dtype), beta.unsqueeze(-1)
            h = mixed.lerp_(p, weight) if in_place else torch.lerp(mixed, p, weight)
        ctx.save_for_backward(partial, query, dot, inv_rms, beta, weights, *sources)
        ctx.mark_non_differentiable(beta)
        if in_place:
            ctx.mark_dirty(mixed)
        return h, beta

    @staticmethod
    def backward(ctx, grad, _):
        partial, query, dot, inv_rms, beta, weights, *sources = ctx.saved_tensors
        if ctx.kernels is not None:
            grad_mixed, merge, grad_partial, grad_query, grad_lse = ctx.kernels.train_phase2_backward(
                grad, partial, query, dot, inv_rms, beta, weights, sources)
            ctx.merge_dots[ctx.column] = (grad_mixed, merge)
            return grad_mixed, grad_partial, grad_query, grad_lse, None, None, None, None, *(None for _ in sources)
        grad = grad.to(beta.dtype)
        scratch = torch.empty_like(grad)
        dots = _dots(grad, [partial, *sources], scratch)  # <grad, p>, <grad, v_i>
        # <grad, mixed> = sum_i weights_i <grad, v_i>; d beta / d logit = beta (1 - beta); d logit / d lse = -1
        grad_logit = (dots[..., 0] - torch.linalg.vecdot(weights, dots[..., 1:])) * beta * (1 - beta)
        grad_partial, grad_query = _key_logits_backward(grad_logit[..., None], partial, query[:, None], dot, inv_rms)
        grad_partial.addcmul_(grad, beta.unsqueeze(-1))
        grad_mixed = torch.mul(grad, (1 - beta).unsqueeze(-1), out=scratch)  # the dots are taken: reuse it
        ctx.merge_dots[ctx.column] = (grad_mixed, dots[..., 1:] * (1 - beta).unsqueeze(-1))
        grads = (grad_mixed, grad_partial.to(partial.dtype), grad_query[:, 0], -grad_logit)
        return *grads, None, None, None, None, *(None for _ in sources)


class SourceStack:
    """Block AttnRes inference: the completed sources side by side in one fp32 [N, ..., d] buffer.

    The pseudo-queries are parameters, so when a source completes, its key logits for every later
    sublayer and the final aggregation are known: one matmul per source, reading it once, instead of one
    per block. Phase 1 is then one batched matmul per block (each source read once, not once per
    sublayer) into an output buffer reused from block to block: fresh memory is slow on CPU (a page fault
    per 4 KiB), and glibc does not recycle blocks over 32 MiB (a block's S outputs are 38 MB at 4 x 512
    tokens, d = 576). The sublayers only read that buffer: phase 2 gives each its own input tensor, so
    nothing a sublayer or a hook holds is overwritten by the next block. When decoding, where each op's
    fixed cost is the whole cost, the same few ops per block and per sublayer replace stacking every
    source at every sublayer.
    """

    normed = False  # its results are h; the sublayers' RMSNorms read them

    def __init__(self, like: torch.Tensor, queries: torch.Tensor, block_size: int, eps: float):
        d = like.shape[-1]
        self.queries = queries  # [d, L + 1]: every sublayer's effective query, then the final aggregation's
        # times sqrt(d), as `_scaled_rms` is: a key logit is then one division
        self.scaled_queries = queries * math.sqrt(d)
        self.query_columns = self.scaled_queries.mT.unsqueeze(-1).unbind(0)  # [d, 1] each, contiguous
        self.rms_floor = queries.new_full((), math.sqrt(d * eps))
        self.block_size, self.eps = block_size, eps
        capacity = math.ceil((queries.shape[-1] - 1) / block_size) + 1
        self.values = like.new_empty(capacity, *like.shape, dtype=queries.dtype)  # each source contiguous
        # per source, its key logits for the query columns from its first reader on
        self.logits = like.new_empty(capacity, *like.shape[:-1], queries.shape[-1], dtype=queries.dtype)
        self.size, self.out = 0, None

    def _first_reader(self, source: int) -> int:
        """The first query column that attends over `source`: its block's first sublayer, or the final one."""
        return min(source * self.block_size, self.queries.shape[-1] - 1)

    def _scaled_rms(self, value: torch.Tensor) -> torch.Tensor:
        """sqrt(d) * rms(v), the key norm's eps included, [..., 1]: hypot(||v||, sqrt(d eps)), two ops."""
        return torch.hypot(torch.linalg.vector_norm(value, dim=-1, keepdim=True), self.rms_floor)

    def extend(self, sources: list[torch.Tensor]) -> None:
        """Take in the sources not stacked yet (the list grows by one completed block at a time)."""
        for source in sources[self.size :]:
            first = self._first_reader(self.size)
            value = self.values[self.size].copy_(source)
            dots = _times_queries(value, self.scaled_queries[:, first:])
            torch.div(dots, self._scaled_rms(value), out=self.logits[self.size, ..., first:])
            self.size += 1

    def _attend(self, first: int, last: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over the stacked sources for query columns [first, last), mixed into out [..., S, d].
        Returns the log-sum-exp [..., S] and the weights [..., n, S]."""
        n, d = self.size, self.values.shape[-1]
        logits = self.logits[:n, ..., first:last]  # [n, ..., S]
        lse = logits.logsumexp(dim=0)
        weights = (logits - lse).exp_()
        values = self.values[:n].view(n, -1, d).transpose(0, 1)  # [tokens, n, d], a view
        torch.bmm(weights.view(n, -1, last - first).permute(1, 2, 0), values, out=out.view(-1, last - first, d))
        return lse, weights.movedim(0, -2)

    def phase1(self, block: int, sources: list[torch.Tensor], keep_weights: bool) -> BlockPhase1:
        """Phase 1 for `block` over its completed `sources`."""
        self.extend(sources)
        first = block * self.block_size
        last = min(first + self.block_size, self.queries.shape[-1] - 1)
        if self.out is None or self.out.shape[-2] != last - first:
            self.out = self.values.new_empty(*self.values.shape[1:-1], last - first, self.values.shape[-1])
        lse, weights = self._attend(first, last, self.out)
        first_input, *others = self.out.unbind(-2)  # the block's first sublayer reads phase 1's result as is
        columns = tuple(zip(self.query_columns[first:last], lse.unsqueeze(-1).unbind(-2)))
        return BlockPhase1(sources, self.queries[:, first:last], self.eps, (first_input.clone(), *others), lse,
                           weights, {}, keep_weights, self, columns)

    def phase2(self, phase1: BlockPhase1, column: int, partial: torch.Tensor):
        """Phase 2 in inference: (h, beta) as `_Phase2`, beta only if the weights are kept; h is a tensor of
        its own. Blends by the completed sources' share 1 - beta = sigmoid(lse - w . RMSNorm(p)): one op less."""
        query, lse = phase1.columns[column]
        partial32 = _to(partial, self.values.dtype)
        rest = torch.addcdiv(lse, partial32 @ query, self._scaled_rms(partial32), value=-1).sigmoid_()
        h = torch.lerp(partial32, phase1.mixed[column], rest)
        return h, (1 - rest[..., 0] if phase1.keep_weights else None)

    def final(self, sources: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The final aggregation over all `sources`: (h, alpha), as `depth_attention`."""
        self.extend(sources)
        column = self.queries.shape[-1] - 1
        h = self.values.new_empty(*self.values.shape[1:-1], 1, self.values.shape[-1])
        _, alpha = self._attend(column, column + 1, h)
        return _to(h.squeeze(-2), sources[0].dtype), alpha.squeeze(-1)


# Fused CPU kernels for Block AttnRes, from the hf_attnres package (hf_attnres.kernels: a module built once with
# the system's C++ compiler). Without them, or without the package, the same equations run as torch ops:
# SourceStack's in inference, _Phase1's and _Phase2's under autograd.
FUSED_ABI = 5  # the kernels' interface this file calls
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# per generation (its cache): (model, input shape and dtype, layers) and the FusedSourceStack of its last step
_FUSED_STACKS: "weakref.WeakKeyDictionary[Cache, tuple]" = weakref.WeakKeyDictionary()


def _fused_kernels():
    """The hf_attnres package's fused CPU kernels if the package is imported (built on first use), else None."""
    kernels = sys.modules.get("hf_attnres.kernels")
    return None if kernels is None else kernels.get(FUSED_ABI)


class FusedSourceStack:
    """`SourceStack` in the fused kernels, for inference on CPU without depth weights: one call per block for
    phase 1 and one per sublayer for phase 2. Nothing is stacked or precomputed: on one token, with the
    decoder's weights streaming through the caches between calls, reading each source and each query once
    when needed is cheaper than any copy; on a prompt, so is reading each token's sources once per block
    (see the kernels' source). Where the RMSNorms reading the results allow it (`fusable_norms`), the calls
    return RMSNorm(h) (`normed`): h is read by nothing else in inference."""

    def __init__(self, decoder, block_size: int, eps: float):
        self.decoder, self.block_size, self.eps = decoder, block_size, eps
        self.normed = decoder.normalises
        self.final_column = decoder.columns() - 1
        # its two calls as builtins bound to it: in a decoding step a pybind11 method call costs several times
        # the phase it runs (see the kernels' source)
        self._phase1, self._phase2 = decoder.bound_calls()

    @classmethod
    def create(cls, kernels, like: torch.Tensor, params: tuple[list[torch.Tensor], list[torch.Tensor]],
               norms: tuple[list[torch.Tensor], list[float]], block_size: int, eps: float) -> "FusedSourceStack | None":
        """The stack for a forward on `like`, or None where a parameter is not a plain tensor on the CPU.
        `norms`: the weights and epsilons of the RMSNorms reading each query column's result, or two empty
        lists (the stack then returns h)."""
        d = like.shape[-1]
        decoder = kernels.Decoder.create(*params, *norms, like.numel() // d, d, block_size, eps)
        return None if decoder is None else cls(decoder, block_size, eps)

    def phase1(self, block: int, sources: list[torch.Tensor], keep_weights: bool) -> BlockPhase1:
        """Phase 1 for `block`: the first sublayer's input as `mixed[0]`; the others' results stay in the kernels."""
        first = block * self.block_size
        last = min(first + self.block_size, self.final_column)
        first_input = self._phase1(sources, first, last)
        return BlockPhase1(sources, None, self.eps, (first_input,), None, None, {}, False, self, (first,), self.normed)

    def phase2(self, phase1: BlockPhase1, column: int, partial: torch.Tensor):
        return self._phase2(partial, phase1.columns[0] + column, column), None

    def final(self, sources: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        return self._phase1(sources, self.final_column, self.final_column + 1), None


_RMSNORM_FORWARD = LlamaRMSNorm.forward


def fusable_norms(norms: list[nn.Module], like: torch.Tensor) -> bool:
    """Whether the fused kernels may apply `norms` themselves: each runs transformers' own LlamaRMSNorm forward
    (not a patched one), has no hooks (a hook must see its call) and a weight of `like`'s dtype (the output's
    dtype would differ otherwise). From the modules' own dicts, as `query_parameters`: decoding asks per token."""
    if _global_forward_hooks or _global_forward_pre_hooks:
        return False
    return all(type(norm).forward is _RMSNORM_FORWARD and not norm._forward_hooks and not norm._forward_pre_hooks
               and norm._parameters["weight"].dtype == like.dtype for norm in norms)


class _ReadingNorm(torch.autograd.Function):
    """norm(h in the model's dtype) in the fused kernels, for an fp32 depth-attention result h: one pass each way
    where the eager LlamaRMSNorm takes about six ops forward and ten backward over [tokens, d], and only h (and 1 /
    rms per token) kept for backward, not also its normalised copy."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, eps: float, kernels):
        x, inv_rms = kernels.train_norm(h, weight, eps)
        ctx.kernels = kernels
        ctx.save_for_backward(h, weight, inv_rms)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight, inv_rms = ctx.saved_tensors
        grad_h, grad_weight = ctx.kernels.train_norm_backward(grad, h, weight, inv_rms)
        return grad_h, grad_weight, None, None


def reading_norm(norm: nn.Module, h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """norm(h) for the depth-attention result `h` (fp32 or `like`'s dtype), as the module computes it from h in
    `like`'s dtype: through the fused CPU kernels where nothing could tell the difference (`fusable_norms`), else
    the module itself."""
    kernels = _cpu_kernels(like) if h.dtype == torch.float32 else None
    if kernels is not None and fusable_norms([norm], like):
        weight = norm._parameters["weight"]
        if type(weight) in _PLAIN and weight.device == h.device:  # not sharded (FSDP2's DTensor) or offloaded
            return _ReadingNorm.apply(h, weight, norm.variance_epsilon, kernels)
    return norm(_to(h, like.dtype))


def block_phase1(
    residuals: list["AttnResidual"], sources: list[torch.Tensor], keep_weights: bool = True
) -> BlockPhase1:
    """Phase 1 for the sublayers of one block (`residuals`, in order) over the completed `sources`."""
    queries = effective_queries(query_parameters(residuals), torch.promote_types(sources[0].dtype, torch.float32))
    eps = residuals[0].key_norm.variance_epsilon
    merge_dots = {}
    *mixed, lse, weights = _Phase1.apply(queries, eps, merge_dots, *sources)
    return BlockPhase1(sources, queries, eps, tuple(mixed), lse, weights, merge_dots, keep_weights)


def two_phase_attention(
    phase1: BlockPhase1, column: int, partial: torch.Tensor | None, norm: nn.Module
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depth attention of the block's `column`-th sublayer: phase 1's result merged with the partial sum.
    Returns (norm(h), alpha), alpha None unless `phase1.keep_weights`."""
    if partial is None:  # the block's first sublayer: every source is complete
        h, beta = phase1.mixed[column], None
    elif phase1.stack is not None:  # inference
        h, beta = phase1.stack.phase2(phase1, column, partial)
    else:
        mixed, query, lse = phase1.mixed[column], phase1.queries[:, column], phase1.lse[..., column]
        h, beta = _Phase2.apply(mixed, partial, query, lse, phase1.weights[..., column], phase1.eps,
                                phase1.merge_dots, column, *phase1.sources)
    x = h if phase1.normed else reading_norm(norm, h, phase1.sources[0])
    if not phase1.keep_weights:
        return x, None
    weights = phase1.weights[..., column]
    if beta is None:
        return x, weights
    return x, torch.cat([weights * (1 - beta).unsqueeze(-1), beta.unsqueeze(-1)], dim=-1)


class AttnResidual(nn.Module):
    """The attention residual in front of one sublayer: its pseudo-query w_l and its key RMSNorm.

    w_l starts at zero (the paper's initialisation), so the first weights are uniform over the sources.
    """

    def __init__(self, config: AttnResConfig):
        super().__init__()
        self.pseudo_query = nn.Parameter(torch.zeros(config.hidden_size))
        self.key_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, sources: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return depth_attention(self.pseudo_query, self.key_norm, sources)


def _reading_norm(config: AttnResConfig, sublayer: int) -> LlamaRMSNorm:
    """RMSNorm that reads the depth-attention output before `sublayer` (spec §4).

    With zero queries that output is the standard residual stream divided by n (the number of sources),
    and RMSNorm_eps(x / n) = RMSNorm_{eps n^2}(x): dividing eps by n^2 makes a converted Llama exact.
    """
    eps = config.rms_norm_eps
    if config.attn_res_mode != "none" and config.attn_res_scale_norm_eps:
        eps = eps / config.num_sources(sublayer) ** 2
    return LlamaRMSNorm(config.hidden_size, eps=eps)


# --------------------------------------------------------------------------------------------------------
# Decoder layer: the paper's layer pseudocode, with Llama's attention, MLP and norms
# --------------------------------------------------------------------------------------------------------
class AttnResDecoderLayer(GradientCheckpointingLayer):
    """One decoder layer = two sublayers (attention, MLP), each preceded by depth attention.

    The depth state is `sources = (b_0, ..., b_{n-1}, partial)`: completed block representations (b_0 is
    the embedding) and the running partial sum of the current block. With standard residuals (`"none"`)
    there are no blocks and `partial` is the ordinary residual stream.
    """

    def __init__(self, config: AttnResConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = ATTENTION_CLASSES[config.attn_res_backbone](config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        attn_sublayer, mlp_sublayer = 2 * layer_idx, 2 * layer_idx + 1
        self.input_layernorm = _reading_norm(config, attn_sublayer)
        self.post_attention_layernorm = _reading_norm(config, mlp_sublayer)
        if config.attn_res_mode != "none":
            self.self_attn_res = AttnResidual(config)
            self.mlp_res = AttnResidual(config)
        else:
            self.self_attn_res = self.mlp_res = None
        self.block_starts = (config.starts_block(attn_sublayer), config.starts_block(mlp_sublayer))
        size = config.sublayers_per_block or 1
        self.block_columns = (attn_sublayer % size, mlp_sublayer % size)  # position within the block

    def _sublayer_input(self, sublayer: int, blocks: list, partial: torch.Tensor, phase1: BlockPhase1 | None):
        """RMSNorm(h) for the sublayer (0: attention, 1: MLP), h = AttnRes(blocks, partial), and its depth
        weights alpha (or None). The norm is applied here: a fused source stack hands back RMSNorm(h) itself."""
        norm = self.input_layernorm if sublayer == 0 else self.post_attention_layernorm
        if phase1 is not None:  # Block AttnRes: phase 1 saw every source but this block's partial sum
            column = self.block_columns[sublayer]
            return two_phase_attention(phase1, column, None if column == 0 else partial, norm)
        attn_res = self.self_attn_res if sublayer == 0 else self.mlp_res
        if attn_res is None:  # standard residual: the sublayer reads the running sum itself
            return norm(partial), None
        h, alpha = attn_res(blocks + [partial])
        return norm(h), alpha

    def forward(
        self,
        *sources: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        phase1: BlockPhase1 | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None, tuple]:
        """`phase1`: the two-phase computation's first phase for this layer's block, if the model ran it
        (see `AttnResModel.block_phase1`); without it each sublayer attends over all its sources itself.
        The KV cache arrives in `kwargs` under the release's own name (`CACHE_ARG`) and goes on to the
        attention module as it came, like `use_cache` and the attention kwargs."""
        blocks, partial = list(sources[:-1]), sources[-1]

        # attention sublayer: x = RMSNorm(AttnRes(blocks, partial)); at a block boundary the partial sum is closed
        x, attn_alpha = self._sublayer_input(0, blocks, partial, phase1)
        if self.block_starts[0]:
            blocks, partial = blocks + [partial], None
        attn_out, attn_weights = self.self_attn(
            hidden_states=x,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        partial = attn_out if partial is None else partial + attn_out

        # MLP sublayer, the same way
        x, mlp_alpha = self._sublayer_input(1, blocks, partial, phase1)
        if self.block_starts[1]:
            blocks, partial = blocks + [partial], None
        mlp_out = self.mlp(x)
        partial = mlp_out if partial is None else partial + mlp_out

        return (*blocks, partial), attn_weights, (attn_alpha, mlp_alpha)


# --------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------
@dataclass
class AttnResModelOutput(BaseModelOutputWithPast):
    r"""
    depth_attentions (`tuple(torch.FloatTensor)`, returned with `output_depth_attentions=True`):
        The depth-attention weights alpha (fp32), one tensor of shape `(batch, seq_len, num_sources)` per
        sublayer in order (layer 0 attention, layer 0 MLP, layer 1 attention, ...) and one last for the final
        aggregation before the final norm. `config.source_names(i)` names the sources of entry `i`.
        Empty with standard residuals.
    """

    depth_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class AttnResCausalLMOutput(CausalLMOutputWithPast):
    r"""
    depth_attentions (`tuple(torch.FloatTensor)`, returned with `output_depth_attentions=True`):
        See [`AttnResModelOutput`].
    """

    depth_attentions: tuple[torch.Tensor, ...] | None = None


# --------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------
class AttnResPreTrainedModel(PreTrainedModel):
    config_class = AttnResConfig
    config: AttnResConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AttnResDecoderLayer"]
    _skip_keys_device_placement = [CACHE_ARG]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, AttnResidual):
            init.zeros_(module.pseudo_query)  # uniform depth weights at start, also for converted checkpoints


def _attn_residuals(layers) -> list[AttnResidual]:
    """The layers' attention residuals in sublayer order (attention, then MLP, per layer). From the modules'
    own dicts: nn.Module's attribute lookup costs about a microsecond, and decoding gathers these per token."""
    return [layer._modules[name] for layer in layers for name in ("self_attn_res", "mlp_res")]


_PLAIN = (nn.Parameter, torch.Tensor)  # not a tensor subclass such as FSDP2's DTensor


def _materialised(params: tuple[list[torch.Tensor], list[torch.Tensor]], like: torch.Tensor) -> bool:
    """Whether all `params` (see `query_parameters`) are plain, non-empty tensors on `like`'s device (not
    sharded or offloaded)."""
    device = like.device
    # the type itself, not `.data`'s: one less tensor per parameter, as decoding checks this for every token
    return all(type(p) in _PLAIN and p.numel() > 0 and p.device == device for p in itertools.chain(*params))


class AttnResModel(AttnResPreTrainedModel):
    def __init__(self, config: AttnResConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [AttnResDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.final_res = AttnResidual(config) if config.attn_res_mode != "none" else None
        self.norm = _reading_norm(config, config.num_sublayers)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def block_phase1(
        self, first_layer: int, sources: tuple[torch.Tensor, ...], stack: SourceStack | None = None,
        keep_weights: bool = True,
    ) -> BlockPhase1 | None:
        """Phase 1 of the two-phase computation (spec §5) for the block opening at `first_layer`, or None
        where each sublayer is better off attending on its own: Full AttnRes (one sublayer per block),
        decoding-sized inputs without a source stack (fewer ops without it), activation checkpointing (phase
        1's outputs would be kept across the block) and parameters not materialised yet. `stack`: see
        `_source_stack`."""
        if stack is not None:  # (its block size: no config read per block while decoding)
            return stack.phase1(2 * first_layer // stack.block_size, list(sources), keep_weights)
        if self.gradient_checkpointing and self.training:
            return None
        size = self.config.sublayers_per_block or 0
        return self._phase1(_attn_residuals(self.layers[first_layer : first_layer + size // 2]), sources, keep_weights)

    def _phase1(self, residuals: list[AttnResidual], sources, keep_weights: bool) -> BlockPhase1 | None:
        """`block_phase1` for `residuals` without a source stack, or None (see `block_phase1`)."""
        size = self.config.sublayers_per_block
        if size is None or size < 2 or _decoding(sources[0]):
            return None
        if not _materialised(query_parameters(residuals), sources[0]):
            # Later layers' parameters are sharded (FSDP, ZeRO-3), offloaded or on another device until their
            # own forward runs: read them only there, each sublayer attending on its own.
            return None
        return block_phase1(residuals, list(sources), keep_weights)

    def _final_aggregation(
        self, sources: list[torch.Tensor], stack: SourceStack | FusedSourceStack | None, keep_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(norm(h), alpha) of the final aggregation over all sources. Without a source stack Block AttnRes runs it
        as a phase 1 of one query: every source is complete, so that is all of it, and in training its autograd
        function costs a third of the eager ops'."""
        if stack is not None:
            h, alpha = stack.final(sources)
            return (h if stack.normed else self.norm(h)), alpha
        phase1 = self._phase1([self.final_res], sources, keep_weights)
        if phase1 is not None:
            return two_phase_attention(phase1, 0, None, self.norm)
        h, alpha = self.final_res(sources)
        return self.norm(h), alpha

    def _source_stack(
        self, inputs_embeds: torch.Tensor, layers: list[AttnResDecoderLayer], keep_weights: bool,
        cache: Cache | None = None,
    ) -> SourceStack | FusedSourceStack | None:
        """The source stack for a Block AttnRes inference forward over `layers`, or None: in training and while
        parameters are not all materialised here. Inference on CPU without depth weights (`keep_weights`) uses
        the fused kernels where they are loaded."""
        size = self.config.sublayers_per_block
        if torch.is_grad_enabled() or size is None or size < 2:
            return None
        kernels = None if keep_weights else _cpu_kernels(inputs_embeds)
        if kernels is not None:
            stack = self._fused_stack(kernels, inputs_embeds, layers, cache)
            if stack is not None:
                return stack
        params = self._stack_parameters(layers)
        if not _materialised(params, inputs_embeds):
            return None
        queries = effective_queries(params, torch.promote_types(inputs_embeds.dtype, torch.float32))
        return SourceStack(inputs_embeds, queries, size, self.final_res.key_norm.variance_epsilon)

    def _stack_parameters(self, layers: list[AttnResDecoderLayer]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`query_parameters` of every query column of a source stack: the layers' sublayers, then the final
        aggregation."""
        return query_parameters(_attn_residuals(layers) + [self.final_res])

    def _reading_norms(self, layers: list[AttnResDecoderLayer]) -> list[LlamaRMSNorm]:
        """The RMSNorm reading each query column's result, in `_stack_parameters`'s order (see `_attn_residuals`)."""
        names = ("input_layernorm", "post_attention_layernorm")
        return [layer._modules[name] for layer in layers for name in names] + [self._modules["norm"]]

    def _fused_stack(self, kernels, like: torch.Tensor, layers: list[AttnResDecoderLayer], cache: Cache | None):
        """A `FusedSourceStack` in `kernels`, or None where the parameters do not allow one.

        A decoding step reuses the previous step's stack of the same generation (the same cache, grown since,
        and the same input shape): gathering 4 L + 2 parameters from their modules costs about as much per
        token as the depth attention itself. Only a stack that reads the parameters themselves (all fp32) is
        kept, so it sees in-place changes of their values; a new or emptied cache starts a new one."""
        norms = self._reading_norms(layers)
        fused_norms = fusable_norms(norms, like)
        key = (weakref.ref(self), like.shape, like.dtype, len(layers), fused_norms)
        try:  # a cache class that cannot be hashed or weakly referenced gets no reuse
            kept = _FUSED_STACKS.get(cache) if cache is not None else None
        except TypeError:
            kept, cache = None, None
        if kept is not None and kept[0] == key and cache.get_seq_length() > 0:
            return kept[1]
        norm_parameters = ([n._parameters["weight"] for n in norms], [n.variance_epsilon for n in norms]) if (
            fused_norms) else ([], [])
        stack = FusedSourceStack.create(kernels, like, self._stack_parameters(layers), norm_parameters,
                                        self.config.sublayers_per_block, self.final_res.key_norm.variance_epsilon)
        # kept for decoding steps only: a prompt's stack holds its phase-1 buffer, [S, tokens, d]
        if cache is not None and stack is not None and stack.decoder.reads_parameters and _decoding(like):
            _FUSED_STACKS[cache] = (key, stack)
        return stack

    def _masks(self, attention_mask, inputs_embeds, cache, position_ids) -> dict:
        if isinstance(attention_mask, dict):  # already prepared, e.g. by generate()
            return attention_mask
        kwargs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      position_ids=position_ids, **{CACHE_ARG: cache})
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_depth_attentions: bool = False,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AttnResModelOutput:
        """Like `LlamaModel.forward`, plus `output_depth_attentions` (see [`AttnResModelOutput`]).

        The KV cache is accepted under both of its names (`past_key_values` until transformers 5.23, `cache`
        since 5.24), so the same file serves `generate` and callers of every supported release.

        `hidden_states[t]` is the sum of the depth sources entering layer t (the ordinary residual stream
        with `"none"`, and what it would be with zero pseudo-queries otherwise); the last entry is the
        final normalised output, as in Llama.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if cache is not None and past_key_values is not None:
            raise ValueError("Pass the KV cache once, as `cache` or as `past_key_values`, not both")
        cache = past_key_values if cache is None else cache
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]

        masks = self._masks(attention_mask, inputs_embeds, cache, position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)

        sources: tuple[torch.Tensor, ...] = (inputs_embeds,)
        all_hidden, all_attn, depth = [], [], []
        phase1 = None
        layers = list(itertools.islice(self.layers, self.config.num_hidden_layers))  # no ModuleList per token
        # one config read per forward, not one per layer (a config attribute costs microseconds in transformers 5)
        layer_masks = [masks[kind] for kind in self.config.layer_types[: len(layers)]]
        stack = self._source_stack(inputs_embeds, layers, output_depth_attentions, cache)
        for layer, mask in zip(layers, layer_masks):
            if output_hidden_states:
                all_hidden.append(sources[0] if len(sources) == 1 else torch.stack(sources).sum(0))
            if layer.block_starts[0]:
                phase1 = self.block_phase1(layer.layer_idx, sources, stack, output_depth_attentions)
            sources, attn_weights, alphas = layer(
                *sources,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                phase1=phase1,
                **{CACHE_ARG: cache},
                **kwargs,
            )
            all_attn.append(attn_weights)
            if output_depth_attentions:
                depth.extend(a for a in alphas if a is not None)

        if self.final_res is None:
            hidden_states = self.norm(sources[-1])
        else:
            hidden_states, final_alpha = self._final_aggregation(list(sources), stack, output_depth_attentions)
            depth.append(final_alpha)
        if output_hidden_states:
            all_hidden.append(hidden_states)

        return AttnResModelOutput(
            last_hidden_state=hidden_states,
            **{CACHE_ARG: cache if use_cache else None},
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            depth_attentions=tuple(depth) if output_depth_attentions else None,
        )


class AttnResForCausalLM(AttnResPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AttnResConfig):
        super().__init__(config)
        self.model = AttnResModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_depth_attentions: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AttnResCausalLMOutput:
        """Like `LlamaForCausalLM.forward`; the cache under either name, as in `AttnResModel.forward`."""
        outputs: AttnResModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_depth_attentions=output_depth_attentions,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return AttnResCausalLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_ARG: getattr(outputs, CACHE_ARG)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            depth_attentions=outputs.depth_attentions,
        )


__all__ = [
    "AttnResForCausalLM",
    "AttnResModel",
    "AttnResPreTrainedModel",
    "AttnResDecoderLayer",
    "AttnResidual",
    "depth_attention",
]
