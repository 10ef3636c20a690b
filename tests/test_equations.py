"""The model against a literal, independent transcription of the paper's equations (spec §2-§3).

The transcription below shares nothing with the model's depth-attention code: it lists every sublayer
output, forms the sources from the spec's definitions (embedding; block sums of outputs; the partial sum
of the current block from its second sublayer on), normalises keys with a hand-written RMSNorm, and takes a
plain softmax. Only the sublayers themselves (attention and MLP with their input norms) are the model's.
"""

import math

import pytest
import torch

from _tiny import fused_kernels, tiny_attnres, token_ids


def rmsnorm(x, weight, eps):
    """In at least fp32 and rounded once to x's dtype (the spec's precision for bf16; exact for fp32)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    y = x.to(dtype)
    return (weight.to(dtype) * y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def attn_res(query, key_weight, eps, sources):
    """alpha_i = softmax_i(w . RMSNorm(v_i));  h = sum_i alpha_i v_i.

    Logits, softmax and sum in at least fp32 (spec: fp32 even under bf16), h rounded once to the sources' dtype.
    """
    dtype = torch.promote_types(sources[0].dtype, torch.float32)
    values = [v.to(dtype) for v in sources]
    logits = torch.stack([(rmsnorm(v, key_weight, eps) * query.to(dtype)).sum(-1) for v in values], dim=-1)
    alpha = torch.softmax(logits, dim=-1)
    return sum(alpha[..., i, None] * v for i, v in enumerate(values)).to(sources[0].dtype), alpha


def sources_for(sublayer, outputs, embedding, block_size):
    """Spec §3: [b_0, ..., b_{n-1}] (+ the partial b_n^{i-1} unless `sublayer` opens block n)."""
    n = sublayer // block_size  # 0-based block of this sublayer
    blocks = [sum(outputs[j * block_size:(j + 1) * block_size]) for j in range(n)]
    within = sublayer - n * block_size
    partial = [sum(outputs[n * block_size:sublayer])] if within > 0 else []
    return [embedding, *blocks, *partial]


def reference_logits(model, input_ids, block_size, scale_eps):
    """Logits of the AttnRes equations; block_size=1 is Full AttnRes (every output its own source)."""
    cfg, base = model.config, model.model
    eps = cfg.rms_norm_eps
    embedding = base.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    rope = base.rotary_emb(embedding, position_ids)
    outputs = []
    L = 2 * cfg.num_hidden_layers
    for sublayer in range(L):
        layer = base.layers[sublayer // 2]
        res = layer.self_attn_res if sublayer % 2 == 0 else layer.mlp_res
        sources = sources_for(sublayer, outputs, embedding, block_size)
        h, _ = attn_res(res.pseudo_query, res.key_norm.weight, eps, sources)
        norm = layer.input_layernorm if sublayer % 2 == 0 else layer.post_attention_layernorm
        norm_eps = eps / len(sources) ** 2 if scale_eps else eps
        x = rmsnorm(h, norm.weight, norm_eps)
        out = layer.self_attn(x, position_embeddings=rope, attention_mask=None)[0] if sublayer % 2 == 0 else layer.mlp(x)
        outputs.append(out)
    n_blocks = math.ceil(L / block_size)
    final_sources = [embedding] + [sum(outputs[j * block_size:(j + 1) * block_size]) for j in range(n_blocks)]
    h, _ = attn_res(base.final_res.pseudo_query, base.final_res.key_norm.weight, eps, final_sources)
    norm_eps = eps / len(final_sources) ** 2 if scale_eps else eps
    return model.lm_head(rmsnorm(h, base.norm.weight, norm_eps))


CASES = {
    # name: (mode, layers, block size, expected number of blocks N)
    "full": ("full", 3, 1, 6),
    "block divides depth": ("block", 4, 4, 2),
    "block, last block holds the rest": ("block", 5, 4, 3),
    "N=1 (one block)": ("block", 3, 6, 1),
    "N=1 (size beyond depth)": ("block", 2, 8, 1),
}


@pytest.fixture(params=["decoding-sized, fused kernels", "prefill-sized, fused kernels", "decoding-sized",
                        "prefill-sized", "decoding-sized, no stack", "prefill-sized, no stack"])
def inference_path(request, monkeypatch):
    """Every inference code path. Block AttnRes runs on CPU through hf_attnres's fused kernels
    (FusedSourceStack) where they are loaded and no depth weights are asked for; otherwise it goes through the
    model's source stack (SourceStack) at both sizes, or, where it has none (parameters sharded or offloaded),
    through each sublayer stacking its own sources (decoding-sized, as Full AttnRes does) or the two-phase
    computation's autograd functions."""
    from hf_attnres import AttnResModel
    from hf_attnres.modeling import modeling_attnres

    decoding = request.param.startswith("decoding")
    monkeypatch.setattr(modeling_attnres, "STACKED_MAX_TOKENS", 10**9 if decoding else 0)
    if request.param.endswith("fused kernels"):
        fused_kernels()
    else:
        monkeypatch.setattr(modeling_attnres, "_fused_kernels", lambda: None)
    if request.param.endswith("no stack"):
        monkeypatch.setattr(AttnResModel, "_source_stack", lambda self, *args: None)
    return request.param


