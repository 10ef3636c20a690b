"""The model against a literal, independent transcription of the paper's equations (spec §2-§3).

The transcription below shares nothing with the model's depth-attention code: it lists every sublayer
output, forms the sources from the spec's definitions (embedding; block sums of outputs; the partial sum
of the current block from its second sublayer on), normalises keys with a hand-written RMSNorm, and takes a
plain softmax. Only the sublayers themselves (attention and MLP with their input norms) are the model's. Every registered
depth-attention implementation (`attn_res_implementation`) is checked against it: outputs, depth weights per
token, and gradients.
"""

import math

import pytest
import torch

from _tiny import IMPLEMENTATIONS, tiny_attnres, token_ids


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


def reference_logits(model, input_ids, block_size, scale_eps, alphas=None):
    """Logits of the AttnRes equations; block_size=1 is Full AttnRes (every output its own source).
    `alphas`: a list that receives each depth attention's weights, in sublayer order, the final one last."""
    alphas = [] if alphas is None else alphas
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
        h, alpha = attn_res(res.pseudo_query, res.key_norm.weight, eps, sources)
        alphas.append(alpha)
        norm = layer.input_layernorm if sublayer % 2 == 0 else layer.post_attention_layernorm
        norm_eps = eps / len(sources) ** 2 if scale_eps else eps
        x = rmsnorm(h, norm.weight, norm_eps)
        out = layer.self_attn(x, position_embeddings=rope, attention_mask=None)[0] if sublayer % 2 == 0 else layer.mlp(x)
        outputs.append(out)
    n_blocks = math.ceil(L / block_size)
    final_sources = [embedding] + [sum(outputs[j * block_size:(j + 1) * block_size]) for j in range(n_blocks)]
    h, alpha = attn_res(base.final_res.pseudo_query, base.final_res.key_norm.weight, eps, final_sources)
    alphas.append(alpha)
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


