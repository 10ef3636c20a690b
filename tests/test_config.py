"""AttnResConfig: Llama fields, defaults, validation, version field, Auto registration."""

import json
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig

import hf_attnres
from hf_attnres import AttnResConfig, AttnResForCausalLM, AttnResModel
from hf_attnres.modeling.configuration_attnres import ATTNRES_VERSION


def test_every_llama_field_is_accepted():
    llama_fields = set(LlamaConfig.__dataclass_fields__)
    assert llama_fields <= set(AttnResConfig.__dataclass_fields__)
    cfg = AttnResConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32, attention_bias=True,
        mlp_bias=True, tie_word_embeddings=True, num_hidden_layers=2, intermediate_size=96, vocab_size=50,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    model = AttnResForCausalLM(cfg)
    assert model.model.layers[0].self_attn.q_proj.out_features == 4 * 32  # custom head_dim
    assert model.model.layers[0].self_attn.k_proj.bias is not None and model.model.layers[0].mlp.up_proj.bias is not None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert model.model.rotary_emb.rope_type == "llama3"


@pytest.mark.parametrize("layers, expected_size, expected_blocks", [(30, 8, 8), (32, 8, 8), (12, 4, 6), (2, 2, 2), (48, 12, 8)])
def test_default_block_size(layers, expected_size, expected_blocks):
    """The smallest even size giving at most 8 blocks; the last block holds the rest."""
    cfg = AttnResConfig(num_hidden_layers=layers, hidden_size=64, num_attention_heads=4)
    assert cfg.attn_res_block_size == expected_size and cfg.num_blocks == expected_blocks
    smaller = expected_size - 2
    assert smaller < 2 or -(-2 * layers // smaller) > 8


def test_block_boundaries_fall_between_layers_and_last_block_holds_rest():
    cfg = AttnResConfig(num_hidden_layers=5, hidden_size=64, num_attention_heads=4, attn_res_block_size=4)
    starts = [s for s in range(cfg.num_sublayers) if cfg.starts_block(s)]
    assert starts == [0, 4, 8] and all(s % 2 == 0 for s in starts)
    assert [cfg.num_sources(s) for s in range(10)] == [1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert cfg.num_sources(cfg.num_sublayers) == 4  # embedding + blocks of 4, 4 and 2 sublayers
    assert cfg.source_names(5) == ["embedding", "block 1", "block 2 (partial)"]
    assert cfg.source_names(10) == ["embedding", "block 1", "block 2", "block 3"]


@pytest.mark.parametrize("field, value, allowed", [
    ("attn_res_mode", "blocks", "block"),
    ("attn_res_block_size", 3, "even"),
    ("attn_res_block_size", 0, "even"),
    ("attn_res_backbone", "gpt2", "llama"),
])
def test_invalid_values_raise_value_error_naming_field(field, value, allowed):
    with pytest.raises(ValueError) as err:
        AttnResConfig(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value) and allowed in str(err.value)


def test_version_written_and_newer_version_warns(tmp_path):
    cfg = AttnResConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4)
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["attnres_version"] == ATTNRES_VERSION
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AttnResConfig.from_pretrained(tmp_path)  # same version: silent
    data["attnres_version"] = "99.0.0"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="newer"):
        AttnResConfig.from_pretrained(tmp_path)


def test_import_registers_auto_classes(tmp_path):
    assert hf_attnres.__version__ == ATTNRES_VERSION
    cfg = AutoConfig.for_model("attnres", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                               intermediate_size=96, vocab_size=50)
    assert isinstance(cfg, AttnResConfig)
    assert isinstance(AutoModelForCausalLM.from_config(cfg), AttnResForCausalLM)
    assert isinstance(AutoModel.from_config(cfg), AttnResModel)
    AttnResForCausalLM(cfg).save_pretrained(tmp_path)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), AttnResForCausalLM)


def test_attn_res_parameters_live_in_small_child_modules():
    model = AttnResForCausalLM(AttnResConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                             intermediate_size=96, vocab_size=50))
    names = [n for n, _ in model.named_parameters() if "_res." in n]
    assert len(names) == 2 * (2 * 2 + 1)
    for n in names:
        module = n.split(".")[-2] if n.endswith("pseudo_query") else n.split(".")[-3]
        assert module in hf_attnres.ATTN_RES_MODULE_NAMES, n
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if n.endswith("pseudo_query"))
