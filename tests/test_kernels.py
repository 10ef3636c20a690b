"""hf_attnres's fused CPU kernels (hf_attnres.kernels): their numerics against the plain-torch path and the
equations, on prompts split over threads and in training, their reuse from one decoding step to the next, and
the loader's failure modes.

The kernels' equations are also checked case by case against the literal transcription in test_equations.py
(its "fused kernels" inference paths and its "fused kernels" two-phase variant for gradients)."""

import gc
import logging
import shutil
import subprocess
import sys

import pytest
import torch

from _tiny import fused_kernels, tiny_attnres, token_ids, without_fused_kernels
from hf_attnres import kernels
from hf_attnres.modeling import modeling_attnres


def decode(model, ids: torch.Tensor, steps: int, change_at: int | None = None) -> list[torch.Tensor]:
    """Greedy decoding step by step from `ids`, returning each step's logits; at step `change_at` one
    pseudo-query is changed in place first (as a training step between decoding steps would)."""
    out = model(input_ids=ids, use_cache=True)
    cache, nxt, logits = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    for step in range(steps):
        if step == change_at:
            model.model.layers[1].mlp_res.pseudo_query.mul_(-2.0)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        logits.append(out.logits)
    return logits


@torch.no_grad()
def test_fused_decoding_equals_plain_torch_and_reuses_its_state(monkeypatch):
    fused_kernels()
    model = _routed_model()
    ids = token_ids(batch=2, seq=7)
    with without_fused_kernels():
        expected = decode(model, ids, 6)
    kept = []
    create = modeling_attnres.FusedSourceStack.create
    monkeypatch.setattr(modeling_attnres.FusedSourceStack, "create",
                        classmethod(lambda cls, *a: kept.append(create(*a)) or kept[-1]))
    got = decode(model, ids, 6)
    # the same logits, within fp32 rounding of two summation orders (the logits are O(1))
    assert max((g - e).abs().max().item() for g, e in zip(got, expected)) < 2e-5
    # one stack for the 7-token prompt, one for all six single-token steps of the same generation
    assert len(kept) == 2 and all(type(k) is modeling_attnres.FusedSourceStack for k in kept)


def libstdcxx_symbols(library) -> list[str]:
    """The symbols of libstdc++'s own runtime (locale, streams, exceptions) that `library` defines."""
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True)
    return [name for name in (line.split()[-1] for line in symbols.stdout.splitlines())
            if name.startswith(("_ZNSt6locale", "_ZNSt8ios_base", "_ZNSo", "__cxa_throw", "__gxx_personality"))]


needs_nm = pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")


@needs_nm
def test_kernels_share_the_process_cxx_runtime():
    """The module links the libstdc++ torch has loaded instead of carrying a copy of its own, as a compiler with a
    static-only libstdc++ would put in: that copy's locale is never set up, and the kernels' first error message
    with a number in it crashed the process (GCC 13 in /opt/gcc on the GPU machine, before the fix)."""
    fused_kernels()
    library = kernels.build_directory() / f"{kernels.LIBRARY}.so"
    assert libstdcxx_symbols(library) == []


STATIC_RUNTIME_BUILD = """
import sys
from pathlib import Path
import torch
from hf_attnres import kernels
kernels.LDFLAGS.append("-static-libstdc++")  # as such a compiler links by default
module = kernels._compile(Path(sys.argv[1]), verbose=False)
decoder = module.Decoder.create([torch.randn(16)] * 3, [torch.ones(16)] * 3, [], [], 1, 16, 2, 1e-5)
phase1, phase2 = decoder.bound_calls()
try:
    phase2(phase1([torch.randn(1, 1, 16)], 0, 2), 7, 1)
except RuntimeError as error:
    print(str(error).splitlines()[0])
"""