@pytest.mark.parametrize("seq", [1, 40], ids=["one token", "prompt"])
@pytest.mark.parametrize("scale_eps", [False, True], ids=["paper-eps", "scaled-eps"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@torch.no_grad()
def test_model_matches_equations(impl, case, scale_eps, seq):
    """Logits and every depth weight, token by token, against the transcription's."""
    mode, layers, size, n_blocks = CASES[case]
    extra = {"attn_res_block_size": size} if mode == "block" else {}
    model = tiny_attnres(mode, num_hidden_layers=layers, attn_res_scale_norm_eps=scale_eps,
                         attn_implementation="sdpa", attn_res_implementation=impl, **extra)
    assert model.config.num_blocks == n_blocks and model.config.attn_res_implementation == impl
    ids = token_ids(seq=seq)
    expected_alphas = []
    expected = reference_logits(model, ids, size, scale_eps, expected_alphas)
    out = model(ids, output_depth_attentions=True)
    # fp32 rounding of two different summation orders; the logits are O(1)
    assert (out.logits - expected).abs().max() < 2e-5
    assert len(out.depth_attentions) == len(expected_alphas) == model.config.num_sublayers + 1
    for i, (got, want) in enumerate(zip(out.depth_attentions, expected_alphas)):
        assert got.dtype == torch.float32 and got.shape == want.shape, i
        # weights in [0, 1]: the sources carry the network's fp32 reassociation error, the one that bounds the
        # logits at 2e-5 (measured here up to 2.3e-6 on the weights); a wrong source or query is off by 1e-2 or more
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"depth weights of entry {i}")
    # the routing really is non-uniform, so the test can tell sources apart
    assert max(a.max().item() - a.min().item() for a in expected_alphas if a.shape[-1] > 1) > 0.1


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


@pytest.mark.parametrize("mode, layers, size", [("block", 5, 4), ("block", 3, 6), ("full", 3, 1)],
                         ids=["uneven blocks", "N=1", "full"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_training_gradients_match_equations(impl, mode, layers, size):
    """Every parameter's gradient against autograd of the transcription, with non-zero queries and key-norm
    weights, and the training forward is the same function."""
    extra = {"attn_res_block_size": size} if mode == "block" else {}
    model = tiny_attnres(mode, num_hidden_layers=layers, attn_res_implementation=impl, **extra).train()
    assert_training_gradients_match_equations(model, token_ids(), size)


def assert_training_gradients_match_equations(model, ids: torch.Tensor, size: int) -> None:
    """The training forward against the transcription, and every parameter's gradient against its autograd."""
    grad_out = torch.randn(*ids.shape, model.config.vocab_size, device=ids.device)
    params = [p for _, p in model.named_parameters()]
    logits = model(ids).logits
    reference = reference_logits(model, ids, size, True)
    assert (logits - reference).abs().max() < 2e-5
    got = torch.autograd.grad((logits * grad_out).sum(), params)
    expected = torch.autograd.grad((reference * grad_out).sum(), params)
    for (name, _), g, e in zip(model.named_parameters(), got, expected):
        # fp32, different summation orders: relative to the gradient's scale
        assert (g - e).abs().max() <= 1e-4 * e.abs().max() + 1e-6, name


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["block", "full"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bf16_training_gradients_within_transcription_floor(impl, mode, device):
    """bf16 training (fp32 depth softmax) loses no more accuracy than the equations do.

    Noise floor: the transcription run in bf16 with its depth attention in fp32, against the fp32 model.
    With sharp random routing this floor is ~4x a plain Llama's (measured), so Llama is not the reference.
    """
    ids = token_ids(batch=4, seq=64).to(device)
    size = 1 if mode == "full" else 4

    def gradients(dtype, transcription=False):
        model = tiny_attnres(mode, num_hidden_layers=4, attn_implementation="sdpa", attn_res_implementation=impl, **(
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
    print(f"{impl}, {mode} on {device}: bf16 relative gradient error (backbone, AttnRes params): model "
          f"{errors['model']}, transcription {errors['floor']}")
    # measured model/floor ratios on CPU over 4 seeds x 2 modes: 0.57-1.25
    assert all(m <= 1.5 * f for m, f in zip(errors["model"], errors["floor"]))


@pytest.mark.parametrize("sublayer", [4, 5], ids=["opens a block", "partial block"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_depth_attention_module_against_transcription(impl, sublayer):
    """One AttnResidual on its own (no forward context): output, weights and every gradient."""
    from hf_attnres.modeling.modeling_attnres import AttnResidual

    torch.manual_seed(0)
    model = tiny_attnres("block", num_hidden_layers=4, attn_res_block_size=4, attn_res_implementation=impl)
    res = AttnResidual(model.config, sublayer)
    with torch.no_grad():
        res.pseudo_query.normal_()
        res.key_norm.weight.uniform_(0.5, 1.5)
    sources = [torch.randn(2, 5, 64, requires_grad=True) * s for s in (1.0, 3.0, 0.5)]
    sources = [s.detach().requires_grad_() for s in sources]
    h, alpha = res(sources)
    grad_out = torch.randn_like(h)
    inputs = [*sources, res.pseudo_query, res.key_norm.weight]
    got = torch.autograd.grad(h, inputs, grad_out)
    ref_h, ref_alpha = attn_res(res.pseudo_query, res.key_norm.weight, res.key_norm.variance_epsilon, sources)
    expected = torch.autograd.grad(ref_h, inputs, grad_out)
    # fp32 rounding of two summation orders over sources of magnitude up to ~4: a few ulps of 4 (4.8e-7 each),
    # absolute, as an element near zero comes from cancellation (1.4e-6 seen on an AVX-512 machine)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(alpha, ref_alpha, rtol=1e-5, atol=1e-6)
    for g, e in zip(got, expected):  # relative to each gradient's scale, as in the model's test above
        assert (g - e).abs().max() <= 1e-5 * e.abs().max() + 1e-6, ((g - e).abs().max(), e.abs().max())


def test_two_phase_block_function_gradcheck_float64():
    """Phase 1's autograd function (hand-written backward, probabilities recomputed) against the transcription
    and torch's finite differences, in fp64, with gradients flowing into both its outputs."""
    from hf_attnres.ops.two_phase import BlockPhase1

    torch.manual_seed(0)
    sources = [torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    queries = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    mixed, lse, weights = BlockPhase1.apply(queries, 1e-5, *sources)
    for j in range(4):  # against the transcription, sublayer by sublayer
        ref, ref_alpha = attn_res(queries[j], torch.ones(8, dtype=torch.float64), 1e-5, sources)
        torch.testing.assert_close(mixed[..., j, :], ref)
        torch.testing.assert_close(weights[..., j], ref_alpha)
    assert torch.autograd.gradcheck(lambda q, *s: BlockPhase1.apply(q, 1e-5, *s)[:2], (queries, *sources))
