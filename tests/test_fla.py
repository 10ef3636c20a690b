"""`attn_res_implementation="fla"` (fla-core's fused Triton kernel, what `"auto"` runs on CUDA) on CPU, under
Triton's interpreter (TRITON_INTERPRET=1), against the transcription of the equations (test_equations.py).

The wrapper in the modeling file and its argument mapping (query, key-norm weight and eps, source order, the
layout of the depth weights, every gradient) are what this checks without a GPU; test_gpu.py checks the same
on CUDA. Skipped where fla-core or triton is not installed (CI installs neither: `pip install fla-core einops
triton` adds them, ~290 MB), or where fla was already imported compiled (a CUDA machine runs test_gpu.py).

fla runs only on CUDA as shipped; three test-only shims let its kernels run in the interpreter, each undoing a
CUDA-only assumption and none touching the arithmetic: its host-side "requires CUDA tensors" check is dropped,
each autotuned kernel keeps its first configuration (autotuning benchmarks on a GPU), and its kernels' `range`
yields Triton scalars, as compiled loops do (the interpreter yields Python ints, which have no `.to`). Tiny
shapes: the interpreter runs each program in Python (~25 ms). Its bf16 stores truncate where a GPU rounds to
nearest (one bf16 ulp, within the bf16 bound of `module_against_transcription`).
"""

import builtins
import importlib.util
import inspect
import os
import sys
import textwrap

import pytest
import torch

from _tiny import tiny_attnres, token_ids

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("fla") is None or importlib.util.find_spec("triton") is None,
    reason="needs fla-core and triton (pip install fla-core einops triton)",
)
# Triton decides at import whether its functions (its own standard library included) are interpreted, and torch
# or transformers import it first: the tests below run in a child pytest started with the variable set.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA, test_gpu.py runs the compiled kernel")
def test_fla_kernel_under_triton_interpreter():
    """Runs this file's interpreter tests in a child pytest with TRITON_INTERPRET=1; all must pass, none skip."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", __file__,
                           "-k", "not test_fla_kernel_under_triton_interpreter"],
                          capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in summary and "skipped" not in summary, summary


@pytest.fixture(scope="module")
def interpreted_fla():
    """fla's AttnRes kernels in Triton's interpreter, on CPU tensors, behind `"fla"` (see the module docstring)."""
    if not INTERPRETED:
        pytest.skip("runs in the child pytest of test_fla_kernel_under_triton_interpreter (TRITON_INTERPRET=1)")
    import triton.language as tl
    from fla.ops.attnres import fused

    from hf_attnres.modeling import modeling_attnres

    guard = '    if not residuals[0].is_cuda:\n        raise ValueError("Triton attnres requires CUDA tensors")\n'
    source = textwrap.dedent(inspect.getsource(fused.fused_attnres_fwd))
    kernels = [getattr(fused, name, None) for name in
               ("attnres_fwd_kernel", "attnres_bwd_kernel_dv", "attnres_bwd_kernel_dqdw")]
    if guard not in source or not all(hasattr(k, "configs") for k in kernels):
        pytest.skip(f"fla-core {getattr(sys.modules.get('fla'), '__version__', '?')} changed: the interpreter "
                    "shims (written for 0.6.0) do not apply")
    originals = (fused.fused_attnres_fwd, [k.configs for k in kernels])
    namespace = dict(vars(fused))
    exec(source.replace(guard, ""), namespace)  # the same function without its device check
    fused.fused_attnres_fwd = namespace["fused_attnres_fwd"]
    for kernel in kernels:
        kernel.configs = kernel.configs[:1]

    def scalar_range(*bounds):
        for i in builtins.range(*(int(b) for b in bounds)):
            yield tl.full([], i, tl.int32)

    fused.range = scalar_range
    devices = modeling_attnres.FLA_DEVICES
    modeling_attnres.FLA_DEVICES = ("cuda", "cpu")
    assert "fla" in modeling_attnres.ALL_DEPTH_ATTENTION_FUNCTIONS and modeling_attnres._fla_fused_attnres()
    yield
    modeling_attnres.FLA_DEVICES = devices
    fused.fused_attnres_fwd, configs = originals
    for kernel, c in zip(kernels, configs):
        kernel.configs = c
    del fused.range


@pytest.fixture
def kernel_calls(interpreted_fla, monkeypatch):
    """Counts calls into fla's kernel, so a silent fallback to the reference would show."""
    from hf_attnres.modeling import modeling_attnres

    kernel, calls = modeling_attnres._fla_fused_attnres(), []

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(modeling_attnres, "_fla_fused_attnres", lambda: counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sublayer", [4, 5], ids=["opens a block", "partial block"])
def test_fla_module_matches_transcription(sublayer, dtype, kernel_calls):
    """Output, depth weights and gradients of sources, query and key-norm weight; bf16 within the floor."""
    from test_gpu import module_against_transcription

    module_against_transcription("fla", "cpu", dtype, sublayer)
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("mode, layers, size", [("block", 3, 4), ("full", 2, 1)], ids=["block", "full"])
def test_fla_model_matches_equations(mode, layers, size, kernel_calls):
    """A whole model run by the kernel: logits, every depth weight, every parameter's gradient (fp32)."""
    from test_equations import reference_logits

    extra = {"attn_res_block_size": size} if mode == "block" else {}
    model = tiny_attnres(mode, num_hidden_layers=layers, attn_implementation="sdpa", attn_res_implementation="fla",
                         **extra).train()
    ids = token_ids(batch=1, seq=6)
    alphas = []
    reference = reference_logits(model, ids, size, True, alphas)
    out = model(ids, output_depth_attentions=True)
    assert len(kernel_calls) == model.config.num_sublayers + 1
    assert (out.logits - reference).abs().max() < 2e-5
    for i, (got, want) in enumerate(zip(out.depth_attentions, alphas, strict=True)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"depth weights of entry {i}")
    params = [p for _, p in model.named_parameters()]
    grad_out = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(0))
    got = torch.autograd.grad((out.logits * grad_out).sum(), params)
    expected = torch.autograd.grad((reference * grad_out).sum(), params)
    for (name, _), g, e in zip(model.named_parameters(), got, expected):
        assert (g - e).abs().max() <= 1e-4 * e.abs().max() + 1e-6, name


def test_fla_falls_back_to_the_reference_where_it_cannot_run(kernel_calls):
    """Mixed source dtypes (autocast: an fp32 embedding beside bf16 outputs) and torch.compile run the reference."""
    from hf_attnres.modeling.modeling_attnres import AttnResidual, eager_depth_attention

    config = tiny_attnres("block", attn_res_implementation="fla").config
    res = AttnResidual(config, 3)
    sources = [torch.randn(1, 2, 64), torch.randn(1, 2, 64).bfloat16()]
    h, _ = res(sources)
    assert not kernel_calls
    torch.testing.assert_close(h, eager_depth_attention(res, sources)[0])
    compiled = torch.compile(lambda s: res(s), fullgraph=True, backend="eager")
    compiled([torch.randn(1, 2, 64), torch.randn(1, 2, 64)])
    assert not kernel_calls
