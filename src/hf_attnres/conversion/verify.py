"""Check that a converted AttnRes model computes what its source computed (spec §4: exact at init).

The source runs as transformers' own class (LlamaForCausalLM, Qwen2ForCausalLM, ...), the converted model as
AttnResForCausalLM loaded from the written folder. One model is in memory at a time. Both run in fp32 on the
*same* weights (when the output is half precision, the source's weights are rounded to it first), so the
difference measures the conversion, not the cast. For half-precision outputs the half-precision run is
reported against the source's own half-vs-fp32 noise floor.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

FP32_TOLERANCE = 1e-4  # max |logit difference| allowed in fp32 (float rounding is ~1e-6 on real checkpoints)
GREEDY_TOKENS = 64

# Built-in text (our own sentences, no license attached): prose, a list, digits and code-like text.
VERIFY_TEXT = (
    "The old lighthouse stood at the edge of the harbour for more than a century. Every evening the keeper climbed "
    "the narrow stairs, trimmed the wick and wound the clockwork that turned the great lens. Ships that passed in the "
    "night never saw him, but they trusted the light, and for a hundred and twelve years not one of them was lost on "
    "the rocks below.\n\n"
    "To bake a simple loaf of bread you need four things: flour, water, salt and yeast. Mix 500 grams of flour with "
    "350 millilitres of warm water, add 10 grams of salt and 7 grams of dried yeast, then knead the dough for ten "
    "minutes until it is smooth.\n\n"
    "def mean(values):\n    return sum(values) / len(values)\n"
)
GREEDY_PROMPT = "The three most important inventions in human history are"
VERIFY_PROMPTS = ("The capital of France is", GREEDY_PROMPT)


@dataclass
class HalfPrecision:
    """The converted model run in half precision, against the source's own half-precision noise.

    Both are measured against the source in fp32 (the checkpoint as published). The criterion is the *mean*
    |logit difference|: the max is dominated by the first (attention-sink) token, whose massive activations
    make any change of rounding order swing its logits by O(1) in bf16 (see `max_*` for that figure).
    """

    dtype: str
    noise_mean: float  # mean |source(half) - source(fp32)|: the checkpoint's own rounding noise
    diff_mean: float  # mean |converted(half) - source(fp32)|
    noise_max: float
    diff_max: float

    @property
    def within_noise(self) -> bool:
        return self.diff_mean <= self.noise_mean


@dataclass
class Verification:
    """Figures of one verification run (fp32 unless said)."""

    max_abs_logit_diff: float
    ppl_source: float | None  # on VERIFY_TEXT; None without a tokenizer
    ppl_converted: float | None
    greedy_source: list[int]
    greedy_converted: list[int]
    greedy_text_source: str | None
    greedy_text_converted: str | None
    greedy_converted_uncached: list[int] | None = None  # the converted model without the KV cache
    tolerance: float = FP32_TOLERANCE
    fp32_noise_floor: float | None = None  # max |source(eager attention) - source(sdpa)|: the source's own fp32 noise
    half: HalfPrecision | None = None  # set when the output is half precision

    @property
    def greedy_identical(self) -> bool:
        return self.greedy_source == self.greedy_converted

    @property
    def cache_consistent(self) -> bool:
        """Cached greedy decoding of the converted model gives what it gives without the cache."""
        return self.greedy_converted_uncached is None or self.greedy_converted == self.greedy_converted_uncached

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_abs_logit_diff) and self.max_abs_logit_diff <= self.tolerance \
            and self.cache_consistent

    def as_rows(self) -> list[tuple[str, str]]:
        """(figure, value) rows for the model card and the CLI summary."""
        rows = [
            ("max abs logit difference (fp32)", f"{self.max_abs_logit_diff:.3g} (tolerance {self.tolerance:g})"),
            ("source's own fp32 noise (eager vs sdpa attention)", _fmt(self.fp32_noise_floor, ".3g")),
            ("perplexity, source (fp32)", _fmt(self.ppl_source)),
            ("perplexity, converted (fp32)", _fmt(self.ppl_converted)),
            (
                f"greedy continuation ({len(self.greedy_source)} tokens, generate with the cache) identical",
                "yes" if self.greedy_identical else "no",
            ),
            ("converted model's greedy continuation with the cache = without it",
             "-" if self.greedy_converted_uncached is None else "yes" if self.cache_consistent else "NO"),
        ]
        if h := self.half:
            rows += [
                (
                    f"{h.dtype}: mean / max abs logit difference, source vs source fp32 (noise floor)",
                    f"{h.noise_mean:.3g} / {h.noise_max:.3g}",
                ),
                (
                    f"{h.dtype}: mean / max abs logit difference, converted vs source fp32",
                    f"{h.diff_mean:.3g} / {h.diff_max:.3g} ({'within' if h.within_noise else 'ABOVE'} the noise floor)",
                ),
            ]
        return rows


class VerificationError(RuntimeError):
    """The converted model does not compute what the source computed."""


def _fmt(x: float | None, spec: str = ".6g") -> str:
    return "-" if x is None else format(x, spec)


def verification_inputs(tokenizer, vocab_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(sequences whose logits are compared, the first being the perplexity text; the greedy prompt).

    Without a tokenizer, fixed pseudo-random ids stand in (perplexity is then meaningless and not reported).
    """
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        text = torch.randint(0, vocab_size, (1, 96), generator=g)
        return [text], text[:, :8]

    def ids(s: str) -> torch.Tensor:
        return tokenizer(s, return_tensors="pt").input_ids

    return [ids(VERIFY_TEXT)] + [ids(p) for p in VERIFY_PROMPTS], ids(GREEDY_PROMPT)


