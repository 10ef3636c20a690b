"""How fast can source-by-source depth attention decode on this CPU? Lower bounds for requirement 5 of issue 20.

Decoding one token, the reference `depth_attention` costs the fixed cost of its small ops (1-3 us each on one
token), a few per source. This times decode tokens/s at batch 1 against Llama exactly as `overhead.py` does
(`decode_tok_s`: SmolLM2-135M dimensions, random weights, fp32, the models interleaved token by token), for:

- `block`: the reference (`"eager"`);
- `block:stacked`: the package's decoding arrangement (all sources stacked, a fixed number of ops);
- `block:compiled`: the reference under `torch.compile` (inductor, one graph per number of sources and shape),
  the `"compile"` implementation issue 20 asks for if it helps on CPU;
- `block:floor_per_source`: NOT the AttnRes function. The fewest ops any source-by-source arrangement needs,
  one dot with the query and one multiply-add per source (no norms, no casts): a lower bound on the cost of
  every arrangement that, like the reference, reads the sources one by one so as to keep no stacked copy;
- `block:floor_none`: NOT the AttnRes function. The depth attention returns the partial sum: what everything
  else AttnRes adds (more norms, block bookkeeping) costs.

    python benchmarks/decode_floor.py              # ~10 min on 2 cores; any overhead.py option passes through
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead  # noqa: E402

from hf_attnres.modeling.modeling_attnres import DepthAttentionInterface, eager_depth_attention  # noqa: E402

# Decoding calls the depth attention with 1 to 9 sources, on the prompt and on one token: 18 graphs, more than
# dynamo's default limit of 8 recompilations, after which it would silently run the reference uncompiled.
torch._dynamo.config.recompile_limit = 64
compiled_depth_attention = torch.compile(eager_depth_attention, dynamic=False)


def compiled(module, sources: list[torch.Tensor], inv_rms=(), **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return compiled_depth_attention(module, sources, inv_rms)


def floor_per_source(module, sources: list[torch.Tensor], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """A bound, not AttnRes: per source one dot and one multiply-add, the rest of the equation left out."""
    dots = [value @ module.pseudo_query for value in sources]  # the model's 1/rms of each block left unused
    alpha = torch.stack(dots, dim=-1).softmax(dim=-1)
    weights = alpha.unsqueeze(-1).unbind(dim=-2)
    h = weights[0] * sources[0]
    for weight, value in zip(weights[1:], sources[1:]):
        h.addcmul_(weight, value)
    return h, alpha


def floor_none(module, sources: list[torch.Tensor], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """A bound, not AttnRes: no depth attention at all."""
    return sources[-1], sources[-1].new_ones(*sources[-1].shape[:-1], len(sources))


def main() -> None:
    overhead.steady_allocator(__file__)  # the same glibc settings as overhead.py's timings (re-runs this script)
    DepthAttentionInterface.register("compiled", compiled)
    DepthAttentionInterface.register("floor_per_source", floor_per_source)
    DepthAttentionInterface.register("floor_none", floor_none)
    sys.argv = [sys.argv[0], "--modes", "block,block:stacked,block:compiled,block:floor_per_source,block:floor_none",
                "--metrics", "decode_tok_s", *sys.argv[1:]]
    overhead.main()


if __name__ == "__main__":
    main()
