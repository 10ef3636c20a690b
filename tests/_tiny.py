"""Tiny random models shared by the tests (hidden 64, a few layers): fast, but every code path is real."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_attnres import AttnResConfig, AttnResForCausalLM

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_llama(seed: int = 0, embed_std: float | None = None, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # non-trivial norm weights, so a mix-up between norms shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        if embed_std is not None:
            model.model.embed_tokens.weight.normal_(0, embed_std)
    return model.eval()


def attnres_from_llama(llama: LlamaForCausalLM, mode: str = "block", **overrides) -> AttnResForCausalLM:
    """AttnRes model carrying `llama`'s weights (pseudo-queries zero, key norms one)."""
    fields = {k: v for k, v in llama.config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    fields.pop("model_type", None)
    config = AttnResConfig(**{**fields, "attn_res_mode": mode, **overrides})
    model = AttnResForCausalLM(config)
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and all("_res." in k for k in missing), (missing, unexpected)
    return model.eval()


def randomize_attn_res(model: AttnResForCausalLM, seed: int = 1, std: float = 0.5) -> AttnResForCausalLM:
    """Non-zero pseudo-queries and non-unit key norms, so the depth weights are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pseudo_query"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "_res.key_norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def tiny_attnres(mode: str = "block", seed: int = 0, random_queries: bool = True, **overrides):
    llama_fields = {k: v for k, v in overrides.items() if k in LlamaConfig.__dataclass_fields__}
    attn_res_fields = {k: v for k, v in overrides.items() if k not in llama_fields}
    model = attnres_from_llama(tiny_llama(seed, **llama_fields), mode, **attn_res_fields)
    return randomize_attn_res(model) if random_queries and mode != "none" else model


def token_ids(batch: int = 2, seq: int = 11, seed: int = 0, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)



def _implementations() -> list[str]:
    from hf_attnres.modeling.modeling_attnres import ALL_DEPTH_ATTENTION_FUNCTIONS

    return sorted(ALL_DEPTH_ATTENTION_FUNCTIONS)


# every registered depth-attention implementation (import hf_attnres adds the package's own)
IMPLEMENTATIONS = _implementations()