@needs_nm
def test_a_static_libstdcxx_stays_out_of_the_kernels(tmp_path):
    """The same with the compiler told to link libstdc++ statically: the loaded runtime still resolves every C++
    symbol, and the error message is whole. Without the fix the module defined 178 of the runtime's symbols here,
    and the message stopped at the first number ("phase2 of column ")."""
    fused_kernels()
    run = subprocess.run([sys.executable, "-c", STATIC_RUNTIME_BUILD, str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert libstdcxx_symbols(tmp_path / f"{kernels.LIBRARY}.so") == []
    assert run.stdout.strip() == "hf_attnres kernels: phase2 of column 7 (sublayer 1 of its block)"


def test_bound_calls_check_their_arguments_and_keep_their_decoder():
    """The decoder's calls as bound builtins (what decoding uses, skipping pybind11's dispatch): bad arguments
    raise a clear TypeError or the kernels' own check, and the calls outlive every other reference to it."""
    module, d = fused_kernels(), 16
    queries, gammas = [torch.randn(d) for _ in range(3)], [torch.ones(d) for _ in range(3)]
    decoder = module.Decoder.create(queries, gammas, [], [], 1, d, 2, 1e-5)
    phase1, phase2 = decoder.bound_calls()
    del decoder
    gc.collect()
    sources = (torch.randn(1, 1, d),)
    h = phase1(sources, 0, 2)  # columns 0 and 1 of the first block, over the embedding alone
    assert torch.equal(h, sources[0])  # one source: weight 1 whatever the query
    assert torch.equal(phase2(h, 1, 1), h)  # the partial sum equal to that source: any blend of the two is it
    with pytest.raises(TypeError, match=r"phase1\(sources: list\[Tensor\]"):
        phase1(sources[0], 0, 2)
    with pytest.raises(TypeError, match="phase2 takes tensors"):
        phase2("h", 1, 1)
    with pytest.raises(TypeError, match="phase2 takes integer indices"):
        phase2(h, "1", 1)
    with pytest.raises(RuntimeError, match=r"phase2 of column 7 \(sublayer 1"):
        phase2(h, 7, 1)


@torch.no_grad()
def test_reused_state_sees_parameters_changed_in_place():
    """The state kept between decoding steps reads the parameters themselves: a change between two steps
    shows in the next one exactly as on the plain-torch path, which keeps nothing."""
    fused_kernels()
    ids = token_ids(batch=1, seq=5)
    with without_fused_kernels():
        expected = decode(tiny_attnres("block", num_hidden_layers=4, attn_res_block_size=2), ids, 4, change_at=2)
    got = decode(tiny_attnres("block", num_hidden_layers=4, attn_res_block_size=2), ids, 4, change_at=2)
    assert (expected[2] - expected[1]).abs().max() > 1e-2  # the change matters
    assert max((g - e).abs().max().item() for g, e in zip(got, expected)) < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_fused_half_precision_within_plain_torch_floor(dtype):
    """In bf16/fp16 the kernels compute in fp32 and round h once, as the plain-torch path does. Noise floor:
    that path's own error against the fp32 model; the kernels may not exceed it by more than half again."""
    fused_kernels()
    model = _routed_model()
    ids = token_ids(seq=9)
    reference = model(ids).logits
    half = model.to(dtype)
    with without_fused_kernels():
        floor = (half(ids).logits.float() - reference).abs().max().item()
    error = (half(ids).logits.float() - reference).abs().max().item()
    print(f"{dtype}: max |logit error| fused {error:.4g}, plain torch {floor:.4g}")
    assert error <= 1.5 * floor


@torch.no_grad()
def test_depth_weights_do_not_use_the_kernels_and_autograd_has_no_source_stack(monkeypatch):
    """The kernels return no depth weights: those keep the plain-torch source stack. Under autograd there is no
    source stack; the two phases' autograd functions use the kernels themselves (tests below)."""
    fused_kernels()
    model = tiny_attnres("block")
    ids = token_ids(seq=6)
    layers = list(model.model.layers)
    embeds = model.model.embed_tokens(ids)
    assert type(model.model._source_stack(embeds, layers, False)) is modeling_attnres.FusedSourceStack
    assert type(model.model._source_stack(embeds, layers, True)) is modeling_attnres.SourceStack
    with torch.enable_grad():
        assert model.model._source_stack(embeds, layers, False) is None


def _routed_model(hidden: int = 64):
    """A block model whose routing is far from uniform (random queries and key-norm weights), with random
    weights in the RMSNorms that read the depth attention (which the kernels apply in inference). A hidden size
    that is not a multiple of 16 takes the kernels' loops past their 16-lane vectors."""
    model = tiny_attnres("block", num_hidden_layers=5, attn_res_block_size=4, hidden_size=hidden)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # key_norm, input_layernorm, post_attention_layernorm, the final norm
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("hidden", [64, 40])
@torch.no_grad()
def test_fused_prefill_split_over_threads_equals_plain_torch(hidden):
    """A prompt of more tokens than one thread takes (64) is split over torch's threads: same logits."""
    fused_kernels()
    model = _routed_model(hidden)
    ids = token_ids(batch=3, seq=150)
    with without_fused_kernels():
        expected = model(ids).logits
    stack = model.model._source_stack(model.model.embed_tokens(ids), list(model.model.layers), False)
    assert type(stack) is modeling_attnres.FusedSourceStack and stack.normed
    # fp32 rounding of two summation orders; the logits are O(1)
    assert (model(ids).logits - expected).abs().max() < 2e-5


@torch.no_grad()
def test_reading_norms_run_themselves_where_they_must(monkeypatch):
    """The kernels apply the RMSNorms that read the depth attention only where nothing can tell: a norm with a
    hook, any global module hook, or a patched LlamaRMSNorm forward (as kernel libraries patch it) runs as a
    module, and the logits follow what it computes."""
    fused_kernels()
    model = _routed_model()
    ids = token_ids(batch=2, seq=80)
    embeds, layers = model.model.embed_tokens(ids), list(model.model.layers)

    def normed() -> bool:
        return model.model._source_stack(embeds, layers, False).normed

    with without_fused_kernels():
        expected = model(ids).logits
    assert normed()
    calls = []
    handle = layers[2].post_attention_layernorm.register_forward_hook(lambda m, a, out: calls.append(out))
    assert not normed()
    assert (model(ids).logits - expected).abs().max() < 2e-5 and len(calls) == 1
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: None)
    assert not normed()
    handle.remove()
    assert normed()

    forward = modeling_attnres.LlamaRMSNorm.forward
    monkeypatch.setattr(modeling_attnres.LlamaRMSNorm, "forward", lambda self, x: 2 * forward(self, x))
    assert not normed()
    with without_fused_kernels():
        patched = model(ids).logits
    assert (patched - expected).abs().max() > 1e-2  # the patch matters
    assert (model(ids).logits - patched).abs().max() < 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [64, 40])
