"""Identity at zero queries (spec §4): with a Llama's weights, AttnRes computes the Llama's function.

The reference is transformers' own, unmodified LlamaForCausalLM. The 1e-5 bound is the issue's; the
measured differences are ~1e-7 (fp32 rounding), while without the eps rescaling they are 1e-2 or more
(asserted below, so the test also shows why the rescaling is needed).
"""

import pytest
import torch

from _tiny import attnres_from_llama, tiny_llama, token_ids
from hf_attnres import AttnResForCausalLM


def max_logit_diff(a, b, ids):
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


@pytest.mark.parametrize("mode", ["block", "full"])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
@pytest.mark.parametrize("embed_std", [None, 1e-3], ids=["default-embeddings", "small-embeddings"])
@pytest.mark.parametrize("seq", [11, 40], ids=["decoding-sized", "prefill-sized"])  # 22 or 80 tokens
def test_zero_queries_equal_llama(mode, eps, embed_std, seq):
    """A decoding-sized and a prefill-sized input, with every registered implementation."""
    llama = tiny_llama(rms_norm_eps=eps, embed_std=embed_std)
    ids = token_ids(seq=seq)
    model = attnres_from_llama(llama, mode)
    assert max_logit_diff(model, llama, ids) <= 1e-5


@pytest.mark.parametrize("mode", ["block", "full"])
def test_without_eps_rescaling_identity_breaks(mode):
    """The naive construction is measurably off, so the exactness above is the rescaling's doing."""
    llama = tiny_llama(rms_norm_eps=1e-5, embed_std=1e-3)
    naive = attnres_from_llama(llama, mode, attn_res_scale_norm_eps=False)
    assert max_logit_diff(naive, llama, token_ids()) > 1e-3


def test_none_mode_is_llama_bit_for_bit():
    llama = tiny_llama()
    model = attnres_from_llama(llama, "none")
    ids = token_ids()
    assert max_logit_diff(model, llama, ids) == 0.0
    with torch.no_grad():
        a = model(ids, output_hidden_states=True).hidden_states
        b = llama(ids, output_hidden_states=True).hidden_states
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["block", "full"])
def test_backbone_gradients_equal_at_step_0(mode):
    """Continued pretraining starts exactly where plain continued pretraining of the Llama would."""
    llama = tiny_llama(embed_std=1e-2)
    model = attnres_from_llama(llama, mode).train()
    llama.train()
    ids = token_ids(seq=16)
    model(input_ids=ids, labels=ids).loss.backward()
    llama(input_ids=ids, labels=ids).loss.backward()
    grads = dict(model.named_parameters())
    worst = 0.0
    for name, p in llama.named_parameters():
        g = grads[name].grad
        worst = max(worst, ((g - p.grad).abs().max() / (p.grad.abs().max() + 1e-12)).item())
    assert worst < 1e-4, worst
    # and the pseudo-queries do receive a gradient (the extra signal AttnRes adds)
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("pseudo_query"))


def test_llama_state_dict_names(tmp_path):
    """Every Llama name is kept; AttnRes parameters are the only missing ones, and nothing is unexpected."""
    llama = tiny_llama()
    model = attnres_from_llama(llama, "block")  # asserts the load report itself
    llama_names = set(dict(llama.named_parameters()))
    attn_res = {n for n, _ in model.named_parameters() if n not in llama_names}
    assert attn_res and all(
        n.split(".")[-2] in ("self_attn_res", "mlp_res", "final_res") or ".key_norm." in n for n in attn_res
    )


def test_from_pretrained_on_llama_checkpoint_zero_queries(tmp_path):
    """Loading a checkpoint that lacks the AttnRes parameters initialises the queries to zero."""
    llama = tiny_llama()
    llama.save_pretrained(tmp_path)
    model = attnres_from_llama(llama, "block")
    loaded = AttnResForCausalLM.from_pretrained(tmp_path, config=model.config).eval()
    for name, p in loaded.named_parameters():
        if name.endswith("pseudo_query"):
            assert torch.count_nonzero(p) == 0, name
        if "_res.key_norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    assert max_logit_diff(loaded, llama, token_ids()) <= 1e-5
