"""`convert_checkpoint`: a Llama-family checkpoint in, a Hub-ready AttnRes folder out, equal at initialisation.

Steps: open and validate the source (nothing written yet); map its config; match its tensors against the
AttnRes model's (names and shapes); stream them into shards in a temporary folder beside OUT, adding the new
AttnRes parameters (zero pseudo-queries, unit key norms); write config, code, generation config, tokenizer;
verify against the source; write the model card; rename the folder into place; optionally upload.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import hub
from ..model_card import markdown_table, render_model_card
from ..modeling import AttnResConfig, AttnResForCausalLM, is_attn_res_param
from ..modeling.modeling_attnres import AttnResidual
from .families import attnres_config, expected_shapes, is_ignored_source_tensor, some_names
from .sources import Source, open_source
from .streaming import LoadedTensor, TensorRef, write_checkpoint
from .verify import FP32_TOLERANCE, Verification, check, verify_conversion

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"


@dataclass
class ConversionReport:
    """What a conversion wrote and, when verified, how closely it matches the source."""

    out: Path
    source: str
    family: str
    settings: dict[str, object]
    files: list[str]
    num_parameters: int
    seconds: float
    verification: Verification | None = None
    dropped_config_keys: list[str] = field(default_factory=list)
    pushed_to: str | None = None

    @property
    def max_abs_logit_diff(self) -> float | None:
        return self.verification.max_abs_logit_diff if self.verification else None

    @property
    def ppl_source(self) -> float | None:
        return self.verification.ppl_source if self.verification else None

    @property
    def ppl_converted(self) -> float | None:
        return self.verification.ppl_converted if self.verification else None

    @property
    def greedy_source(self) -> str | list[int] | None:
        """The source's greedy continuation: text, or token ids when there is no tokenizer."""
        v = self.verification
        return v and (v.greedy_source if v.greedy_text_source is None else v.greedy_text_source)

    @property
    def greedy_converted(self) -> str | list[int] | None:
        v = self.verification
        return v and (v.greedy_converted if v.greedy_text_converted is None else v.greedy_text_converted)

    def summary(self) -> str:
        lines = [
            f"Converted {self.source} ({self.family}, {self.num_parameters / 1e6:.1f}M parameters) into {self.out} "
            f"in {self.seconds:.1f} s: {', '.join(self.files)}"
        ]
        lines += [f"  {k}: {v}" for k, v in self.settings.items()]
        if self.dropped_config_keys:
            lines.append(
                f"  source config keys with no AttnRes meaning (dropped): {', '.join(self.dropped_config_keys)}"
            )
        if self.verification is None:
            lines.append("  not verified")
        else:
            lines += [f"  {k}: {v}" for k, v in self.verification.as_rows()]
            lines += [
                f"  greedy continuation, {who}: {text!r}"
                for who, text in (("source", self.greedy_source), ("converted", self.greedy_converted))
            ]
        if self.pushed_to:
            lines.append(f"  uploaded to https://huggingface.co/{self.pushed_to}")
        return "\n".join(lines)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() in ("auto", "none"):
        return None
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(
            f"dtype={dtype!r} is not supported: use one of float32, bfloat16, float16 (or auto)."
        ) from None


def plan_tensors(source: Source, config: AttnResConfig) -> list[TensorRef]:
    """The tensors of the AttnRes checkpoint: the source's, in storage order, then the new AttnRes ones.

    Raises ValueError when the source's tensors do not match what its config describes, naming the
    differences. A tied `lm_head.weight` is dropped (transformers ties it on load, as `save_pretrained` drops it).
    """
    expected = expected_shapes(config)
    new = [n for n in expected if is_attn_res_param(n)]  # in the model's own (layer) order
    stored = [
        t
        for t in source.tensors
        if not is_ignored_source_tensor(t.name) and not (config.tie_word_embeddings and t.name == "lm_head.weight")
    ]
    names = {t.name for t in stored}
    wanted = set(expected) - set(new)
    problems = []
    if wanted - names:
        problems.append(f"missing {some_names(wanted - names)}")
    if names - wanted:
        problems.append(f"unexpected {some_names(names - wanted)}")
    problems += [
        f"{t.name} has shape {list(t.shape)}, the config implies {list(expected[t.name])}"
        for t in stored
        if t.name in expected and tuple(t.shape) != expected[t.name]
    ][:5]
    if problems:
        raise ValueError(
            f"the weights of {source.spec} do not match its config ({source.config.model_type}, "
            f"{config.num_hidden_layers} layers, hidden {config.hidden_size}): "
            + "; ".join(problems)
            + ". Check that config.json belongs to these weights."
        )
    init = AttnResidual(config, 0).state_dict()  # the model's own initial values: zero query, unit key norm
    for name in new:
        value = init[next(k for k in init if name.endswith("." + k))]
        stored.append(LoadedTensor(name=name, shape=tuple(value.shape), dtype=value.dtype, load=lambda v=value: v))
    return stored


