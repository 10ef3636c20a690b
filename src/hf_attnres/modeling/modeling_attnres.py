"""Attention Residuals (AttnRes; Kimi Team, arXiv 2603.15031) for transformers.

A standard PreNorm decoder adds every sublayer output into one running sum with weight 1. AttnRes replaces
that sum with softmax attention over depth: before each attention or MLP sublayer l, a learned pseudo-query
w_l attends over earlier sources v_i,

    alpha_{i->l} = softmax_i( w_l . RMSNorm(v_i) ),        h_l = sum_i alpha_{i->l} v_i,

where the sources are the token embedding and every earlier sublayer output (Full AttnRes) or the block
sums of those outputs (Block AttnRes). Everything else is the Llama decoder, reused from transformers.

`depth_attention` is that equation, the reference implementation (`attn_res_implementation="eager"`); others
register by name in `DepthAttentionInterface`, as attention backends do in `AttentionInterface` (`import
hf_attnres` adds the package's). The default, `"auto"`, is fla-core's kernel on CUDA where installed, else this.
Hub-portable: imports only torch, transformers, the standard library and the config file beside it.
"""

import functools
import importlib.util
import warnings
from collections.abc import Callable, Sequence
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
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import GeneralInterface

from .configuration_attnres import AttnResConfig

logger = logging.get_logger(__name__)

# Attention module of each supported family; MLP, RMSNorm and rotary embedding are Llama's in all of them.
ATTENTION_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaAttention,
    "mistral": MistralAttention,
    "qwen2": Qwen2Attention,
    "qwen3": Qwen3Attention,
}

# transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (for `generate`, layers, masks, outputs).
# The installed release's name, read off its own output class: Hub code runs on whatever release users have.
CACHE_ARG = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# Child modules holding every AttnRes parameter (pseudo-queries and key norms), e.g. for PEFT's modules_to_save.
ATTN_RES_MODULE_NAMES = ["self_attn_res", "mlp_res", "final_res"]


# ---- Depth attention (spec §2) ----
def inverse_rms(value: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / rms(v) per token, fp32: the key RMSNorm's scale of a source. Every key norm has the model's eps, so
    each source's is computed once, when the source is made, and shared by every sublayer that reads it."""
    mean_square = torch.linalg.vector_norm(value, dim=-1, dtype=torch.float32).square() / value.shape[-1]
    return torch.rsqrt(mean_square + eps)


def depth_attention(
    pseudo_query: torch.Tensor, key_norm_weight: torch.Tensor, sources: list[torch.Tensor], inv_rms: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_i = softmax_i(w . RMSNorm(v_i)) over the sources; returns h = sum_i alpha_i v_i and alpha.

    RMSNorm(v) = gamma * v / rms(v), so w . RMSNorm(v) = (w * gamma) . v * inv_rms(v): the key norm's weight
    folds into the query and no normalised key is materialised (`inv_rms[i]`: `inverse_rms(sources[i])`).
    Logits, softmax and the sum are fp32 whatever the model dtype; the values stay raw. Each source is read on
    its own (its dot with the query, its share of h) and only per-token scalars are stacked: under autograd
    nothing keeps a stacked or normalised copy of the sources, so training memory stays Llama's (in fp32; under
    bf16 the fp32 casts are kept too).
    """
    dtype = torch.promote_types(sources[0].dtype, torch.float32)
    query = pseudo_query.to(dtype) * key_norm_weight.to(dtype)
    values = [value.to(dtype) for value in sources]
    logits = torch.stack([value @ query for value in values], dim=-1) * torch.stack(inv_rms, dim=-1)
    alpha = logits.softmax(dim=-1)
    weights = alpha.unsqueeze(-1).unbind(dim=-2)
    h = weights[0] * values[0]
    for weight, value in zip(weights[1:], values[1:]):
        h.addcmul_(weight, value)  # in place also under autograd: backward needs the weights and values, not h
    return h.to(sources[0].dtype), alpha


def eager_depth_attention(
    module: "AttnResidual", sources: list[torch.Tensor], inv_rms: Sequence[torch.Tensor] = (), **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """`inv_rms`: those of the leading sources the model already holds (the completed blocks); the rest here."""
    eps = module.key_norm.variance_epsilon
    inv_rms = [*inv_rms, *(inverse_rms(value, eps) for value in sources[len(inv_rms):])]
    return depth_attention(module.pseudo_query, module.key_norm.weight, sources, inv_rms)


# Optional packages providing implementations, found here so that Hub folders use them too (never required):
# fla-core's fused Triton kernel, `fla.ops.attnres.fused_attnres`, imported by name on first use on CUDA.
FLA_AVAILABLE = importlib.util.find_spec("fla") is not None
FLA_DEVICES = ("cuda",)  # where its kernel runs (the tests add "cpu" under Triton's interpreter)


@functools.cache
def _fla_fused_attnres() -> Callable | None:
    try:
        return importlib.import_module("fla.ops.attnres").fused_attnres
    except Exception as error:  # installed but unusable (e.g. no working triton): the reference runs
        logger.warning(f"fla-core is installed but its AttnRes kernel does not import ({error!r}); using 'eager'.")
        return None


def fla_depth_attention(module: "AttnResidual", sources: list[torch.Tensor], **kwargs):
    """fla's kernel where it runs (CUDA, sources of one dtype, not under torch.compile, which fuses the
    reference); the reference elsewhere. Its output norm is not used: it cannot take the reading norm's eps/n^2."""
    usable = sources[0].device.type in FLA_DEVICES and not torch.compiler.is_compiling()
    fused = _fla_fused_attnres() if usable and len({s.dtype for s in sources}) == 1 else None
    if fused is None:
        return eager_depth_attention(module, sources, **kwargs)
    h, alpha = fused(module.pseudo_query, sources, module.key_norm.weight,
                     rms_eps=module.key_norm.variance_epsilon, return_weights=True)
    return h, alpha.movedim(0, -1)  # weights [n, ...] -> [..., n]


