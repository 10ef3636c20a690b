"""Attention Residuals (AttnRes; Kimi Team, arXiv 2603.15031) for transformers.

A standard PreNorm decoder adds every sublayer output into one running sum with weight 1. AttnRes replaces
that sum with softmax attention over depth: before each attention or MLP sublayer l, a learned pseudo-query
w_l attends over earlier sources v_i,

    alpha_{i->l} = softmax_i( w_l . RMSNorm(v_i) ),        h_l = sum_i alpha_{i->l} v_i,

where the sources are the token embedding and every earlier sublayer output (Full AttnRes) or the block
sums of those outputs (Block AttnRes). Everything else is the Llama decoder, reused from transformers.

Hub-portable: imports only torch, transformers, the standard library and the config file beside it.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention
from transformers.utils import logging

from .configuration_attnres import AttnResConfig

logger = logging.get_logger(__name__)

# Attention module of each supported family; MLP, RMSNorm and rotary embedding are Llama's in all of them.
ATTENTION_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaAttention,
    "mistral": MistralAttention,
    "qwen2": Qwen2Attention,
    "qwen3": Qwen3Attention,
}

# Child modules holding every AttnRes parameter (pseudo-queries and key norms), e.g. for PEFT's modules_to_save.
ATTN_RES_MODULE_NAMES = ["self_attn_res", "mlp_res", "final_res"]


# --------------------------------------------------------------------------------------------------------
# Depth attention (spec §2)
# --------------------------------------------------------------------------------------------------------
# Inference on at most this many tokens (decoding) stacks the sources; larger inputs go source by source.
STACKED_MAX_TOKENS = 64


def _key_logits(value: torch.Tensor, queries: torch.Tensor, eps: float):
    """(q_k . v / rms(v) for the k query columns, q . v, 1 / rms(v)), per token, in the queries' dtype."""
    value32 = value.to(queries.dtype)
    dot = value32 @ queries
    inv_rms = torch.rsqrt(torch.linalg.vector_norm(value32, dim=-1, keepdim=True).square() / value.shape[-1] + eps)
    return dot * inv_rms, dot, inv_rms


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
        d = value.shape[-1]
        value32 = value.to(queries.dtype)
        grad_dot = grad * inv_rms
        # d(q.v * inv_rms)/dv = inv_rms * q - q.v * inv_rms^3 * v / d
        grad_rms = -(grad * dot).sum(-1, keepdim=True) * inv_rms.pow(3) / d
        grad_value = (grad_dot @ queries.T).addcmul_(grad_rms, value32)
        grad_queries = value32.reshape(-1, d).T @ grad_dot.reshape(-1, queries.shape[-1])
        return grad_value.to(value.dtype), grad_queries, None


def key_logits(value: torch.Tensor, queries: torch.Tensor, eps: float) -> torch.Tensor:
    """w_k . RMSNorm(v) for every column of `queries` (the pseudo-queries times their key-norm weights)."""
    if torch.is_grad_enabled():
        return _KeyLogits.apply(value, queries, eps)
    return _key_logits(value, queries, eps)[0]


def effective_queries(attn_residuals: list["AttnResidual"], dtype: torch.dtype) -> torch.Tensor:
    """[d, k] matrix of w * gamma: RMSNorm(v) = gamma * v / rms(v), so w . RMSNorm(v) = (w * gamma) . v / rms(v)."""
    return torch.stack([r.pseudo_query.to(dtype) * r.key_norm.weight.to(dtype) for r in attn_residuals], dim=-1)


