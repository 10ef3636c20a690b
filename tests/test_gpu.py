"""flash_attention_2 on CUDA (skipped cleanly without CUDA and flash-attn).

flash-attn runs only in bf16/fp16, so every tolerance is a noise floor measured in the same test: the error
against fp32 of the same model in bf16 with sdpa. Another kernel may round differently: it is allowed twice
that floor. (The bf16 training path on CUDA: test_equations.py::test_bf16_training_gradients_*.)
"""

import importlib.util

import pytest
import torch
from transformers import DynamicCache

from _tiny import IMPLEMENTATIONS, tiny_attnres, token_ids

CUDA = torch.cuda.is_available()
needs_flash = pytest.mark.skipif(not CUDA or importlib.util.find_spec("flash_attn") is None,
                                 reason="flash_attention_2 needs CUDA and the flash-attn package")
pytestmark = pytest.mark.gpu


def on_gpu(mode: str, impl: str, dtype: torch.dtype):
    return tiny_attnres(mode, attn_implementation=impl).to("cuda", dtype)


@pytest.fixture
def flash_calls(monkeypatch):
    """Counts calls into transformers' flash_attention_2 function, so a silent fallback to sdpa would show."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mapping = type(ALL_ATTENTION_FUNCTIONS)._global_mapping
    real, calls = mapping["flash_attention_2"], []

    def counted(module, query, key, value, attention_mask, *args, **kwargs):
        calls.append(attention_mask is not None)
        return real(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setitem(mapping, "flash_attention_2", counted)
    return calls


@needs_flash
@pytest.mark.parametrize("mode", ["block", "full"])
@torch.no_grad()
def test_flash_attention_2_logits_within_bf16_floor(mode, flash_calls):
    ids = token_ids(seq=40).cuda()
    reference = on_gpu(mode, "sdpa", torch.float32)(ids).logits
    floor = (on_gpu(mode, "sdpa", torch.bfloat16)(ids).logits.float() - reference).abs().max().item()
    error = (on_gpu(mode, "flash_attention_2", torch.bfloat16)(ids).logits.float() - reference).abs().max().item()
    print(f"{mode}: flash bf16 error {error:.3g}, sdpa bf16 floor {floor:.3g}")
    assert len(flash_calls) == tiny_attnres(mode).config.num_hidden_layers  # one call per decoder layer
    assert 0 < floor and error <= 2 * floor


def padded_incremental_logits(model, batch, mask, prefill: int) -> torch.Tensor:
    """Prefill, then one token at a time, positions from the mask as `generate` computes them."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    pieces = []
    for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, batch.shape[1])]:
        pieces.append(model(batch[:, start:stop], attention_mask=mask[:, :stop], position_ids=positions[:, start:stop],
                            past_key_values=cache, use_cache=True).logits.float())
    return torch.cat(pieces, 1)


@needs_flash
@pytest.mark.parametrize("mode", ["block", "full"])
@torch.no_grad()
def test_flash_attention_2_left_padded_incremental_decoding(mode, flash_calls):
    """Left padding takes flash-attn's varlen kernels; each row must match itself run alone in fp32."""
    a, b = token_ids(batch=1, seq=12, seed=1)[0], token_ids(batch=1, seq=8, seed=2)[0]
    batch = torch.stack([a, torch.cat([torch.zeros(4, dtype=torch.long), b])]).cuda()
    mask = torch.stack([torch.ones(12), torch.cat([torch.zeros(4), torch.ones(8)])]).long().cuda()
    fp32 = on_gpu(mode, "sdpa", torch.float32)
    reference = [fp32(a[None].cuda()).logits[0], fp32(b[None].cuda()).logits[0]]

    def error(impl):
        logits = padded_incremental_logits(on_gpu(mode, impl, torch.bfloat16), batch, mask, prefill=6)
        return max((logits[0] - reference[0]).abs().max().item(), (logits[1, 4:] - reference[1]).abs().max().item())

    floor, flash = error("sdpa"), error("flash_attention_2")
    assert flash_calls and any(flash_calls)  # flash-attn ran, with the padding mask (its varlen route)
    print(f"{mode}: padded incremental flash bf16 error {flash:.3g}, sdpa bf16 floor {floor:.3g}")
    assert 0 < floor and flash <= 2 * floor


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("seq", [1, 40], ids=["one token", "prompt"])
@torch.no_grad()
def test_block_inference_on_cuda_matches_equations(seq, impl):
    """Block AttnRes inference on CUDA, every implementation, against the transcription, fp32 (no TF32),
    random queries, with and without the depth weights."""
    from test_equations import reference_logits

    assert not torch.backends.cuda.matmul.allow_tf32
    model = tiny_attnres("block", num_hidden_layers=5, attn_res_block_size=4, attn_implementation="sdpa",
                         attn_res_implementation=impl).cuda()
    ids = token_ids(seq=seq).cuda()
    expected = reference_logits(model, ids, 4, True)
    for depth in False, True:  # the CPU tests' bound: fp32 summation orders
        assert (model(ids, output_depth_attentions=depth).logits - expected).abs().max() < 2e-5