class DepthAttentionInterface(GeneralInterface):
    """Depth-attention implementations by name, selected by `config.attn_res_implementation`.

    `fn(module, sources, inv_rms, depth_context, depth_modules) -> (h, alpha)` computes `depth_attention` for
    `module` (an `AttnResidual`: `pseudo_query`, `key_norm`, `sublayer`, `config`) over `sources` (the last one
    the partial block sum unless `module` opens a block); `inv_rms` holds the `inverse_rms` of the completed
    blocks among them (empty when called on its own). `depth_context` is a dict living for one forward, where
    an implementation may share work between a block's sublayers (None under activation checkpointing, whose
    recomputation must not reuse it); `depth_modules` lists every `AttnResidual` in sublayer order.
    """

    _global_mapping: dict[str, Callable] = {
        "eager": eager_depth_attention,
        "auto": fla_depth_attention if FLA_AVAILABLE else eager_depth_attention,
        **({"fla": fla_depth_attention} if FLA_AVAILABLE else {}),
    }


ALL_DEPTH_ATTENTION_FUNCTIONS = DepthAttentionInterface()


class AttnResidual(nn.Module):
    """The attention residual in front of sublayer `sublayer` (or the final aggregation, `num_sublayers`):
    its pseudo-query w_l and its key RMSNorm. w_l starts at zero (the paper's initialisation), so the first
    weights are uniform over the sources."""

    def __init__(self, config: AttnResConfig, sublayer: int):
        super().__init__()
        self.config = config
        self.sublayer = sublayer
        self.pseudo_query = nn.Parameter(torch.zeros(config.hidden_size))
        self.key_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, sources: list[torch.Tensor], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        depth_attention_fn = ALL_DEPTH_ATTENTION_FUNCTIONS[self.config.attn_res_implementation]
        return depth_attention_fn(self, sources, **kwargs)