@pytest.fixture(params=["fused kernels", "loop", "stacked"])
def phase1_variant(request, monkeypatch):
    """Every form of the two-phase computation under autograd: hf_attnres's fused kernels (the CPU default
    where they are loaded), and in plain torch the loop (CPU without them) and the stacked, batched-matmul
    form (the CUDA default), forced here on CPU."""
    from hf_attnres.modeling import modeling_attnres

    devices = ("cpu", "cuda") if request.param == "stacked" else ()
    monkeypatch.setattr(modeling_attnres, "PHASE1_STACKED_DEVICES", devices)
    if request.param != "fused kernels":
        monkeypatch.setattr(modeling_attnres, "_fused_kernels", lambda: None)
        yield request.param
        return
    fused_kernels()
    calls = []  # (whether the kernels apply: CPU tensors of fp32, bf16 or fp16; the kernels chosen)
    choose = modeling_attnres._cpu_kernels
    monkeypatch.setattr(modeling_attnres, "_cpu_kernels", lambda like: calls.append(
        (like.device.type == "cpu" and like.dtype in modeling_attnres._FUSED_DTYPES, choose(like))) or calls[-1][1])
    yield request.param
    # the path under test is the one that ran, wherever it applies (Full AttnRes has no two-phase computation)
    assert all(used is not None for applies, used in calls if applies)


@pytest.mark.parametrize("scale_eps", [False, True], ids=["paper-eps", "scaled-eps"])
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_model_matches_equations(case, scale_eps, inference_path):
    mode, layers, size, n_blocks = CASES[case]
    extra = {"attn_res_block_size": size} if mode == "block" else {}
    model = tiny_attnres(mode, num_hidden_layers=layers, attn_res_scale_norm_eps=scale_eps,
                         attn_implementation="sdpa", **extra)
    assert model.config.num_blocks == n_blocks
    ids = token_ids()
    expected = reference_logits(model, ids, size, scale_eps)
    got = model(ids).logits
    # fp32 rounding of two different summation orders; the logits are O(1)
    assert (got - expected).abs().max() < 2e-5
    if inference_path.endswith("fused kernels") and mode == "block":  # the path under test is the one that ran
        stack = model.model._source_stack(model.model.embed_tokens(ids), list(model.model.layers), False)
        assert type(stack).__name__ == "FusedSourceStack"
    # the same with the depth weights requested (inference builds them only then), and the routing really is
    # non-uniform, so the test can tell sources apart
    out = model(ids, output_depth_attentions=True)
    assert (out.logits - expected).abs().max() < 2e-5
    alphas = out.depth_attentions
    assert max(a.max().item() - a.min().item() for a in alphas if a.shape[-1] > 1) > 0.1


