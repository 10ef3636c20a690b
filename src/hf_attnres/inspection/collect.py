"""The numbers behind the inspection figures, measured with forward hooks on a Llama-style PreNorm decoder.

Why hooks: the same module names (`input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`, the
final `norm`) exist in AttnRes models in every mode and in plain Llama/Mistral/Qwen models, so one pass
measures both and the two can be compared on the same text. What is measured, per sublayer (attention of
decoder layer t is sublayer 2t, its MLP 2t+1):

- ``input_rms``: RMS of what the sublayer's RMSNorm reads (the residual stream with standard residuals, the
  depth-attention mix with AttnRes), ``output_rms``: RMS of the sublayer's output. RMS of a token is
  ``sqrt(mean(x**2))`` over the hidden dimension; the value reported is its mean over non-padding tokens.
- ``output_grad_norm``: L2 norm of d(loss)/d(sublayer output) over all non-padding tokens of all texts, for
  the mean next-token cross-entropy over all texts (so batching does not change it). This is what the
  gradient figure shows on its left: how much gradient reaches each depth.
- ``param_grad_norm``: L2 norm of the gradient of the same loss w.r.t. the sublayer's own weights (q/k/v/o
  projections, or gate/up/down), norms and pseudo-queries excluded.
- ``depth_attention`` (AttnRes block/full only): the depth-attention weights averaged over non-padding tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# A few real English paragraphs, used when no text is given: enough tokens (~300) for stable averages.
DEFAULT_TEXTS: tuple[str, ...] = (
    "The river rose during the night, and by morning the low fields along the valley were under water. "
    "Farmers moved their animals to higher ground while volunteers filled sandbags outside the school. "
    "By the afternoon the rain had stopped, but the water kept rising for another day before it slowly "
    "returned to its banks.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into "
    "sugar and oxygen. The sugar feeds the plant and, through the food chain, almost every animal on Earth, "
    "while the oxygen released into the air is what we breathe.",
    "To make a simple loaf of bread, mix flour, water, salt and a little yeast, then knead the dough until "
    "it is smooth. Leave it to rise in a warm place for an hour, shape it, let it rise again, and bake it "
    "in a hot oven until the crust is brown and the loaf sounds hollow when tapped.",
    "The library opens at nine on weekdays and at ten on Saturdays. Members may borrow up to six books for "
    "three weeks, and books can be renewed online unless another reader has reserved them.",
)


@dataclass
class DepthAttentionMap:
    """Mean depth-attention weights on a common source axis, ready to draw as a heatmap.

    Rows are the sublayers in order plus the final aggregation; columns are the embedding then block
    1..N (Block AttnRes) or sublayer 1..L (Full AttnRes). Row i attends over its first ``len(sources[i])``
    columns; the other cells are ``None`` (not available yet). In Block AttnRes the running partial sum of
    the row's own block sits in that block's column, at index ``partial[i]``.
    """

    mode: str
    block_size: int | None
    columns: list[str]
    rows: list[str]
    sources: list[list[str]]
    weights: list[list[float | None]]
    partial: list[int | None]


@dataclass
class ModelInspection:
    """Everything measured on one model (see the module docstring for the definitions)."""

    label: str
    model_type: str
    attn_res_mode: str  # "block" | "full" | "none" (plain Llama-style models report "none")
    num_hidden_layers: int
    num_texts: int
    num_tokens: int  # non-padding tokens the averages run over
    num_loss_tokens: int  # next-token targets of the loss
    loss: float | None
    sublayer_names: list[str]
    sublayer_kinds: list[str]  # "attention" | "mlp"
    sublayer_layers: list[int]
    input_rms: list[float]
    output_rms: list[float]
    final_input_rms: float  # what the final norm reads (after the final aggregation with AttnRes)
    output_grad_norm: list[float] | None = None
    param_grad_norm: list[float] | None = None
    pseudo_query_grad_norm: list[float] | None = None  # AttnRes only: one per sublayer plus the final one
    depth_attention: DepthAttentionMap | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_sublayers(self) -> int:
        return len(self.sublayer_kinds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInspection:
        """Inverse of `to_dict` (e.g. one entry of inspection.json's "models"), to redraw without the model."""
        data = dict(data)
        if data.get("depth_attention") is not None:
            data["depth_attention"] = DepthAttentionMap(**data["depth_attention"])
        return cls(**data)


def sublayer_name(index: int) -> str:
    """Readable name of 0-based sublayer `index` (attention of layer t is 2t, its MLP 2t + 1)."""
    return f"layer {index // 2} {'attention' if index % 2 == 0 else 'MLP'}"


# --------------------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------------------
def read_texts(path: str | Path, max_texts: int | None = None) -> list[str]:
    """Texts of a file or folder as `train` and `eval` read them (`load_documents`: a `.txt`/`.md` file is one
    text, a `.jsonl`/`.json`/`.parquet` row is one), so every command agrees on what a document is."""
    from ..training.data import load_documents

    if not Path(path).exists():
        raise FileNotFoundError(f"text file {path} does not exist.")
    texts = [t for t in load_documents([str(path)])["text"] if t.strip()]
    if not texts:
        raise ValueError(f"no text found in {path}: give a file with text in it.")
    return texts[:max_texts] if max_texts is not None else texts


def tokenize_batches(
    tokenizer: Any, texts: Sequence[str], max_tokens: int = 256, batch_size: int = 4
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches, right-padded by hand so tokenizers without a pad token work.

    Right padding keeps every real token at the same position as when the text is run alone (causal
    attention never lets a real token see the padding), so per-token numbers do not depend on batching.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("No texts to inspect.")
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens} is too small: the language-modelling loss needs at least 2 tokens.")
    encoded = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]
        encoded.append(list(ids)[:max_tokens])
    if all(len(ids) == 0 for ids in encoded):
        raise ValueError("Every text tokenized to nothing.")
    encoded = [ids for ids in encoded if ids]
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        batches.append((input_ids, mask))
    return batches