def test_training_reading_norm_equals_llama_rmsnorm(dtype, hidden):
    """In training the kernels apply a reading norm in one pass each way: the output and the gradients of h
    and of the weight against transformers' LlamaRMSNorm module reading h in the model's dtype. In fp32 only
    summation orders differ. In bf16/fp16 one rounding of h / rms may land on the other side, as 1 / sqrt and
    torch's rsqrt differ in their last fp32 bit: at most one unit in the last place of the output's dtype at
    each value, and the weight's gradient, a sum over tokens of products rounded one by one in the module's
    backward, within one unit at its largest entry."""
    fused_kernels()
    torch.manual_seed(0)
    norm = modeling_attnres.LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    like = torch.empty(1, dtype=dtype)
    h = (3 * torch.randn(3, 150, hidden)).requires_grad_()
    grad = torch.randn(3, 150, hidden).to(dtype)

    def run(fused: bool):
        h.grad = norm.weight.grad = None
        x = modeling_attnres.reading_norm(norm, h, like) if fused else norm(h.to(dtype))
        assert (type(x.grad_fn).__name__ == "_ReadingNormBackward") == fused
        x.backward(grad)
        return x.detach().float(), h.grad.clone(), norm.weight.grad.float()

    (x, grad_h, grad_w), (x_ref, grad_h_ref, grad_w_ref) = run(True), run(False)
    if dtype == torch.float32:
        assert (x - x_ref).abs().max() <= 1e-6 * x_ref.abs().max()
        assert (grad_h - grad_h_ref).abs().max() <= 1e-6 * grad_h_ref.abs().max()
        assert (grad_w - grad_w_ref).abs().max() <= 1e-5 * grad_w_ref.abs().max()
        return
    ulp = torch.finfo(dtype).eps  # the dtype's spacing relative to the value's binade
    for got, want in ((x, x_ref), (grad_h, grad_h_ref)):
        spacing = ulp * torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(torch.finfo(dtype).tiny))))
        assert ((got - want).abs() <= spacing).all()
    assert (grad_w - grad_w_ref).abs().max() <= 2 * ulp * grad_w_ref.abs().max()


def test_training_reading_norm_with_a_hook_runs_as_a_module():
    """A hook on a reading norm sees its call in training too: the kernels leave that norm to the module."""
    fused_kernels()
    model = _routed_model()
    ids = token_ids(2, 80)
    norm = model.model.layers[1].post_attention_layernorm
    calls = []
    handle = norm.register_forward_hook(lambda m, a, out: calls.append(out))
    model(ids, labels=ids).loss.backward()
    handle.remove()
    assert len(calls) == 1 and type(calls[0].grad_fn).__name__ != "_ReadingNormBackward"