def depth_attention(
    pseudo_query: torch.Tensor,
    key_norm: LlamaRMSNorm,
    sources: list[torch.Tensor],
    known_logits: list[torch.Tensor] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_i = softmax_i(w . RMSNorm(v_i)) over the sources; returns h = sum_i alpha_i v_i and alpha.

    The key norm's weight folds into the query, so normalised keys are never materialised. Logits and
    softmax are fp32 whatever the model dtype; the values stay raw (un-normalised), as in the paper.
    `known_logits` are the logits of the first sources when already computed (two-phase computation).
    """
    dtype = torch.promote_types(sources[0].dtype, torch.float32)  # fp32 under bf16/fp16
    query = pseudo_query.to(dtype) * key_norm.weight.to(dtype)
    eps = key_norm.variance_epsilon
    grad = torch.is_grad_enabled()
    if not grad and sources[0][..., 0].numel() <= STACKED_MAX_TOKENS:
        # decoding: a handful of tokens, so the number of ops is the cost, not memory: stack once
        values = torch.stack(sources, dim=-2).to(dtype)
        logits = (values @ query) * torch.rsqrt(values.pow(2).mean(-1) + eps)
        alpha = logits.softmax(dim=-1)
        return (alpha.unsqueeze(-2) @ values).squeeze(-2).to(sources[0].dtype), alpha
    query = query[:, None]
    logits = [*known_logits, *(key_logits(v, query, eps)[..., 0] for v in sources[len(known_logits):])]
    alpha = torch.stack(logits, dim=-1).softmax(dim=-1)
    # The weighted sum accumulates in fp32 too: one rounding to bf16 at the end, not one per source.
    h = alpha[..., 0, None] * sources[0]
    for i in range(1, len(sources)):
        if grad:
            h = torch.addcmul(h, alpha[..., i, None], sources[i])
        else:  # inference: accumulate in place, no new buffer per source
            h.addcmul_(alpha[..., i, None], sources[i])
    return h.to(sources[0].dtype), alpha


class AttnResidual(nn.Module):
    """The attention residual in front of one sublayer: its pseudo-query w_l and its key RMSNorm.

    w_l starts at zero (the paper's initialisation), so the first weights are uniform over the sources.
    """

    def __init__(self, config: AttnResConfig):
        super().__init__()
        self.pseudo_query = nn.Parameter(torch.zeros(config.hidden_size))
        self.key_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, sources: list[torch.Tensor], known_logits=()) -> tuple[torch.Tensor, torch.Tensor]:
        return depth_attention(self.pseudo_query, self.key_norm, sources, known_logits)


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

    @staticmethod
    def _sublayer_input(attn_res: AttnResidual | None, blocks: list, partial: torch.Tensor, known=()):
        if attn_res is None:  # standard residual: the sublayer reads the running sum itself
            return partial, None
        return attn_res(blocks + [partial], known)

    def forward(
        self,
        *sources: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        block_logits: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None, tuple]:
        """`block_logits`: phase 1 of the two-phase computation, the logits of this block's sublayers
        against the sources completed before it (see `AttnResModel.block_logits`)."""
        blocks, partial = list(sources[:-1]), sources[-1]
        known = [[logits[..., column] for logits in block_logits or ()] for column in self.block_columns]

        # attention sublayer: h = AttnRes(blocks, partial); at a block boundary the partial sum is closed
        h, attn_alpha = self._sublayer_input(self.self_attn_res, blocks, partial, known[0])
        if self.block_starts[0]:
            blocks, partial = blocks + [partial], None
        attn_out, attn_weights = self.self_attn(
            hidden_states=self.input_layernorm(h),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            past_key_values=past_key_values,
            **kwargs,
        )
        partial = attn_out if partial is None else partial + attn_out

        # MLP sublayer, the same way
        h, mlp_alpha = self._sublayer_input(self.mlp_res, blocks, partial, known[1])
        if self.block_starts[1]:
            blocks, partial = blocks + [partial], None
        mlp_out = self.mlp(self.post_attention_layernorm(h))
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
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, AttnResidual):
            init.zeros_(module.pseudo_query)  # uniform depth weights at start, also for converted checkpoints


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

    def block_logits(self, first_layer: int, sources: tuple[torch.Tensor, ...]) -> list[torch.Tensor] | None:
        """Phase 1 of the paper's two-phase computation (spec §5).

        Pseudo-queries are parameters, so when a block opens, the logits of all its sublayers against the
        sources completed so far are one matrix product per source: [tokens, d] x [d, S] instead of S
        separate passes over each source (in training, likewise for the backward). Phase 2 (the partial
        sum of the current block, known only as the block runs) is handled by each sublayer. Skipped for
        Full AttnRes (one sublayer per block) and for decoding-sized inputs (fewer ops without it).
        """
        size = self.config.sublayers_per_block
        if size is None or size < 2 or not self.layers[first_layer].block_starts[0]:
            return None
        if not torch.is_grad_enabled() and sources[0][..., 0].numel() <= STACKED_MAX_TOKENS:
            return None
        layers = self.layers[first_layer : first_layer + size // 2]
        residuals = [r for layer in layers for r in (layer.self_attn_res, layer.mlp_res)]
        params = [p for r in residuals for p in (r.pseudo_query, r.key_norm.weight)]
        if not all(type(p.data) is torch.Tensor and p.numel() > 0 and p.device == sources[0].device for p in params):
            # Later layers' parameters are sharded (FSDP, ZeRO-3), offloaded or on another device until their
            # own forward runs: read them only there, each sublayer computing its own logits.
            return None
        queries = effective_queries(residuals, torch.promote_types(sources[0].dtype, torch.float32))
        eps = residuals[0].key_norm.variance_epsilon
        return [key_logits(v, queries, eps) for v in sources]

    def _masks(self, attention_mask, inputs_embeds, past_key_values, position_ids) -> dict:
        if isinstance(attention_mask, dict):  # already prepared, e.g. by generate()
            return attention_mask
        kwargs = dict(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_depth_attentions: bool = False,
        **kwargs,
    ) -> AttnResModelOutput:
        """Like `LlamaModel.forward`, plus `output_depth_attentions` (see [`AttnResModelOutput`]).

        `hidden_states[t]` is the sum of the depth sources entering layer t (the ordinary residual stream
        with `"none"`, and what it would be with zero pseudo-queries otherwise); the last entry is the
        final normalised output, as in Llama.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]

        masks = self._masks(attention_mask, inputs_embeds, past_key_values, position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)

        sources: tuple[torch.Tensor, ...] = (inputs_embeds,)
        all_hidden, all_attn, depth = [], [], []
        block_logits = None
        for layer in self.layers[: self.config.num_hidden_layers]:
            if output_hidden_states:
                all_hidden.append(sources[0] if len(sources) == 1 else torch.stack(sources).sum(0))
            if layer.block_starts[0]:
                block_logits = self.block_logits(layer.layer_idx, sources)
            sources, attn_weights, alphas = layer(
                *sources,
                attention_mask=masks[self.config.layer_types[layer.layer_idx]],
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                position_ids=position_ids,
                use_cache=use_cache,
                block_logits=block_logits,
                **kwargs,
            )
            all_attn.append(attn_weights)
            depth.extend(a for a in alphas if a is not None)

        if self.final_res is None:
            hidden_states = sources[-1]
        else:
            hidden_states, final_alpha = self.final_res(list(sources))
            depth.append(final_alpha)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)

        return AttnResModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_depth_attentions: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AttnResCausalLMOutput | tuple:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_depth_attentions=output_depth_attentions,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        output = AttnResCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            depth_attentions=outputs.depth_attentions,
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = [
    "AttnResForCausalLM",
    "AttnResModel",
    "AttnResPreTrainedModel",
    "AttnResDecoderLayer",
    "AttnResidual",
    "depth_attention",
]
