"""`hf-attnres convert` on tiny random checkpoints of every supported family (fast, offline).

Every equivalence test compares against the unmodified source model (transformers' own class), so a wrong
tensor, norm epsilon, attention variant or rope setting shows as a logit difference.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from _tiny import token_ids
from hf_attnres import AttnResConfig, AttnResForCausalLM, save_for_hub
from hf_attnres.cli import main as cli_main
from hf_attnres.conversion import UnsupportedModelError, convert_checkpoint
from hf_attnres.conversion import convert as convert_module
from hf_attnres.conversion.streaming import plan_shards
from hf_attnres.hub import CODE_FILES
from hf_attnres.model_card import render_model_card
from test_hub import ISOLATED_LOAD

# Tiny variants of every supported family, built with transformers' own classes (hidden 64, 3 layers).
FAMILIES = {
    "llama-gqa-headdim-biases": ("llama", dict(head_dim=24, attention_bias=True, mlp_bias=True)),
    "llama3-scaled-rope-tied": (
        "llama",
        dict(
            tie_word_embeddings=True,
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "llama-linear-rope": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral-sliding": ("mistral", dict(sliding_window=8)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-sliding-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=24)),
}
TOLERANCE = 1e-5


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """40 tokens (longer than the sliding windows), the second row left-padded."""
    ids = token_ids(batch=2, seq=40, vocab=128)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    return ids, mask


@torch.no_grad()
def logits(model, ids=None, mask=None) -> torch.Tensor:
    if ids is None:
        ids, mask = batch()
    return model(input_ids=ids, attention_mask=mask).logits


def convert(src, out, **kwargs):
    return convert_checkpoint(src, out, progress=False, **{"verify": False, **kwargs})


def load_converted(folder) -> AttnResForCausalLM:
    return AttnResForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------------------
# Equivalence, per family
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_family_converts_exactly(name, conv_tiny_checkpoint, tmp_path):
    family, overrides = FAMILIES[name]
    src, source = conv_tiny_checkpoint(family, **overrides)
    report = convert(src, tmp_path / "out")
    converted = load_converted(report.out)

    config = converted.config
    assert config.attn_res_backbone == family and config.attn_res_mode == "block"
    assert config.layer_types == list(getattr(source.config, "layer_types", None) or config.layer_types)
    assert config.tie_word_embeddings == source.config.tie_word_embeddings
    # the family's own attention module is reused, not re-implemented
    assert type(converted.model.layers[0].self_attn) is type(source.model.layers[0].self_attn)
    diff = (logits(converted) - logits(source)).abs().max().item()
    assert diff <= TOLERANCE, f"{name}: max |logit difference| {diff:.3g}"

    # the tolerance is meaningful: without the epsilon rescaling (spec §4) the same weights miss it by far
    unscaled = AttnResForCausalLM(AttnResConfig.from_pretrained(report.out, attn_res_scale_norm_eps=False)).eval()
    unscaled.load_state_dict(converted.state_dict())
    assert (logits(unscaled) - logits(source)).abs().max().item() > 100 * TOLERANCE


def test_full_mode_and_block_size(conv_tiny_checkpoint, tmp_path):
    src, source = conv_tiny_checkpoint("llama", num_hidden_layers=4)
    for mode, block_size, blocks in (("full", None, 8), ("block", 4, 2)):
        report = convert(src, tmp_path / mode, mode=mode, block_size=block_size)
        converted = load_converted(report.out)
        assert converted.config.attn_res_mode == mode and converted.config.num_blocks == blocks
        assert (logits(converted) - logits(source)).abs().max().item() <= TOLERANCE


def test_sharded_bin_source_to_bf16_shards(conv_tiny_checkpoint, tmp_path):
    """`.bin` shards in, bfloat16 safetensors shards out; equal to the source with its weights rounded to bf16."""
    src, source = conv_tiny_checkpoint("qwen2")
    bin_src = tmp_path / "bin"
    bin_src.mkdir()
    (bin_src / "config.json").write_bytes((src / "config.json").read_bytes())
    state = source.state_dict()
    names = list(state)
    halves = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for file, keys in halves.items():
        torch.save({k: state[k].clone() for k in keys}, bin_src / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (bin_src / "pytorch_model.bin.index.json").write_text(json.dumps(index))

    report = convert(bin_src, tmp_path / "out", dtype="bfloat16", max_shard_size="60KB")
    shards = sorted(p.name for p in report.out.glob("*.safetensors"))
    assert len(shards) > 2 and shards == report.files and (report.out / "model.safetensors.index.json").is_file()
    weight_map = json.loads((report.out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map.values()) == set(shards)
    assert all(t.dtype == torch.bfloat16 for f in shards for t in load_file(report.out / f).values())
    assert json.loads((report.out / "config.json").read_text())["dtype"] == "bfloat16"

    rounded = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).float().eval()
    assert (logits(load_converted(report.out)) - logits(rounded)).abs().max().item() <= TOLERANCE


def test_tied_source_that_stores_lm_head(conv_tiny_checkpoint, tmp_path):
    """Some tied checkpoints store lm_head.weight anyway: it is dropped and tying is kept."""
    src, source = conv_tiny_checkpoint("llama", tie_word_embeddings=True)
    copy = tmp_path / "src"
    copy.mkdir()
    (copy / "config.json").write_bytes((src / "config.json").read_bytes())
    save_file({k: v.contiguous().clone() for k, v in source.state_dict().items()}, copy / "model.safetensors")
    report = convert(copy, tmp_path / "out")
    assert "lm_head.weight" not in load_file(report.out / "model.safetensors")
    converted = load_converted(report.out)
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    assert (logits(converted) - logits(source)).abs().max().item() <= TOLERANCE


# ---------------------------------------------------------------------------------------------------------
# The output folder: what save_for_hub writes, loadable without hf_attnres
# ---------------------------------------------------------------------------------------------------------
def test_folder_is_what_save_for_hub_writes(conv_tiny_checkpoint, tmp_path):
    src, source = conv_tiny_checkpoint("llama", tie_word_embeddings=True)
    streamed = convert(src, tmp_path / "streamed").out
    reference = AttnResForCausalLM(AttnResConfig.from_pretrained(streamed))
    reference.load_state_dict(source.state_dict(), strict=False)  # AttnRes params keep their initial values
    saved = save_for_hub(reference, tmp_path / "saved")

    assert sorted(p.name for p in streamed.iterdir()) == sorted([*(p.name for p in saved.iterdir()), "README.md"])
    for name in ("config.json", "generation_config.json"):
        assert json.loads((streamed / name).read_text()) == json.loads((saved / name).read_text()), name
    for name in CODE_FILES:
        assert (streamed / name).read_bytes() == (saved / name).read_bytes()
    ours, theirs = load_file(streamed / "model.safetensors"), load_file(saved / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)


def test_loads_with_trust_remote_code_without_package(conv_tiny_checkpoint, tmp_path):
    src, original = conv_tiny_checkpoint("qwen3", head_dim=24)
    out = convert(src, tmp_path / "out").out
    ids, _ = batch()
    torch.save(ids, tmp_path / "ids.pt")
    env = {
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED_LOAD, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "remote.pt")],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    remote = torch.load(tmp_path / "remote.pt")
    assert torch.equal(remote["logits"], logits(load_converted(out), ids))  # with or without hf_attnres
    with torch.no_grad():  # generating with its cache, the converted folder continues as the original does
        expected = original.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(remote["generated"], expected)


def test_cli_verified_conversion_and_model_card(conv_tiny_checkpoint, tmp_path, capsys):
    src, _ = conv_tiny_checkpoint("mistral", sliding_window=8)
    out = tmp_path / "out"
    code = cli_main(
        [
            "convert",
            str(src),
            str(out),
            "--mode",
            "full",
            "--no-progress",
            "--license",
            "apache-2.0",
            "--base-model",
            "org/tiny-mistral",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "max abs logit difference (fp32)" in printed and "identical: yes" in printed
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model: org/tiny-mistral" in front and "license: apache-2.0" in front
    assert "trust_remote_code=True" in card and "| attn_res_mode | full |" in card
    assert "max abs logit difference (fp32)" in card


def test_verification_report(conv_tiny_checkpoint, tmp_path):
    src, _ = conv_tiny_checkpoint("llama")
    report = convert(src, tmp_path / "out", verify=True)
    v = report.verification
    assert v.passed and report.max_abs_logit_diff <= TOLERANCE
    assert len(v.greedy_source) == 64 and v.greedy_identical
    assert report.ppl_source is None  # no tokenizer: fixed token ids, no perplexity


def test_failed_verification_exits_nonzero_and_leaves_nothing(conv_tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """A conversion that is not exact (here: the epsilon rescaling switched off) fails and writes nothing."""
    src, _ = conv_tiny_checkpoint("llama")
    real = convert_module.attnres_config

    def broken(*args, **kwargs):
        config, dropped = real(*args, **kwargs)
        config.attn_res_scale_norm_eps = False
        return config, dropped

    monkeypatch.setattr(convert_module, "attnres_config", broken)
    assert cli_main(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "exceeds the tolerance 0.0001" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Refusals and safety
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_type, reason",
    [
        ("gpt2", "LayerNorm"),
        ("gemma", "sqrt(hidden)"),
        ("olmo2", "post-norm"),
        ("mixtral", "mixture-of-experts"),
        ("attnres", "already an AttnRes"),
        ("bert", "not one of the supported"),
    ],
)
def test_unsupported_families_are_refused(model_type, reason, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(UnsupportedModelError, match="Supported: Llama") as err:
        convert(src, tmp_path / "out")
    assert reason in str(err.value) and "PreNorm" in str(err.value)
    assert cli_main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert "hf-attnres convert: error: cannot convert" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_safety_and_untouched_source(conv_tiny_checkpoint, tmp_path):
    src, _ = conv_tiny_checkpoint("qwen2", max_shard_size="40KB")
    before = hashes(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--force"):
        convert(src, out)
    assert (out / "keep.txt").read_text() == "user data"
    convert(src, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    for bad_out in (src, src / "sub", src.parent):
        with pytest.raises(ValueError, match="overlaps the source"):
            convert(src, bad_out, force=True)
    assert hashes(src) == before and not leftovers(tmp_path)


def _break(kind: str, folder: Path) -> None:
    shards = sorted(folder.glob("*.safetensors"))
    if kind == "truncated":
        data = shards[-1].read_bytes()
        shards[-1].write_bytes(data[: len(data) - 100])
    elif kind == "corrupt header":
        data = bytearray(shards[0].read_bytes())
        data[8:40] = b"\x00garbage, not a json header\x00!!"
        shards[0].write_bytes(bytes(data))
    elif kind == "missing shard":
        shards[1].unlink()
    elif kind == "missing config":
        (folder / "config.json").unlink()
    elif kind == "config mismatch":
        config = json.loads((folder / "config.json").read_text())
        config["intermediate_size"] = 80
        (folder / "config.json").write_text(json.dumps(config))
    elif kind == "fewer layers in config":
        config = json.loads((folder / "config.json").read_text())
        config["num_hidden_layers"] = 2
        (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "kind, error, message",
    [
        ("truncated", ValueError, "truncated or corrupt"),
        ("corrupt header", ValueError, "truncated or corrupt"),
        ("missing shard", FileNotFoundError, "which is missing"),
        ("missing config", FileNotFoundError, "no config.json"),
        ("config mismatch", ValueError, r"shape \[80, 64\]|implies \[80, 64\]"),
        ("fewer layers in config", ValueError, "unexpected model.layers.2"),
    ],
)
def test_broken_sources_give_clear_errors(kind, error, message, conv_tiny_checkpoint, tmp_path, capsys):
    src, _ = conv_tiny_checkpoint("llama", max_shard_size="40KB")
    broken = tmp_path / "src"
    broken.mkdir()
    for p in src.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    _break(kind, broken)
    with pytest.raises(error, match=message):
        convert(broken, tmp_path / "out")
    assert cli_main(["convert", str(broken), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "hf-attnres convert: error:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_missing_and_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "nowhere.gguf", tmp_path / "out")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        convert(bad, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="no weights in transformers format"):
        convert(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ValueError, match="max_shard_size"):
        plan_shards([], torch.float32, "lots")


# ---------------------------------------------------------------------------------------------------------
# Hub: download and upload go through huggingface_hub (mocked: no network here)
# ---------------------------------------------------------------------------------------------------------
def test_hub_download_and_upload(conv_tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    src, source = conv_tiny_checkpoint("llama")
    calls = {}

    class FakeApi:
        def list_repo_files(self, repo_id, revision=None):
            return ["config.json", "model.safetensors", "pytorch_model.bin"]

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create"] = (repo_id, exist_ok)
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls["upload"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()))

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls["download"] = (repo_id, allow_patterns)
        return str(src)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    report = convert("org/tiny-llama", tmp_path / "out", push_to_hub="me/tiny-llama-attnres")

    repo, patterns = calls["download"]
    assert repo == "org/tiny-llama" and "model*.safetensors" in patterns and "pytorch_model*.bin" not in patterns
    assert calls["create"] == ("me/tiny-llama-attnres", True)
    assert calls["upload"][0] == "me/tiny-llama-attnres" and "model.safetensors" in calls["upload"][1]
    assert report.pushed_to == "me/tiny-llama-attnres"
    card = (report.out / "README.md").read_text()
    assert "base_model: org/tiny-llama" in card and 'from_pretrained("me/tiny-llama-attnres"' in card
    assert (logits(load_converted(report.out)) - logits(source)).abs().max().item() <= TOLERANCE


def test_model_card_writer():
    card = render_model_card(
        title="T",
        summary="S",
        settings={"a|b": 1},
        base_model="org/m",
        license=None,
        figures="| x | y |",
        tags=["extra"],
    )
    front = card.split("---")[1]
    assert "base_model: org/m" in front and "- extra" in front and "- attnres" in front and "license" not in front
    assert "| a\\|b | 1 |" in card and "## Figures" in card and "Unknown: the source did not state a license" in card