@pytest.mark.parametrize("tokens, hidden", [((2, 9), 64), ((3, 150), 64), ((3, 150), 40)],
                         ids=["one thread", "split over threads", "hidden 40"])
def test_fused_training_step_equals_plain_torch(tokens, hidden, monkeypatch):
    """Loss and every parameter's gradient through the fused phases against the plain-torch autograd
    functions, with phase 2's products handed down to phase 1's backward as there."""
    fused_kernels()
    model = _routed_model(hidden)
    ids = token_ids(*tokens)

    def step(kernels: bool):
        model.zero_grad()
        if kernels:
            loss = model(ids, labels=ids).loss
        else:
            with without_fused_kernels():
                loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    fused = modeling_attnres._cpu_kernels
    monkeypatch.setattr(modeling_attnres, "_cpu_kernels", lambda like: calls.append(fused(like)) or calls[-1])
    loss, grads = step(True)
    assert calls and all(c is not None for c in calls)
    expected_loss, expected = step(False)
    assert (loss - expected_loss).abs() < 1e-5
    for name, e in expected.items():
        # fp32, different summation orders: relative to the gradient's scale, as against the equations
        assert (grads[name] - e).abs().max() <= 1e-4 * e.abs().max() + 1e-6, name


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The loader as in a new process, building into an empty cache."""
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("HF_ATTNRES_CACHE", str(tmp_path))
    return tmp_path


def test_failed_build_warns_and_models_run_without_kernels(fresh_loader, monkeypatch, caplog):
    def no_compiler(directory, verbose):
        (directory / "partial.o").write_text("half a build")
        raise RuntimeError("Error building extension 'hf_attnres_kernels'\nc++: command not found")

    monkeypatch.setattr(kernels, "_compile", no_compiler)
    with caplog.at_level(logging.WARNING, logger="hf_attnres.kernels"):
        assert kernels.get(modeling_attnres.FUSED_ABI) is None
        assert kernels.get(modeling_attnres.FUSED_ABI) is None  # not retried
    warnings = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "c++: command not found" in warnings[0] and "build-kernels" in warnings[0]
    # nothing half-built is left where a later load would find it
    assert not kernels.build_directory().exists() and not list((fresh_loader / "kernels").iterdir())
    model = tiny_attnres("block")
    ids = token_ids(seq=6)
    with torch.no_grad():
        got = model(ids).logits
        with without_fused_kernels():
            assert torch.equal(got, model(ids).logits)


def test_disabled_by_environment(fresh_loader, monkeypatch):
    monkeypatch.setattr(kernels, "_compile", lambda *a: pytest.fail("must not build"))
    monkeypatch.setenv("HF_ATTNRES_KERNELS", "0")
    assert kernels.get(modeling_attnres.FUSED_ABI) is None and not kernels._tried


@torch.no_grad()
def test_loaded_kernels_unused_when_disabled_or_of_another_version(monkeypatch):
    fused_kernels()
    assert kernels.get(modeling_attnres.FUSED_ABI + 1) is None  # e.g. a Hub folder's code of another release
    model = tiny_attnres("block")
    embeds, layers = model.model.embed_tokens(token_ids(seq=6)), list(model.model.layers)
    monkeypatch.setenv("HF_ATTNRES_KERNELS", "0")
    assert type(model.model._source_stack(embeds, layers, False)) is modeling_attnres.SourceStack


def test_build_kernels_cli_reports_the_build(capsys):
    from hf_attnres.cli import main

    fused_kernels()
    assert main(["build-kernels"]) == 0
    assert str(kernels.build_directory()) in capsys.readouterr().out
    assert (kernels.build_directory() / "hf_attnres_kernels.so").is_file()


@torch.no_grad()
def test_unhashable_cache_decodes_without_reuse():
    """A cache class that defines equality (so is unhashable) still decodes, only without the kept state."""
    from transformers import DynamicCache

    class ComparableCache(DynamicCache):
        def __eq__(self, other):
            return self is other

    fused_kernels()
    model = tiny_attnres("block", num_hidden_layers=4, attn_res_block_size=2)
    ids = token_ids(batch=1, seq=5)
    out = model(input_ids=ids, past_key_values=ComparableCache(config=model.config), use_cache=True)
    step = model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True).logits
    with without_fused_kernels():
        out = model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
        expected = model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True).logits
    assert (step - expected).abs().max() < 2e-5