# --------------------------------------------------------------------------------------------------------
# Model structure
# --------------------------------------------------------------------------------------------------------
_SUBLAYER_MODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (`model.model` for a *ForCausalLM), checked to be Llama-style PreNorm."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None) or getattr(model, "model", None)
    if base is None and hasattr(model, "layers"):
        base = model
    layers = getattr(base, "layers", None)
    if layers is None or not hasattr(base, "norm") or not all(
        all(hasattr(layer, name) for name in _SUBLAYER_MODULES) for layer in layers
    ):
        raise ValueError(
            f"Cannot inspect {type(model).__name__}: inspection needs a Llama-style PreNorm decoder "
            "(model.model.layers[t] with input_layernorm, self_attn, post_attention_layernorm, mlp, and a "
            "final model.model.norm), as in AttnRes, Llama, Mistral and Qwen models."
        )
    return base


def attn_res_mode(model: nn.Module) -> str:
    """"block"/"full" for AttnRes models; "none" for AttnRes with standard residuals and plain models."""
    return getattr(model.config, "attn_res_mode", None) or "none"


def _is_attnres(model: nn.Module) -> bool:
    return getattr(model.config, "attn_res_mode", None) is not None


@contextmanager
def _inspection_mode(model: nn.Module, gradients: bool):
    """Eval mode (no dropout, no activation checkpointing) and, for gradients, every weight requiring grad
    (a frozen model still gets its gradients measured); the model is restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        if gradients:
            for p, _ in flags:
                p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _token_rms_sum(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Sum over non-padding tokens of the per-token RMS over the hidden dimension (fp32)."""
    rms = x.detach().float().pow(2).mean(-1).sqrt()
    return float((rms * mask).sum())


def _masked_sq_sum(g: torch.Tensor | None, mask: torch.Tensor) -> float:
    if g is None:
        return 0.0
    return float((g.detach().float().pow(2).sum(-1) * mask).sum())


