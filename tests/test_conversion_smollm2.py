"""Conversion of the real SmolLM2-135M-Instruct (GGUF, dequantised through transformers): exactness, bf16,
streaming memory. The checkpoint is loaded once for the module; every comparison is against transformers'
own LlamaForCausalLM holding the unmodified weights."""

import hashlib
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_attnres import AttnResForCausalLM
from hf_attnres.assets import SMOLLM2_BASE_MODEL, SMOLLM2_LICENSE, smollm2_gguf
from hf_attnres.conversion import convert_checkpoint
from hf_attnres.conversion.sources import open_source
from hf_attnres.conversion.verify import VERIFY_TEXT, verify_conversion

pytestmark = pytest.mark.slow
# Text the verification never sees, so the independent check below is not the verifier checking itself.
OTHER_TEXT = (
    "A river that has carved a canyon over millions of years still carries sand to the sea each spring, "
    "and the farmers downstream plant their fields in the silt it leaves behind."
)


def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "convert_bench", Path(__file__).parents[1] / "benchmarks" / "convert.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The GGUF opened once (dequantised), its weights saved as 64 MB safetensors shards, and an independent
    LlamaForCausalLM reference loaded from those shards."""
    source = open_source(smollm2_gguf())
    folder = tmp_path_factory.mktemp("smollm2") / "sharded"
    source.model.save_pretrained(folder, max_shard_size="64MB")
    source.tokenizer.save_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return SimpleNamespace(source=source, folder=folder, reference=reference, tokenizer=source.tokenizer)


@torch.no_grad()
def _logits(model, tokenizer, text):
    return model(**tokenizer(text, return_tensors="pt")).logits


def test_gguf_conversion_is_exact_in_fp32(smol, tmp_path):
    report = convert_checkpoint(
        smol.source, tmp_path / "out", progress=False, verify=True, base_model=SMOLLM2_BASE_MODEL
    )
    v = report.verification
    print(f"\nSmolLM2 fp32: {report.summary()}")
    assert report.max_abs_logit_diff <= 1e-4
    assert len(v.greedy_source) == 64 and v.greedy_source == v.greedy_converted
    assert f"{report.ppl_source:.4g}" == f"{report.ppl_converted:.4g}" and 5 < report.ppl_source < 50

    # independently of the verifier: the converted folder against the reference, on other text
    converted = AttnResForCausalLM.from_pretrained(report.out, dtype=torch.float32).eval()
    for text in (VERIFY_TEXT, OTHER_TEXT):
        diff = (_logits(converted, smol.tokenizer, text) - _logits(smol.reference, smol.tokenizer, text)).abs().max()
        assert diff.item() <= 1e-4, diff.item()

    # Hub-ready: tokenizer with chat template, card with base model, license (from the GGUF) and figures
    tokenizer = AutoTokenizer.from_pretrained(report.out)
    assert tokenizer.chat_template and tokenizer("Paris").input_ids == smol.tokenizer("Paris").input_ids
    card = (report.out / "README.md").read_text()
    front = card.split("---")[1]
    assert f"base_model: {SMOLLM2_BASE_MODEL}" in front and f"license: {SMOLLM2_LICENSE}" in front
    assert "max abs logit difference (fp32)" in card
    assert "greedy continuation (64 tokens, generate with the cache) identical | yes" in card
    assert "with the cache = without it | yes" in card


def test_bf16_conversion_within_the_checkpoints_own_noise(smol, tmp_path):
    report = convert_checkpoint(smol.folder, tmp_path / "out", dtype="bfloat16", verify=False, progress=False)
    result = verify_conversion(
        lambda: AutoModelForCausalLM.from_pretrained(smol.folder, dtype=torch.float32).eval(),
        lambda: AttnResForCausalLM.from_pretrained(report.out, dtype=torch.float32).eval(),
        smol.tokenizer,
        out_dtype=torch.bfloat16,
        new_tokens=16,
    )
    h = result.half
    print(
        f"\nSmolLM2 bf16: fp32 gate {result.max_abs_logit_diff:.3g}; mean |diff| vs fp32 source: converted "
        f"{h.diff_mean:.4f}, source's own bf16 noise {h.noise_mean:.4f} (max {h.diff_max:.3f} vs {h.noise_max:.3f})"
    )
    assert result.passed and result.greedy_identical  # same rounded weights, fp32 compute: exact
    assert h.within_noise and h.diff_mean <= h.noise_mean


def test_streaming_memory_and_untouched_source(smol, tmp_path):
    """Converting 64 MB shards needs less extra memory than the largest shard (the 113 MB embedding's)."""
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in smol.folder.iterdir()}
    m = _benchmark().conversion_memory(smol.folder, tmp_path / "out")
    print(
        f"\nSmolLM2 streaming: peak RSS {m['peak_mb']:.0f} MB, import baseline {m['baseline_mb']:.0f} MB, "
        f"extra {m['extra_mb']:.0f} MB vs largest shard {m['largest_shard_mb']:.0f} MB"
    )
    assert m["extra_mb"] <= m["largest_shard_mb"]
    # shard by shard: one output shard per input shard, the index rewritten
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == len(list(smol.folder.glob("*.safetensors"))) > 1
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in smol.folder.iterdir()} == before
