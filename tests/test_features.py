"""Attention implementations, outputs, activation checkpointing, torch.compile, PEFT targeting."""

import pytest
import torch

from _tiny import IMPLEMENTATIONS, tiny_attnres, token_ids
from hf_attnres.modeling.modeling_attnres import CACHE_ARG


def logits_with(impl, mode="block", **kw):
    model = tiny_attnres(mode, attn_implementation=impl, **kw)
    with torch.no_grad():
        return model(token_ids(), **{k: v for k, v in kw.items() if k.startswith("output_")})


@pytest.mark.parametrize("mode", ["block", "full"])
def test_eager_equals_sdpa(mode):
    eager = logits_with("eager", mode).logits
    sdpa = logits_with("sdpa", mode).logits
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)


def test_set_attn_implementation_switches_backend():
    model = tiny_attnres("block", attn_implementation="sdpa")
    ids = token_ids()
    with torch.no_grad():
        before = model(ids).logits
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        out = model(ids, output_attentions=True)
    torch.testing.assert_close(out.logits, before, rtol=1e-5, atol=1e-5)
    assert len(out.attentions) == model.config.num_hidden_layers
    assert out.attentions[0].shape == (2, model.config.num_attention_heads, 11, 11)


def test_flex_attention_on_cpu():
    try:
        flex = logits_with("flex_attention").logits
    except Exception as e:  # noqa: BLE001 - report why the backend is unavailable here
        pytest.skip(f"flex_attention does not run on this CPU build: {type(e).__name__}: {e}"[:300])
    torch.testing.assert_close(flex, logits_with("sdpa").logits, rtol=1e-4, atol=1e-4)


def enable_checkpointing(model, use_reentrant: bool) -> None:
    """As a Trainer does: the release's current name where it has one (5.23+), the old one before."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["block", "full"])
def test_activation_checkpointing_trains_every_parameter(mode, impl, use_reentrant):
    """The same gradients with and without checkpointing, for every parameter (reentrant checkpointing only
    sees tensors a layer returns at top level: a nested tuple would leave every layer's gradient None)."""
    ids = token_ids(seq=16)

    def gradients(checkpointing: bool) -> dict:
        model = tiny_attnres(mode, attn_res_implementation=impl).train()
        if checkpointing:
            enable_checkpointing(model, use_reentrant)
            assert model.model.layers[0].gradient_checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    default, checkpointed = gradients(False), gradients(True)
    assert default.keys() == checkpointed.keys()
    for name, g in default.items():
        assert checkpointed[name] is not None, f"{name} gets no gradient under checkpointing"
        # the same ops recomputed; two_phase shares nothing across checkpointed layers (another summation
        # order): measured 1.7e-6 of each gradient's largest entry, fp32 rounding
        assert (checkpointed[name] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-8, name


@pytest.mark.parametrize("mode", ["block", "full"])
def test_torch_compile_has_no_graph_breaks(mode):
    """The reference path compiles as one graph (`fullgraph=True` raises at any break), for a prompt, a cached
    decoding step and a training step; the compiled model computes what the eager one does."""
    torch.compiler.reset()  # dynamo's recompile limit counts per code object, across tests
    model = tiny_attnres(mode).eval()
    assert model._can_compile_fullgraph
    ids = token_ids()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager_out = model(ids, use_cache=True)
        out = compiled(ids, use_cache=True)
        torch.testing.assert_close(out.logits, eager_out.logits, rtol=1e-5, atol=1e-5)
        step = compiled(ids[:, -1:], use_cache=True, **{CACHE_ARG: getattr(out, CACHE_ARG)})
        expected = model(torch.cat([ids, ids[:, -1:]], 1)).logits[:, -1:]
        torch.testing.assert_close(step.logits, expected, rtol=1e-5, atol=1e-5)
    model.train()
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_torch_compile_training_step_on_cpu():
    """Compiled training with inductor gives eager's gradients; inductor only reorders fp32 sums (measured 3e-6)."""
    torch.compiler.reset()
    model = tiny_attnres("block", num_hidden_layers=4, attn_res_block_size=4).train()
    ids = token_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    torch.compile(model)(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-4 * eager[name].abs().max().item())


def test_generate_with_static_cache_and_compile():
    """generate() with a static cache, the model compiled as transformers compiles it, equals uncached greedy."""
    torch.compiler.reset()  # dynamo's recompile limit counts per code object, across tests
    model = tiny_attnres("block").eval()
    ids = token_ids(batch=1)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, use_cache=False, **kw)
        model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
        assert torch.equal(model.generate(ids, cache_implementation="static", **kw), expected)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_switch_implementation_on_a_loaded_model(impl, tmp_path):
    """A saved model loads with another implementation (from_pretrained kwarg) or switches after loading."""
    from hf_attnres import AttnResForCausalLM

    model = tiny_attnres("block")
    model.save_pretrained(tmp_path)
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).logits
        loaded = AttnResForCausalLM.from_pretrained(tmp_path, attn_res_implementation=impl).eval()
        assert loaded.config.attn_res_implementation == impl
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=2e-5)
        loaded.set_attn_res_implementation("eager")
        assert torch.equal(loaded(ids).logits, expected)
    with pytest.raises(ValueError, match="not registered"):
        loaded.set_attn_res_implementation("no-such-implementation")