def reading_norm(config: AttnResConfig, sublayer: int) -> LlamaRMSNorm:
    """RMSNorm that reads the depth-attention output before `sublayer` (spec §4).

    With zero queries that output is the standard residual stream divided by n (the number of sources),
    and RMSNorm_eps(x / n) = RMSNorm_{eps n^2}(x): dividing eps by n^2 makes a converted Llama exact.
    """
    eps = config.rms_norm_eps
    if config.attn_res_mode != "none" and config.attn_res_scale_norm_eps:
        eps = eps / config.num_sources(sublayer) ** 2
    return LlamaRMSNorm(config.hidden_size, eps=eps)


# ---- Decoder layer: the paper's pseudocode, with Llama's attention, MLP and norms ----
def split_depth_state(state) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """`(*blocks, *inv_rms, partial_block)`, as the layers pass it on, -> `(blocks, inv_rms, partial_block)`."""
    n = len(state) // 2
    return list(state[:n]), list(state[n:-1]), state[-1]


class AttnResDecoderLayer(GradientCheckpointingLayer):
    """One decoder layer = two sublayers (attention, MLP), each preceded by depth attention.

    The depth state is `(*blocks, *inv_rms, partial_block)`: the completed block representations (`blocks[0]` is
    the embedding), their `inverse_rms`, and the running sum of the current block's outputs, passed as separate
    tensors so that activation checkpointing (reentrant or not) sees and trains every one of them. With
    standard residuals (`"none"`) there are no blocks and `partial_block` is the ordinary residual stream.
    """

    def __init__(self, config: AttnResConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = ATTENTION_CLASSES[config.attn_res_backbone](config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        attn_sublayer, mlp_sublayer = 2 * layer_idx, 2 * layer_idx + 1
        self.input_layernorm = reading_norm(config, attn_sublayer)
        self.post_attention_layernorm = reading_norm(config, mlp_sublayer)
        with_res = config.attn_res_mode != "none"
        self.self_attn_res = AttnResidual(config, attn_sublayer) if with_res else None
        self.mlp_res = AttnResidual(config, mlp_sublayer) if with_res else None
        self.attn_starts_block = config.starts_block(attn_sublayer)
        self.mlp_starts_block = config.starts_block(mlp_sublayer)

    def forward(
        self,
        *state: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        depth_context: dict | None = None,
        depth_modules: tuple["AttnResidual", ...] = (),
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor | None, ...]:
        """Returns `(*blocks, *inv_rms, partial_block, attn_weights, attn_alpha, mlp_alpha)`, a flat tuple. The KV
        cache arrives in `kwargs` under the release's own name (`CACHE_ARG`) and goes on to the attention module."""
        blocks, inv_rms, partial_block = split_depth_state(state)
        depth = {"depth_context": depth_context, "depth_modules": depth_modules}

        # attention sublayer: a block boundary closes the partial sum, then h = AttnRes(blocks, partial)
        if self.attn_starts_block:
            blocks, inv_rms, partial_block = self._close_block(self.self_attn_res, blocks, inv_rms, partial_block)
        h, attn_alpha = self._depth(self.self_attn_res, blocks, inv_rms, partial_block, depth)
        attn_out, attn_weights = self.self_attn(
            hidden_states=self.input_layernorm(h),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        partial_block = attn_out if partial_block is None else partial_block + attn_out

        # MLP sublayer, the same way
        if self.mlp_starts_block:
            blocks, inv_rms, partial_block = self._close_block(self.mlp_res, blocks, inv_rms, partial_block)
        h, mlp_alpha = self._depth(self.mlp_res, blocks, inv_rms, partial_block, depth)
        mlp_out = self.mlp(self.post_attention_layernorm(h))
        partial_block = mlp_out if partial_block is None else partial_block + mlp_out

        return (*blocks, *inv_rms, partial_block, attn_weights, attn_alpha, mlp_alpha)

    @staticmethod
    def _close_block(attn_res: AttnResidual, blocks, inv_rms, partial_block):
        """The partial sum becomes a block representation; its key-norm scale is computed once, here."""
        eps = attn_res.key_norm.variance_epsilon
        return blocks + [partial_block], inv_rms + [inverse_rms(partial_block, eps)], None

    @staticmethod
    def _depth(attn_res: AttnResidual | None, blocks, inv_rms, partial_block, depth: dict):
        if attn_res is None:  # standard residual: the sublayer reads the running sum itself
            return partial_block, None
        sources = blocks if partial_block is None else blocks + [partial_block]
        return attn_res(sources, inv_rms=inv_rms, **depth)


# ---- Outputs and models ----
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
    _can_compile_fullgraph = True  # tests/test_features.py: no graph break in training or generation

    def __init__(self, config: AttnResConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        name = config.attn_res_implementation
        if name not in ALL_DEPTH_ATTENTION_FUNCTIONS:
            logger.warning(
                f"attn_res_implementation={name!r} is not available here (it comes with a package that is not "
                f"installed or imported); using 'eager'. Available: {sorted(ALL_DEPTH_ATTENTION_FUNCTIONS)}."
            )
            config.attn_res_implementation = "eager"

    def set_attn_res_implementation(self, name: str) -> None:
        """Switch the depth-attention implementation of this (loaded) model, e.g. `"eager"`."""
        if name not in ALL_DEPTH_ATTENTION_FUNCTIONS:
            raise ValueError(
                f"attn_res_implementation={name!r} is not registered: use one of "
                f"{sorted(ALL_DEPTH_ATTENTION_FUNCTIONS)} (`import hf_attnres` adds the package's own)."
            )
        self.config.attn_res_implementation = name

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
        with_res = config.attn_res_mode != "none"
        self.final_res = AttnResidual(config, config.num_sublayers) if with_res else None
        self.norm = reading_norm(config, config.num_sublayers)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

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
        if past_key_values is not None and CACHE_ARG == "cache":  # as Llama's forward warns on these releases
            warnings.warn("`past_key_values` is deprecated since transformers 5.24: pass the KV cache as `cache`.",
                          FutureWarning, stacklevel=2)
        cache = past_key_values if cache is None else cache
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        use_cache = self.config.use_cache if use_cache is None else use_cache
        checkpointing = self.gradient_checkpointing and self.training
        if checkpointing:
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
        layer_types = self.config.layer_types
        depth_modules = tuple(m for layer in self.layers for m in (layer.self_attn_res, layer.mlp_res))
        depth_modules += (self.final_res,)
        # shared work between the sublayers of one forward; none under checkpointing, which recomputes layers
        depth_context = None if checkpointing else {}

        state: tuple[torch.Tensor, ...] = (inputs_embeds,)  # (*blocks, *inv_rms, partial_block), see the layer
        all_hidden, all_attn, depth = [], [], []
        for layer in self.layers[: self.config.num_hidden_layers]:
            if output_hidden_states:
                blocks, _, partial_block = split_depth_state(state)
                sources = [*blocks, partial_block]
                all_hidden.append(sum(sources[1:], sources[0]))
            *state, attn_weights, attn_alpha, mlp_alpha = layer(
                *state,
                attention_mask=masks[layer_types[layer.layer_idx]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                depth_context=depth_context,
                depth_modules=depth_modules,
                **{CACHE_ARG: cache},
                **kwargs,
            )
            all_attn.append(attn_weights)
            depth += [a for a in (attn_alpha, mlp_alpha) if a is not None]

        if self.final_res is None:  # standard residuals: the stream is the one source
            hidden_states = self.norm(state[-1])
        else:  # the final aggregation attends over every source, then the final norm reads it (spec §3)
            blocks, inv_rms, partial_block = split_depth_state(state)
            h, final_alpha = self.final_res([*blocks, partial_block], inv_rms=inv_rms, depth_context=depth_context,
                                            depth_modules=depth_modules)
            hidden_states = self.norm(h)
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
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

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


__all__ = ["AttnResForCausalLM", "AttnResModel", "AttnResPreTrainedModel", "AttnResDecoderLayer", "AttnResidual",
           "DepthAttentionInterface", "depth_attention"]
