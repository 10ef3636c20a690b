"""CUDA: every depth-attention implementation (fla-core's kernel where installed) and flash_attention_2, against
the transcription of the equations (test_equations.py); skipped cleanly without CUDA (and flash-attn, fla-core).

In bf16 every tolerance is a noise floor measured in the same test: the transcription's own error in bf16 against
fp32 on the same inputs. Another arithmetic may round differently: it is allowed twice that floor. (The bf16
training path of whole models on CUDA: test_equations.py::test_bf16_training_gradients_*.)
"""

import importlib.util

import pytest
import torch
from transformers import DynamicCache

from _tiny import IMPLEMENTATIONS, tiny_attnres, token_ids

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
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


def module_against_transcription(impl: str, device: str, dtype: torch.dtype, sublayer: int) -> None:
    """One AttnResidual run by `impl` on `device` in `dtype`: output, depth weights and the gradients of the
    sources, the pseudo-query and the key-norm weight, against the transcription (`attn_res`). Also used under
    Triton's interpreter (test_fla.py).

    fp32: the bounds of test_equations' CPU test (summation orders). bf16, on the same (bf16-representable)
    inputs: at most twice the transcription's own bf16 error against fp32, plus one bf16 ulp of the largest
    entry: a result rounded once from fp32 is half an ulp off at most, and a last-bit difference in the fp32
    arithmetic (or the interpreter's truncating bf16 stores) flips a rounding. The depth weights are fp32 in
    every route, bounded as in fp32. A wrong query, key norm, eps or source is off by far more (fp32 bounds)."""
    from test_equations import attn_res

    from hf_attnres.modeling.modeling_attnres import AttnResidual

    config = tiny_attnres("block", num_hidden_layers=4, attn_res_block_size=4, attn_res_implementation=impl).config
    g = torch.Generator().manual_seed(sublayer)
    d = config.hidden_size
    # bf16-representable inputs, so every run sees the same numbers and the floor measures arithmetic only
    query, gamma = (torch.randn(d, generator=g) for _ in range(2))
    gamma = (gamma.abs() * 0.5 + 0.5).bfloat16().float()
    query = query.bfloat16().float()
    sources = [(torch.randn(2, 5, d, generator=g) * s).bfloat16().float() for s in (1.0, 3.0, 0.5)]
    grad_out = torch.randn(2, 5, d, generator=g).bfloat16().float()

    def run(via_module: bool, run_dtype: torch.dtype):
        res = AttnResidual(config, sublayer).to(device, run_dtype)
        with torch.no_grad():
            res.pseudo_query.copy_(query)
            res.key_norm.weight.copy_(gamma)
        srcs = [v.to(device, run_dtype).requires_grad_() for v in sources]
        if via_module:
            h, alpha = res(srcs)
        else:
            h, alpha = attn_res(res.pseudo_query, res.key_norm.weight, res.key_norm.variance_epsilon, srcs)
        assert h.dtype == run_dtype and alpha.dtype == torch.float32 and alpha.shape == (2, 5, len(srcs))
        grads = torch.autograd.grad(h, [*srcs, res.pseudo_query, res.key_norm.weight], grad_out.to(device, run_dtype))
        return [t.detach().float().cpu() for t in (h, alpha, *grads)]

    names = ["output", "depth weights", "grad source 0", "grad source 1", "grad source 2", "grad query",
             "grad key-norm weight"]
    exact = run(False, torch.float32)
    got = run(True, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], exact[0], rtol=1e-5, atol=5e-6)
        torch.testing.assert_close(got[1], exact[1], rtol=1e-5, atol=1e-6)
        for name, g_, e in zip(names[2:], got[2:], exact[2:]):
            assert (g_ - e).abs().max() <= 1e-5 * e.abs().max() + 1e-6, (name, (g_ - e).abs().max(), e.abs().max())
        return
    floor = run(False, dtype)
    for name, g_, f, e in zip(names, got, floor, exact):
        error, floor_error = (g_ - e).abs().max().item(), (f - e).abs().max().item()
        print(f"{impl} {name}: bf16 error {error:.3g}, transcription's bf16 floor {floor_error:.3g}")
        slack = 1e-5 if name == "depth weights" else torch.finfo(torch.bfloat16).eps * e.abs().max().item()
        assert error <= 2 * floor_error + slack, (name, error, floor_error)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sublayer", [4, 5], ids=["opens a block", "partial block"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_depth_attention_module_on_cuda(impl, sublayer, dtype):
    module_against_transcription(impl, "cuda", dtype, sublayer)


