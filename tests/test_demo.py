"""`hf-attnres demo`, as a user runs it: the command line, its output folder and what it prints."""

import json

import torch

from hf_attnres import AttnResConfig, AttnResForCausalLM
from hf_attnres.cli import main


def test_demo_command(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--layers", "4", "--hidden", "64", "--new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert "[3/3]" in printed and "the same as this process without a cache" in printed
    folder = out / "model"
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    # the folder holds the model the demo describes: rebuilt here from its seed and config, it is the same
    config = AttnResConfig.from_pretrained(folder)
    torch.manual_seed(0)
    rebuilt = AttnResForCausalLM(config).eval()
    saved = AttnResForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 72, 101, 108]])
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, rebuilt(ids).logits)
    # a second run refuses to overwrite without --force, with one clear line
    assert main(["demo", "--out", str(out), "--layers", "4", "--hidden", "64"]) == 2
    assert "not empty" in capsys.readouterr().err