# --------------------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------------------
def collect_inspection(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str] | None = None,
    *,
    label: str | None = None,
    max_tokens: int = 256,
    batch_size: int = 4,
    gradients: bool = True,
) -> ModelInspection:
    """Measure depth-attention weights, magnitudes and gradients of `model` on `texts` (see module docstring).

    One forward (and, with `gradients`, one backward through `torch.autograd.grad`, so existing `.grad`
    fields are left untouched) per batch; the model's train/eval mode and `requires_grad` flags are restored.
    """
    texts = list(DEFAULT_TEXTS) if texts is None else ([texts] if isinstance(texts, str) else list(texts))
    base = _decoder(model)
    config = model.config
    layers = list(base.layers)
    num_sub = 2 * len(layers)
    mode = attn_res_mode(model)
    is_attnres = _is_attnres(model)
    device = next(model.parameters()).device
    batches = tokenize_batches(tokenizer, texts, max_tokens=max_tokens, batch_size=batch_size)
    num_tokens = int(sum(mask.sum() for _, mask in batches))
    num_loss_tokens = int(sum(mask[:, 1:].sum() for _, mask in batches))
    if gradients and num_loss_tokens == 0:
        raise ValueError("The texts are too short for a language-modelling loss (every text is one token).")

    in_sum = [0.0] * num_sub
    out_sum = [0.0] * num_sub
    final_in_sum = 0.0
    out_grad_sq = [0.0] * num_sub
    alpha_sum: list[torch.Tensor] | None = None
    loss_total = 0.0
    param_groups = [list((layer.self_attn if i % 2 == 0 else layer.mlp).parameters())
                    for layer in layers for i in (0, 1)]
    query_params: list[nn.Parameter] = []
    if mode != "none":
        for layer in layers:
            query_params += [layer.self_attn_res.pseudo_query, layer.mlp_res.pseudo_query]
        query_params.append(base.final_res.pseudo_query)
    param_grad_acc: list[list[torch.Tensor | None]] = [[None] * len(g) for g in param_groups]
    query_grad_acc: list[torch.Tensor | None] = [None] * len(query_params)

    # The hooks read these per batch.
    state: dict[str, Any] = {}

    def record_input(index: int):
        def hook(module, args, output):
            nonlocal final_in_sum
            x = args[0] if args else None
            if x is None:
                return
            if index == num_sub:
                final_in_sum += _token_rms_sum(x, state["mask"])
            else:
                in_sum[index] += _token_rms_sum(x, state["mask"])
        return hook

    def record_output(index: int):
        def hook(module, args, output):
            y = output[0] if isinstance(output, (tuple, list)) else output
            out_sum[index] += _token_rms_sum(y, state["mask"])
            state["outputs"][index] = y
        return hook

    handles = []
    try:
        for t, layer in enumerate(layers):
            handles.append(layer.input_layernorm.register_forward_hook(record_input(2 * t)))
            handles.append(layer.self_attn.register_forward_hook(record_output(2 * t)))
            handles.append(layer.post_attention_layernorm.register_forward_hook(record_input(2 * t + 1)))
            handles.append(layer.mlp.register_forward_hook(record_output(2 * t + 1)))
        handles.append(base.norm.register_forward_hook(record_input(num_sub)))

        with _inspection_mode(model, gradients), torch.set_grad_enabled(gradients):
            for input_ids, mask in batches:
                input_ids, mask = input_ids.to(device), mask.to(device)
                state["mask"] = mask.float()
                state["outputs"] = [None] * num_sub
                kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=mask, use_cache=False)
                if is_attnres:
                    kwargs["output_depth_attentions"] = True
                out = model(**kwargs)
                if getattr(out, "logits", None) is None:
                    raise ValueError(
                        f"{type(model).__name__} returns no logits: inspect a *ForCausalLM model (the gradients "
                        "come from the language-modelling loss)."
                    )

                if mode != "none":
                    alphas = out.depth_attentions
                    if len(alphas) != num_sub + 1:
                        raise RuntimeError(f"Expected {num_sub + 1} depth-attention tensors, got {len(alphas)}.")
                    sums = [(a.detach().double() * mask[..., None].double()).sum((0, 1)) for a in alphas]
                    alpha_sum = sums if alpha_sum is None else [s + a for s, a in zip(alpha_sum, sums)]

                # Mean next-token cross-entropy over all targets of all texts: summed per batch, divided by
                # the total count, so gradients accumulate exactly across batches.
                logits = out.logits[:, :-1].float()
                targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                loss = nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
                ) / max(num_loss_tokens, 1)
                loss_total += float(loss.detach())
                if not gradients:
                    continue

                outputs = state["outputs"]
                if any(y is None for y in outputs):
                    raise RuntimeError("A sublayer's forward hook did not fire; the model is not a standard decoder.")
                flat_params = [p for group in param_groups for p in group]
                inputs = [y for y in outputs] + flat_params + query_params
                grads = torch.autograd.grad(loss, inputs, allow_unused=True)
                for i in range(num_sub):
                    out_grad_sq[i] += _masked_sq_sum(grads[i], state["mask"])
                k = num_sub
                for gi, group in enumerate(param_groups):
                    for pi in range(len(group)):
                        g = grads[k]
                        k += 1
                        if g is not None:
                            acc = param_grad_acc[gi][pi]
                            param_grad_acc[gi][pi] = g.float() if acc is None else acc + g.float()
                for qi in range(len(query_params)):
                    g = grads[k + qi]
                    if g is not None:
                        acc = query_grad_acc[qi]
                        query_grad_acc[qi] = g.float() if acc is None else acc + g.float()
                del out, logits, loss, grads, inputs
                state["outputs"] = None
    finally:
        for handle in handles:
            handle.remove()
        state.clear()

    def norm(tensors: Iterable[torch.Tensor | None]) -> float:
        return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors if t is not None))

    inspection = ModelInspection(
        label=label or getattr(config, "name_or_path", None) or type(model).__name__,
        model_type=getattr(config, "model_type", type(model).__name__),
        attn_res_mode=mode,
        num_hidden_layers=len(layers),
        num_texts=sum(ids.shape[0] for ids, _ in batches),
        num_tokens=num_tokens,
        num_loss_tokens=num_loss_tokens,
        loss=loss_total if num_loss_tokens else None,
        sublayer_names=[sublayer_name(i) for i in range(num_sub)],
        sublayer_kinds=["attention" if i % 2 == 0 else "mlp" for i in range(num_sub)],
        sublayer_layers=[i // 2 for i in range(num_sub)],
        input_rms=[s / num_tokens for s in in_sum],
        output_rms=[s / num_tokens for s in out_sum],
        final_input_rms=final_in_sum / num_tokens,
    )
    if gradients:
        inspection.output_grad_norm = [math.sqrt(s) for s in out_grad_sq]
        inspection.param_grad_norm = [norm(group) for group in param_grad_acc]
        if query_params:
            inspection.pseudo_query_grad_norm = [norm([g]) for g in query_grad_acc]
    if alpha_sum is not None:
        inspection.depth_attention = depth_attention_map(config, [(s / num_tokens).tolist() for s in alpha_sum])
    return inspection


def depth_attention_map(config: Any, mean_weights: Sequence[Sequence[float]]) -> DepthAttentionMap:
    """Place each row's mean weights (`mean_weights[i]` over `config.source_names(i)`) on the common axis."""
    num_sub = config.num_sublayers
    if len(mean_weights) != num_sub + 1:
        raise ValueError(f"Expected {num_sub + 1} rows of depth weights, got {len(mean_weights)}.")
    unit = "sublayer" if config.attn_res_mode == "full" else "block"
    columns = ["embedding"] + [f"{unit} {j}" for j in range(1, config.num_blocks + 1)]
    rows, sources, weights, partial = [], [], [], []
    for i, row in enumerate(mean_weights):
        names = config.source_names(i)
        if len(names) != len(row):
            raise ValueError(f"Row {i} has {len(row)} weights but {len(names)} sources.")
        rows.append(sublayer_name(i) if i < num_sub else "final output")
        sources.append(list(names))
        weights.append([float(w) for w in row] + [None] * (len(columns) - len(row)))
        partial.append(len(row) - 1 if names[-1].endswith("(partial)") else None)
    return DepthAttentionMap(
        mode=config.attn_res_mode,
        block_size=config.sublayers_per_block,
        columns=columns,
        rows=rows,
        sources=sources,
        weights=weights,
        partial=partial,
    )