@needs_cuda
@pytest.mark.parametrize("mode, layers, size", [("block", 5, 4), ("full", 3, 1)], ids=["block", "full"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_training_gradients_on_cuda_match_equations(impl, mode, layers, size):
    """Every parameter's gradient on CUDA in fp32 (no TF32) against autograd of the transcription."""
    from test_equations import assert_training_gradients_match_equations

    extra = {"attn_res_block_size": size} if mode == "block" else {}
    model = tiny_attnres(mode, num_hidden_layers=layers, attn_implementation="sdpa", attn_res_implementation=impl,
                         **extra).cuda().train()
    assert_training_gradients_match_equations(model, token_ids(seq=40).cuda(), size)


@needs_cuda
@pytest.mark.parametrize("mode", ["block", "full"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@torch.no_grad()
def test_converted_llama_is_exact_on_cuda(impl, mode):
    """Zero pseudo-queries: the converted model computes its Llama's function (spec §4), fp32 on CUDA."""
    from _tiny import attnres_from_llama, tiny_llama

    llama = tiny_llama(embed_std=1e-3)  # a small stream, where an unscaled reading-norm eps would show (1e-3+)
    model = attnres_from_llama(llama, mode, attn_res_implementation=impl).cuda()
    ids = token_ids(seq=40).cuda()
    assert (model(ids).logits - llama.cuda()(ids).logits).abs().max() <= 1e-5  # test_identity's CPU bound


@needs_cuda
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@torch.no_grad()
def test_cached_generation_equals_uncached_on_cuda(impl, cache_implementation):
    """Greedy generation with a KV cache (depth attention on one token per step) equals recomputing the whole
    sequence at every step, fp32 on CUDA, random queries; for `"auto"` also with transformers' compilation of the
    static-cache decoding step (under torch.compile `"auto"` and `"fla"` run the reference, which inductor fuses)."""
    model = tiny_attnres("block", attn_implementation="sdpa", attn_res_implementation=impl).cuda().eval()
    ids = token_ids(batch=2).cuda()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, use_cache=False, **kw)
    # compiling takes ~30 s a model: with the default implementation only
    for disable_compile in (True, False) if cache_implementation == "static" and impl == "auto" else (True,):
        got = model.generate(ids, cache_implementation=cache_implementation, disable_compile=disable_compile, **kw)
        assert torch.equal(got, expected), (impl, cache_implementation, disable_compile)


@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs fla-core")
def test_auto_runs_the_fla_kernel_on_cuda(monkeypatch):
    """The default ("auto") calls fla's kernel for CUDA sources of one dtype, and the reference on CPU."""
    from hf_attnres.modeling import modeling_attnres

    calls = []
    kernel = modeling_attnres._fla_fused_attnres()
    assert kernel is not None, "fla-core is installed but its kernel does not import"
    monkeypatch.setattr(modeling_attnres, "_fla_fused_attnres", lambda: lambda *a, **k: calls.append(1) or kernel(*a, **k))
    model = tiny_attnres("block")
    assert model.config.attn_res_implementation == "auto"
    ids = token_ids()
    with torch.no_grad():
        model(ids)
        assert not calls
        model.cuda()(ids.cuda())
    assert len(calls) == model.config.num_sublayers + 1