def _check_paths(source: Source, out: Path) -> None:
    """Never let the output replace, contain or sit inside the source: the source must stay untouched."""
    src, dst = source.path.resolve(), out.resolve()
    if src == dst or dst in src.parents or (source.path.is_dir() and src in dst.parents):
        raise ValueError(f"the output {out} overlaps the source {source.path}: write the conversion somewhere else.")


def _verification_bytes(num_parameters: int) -> float:
    """Memory verification needs: one fp32 model at a time (x1.5 while loading) plus 1 GiB of activations."""
    return num_parameters * 4 * 1.5 + (1 << 30)


def _fits_in_memory(num_parameters: int) -> bool:
    """Whether verification fits in the available RAM."""
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return _verification_bytes(num_parameters) < available


@dataclass
class ConvertConfig:
    """A conversion (`hf-attnres convert --help` documents each field; `convert_checkpoint` the behaviour)."""

    src: str = field(metadata={"positional": "SRC", "help": "local checkpoint folder, Hub repo id, or .gguf file "
                               "(in Python also a `Source` from `open_source`)"})
    out: str = field(metadata={"positional": "OUT", "help": "output folder (written to a temporary folder, renamed "
                               "when complete)"})
    mode: str = field(default="block", metadata={"help": "AttnRes variant", "choices": ("block", "full")})
    block_size: int | None = field(default=None, metadata={"help": "sublayers per block, even (default: smallest "
                                                           "giving at most 8 blocks)"})
    dtype: str | None = field(default=None, metadata={"help": "output dtype (default: the source's)",
                                                      "choices": ("auto", *DTYPES)})
    max_shard_size: str | int = field(default="2GB", metadata={"help": "largest output shard, e.g. 2GB, 500MB; "
                                      "output shards follow the source's and are split further only above this size"})
    verify: bool | None = field(default=None, metadata={"help": "compare with the source and fail above --tolerance "
                                "(default: on when a model fits in memory)"})
    tolerance: float = field(default=FP32_TOLERANCE, metadata={"help": "largest max |logit difference| accepted "
                                                               "in fp32"})
    force: bool = field(default=False, metadata={"help": "replace a non-empty OUT"})
    push_to_hub: str | None = field(default=None, metadata={"help": "upload the finished folder to this Hub repo",
                                                            "metavar": "REPO"})
    private: bool | None = field(default=None, metadata={"help": "with --push-to-hub: create a private repo"})
    base_model: str | None = field(default=None, metadata={"help": "model-card base_model when the source does "
                                                           "not name it"})
    license: str | None = field(default=None, metadata={"help": "model-card license when the source does not "
                                                        "state it"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})


