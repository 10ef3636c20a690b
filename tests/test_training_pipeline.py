"""The end-to-end job (`hf-attnres run`) wired through on a tiny Llama: convert, inspect, train, save, reload."""

from __future__ import annotations

import json

import pytest
from test_training_helpers import make_llama_dir, make_text_dir, reset_accelerate

from hf_attnres.cli import main as cli_main


def test_run_converts_trains_saves_and_reloads_with_remote_code(tmp_path, capsys):
    from hf_attnres import conversion

    if not hasattr(conversion, "convert_checkpoint"):
        pytest.skip("the converter is not in this tree")
    reset_accelerate()
    llama = make_llama_dir(tmp_path / "llama")
    data = make_text_dir(tmp_path / "data", n_docs=8, chars=600)
    out = tmp_path / "run"
    args = ["run", "--model", str(llama), "--data", str(data), "--output-dir", str(out), "--steps", "2",
            "--seq-len", "32", "--batch-size", "2", "--eval-blocks", "2", "--max-new-tokens", "3", "--lr", "1e-2"]
    assert cli_main(args) == 0
    reset_accelerate()
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 2 and summary["perplexity_after"] < summary["perplexity_before"]
    assert summary["conversion"]["max_abs_logit_diff"] < 1e-4
    sample = summary["sample"]
    assert sample["class"].startswith("transformers_modules.") and not sample["hf_attnres_imported"]
    for key in ("converted", "final", "metrics"):
        assert (tmp_path / summary["paths"][key]).exists(), key
    printed = capsys.readouterr().out
    assert "held-out perplexity" in printed and str(out / "final") in printed

    assert cli_main(args) == 0  # the same command again resumes the finished run: nothing is retrained
    reset_accelerate()
    again = json.loads((out / "run_summary.json").read_text())
    assert again["perplexity_after"] == pytest.approx(summary["perplexity_after"], rel=1e-6)
    assert "reusing the conversion" in capsys.readouterr().out
