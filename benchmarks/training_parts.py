"""What Block AttnRes's fused CPU kernels save in a training step, part by part, against the modules' eager ops.

Forward plus backward, on one batch's shapes (SmolLM2-135M's hidden size 576, 4 x 512 tokens, fp32, random
values), the two variants alternating and the order swapped every repeat; printed: each variant's median and
the median of the repeats' own ratios (fused / eager).

- `reading norm`: one RMSNorm reading a depth-attention result, transformers' LlamaRMSNorm module against the
  kernels' one pass each way (`reading_norm`). A training step runs 2 L + 1 of them (61 here). Llama runs the
  same norms as modules: this saving is not a cost AttnRes adds.
- `final aggregation`: the depth attention over all sources before the final norm (1 + blocks sources, 9
  here), the AttnResidual module's ops against a phase 1 of one query (`_Phase1`, in the kernels).

    python benchmarks/training_parts.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from overhead import steady_allocator  # benchmarks/ is on the path when this script runs

from hf_attnres import AttnResConfig
from hf_attnres.modeling import modeling_attnres as modeling


def timed(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--tokens", type=int, default=4 * 512)
    p.add_argument("--sources", type=int, default=9, help="sources of the final aggregation (1 + blocks)")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    steady_allocator(__file__)
    if modeling._fused_kernels() is None:
        sys.exit("the fused kernels are unavailable here (`hf-attnres build-kernels --verbose` shows why)")

    torch.manual_seed(0)
    config = AttnResConfig(hidden_size=args.hidden, num_attention_heads=1, num_hidden_layers=2, vocab_size=8)
    norm = modeling.LlamaRMSNorm(args.hidden, eps=1e-5)
    residual = modeling.AttnResidual(config)
    with torch.no_grad():
        residual.pseudo_query.normal_(0, 0.05)
    h = torch.randn(args.tokens, args.hidden, requires_grad=True)
    sources = [torch.randn(args.tokens, args.hidden, requires_grad=True) for _ in range(args.sources)]
    grad = torch.randn(args.tokens, args.hidden)
    parts = {
        "reading norm": (lambda: norm(h).backward(grad),
                         lambda: modeling.reading_norm(norm, h, h).backward(grad)),
        "final aggregation": (lambda: residual(sources)[0].backward(grad),
                              lambda: modeling.block_phase1([residual], sources, False).mixed[0].backward(grad)),
    }
    for name, (eager, fused) in parts.items():
        for _ in range(3):  # warm-up
            eager(), fused()
        times = {"eager": [], "fused": []}
        for r in range(args.repeats):
            for kind, f in ((("eager", eager), ("fused", fused)) if r % 2 == 0 else (("fused", fused), ("eager", eager))):
                times[kind].append(timed(f))
        ratio = statistics.median(f / e for e, f in zip(times["eager"], times["fused"]))
        print(f"{name}: eager {1e3 * statistics.median(times['eager']):.2f} ms, fused "
              f"{1e3 * statistics.median(times['fused']):.2f} ms (forward + backward, medians of {args.repeats}); "
              f"fused / eager {ratio:.3f} (median of paired ratios)")


if __name__ == "__main__":
    main()