def convert_checkpoint(
    config: ConvertConfig | str | os.PathLike | Source, out: str | os.PathLike | None = None, **options
) -> ConversionReport:
    """Convert a Llama/Mistral/Qwen2/Qwen3 checkpoint into an AttnRes folder that equals it at initialisation.

    Call it with a `ConvertConfig`, or as `convert_checkpoint(src, out, mode="block", ...)` with the same fields.
    `src`: a local folder (safetensors, single or sharded, or `.bin`), a Hub repo id, a `.gguf` file
    (dequantised through transformers: the only source built in memory), or a `Source` from `open_source`
    (e.g. to convert one dequantised GGUF several ways). Folders are streamed shard by shard, never loaded
    whole; output shards follow the source's, split above `max_shard_size`. `dtype`: output dtype (default:
    the source's). `verify`: compare with the source and fail when the max |logit difference| in fp32 exceeds
    `tolerance`; None verifies when a model fits in memory. `force`: replace a non-empty `out`.
    `push_to_hub`: upload the finished folder to this repo. `base_model` / `license`: model-card metadata when
    the source does not state them.
    """
    if isinstance(config, ConvertConfig):
        if out is not None or options:
            raise TypeError("pass either a ConvertConfig or (src, out, **options), not both")
    else:
        config = ConvertConfig(src=config, out=out, **options)
    src, out, mode, block_size, dtype = config.src, config.out, config.mode, config.block_size, config.dtype
    max_shard_size, verify, tolerance, force = config.max_shard_size, config.verify, config.tolerance, config.force
    push_to_hub, progress, base_model, license = config.push_to_hub, config.progress, config.base_model, config.license
    private = config.private
    start = time.perf_counter()
    out_dtype = parse_dtype(dtype)
    source = src if isinstance(src, Source) else open_source(src)
    out = Path(out)
    _check_paths(source, out)
    out_dtype = out_dtype or source.dtype
    config, dropped = attnres_config(source.config, mode=mode, block_size=block_size, dtype=out_dtype)
    tensors = plan_tensors(source, config)
    if verify is None:
        verify = _fits_in_memory(source.num_parameters)
        if not verify:
            logger.warning(
                "Not verifying: two-pass verification needs about %.1f GB of free memory.",
                _verification_bytes(source.num_parameters) / 1e9,
            )
    settings = {
        "source": _source_name(source),
        "attn_res_mode": config.attn_res_mode,
        "attn_res_block_size": config.attn_res_block_size if config.attn_res_mode == "block" else None,
        "sublayers / blocks": f"{config.num_sublayers} / {config.num_blocks}",
        "attn_res_backbone": config.attn_res_backbone,
        "attn_res_scale_norm_eps": config.attn_res_scale_norm_eps,
        "dtype": str(out_dtype).removeprefix("torch."),
        "attnres_version": config.attnres_version,
    }

    with hub.atomic_output_dir(out, overwrite=force) as tmp:
        files = write_checkpoint(tensors, tmp, out_dtype, max_shard_size, progress)
        _write_metadata(source, config, tmp)
        result = None
        if verify:
            logger.info("Verifying against the source (%s) ...", type(source.config).__name__)
            result = verify_conversion(
                lambda: source.load_model(keep=isinstance(src, Source)),  # ours alone: no copy needed
                lambda: AttnResForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval(),
                source.load_tokenizer(),
                out_dtype=out_dtype,
                tolerance=tolerance,
            )
            check(result)
            if result.half and not result.half.within_noise:
                logger.warning(
                    "In %s the converted model's mean |logit difference| from the fp32 source (%.3g) is above "
                    "the source's own %s noise (%.3g).",
                    result.half.dtype,
                    result.half.diff_mean,
                    result.half.dtype,
                    result.half.noise_mean,
                )
        base = base_model or source.base_model
        card = render_model_card(
            title=f"{base or _source_name(source)} with Attention Residuals ({config.attn_res_mode} AttnRes)",
            summary=_summary(source, config, verified=result is not None),
            settings=settings,
            model_id=push_to_hub or out.name,
            base_model=base,
            license=license or source.license,
            figures=_figures(result),
            tags=["conversion", source.config.model_type],
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")

    report = ConversionReport(
        out=out,
        source=source.spec,
        family=source.config.model_type,
        settings=settings,
        files=files,
        num_parameters=sum(t.numel for t in tensors),
        seconds=time.perf_counter() - start,
        verification=result,
        dropped_config_keys=dropped,
    )
    if push_to_hub:
        report.pushed_to = upload(out, push_to_hub, private=private)
    return report


def _write_metadata(source: Source, config: AttnResConfig, folder: Path) -> None:
    """Everything `hub.save_for_hub` writes besides the weights: config with auto_map, code, generation
    config, tokenizer (copied as is, with its chat template)."""
    from transformers import GenerationConfig

    config.auto_map = dict(hub.AUTO_MAP)
    config.save_pretrained(folder)
    for name in hub.CODE_FILES:
        shutil.copyfile(MODELING_DIR / name, folder / name)
    generation = source.generation_config() or GenerationConfig.from_model_config(config)
    generation.save_pretrained(folder)
    for path in source.tokenizer_paths():
        (shutil.copytree if path.is_dir() else shutil.copyfile)(path, folder / path.name)
    if source.tokenizer is not None:  # GGUF: the tokenizer rebuilt by transformers
        source.tokenizer.save_pretrained(folder)


def _source_name(source: Source) -> str:
    """How the card names the source: the repo id, or the file/folder name (local paths mean nothing on the Hub)."""
    return source.spec if source.kind == "hub" else source.path.resolve().name


def _summary(source: Source, config: AttnResConfig, verified: bool) -> str:
    kind = {"gguf": "a dequantised GGUF file", "hub": "the Hub", "folder": "a local checkpoint"}[source.kind]
    text = (
        f"`{_source_name(source)}` ({kind}, {source.config.model_type}) converted to an AttnRes model by "
        "`hf-attnres convert`. "
        "Every original weight is kept under its original name; the new AttnRes parameters start at the paper's "
        "initialisation (zero pseudo-queries, unit key norms), and each RMSNorm that reads the depth mixture has its "
        "epsilon divided by n^2 (n = number of sources), so at initialisation the model computes exactly what the "
        "original computed. It is a starting point for continued pretraining: the routing is learned, not converted."
    )
    if not verified:
        text += "\n\nThis conversion was **not verified** against the source."
    return text


def _figures(result: Verification | None) -> str | None:
    if result is None:
        return None
    inputs = "built-in English text" if result.ppl_source is not None else "fixed token ids (no tokenizer)"
    text = (
        f"Verification against the source model (transformers' own class) on {inputs}, both in fp32 on identical "
        "weights:\n\n" + markdown_table(result.as_rows(), header=("figure", "value"))
    )
    if result.greedy_text_source is not None:
        text += f"\n\nGreedy continuation of the converted model:\n\n```text\n{result.greedy_text_converted}\n```"
    return text


def upload(folder: Path, repo_id: str, private: bool | None = None) -> str:
    """Upload a finished folder to the Hub with huggingface_hub (creates the repo if needed)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return hub.push_folder(folder, repo_id, private=private, commit_message="Upload AttnRes conversion (hf-attnres)")[0]
    except (HfHubHTTPError, OSError) as e:
        raise RuntimeError(
            f"the conversion is complete in {folder}, but uploading it to {repo_id!r} failed ({e}). "
            "Check `hf auth login` and retry with `hf upload`."
        ) from e