@torch.no_grad()
def test_full_is_block_with_one_sublayer_per_block():
    """N = L: the Block equations with S = 1 are Full AttnRes, and so is the model in full mode."""
    model = tiny_attnres("full")
    ids = token_ids()
    full = reference_logits(model, ids, 1, True)
    # an independent Full transcription: sources are the embedding and each earlier output (spec §2)
    cfg, base = model.config, model.model
    emb = base.embed_tokens(ids)
    rope = base.rotary_emb(emb, torch.arange(ids.shape[1])[None])
    values = [emb]
    for sublayer in range(2 * cfg.num_hidden_layers):
        layer = base.layers[sublayer // 2]
        res = layer.self_attn_res if sublayer % 2 == 0 else layer.mlp_res
        h, _ = attn_res(res.pseudo_query, res.key_norm.weight, cfg.rms_norm_eps, values)
        eps = cfg.rms_norm_eps / len(values) ** 2
        if sublayer % 2 == 0:
            values.append(layer.self_attn(rmsnorm(h, layer.input_layernorm.weight, eps), position_embeddings=rope,
                                          attention_mask=None)[0])
        else:
            values.append(layer.mlp(rmsnorm(h, layer.post_attention_layernorm.weight, eps)))
    h, _ = attn_res(base.final_res.pseudo_query, base.final_res.key_norm.weight, cfg.rms_norm_eps, values)
    direct = model.lm_head(rmsnorm(h, base.norm.weight, cfg.rms_norm_eps / len(values) ** 2))
    assert (full - direct).abs().max() < 2e-5
    assert (model(ids).logits - direct).abs().max() < 2e-5


def test_training_path_matches_equations(phase1_variant):
    """With autograd on (the memory-lean custom-function path) the forward is the same function."""
    model = tiny_attnres("block", num_hidden_layers=5, attn_res_block_size=4)
    ids = token_ids()
    with torch.no_grad():
        expected = reference_logits(model, ids, 4, True)
    assert (model(ids).logits - expected).abs().max() < 2e-5


@pytest.mark.parametrize("layers, size", [(5, 4), (3, 6)], ids=["uneven blocks", "N=1"])
def test_training_gradients_match_equations(layers, size, phase1_variant):
    """Every parameter's gradient (two-phase path, hand-written backward) against autograd of the
    transcription, with non-zero queries and key-norm weights."""
    model = tiny_attnres("block", num_hidden_layers=layers, attn_res_block_size=size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "key_norm" in name:
                p.uniform_(0.5, 1.5)
    ids = token_ids()
    grad_out = torch.randn(*ids.shape, model.config.vocab_size)
    params = [p for _, p in model.named_parameters()]
    got = torch.autograd.grad((model(ids).logits * grad_out).sum(), params)
    expected = torch.autograd.grad((reference_logits(model, ids, size, True) * grad_out).sum(), params)
    for (name, _), g, e in zip(model.named_parameters(), got, expected):
        # fp32, different summation orders: relative to the gradient's scale
        assert (g - e).abs().max() <= 1e-4 * e.abs().max() + 1e-6, name


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["block", "full"])
def test_bf16_training_gradients_within_transcription_floor(mode, device, phase1_variant):
    """bf16 training (fp32 depth softmax, custom backward) loses no more accuracy than the equations do.

    Noise floor: the transcription run in bf16 with its depth attention in fp32, against the fp32 model.
    With sharp random routing this floor is ~4x a plain Llama's (measured), so Llama is not the reference.
    """
    ids = token_ids(batch=4, seq=64).to(device)
    size = 1 if mode == "full" else 4

    def gradients(dtype, transcription=False):
        model = tiny_attnres(mode, num_hidden_layers=4, attn_implementation="sdpa", **(
            {"attn_res_block_size": size} if mode == "block" else {})).to(device, dtype).train()
        if transcription:
            logits = reference_logits(model, ids, size, True).float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        else:
            out = model(input_ids=ids, labels=ids, output_depth_attentions=True)
            assert all(a.dtype == torch.float32 for a in out.depth_attentions)
            loss = out.loss
        loss.backward()
        return {n: p.grad.float() for n, p in model.named_parameters()}

    exact = gradients(torch.float32)
    errors = {}
    for route, grads in [("model", gradients(torch.bfloat16)), ("floor", gradients(torch.bfloat16, True))]:
        errors[route] = []
        for group in (lambda n: "_res." not in n, lambda n: "_res." in n):  # backbone, AttnRes parameters
            names = [n for n in exact if group(n)]
            error = sum((grads[n] - exact[n]).square().sum() for n in names).sqrt()
            errors[route].append((error / sum(exact[n].square().sum() for n in names).sqrt()).item())
    print(f"{mode} on {device}: bf16 relative gradient error (backbone, AttnRes params): model {errors['model']}, "
          f"transcription {errors['floor']}")
    # measured model/floor ratios on CPU over 4 seeds x 2 modes: 0.57-1.25
    assert all(m <= 1.5 * f for m, f in zip(errors["model"], errors["floor"]))


def test_two_phase_gradcheck_float64(phase1_variant):
    """Both phases' custom autograd functions pass torch's finite-difference gradcheck (in fp64)."""
    from hf_attnres.modeling.modeling_attnres import _Phase1, _Phase2

    torch.manual_seed(0)
    sources = [torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    queries = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    outputs = _Phase1.apply(queries, 1e-5, {}, *sources)
    # phase 1 against the transcription, sublayer by sublayer
    for j in range(4):
        ref, _ = attn_res(queries[:, j], torch.ones(8, dtype=torch.float64), 1e-5, sources)
        torch.testing.assert_close(outputs[j], ref)
    weights = outputs[-1]

    def phase1(q, *s):
        *mixed, lse, _ = _Phase1.apply(q, 1e-5, {}, *s)
        return (*mixed, lse)

    assert torch.autograd.gradcheck(phase1, (queries, *sources))
    partial = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    mixed = outputs[1].detach().requires_grad_()
    lse = outputs[-2].detach()[..., 1].requires_grad_()

    def phase2(m, p, q, l):  # the backward recomputes <grad, mixed> from the sources and weights
        return _Phase2.apply(m, p, q, l, weights[..., 1], 1e-5, {}, 1, *sources)[0]

    assert torch.autograd.gradcheck(phase2, (mixed, partial, queries[:, 1].detach().requires_grad_(), lse))

    def both_phases(q, p, *s):  # phase 1's backward reuses the dots phase 2's backward left for it
        merge_dots = {}
        *mixed, lse, weights = _Phase1.apply(q, 1e-5, merge_dots, *s)
        return tuple(
            _Phase2.apply(mixed[j], p, q[:, j], lse[..., j], weights[..., j], 1e-5, merge_dots, j, *s)[0] for j in (1, 2, 3)
        )

    assert torch.autograd.gradcheck(both_phases, (queries, partial, *sources))


@torch.no_grad()
def test_depth_weights_match_equations():
    """The returned depth-attention weights are the transcription's alphas, sublayer by sublayer."""
    model = tiny_attnres("block", num_hidden_layers=4, attn_res_block_size=4)
    ids = token_ids()
    out = model(ids, output_depth_attentions=True)
    cfg = model.config
    assert len(out.depth_attentions) == cfg.num_sublayers + 1
    for i, alpha in enumerate(out.depth_attentions):
        assert alpha.shape == (*ids.shape, cfg.num_sources(i))
        assert alpha.dtype == torch.float32
        torch.testing.assert_close(alpha.sum(-1), torch.ones(ids.shape))
    # sublayer 0 sees only the embedding; the first MLP sees the embedding and the partial block
    assert out.depth_attentions[0].shape[-1] == 1 and out.depth_attentions[1].shape[-1] == 2
    # final aggregation, recomputed from the transcription's sources
    emb = model.model.embed_tokens(ids)
    hs = model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == cfg.num_hidden_layers + 1 and torch.equal(hs[0], emb)


def test_depth_attention_backward_matches_autograd_of_transcription():
    """The hand-written backward of the depth-attention logits against autograd of the plain formula."""
    from hf_attnres.modeling.modeling_attnres import AttnResidual

    torch.manual_seed(0)
    model = tiny_attnres("block")
    res = AttnResidual(model.config)
    with torch.no_grad():
        res.pseudo_query.normal_()
        res.key_norm.weight.uniform_(0.5, 1.5)
    sources = [torch.randn(2, 5, 64, requires_grad=True) for _ in range(4)]
    h, _ = res(sources)
    grad_out = torch.randn_like(h)
    got = torch.autograd.grad(h, [*sources, res.pseudo_query, res.key_norm.weight], grad_out)
    ref_h, _ = attn_res(res.pseudo_query, res.key_norm.weight, res.key_norm.variance_epsilon, sources)
    expected = torch.autograd.grad(ref_h, [*sources, res.pseudo_query, res.key_norm.weight], grad_out)
    # fp32 rounding of two summation orders over sources of magnitude up to ~4: a few ulps of 4 (4.8e-7 each),
    # absolute, as an element near zero comes from cancellation (1.4e-6 seen on an AVX-512 machine)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=5e-6)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_depth_attention_gradcheck_float64():
    """The custom autograd function passes torch's finite-difference gradcheck (in fp64)."""
    from hf_attnres.modeling.modeling_attnres import _KeyLogits

    torch.manual_seed(0)
    v = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    for k in (1, 3):  # one query (a sublayer) or several (a block's, in the two-phase computation)
        q = torch.randn(8, k, dtype=torch.float64, requires_grad=True)
        ref = (v @ q) * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5)
        torch.testing.assert_close(_KeyLogits.apply(v, q, 1e-5), ref)
        assert torch.autograd.gradcheck(lambda v, q: _KeyLogits.apply(v, q, 1e-5), (v, q))
