"""Configuration of Attention Residuals (AttnRes) models.

Hub-portable: imports only the standard library and transformers, so this file can be copied into a model
folder and loaded with ``trust_remote_code=True`` without hf_attnres installed.
"""

import math
import warnings

from transformers.configuration_utils import strict  # huggingface_hub's strict dataclasses, as transformers uses them
from transformers.models.llama.configuration_llama import LlamaConfig

# Version of the AttnRes config/weight format written by this code. Bump it when a saved model would mean
# something different to older code; loading a newer one warns.
ATTNRES_VERSION = "0.1.0"

ATTN_RES_MODES = ("block", "full", "none")
# Transformer families whose decoder an AttnRes model can carry exactly (attention variants differ; the
# MLP, RMSNorm and rotary embedding are Llama's in all of them).
ATTN_RES_BACKBONES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_MAX_BLOCKS = 8
# Where a model folder's code files define the classes (`save_pretrained` copies both files beside the weights).
AUTO_MAP = {
    "AutoConfig": "configuration_attnres.AttnResConfig",
    "AutoModel": "modeling_attnres.AttnResModel",
    "AutoModelForCausalLM": "modeling_attnres.AttnResForCausalLM",
}


def default_block_size(num_sublayers: int, max_blocks: int = DEFAULT_MAX_BLOCKS) -> int:
    """Smallest even block size (in sublayers) giving at most ``max_blocks`` blocks (the paper uses ~8)."""
    size = max(2, math.ceil(num_sublayers / max_blocks))
    return size + (size % 2)


def _version_tuple(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in str(version).split("."))