@torch.no_grad()
def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the parameters only, as `from_pretrained(dtype=...)` leaves them: buffers such as the rotary
    `inv_freq` stay fp32 (`model.to(dtype)` would round them too and perturb every position)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


@torch.no_grad()
def _logits(model, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=s).logits.float() for s in sequences]


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) of `ids` under `logits` (from the same forward as the comparison)."""
    return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new_tokens: int, *, use_cache: bool = True) -> list[int]:
    """`new_tokens` tokens of `generate` (greedy, EOS ignored): what users run, cached unless told otherwise.

    A transformers release once broke cached generation while uncached logits stayed identical, so the
    converter checks both paths.
    """
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              use_cache=use_cache, eos_token_id=None, pad_token_id=0)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    return out[0, prompt.shape[1]:].tolist()


def _attention_noise(model, sequences: list[torch.Tensor], reference: list[torch.Tensor]) -> float | None:
    """The model's own fp32 noise: its logits with eager attention against `reference` (its default kernel)."""
    current = model.config._attn_implementation
    if current == "eager":
        return None
    model.set_attn_implementation("eager")
    try:
        return _max_diff(_logits(model, sequences), reference)
    finally:
        model.set_attn_implementation(current)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _mean_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return torch.cat([(x - y).abs().flatten() for x, y in zip(a, b, strict=True)]).mean().item()


def verify_conversion(
    load_source: Callable[[], torch.nn.Module],
    load_converted: Callable[[], torch.nn.Module],
    tokenizer=None,
    *,
    out_dtype: torch.dtype = torch.float32,
    new_tokens: int = GREEDY_TOKENS,
    tolerance: float = FP32_TOLERANCE,
) -> Verification:
    """Run source then converted model (each loaded fp32 by its callable, then freed) and compare them.

    `out_dtype` is the converted checkpoint's dtype: for half precision the source's weights are rounded to
    it before the fp32 comparison, and the half-precision runs are compared against the noise floor.
    """
    half = out_dtype if out_dtype in (torch.bfloat16, torch.float16) else None
    source = load_source()
    sequences, prompt = verification_inputs(tokenizer, source.config.vocab_size)
    text = sequences[0]
    if half:
        src_fp32 = _logits(source, sequences)  # the checkpoint as published, in fp32
        src_half = _logits(cast_parameters(source, half), sequences)
        cast_parameters(source, torch.float32)  # now holds exactly the rounded weights that were written
    src = _logits(source, sequences)
    noise = _attention_noise(source, sequences, src)
    ppl_src = _perplexity(src[0], text) if tokenizer is not None else None
    greedy_src = greedy(source, prompt, new_tokens)
    del source
    gc.collect()

    converted = load_converted()
    conv = _logits(converted, sequences)
    ppl_conv = _perplexity(conv[0], text) if tokenizer is not None else None
    greedy_conv = greedy(converted, prompt, new_tokens)
    greedy_uncached = greedy(converted, prompt, new_tokens, use_cache=False)
    result = Verification(
        max_abs_logit_diff=_max_diff(src, conv),
        ppl_source=ppl_src,
        ppl_converted=ppl_conv,
        greedy_source=greedy_src,
        greedy_converted=greedy_conv,
        greedy_text_source=tokenizer.decode(greedy_src) if tokenizer is not None else None,
        greedy_text_converted=tokenizer.decode(greedy_conv) if tokenizer is not None else None,
        greedy_converted_uncached=greedy_uncached,
        tolerance=tolerance,
        fp32_noise_floor=noise,
    )
    if half:
        conv_half = _logits(cast_parameters(converted, half), sequences)
        result.half = HalfPrecision(
            dtype=str(half).removeprefix("torch."),
            noise_mean=_mean_diff(src_half, src_fp32),
            diff_mean=_mean_diff(conv_half, src_fp32),
            noise_max=_max_diff(src_half, src_fp32),
            diff_max=_max_diff(conv_half, src_fp32),
        )
    return result


def check(result: Verification) -> None:
    """Raise `VerificationError` unless the fp32 difference is within tolerance and cached decoding agrees."""
    if not result.cache_consistent:
        raise VerificationError(
            f"the converted model's greedy continuation with the KV cache ({result.greedy_converted[:8]}...) differs "
            f"from the one without it ({result.greedy_converted_uncached[:8]}...): cached generation is broken with "
            "this transformers release. Nothing was written. Please report it with `pip show transformers`."
        )
    if not result.passed:
        raise VerificationError(
            f"the converted model differs from the source: max |logit difference| {result.max_abs_logit_diff:.3g} in "
            f"fp32 exceeds the tolerance {result.tolerance:g} (the source's own fp32 noise, "
            "eager vs sdpa attention, is "
            f"{_fmt(result.fp32_noise_floor, '.3g')}). Nothing was written. If the difference is of the order of that "
            "noise, rerun with a larger --tolerance; otherwise this is a bug or an unsupported variant of the "
            "architecture: please report it with the source's config.json."
        )
