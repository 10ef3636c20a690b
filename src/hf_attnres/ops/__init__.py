"""Depth-attention implementations beyond the reference, registered by name on `import hf_attnres`.

Select one with `config.attn_res_implementation` (or `model.set_attn_res_implementation(name)`); each computes
the function of `depth_attention` in the modeling file and is tested against the same transcription of the
equations (tests/test_equations.py).
"""

from ..modeling.modeling_attnres import DepthAttentionInterface
from .decoding import stacked_depth_attention
from .two_phase import two_phase_depth_attention

DepthAttentionInterface.register("two_phase", two_phase_depth_attention)
DepthAttentionInterface.register("stacked", stacked_depth_attention)

__all__ = ["stacked_depth_attention", "two_phase_depth_attention"]