@strict
class AttnResConfig(LlamaConfig):
    r"""Llama configuration plus the AttnRes fields.

    Every [`LlamaConfig`] field keeps its meaning (GQA, `head_dim`, `rope_parameters` including scaled rope
    types, `attention_bias`, `mlp_bias`, `tie_word_embeddings`, ...). Added:

    attn_res_mode (`str`, defaults to `"block"`):
        `"block"`: Block AttnRes (spec §3); `"full"`: Full AttnRes over every earlier sublayer output (spec §2);
        `"none"`: standard residuals, numerically the same function as `LlamaForCausalLM` with the same
        weights, so baselines and AttnRes runs share one code path.
    attn_res_block_size (`int`, *optional*):
        Sublayers per block as the paper counts them: attention and MLP each count one, so a decoder layer is
        two sublayers and the size must be even (block boundaries fall between decoder layers). Blocks are
        filled from the first layer on; when the size does not divide `2 * num_hidden_layers`, the last block
        holds the remaining sublayers (e.g. 60 sublayers with size 8: seven blocks of 8 and one of 4). When
        unset, the smallest even size giving at most 8 blocks. Ignored unless the mode is `"block"`.
    attn_res_scale_norm_eps (`bool`, defaults to `True`):
        Divide the epsilon of every RMSNorm that reads the depth-attention output by `n**2`, `n` being the
        number of sources at that point. With zero pseudo-queries the output is the standard residual stream
        divided by `n`, and `RMSNorm_eps(x / n) = RMSNorm_{eps n^2}(x)`, so this makes a converted Llama
        exact (spec §4). It only changes a constant inside the norm; turn it off for paper-literal training.
    attn_res_implementation (`str`, defaults to `"auto"`):
        Which implementation computes the depth attention, by name (see `DepthAttentionInterface` in the modeling
        file): `"eager"` is the reference, the equations in plain torch ops; `"auto"` runs fla-core's fused
        kernel (`"fla"`) on CUDA where that package is installed and the reference elsewhere. `import hf_attnres`
        adds the package's own; a name not available where the model loads falls back to `"eager"` with a
        warning. Every implementation computes the same function; switch on a loaded model with
        `model.set_attn_res_implementation(name)`.
    attn_res_backbone (`str`, defaults to `"llama"`):
        Which family's attention module each decoder layer uses: `"llama"`, `"mistral"` (sliding window),
        `"qwen2"` (q/k/v bias) or `"qwen3"` (q/k RMSNorm).
    sliding_window (`int`, *optional*), layer_types (`list[str]`, *optional*):
        As in Mistral/Qwen2/Qwen3: the attention window and, per layer, `"full_attention"` or
        `"sliding_attention"`. Unused by the Llama backbone.
    attnres_version (`str`):
        Version of the AttnRes format that wrote this config; loading a newer one warns.
    """

    model_type = "attnres"
    # The depth history, not only `hidden_states`, flows between layers: no pipeline-parallel plan.
    base_model_pp_plan = None

    attn_res_mode: str = "block"
    attn_res_block_size: int | None = None
    attn_res_scale_norm_eps: bool = True
    attn_res_backbone: str = "llama"
    attn_res_implementation: str = "auto"
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    attnres_version: str = ATTNRES_VERSION

    def __post_init__(self, **kwargs):
        self._check_attn_res_fields()
        if getattr(self, "auto_map", None) is None:  # a saved folder loads with any of the three Auto classes
            self.auto_map = dict(AUTO_MAP)
        if self.attn_res_mode == "block" and self.attn_res_block_size is None:
            self.attn_res_block_size = default_block_size(2 * self.num_hidden_layers)
        if self.layer_types is None:
            self.layer_types = [
                "sliding_attention" if self.sliding_window is not None else "full_attention"
            ] * self.num_hidden_layers
        if _version_tuple(self.attnres_version) > _version_tuple(ATTNRES_VERSION):
            warnings.warn(
                f"This config was written by AttnRes format {self.attnres_version}, newer than the code loading "
                f"it ({ATTNRES_VERSION}); results may differ. Upgrade hf-attnres (or re-download the model's code).",
                stacklevel=2,
            )
        super().__post_init__(**kwargs)

    def _check_attn_res_fields(self) -> None:
        if self.attn_res_mode not in ATTN_RES_MODES:
            raise ValueError(f"attn_res_mode={self.attn_res_mode!r} is not valid: use one of {ATTN_RES_MODES}.")
        if self.attn_res_backbone not in ATTN_RES_BACKBONES:
            raise ValueError(
                f"attn_res_backbone={self.attn_res_backbone!r} is not valid: use one of {ATTN_RES_BACKBONES}."
            )
        if not isinstance(self.attn_res_implementation, str):
            raise ValueError(
                f"attn_res_implementation={self.attn_res_implementation!r} is not valid: use a name such as 'auto'."
            )
        size = self.attn_res_block_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 2 or size % 2):
            raise ValueError(
                f"attn_res_block_size={size!r} is not valid: use a positive even number of sublayers (attention "
                "and MLP count one each, so blocks end between decoder layers), or None for the default "
                f"(at most {DEFAULT_MAX_BLOCKS} blocks)."
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window!r} is not valid: use a positive int or None.")

    # ---- block structure (structural, derived from the fields above) ----
    @property
    def num_sublayers(self) -> int:
        """L in the paper: attention and MLP of every decoder layer."""
        return 2 * self.num_hidden_layers

    @property
    def sublayers_per_block(self) -> int | None:
        """S: 1 in Full AttnRes (every sublayer output is its own source), None with standard residuals."""
        return {"full": 1, "block": self.attn_res_block_size, "none": None}[self.attn_res_mode]

    @property
    def num_blocks(self) -> int:
        """N: number of block representations besides the embedding (N = L for Full AttnRes)."""
        size = self.sublayers_per_block
        return 0 if size is None else math.ceil(self.num_sublayers / size)

    def starts_block(self, sublayer: int) -> bool:
        """Whether 0-based `sublayer` opens a new block (the running partial sum is closed before it)."""
        size = self.sublayers_per_block
        return size is not None and sublayer % size == 0

    def num_sources(self, sublayer: int) -> int:
        """Sources the depth attention before 0-based `sublayer` attends over (`num_sublayers`: the final one)."""
        size = self.sublayers_per_block
        return 1 if size is None else math.ceil(sublayer / size) + 1

    def source_names(self, sublayer: int) -> list[str]:
        """Readable names of those sources, in order: the embedding, completed blocks, the partial block."""
        n = self.num_sources(sublayer)
        if self.attn_res_mode == "none":
            return ["residual stream"]
        complete = sublayer == self.num_sublayers or self.starts_block(sublayer)
        unit = "sublayer" if self.attn_res_mode == "full" else "block"
        names = ["embedding"] + [f"{unit} {i}" for i in range(1, n)]
        if not complete and n > 1:
            names[-1] = f"{unit} {n - 1} (partial)"
        return names


__all__ = ["AttnResConfig", "ATTNRES_VERSION", "default_block_size"]
