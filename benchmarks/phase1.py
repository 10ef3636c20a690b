"""Phase 1 of Block AttnRes's two-phase computation: the loop form against the stacked (batched-matmul) form.

`PHASE1_STACKED_DEVICES` in the modeling file picks the form per device; this script times both side by side
on one device (forward, and forward + backward) for a block's S = 8 queries over n completed sources, and
prints stacked / loop ratios, so the choice can be re-checked on new hardware (it applies to training). It
also times the inference form, `SourceStack` (a fresh stack per call, so its per-source work is counted).

    python benchmarks/phase1.py                                   # CPU fp32, 4 x 512 tokens
    python benchmarks/phase1.py --device cuda --dtype bfloat16 --tokens 32768
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from overhead import DTYPES, sync  # benchmarks/ is on the path when this script runs

from hf_attnres.modeling import modeling_attnres as modeling


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of `fn` after one warm-up, waiting for queued GPU work."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--tokens", type=int, default=2048, help="batch x sequence length")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--queries", type=int, default=8, help="sublayers per block (S)")
    p.add_argument("--sources", default="2,5,8", help="numbers of completed sources (n) to time")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device, dtype = args.device, DTYPES[args.dtype]
    queries = torch.randn(args.hidden, args.queries, device=device, requires_grad=True)
    print(f"torch {torch.__version__}, {device}, {args.dtype}, {args.tokens} tokens, d={args.hidden}, S={args.queries}")
    for n in map(int, args.sources.split(",")):
        sources = [torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(n)]

        def forward():
            with torch.no_grad():
                modeling._Phase1.apply(queries, 1e-5, {}, *sources)

        def forward_backward():
            *mixed, lse, _ = modeling._Phase1.apply(queries, 1e-5, {}, *sources)
            torch.autograd.grad([*mixed, lse], [queries, *sources], [torch.ones_like(m) for m in (*mixed, lse)])

        stack_queries = torch.randn(args.hidden, n * args.queries + 1, device=device)

        def inference_stack():
            with torch.no_grad():  # phase 1 of the n-th block: every source is complete
                modeling.SourceStack(sources[0], stack_queries, args.queries, 1e-5).phase1(n - 1, sources, False)

        result = {}
        for form, devices in (("loop", ()), ("stacked", (torch.device(device).type,))):
            modeling.PHASE1_STACKED_DEVICES = devices
            result[form] = (timed(forward, device, args.repeats), timed(forward_backward, device, args.repeats))
        (f_loop, fb_loop), (f_stack, fb_stack) = result["loop"], result["stacked"]
        f_source_stack = timed(inference_stack, device, args.repeats)
        print(f"  n={n}: forward loop {f_loop * 1e3:.2f} ms, stacked {f_stack * 1e3:.2f} ms (ratio {f_stack / f_loop:.2f}); "
              f"forward+backward loop {fb_loop * 1e3:.2f} ms, stacked {fb_stack * 1e3:.2f} ms (ratio {fb_stack / fb_loop:.2f}); "
              f"inference source stack {f_source_stack * 1e3:.2f} ms (ratio to loop {f_source_stack / f_loop:.2f})")


if __name__ == "__main__":
    main()