def test_unknown_implementation_in_a_config_falls_back_to_eager(caplog):
    """A folder saved with an implementation this install lacks (e.g. a GPU package's) still loads."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        model = tiny_attnres("block", attn_res_implementation="from-a-missing-package")
    finally:
        hf_logging.disable_propagation()
    assert model.config.attn_res_implementation == "eager"
    assert "not available here" in caplog.text


def test_return_dict_false_returns_tuples():
    model = tiny_attnres("block")
    ids = token_ids()
    with torch.no_grad():
        as_tuple = model(ids, labels=ids, return_dict=False)
        as_dict = model(ids, labels=ids)
        base = model.model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)


def test_tensor_parallel_plan_names_the_tied_lm_head():
    from transformers import LlamaForCausalLM

    from hf_attnres import AttnResForCausalLM

    assert AttnResForCausalLM._tp_plan == LlamaForCausalLM._tp_plan
    model = tiny_attnres("block", tie_word_embeddings=True)
    plan = model.tp_plan if hasattr(model, "tp_plan") else model._tp_plan
    assert "lm_head" in plan and any("q_proj" in key for key in plan)


@pytest.mark.parametrize("seq", [11, 40], ids=["decoding-sized", "prefill-sized"])
def test_bf16_depth_logits_in_fp32(seq):
    model = tiny_attnres("block").to(torch.bfloat16)
    with torch.no_grad():
        out = model(token_ids(seq=seq), output_depth_attentions=True)
    assert out.logits.dtype == torch.bfloat16
    assert all(a.dtype == torch.float32 for a in out.depth_attentions)
    for alpha in out.depth_attentions[3], out.depth_attentions[-1]:
        torch.testing.assert_close(alpha.sum(-1), torch.ones(2, seq))


def test_peft_lora_with_attn_res_modules_to_save():
    from peft import LoraConfig, get_peft_model

    from hf_attnres import ATTN_RES_MODULE_NAMES

    model = tiny_attnres("block")
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                  modules_to_save=ATTN_RES_MODULE_NAMES))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("pseudo_query" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("mlp.up_proj.weight" in n and "lora" not in n for n in trainable)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("seq", [1, 40], ids=["one token", "prompt"])
@torch.no_grad()
def test_sublayer_inputs_stay_intact_in_inference(seq, impl):
    """What a sublayer's norm reads is still its own tensor afterwards, as in Llama (e.g. for hooks that record
    the residual stream): no implementation writes into a buffer it reuses."""
    model = tiny_attnres("block", attn_res_implementation=impl).eval()
    assert model.config.num_blocks >= 3
    kept, copies = [], []

    def record(module, args):
        kept.append(args[0])
        copies.append(args[0].clone())

    for layer in model.model.layers:
        layer.input_layernorm.register_forward_pre_hook(record)
        layer.post_attention_layernorm.register_forward_pre_hook(record)
    model(token_ids(batch=2, seq=seq))
    assert len(kept) == 2 * model.config.num_hidden_layers
    for got, expected in zip(kept, copies):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
