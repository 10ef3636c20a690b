"""Shared pytest set-up: tests run offline, on CPU, deterministically."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # for the tests' own helpers (_tiny.py)


# ---- insp_: fixtures of the inspection tests (tests/test_inspection*.py) ----
import pytest as _insp_pytest


@_insp_pytest.fixture(scope="session")
def insp_tokenizer():
    """Offline character-level tokenizer (printable ASCII, ids < 100) with eos and pad tokens."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2}
    for ch in string.printable[:95]:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


@_insp_pytest.fixture(scope="session")
def insp_make_model():
    """Factory of tiny random models: `make(mode, layers=3, hidden=32, block_size=2, queries="random")`.

    mode "block"/"full"/"none" gives an AttnResForCausalLM, "llama" a plain LlamaForCausalLM. `queries`:
    "random" (non-uniform depth weights) or "zero" (the paper's initialisation).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_attnres import AttnResConfig, AttnResForCausalLM

    def make(mode="block", layers=3, hidden=32, block_size=2, queries="random", seed=0):
        torch.manual_seed(seed)
        common = dict(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=1, eos_token_id=2, bos_token_id=2, attn_implementation="eager")
        if mode == "llama":
            return LlamaForCausalLM(LlamaConfig(**common)).eval()
        extra = {"attn_res_block_size": block_size} if mode == "block" else {}
        model = AttnResForCausalLM(AttnResConfig(attn_res_mode=mode, **extra, **common)).eval()
        if queries == "random" and mode != "none":
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("pseudo_query"):
                        p.normal_(0.0, 1.0)
        return model

    return make


# ---- conv_: fixtures of the conversion tests (tests/test_conversion*.py) ----
import pytest as _conv_pytest


@_conv_pytest.fixture(scope="session")
def conv_tiny_checkpoint(tmp_path_factory):
    """Factory `make(family="llama", **config_overrides) -> (folder, model)`: a tiny random checkpoint saved
    with `save_pretrained` (cached per arguments). Every weight is random, norms included and biases non-zero,
    so a mix-up of any tensor shows in the logits; rms_norm_eps is large so a wrong epsilon shows too."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    cache = {}

    def make(family: str = "llama", max_shard_size: str = "50GB", seed: int = 0, **overrides):
        key = (family, max_shard_size, seed, repr(sorted(overrides.items())))
        if key not in cache:
            config_cls, model_cls = classes[family]
            dims = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        rms_norm_eps=1e-2, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
            torch.manual_seed(seed)
            model = model_cls(config_cls(**{**dims, **overrides})).eval()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.uniform_(0.5, 1.5)
                    else:
                        p.normal_(0.0, 0.1)
            folder = tmp_path_factory.mktemp(f"conv-src-{family}")
            model.save_pretrained(folder, max_shard_size=max_shard_size)
            cache[key] = (folder, model)
        return cache[key]

    return make


@_conv_pytest.fixture()
def fresh_accelerate():
    """Accelerate's process-wide state reset before and after: each in-process training run starts clean."""
    from test_training_helpers import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()
