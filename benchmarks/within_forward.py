"""Block AttnRes prefill on CPU: two variants of the fused kernels' work compared inside one forward.

Whole prefills on a shared 2-core VM vary by 10-50% from one repeat to the next, more than the 1-4% in question.
Here each forward runs half its blocks one way (A) and half the other (B), in a pattern with as much work on
each side, swapped in the next forward: with R = time of the A blocks / time of the B blocks, sqrt(R_f R_f+1)
cancels both what the blocks contain and whatever slows the machine for longer than a forward. Printed: its
median, mean and standard error over the pairs of forwards. The final aggregation is not timed.

    python benchmarks/within_forward.py --compare norms    # kernels applying the reading norms (A) or not (B)
    python benchmarks/within_forward.py --compare calls    # the two phases' calls (A) against no-ops (B)
    python benchmarks/within_forward.py --compare phase2   # phase 2's calls (A) against no-ops (B)

A no-op phase returns a source or the partial sum in place of its result: the forward then computes something
else, at Llama's cost per sublayer. With `calls` and `phase2` both sides apply the norms through the modules. Defaults as `overhead.py` (SmolLM2-135M's dimensions, random weights, fp32,
sdpa, 4 x 512 tokens, glibc set to reuse freed memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from overhead import build, prefill, steady_allocator  # benchmarks/ is on the path when this script runs

from hf_attnres.modeling import modeling_attnres as modeling


class NoPhase2:
    """Phase 2 as a no-op: the sublayer reads its partial sum (through its norm module)."""

    def phase2(self, phase1, column: int, partial: torch.Tensor):
        return partial, None


class Alternating:
    """A source stack that sends each block to side A or B and marks the time each block's phase 1 starts.
    `normed` and `plain` are `FusedSourceStack`s, the kernels applying the reading norms in the first only.
    norms: A `normed`, B `plain`; calls and phase2: A `plain`, B the same with no-ops for the calls."""

    normed = True  # the final aggregation (not timed) goes to `normed`

    def __init__(self, normed, plain, side_of_block, marks: list, compare: str):
        self.normed_stack, self.plain, self.block_size = normed, plain, normed.block_size
        self.side_of_block, self.marks, self.compare = side_of_block, marks, compare

    def phase1(self, block: int, sources: list[torch.Tensor], keep_weights: bool):
        self.marks.append(time.perf_counter())
        if self.side_of_block(block) == "a":
            return (self.normed_stack if self.compare == "norms" else self.plain).phase1(block, sources, keep_weights)
        if self.compare == "norms":
            return self.plain.phase1(block, sources, keep_weights)
        if self.compare == "phase2":
            return dataclasses.replace(self.plain.phase1(block, sources, keep_weights), stack=NoPhase2())
        # no phase 1 either: the block's first sublayer reads the last completed source
        first = block * self.block_size
        return modeling.BlockPhase1(sources, None, self.plain.eps, (sources[-1],), None, None, {}, False, NoPhase2(),
                                    (first,))

    def final(self, sources: list[torch.Tensor]):
        self.marks.append(time.perf_counter())
        return self.normed_stack.final(sources)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", choices=["norms", "calls", "phase2"], default="norms")
    p.add_argument("--pairs", type=int, default=20, help="pairs of forwards (each block timed both ways)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--pattern", default="01100110", help="blocks on side A (0) or B (1) in even forwards")
    args = p.parse_args()
    steady_allocator(__file__)

    torch.set_grad_enabled(False)
    dims = SimpleNamespace(vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, device="cpu",
                           dtype="float32")
    model = build("block", dims).eval()
    if modeling._fused_kernels() is None:
        sys.exit("the fused kernels are unavailable here (`hf-attnres build-kernels --verbose` shows why)")
    pattern = [int(c) for c in args.pattern]
    forward, marks = [0], []

    def side_of_block(block: int) -> str:
        return "a" if (pattern[block % len(pattern)] ^ forward[0] % 2) == 0 else "b"

    fused_stack = modeling.AttnResModel._fused_stack

    def alternating(self, kernels, like, layers, cache):
        a = fused_stack(self, kernels, like, layers, None)
        fusable = modeling.fusable_norms
        modeling.fusable_norms = lambda norms, like: False
        try:
            b = fused_stack(self, kernels, like, layers, None)
        finally:
            modeling.fusable_norms = fusable
        if not a.normed or b.normed:
            sys.exit("the reading norms cannot be fused here (a hook or a patched LlamaRMSNorm?)")
        return Alternating(a, b, side_of_block, marks, args.compare)

    modeling.AttnResModel._fused_stack = alternating
    ids = torch.randint(0, dims.vocab, (args.batch, args.seq))
    logs = []
    for f in range(2 * args.pairs + 1):  # forward 0 warms up
        forward[0], marks[:] = f, []
        prefill(model, ids)
        if f == 0:
            continue
        times = [end - start for start, end in zip(marks, marks[1:])]
        side = [side_of_block(b) for b in range(len(times))]
        logs.append(math.log(sum(t for t, s in zip(times, side) if s == "a")
                             / sum(t for t, s in zip(times, side) if s == "b")))
        if f % 2 == 0:
            print(f"  pair {f // 2}: A / B {math.exp((logs[-2] + logs[-1]) / 2):.4f}, forward {sum(times):.2f} s",
                  flush=True)
    ratios = [math.exp((x + y) / 2) for x, y in zip(logs[0::2], logs[1::2])]
    label = {"norms": "norms applied by the kernels / by the modules", "calls": "the phases' calls / no-ops",
             "phase2": "phase 2's calls / no-ops"}[args.compare]
    print(f"{label}, blocks' time: median {statistics.median(ratios):.4f}, mean {statistics.mean(ratios):.4f}, "
          f"standard error {statistics.stdev(ratios) / math.sqrt(len(ratios)):.4f} ({len(ratios)} pairs)")


if __name__ == "__main__":
    main()
