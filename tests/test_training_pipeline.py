"""The end-to-end job (`hf-attnres run`) wired through on a tiny Llama: convert, inspect, train, save, reload."""

from __future__ import annotations

import json

import pytest
from test_training_helpers import make_llama_dir, make_text_dir, reset_accelerate

from hf_attnres.cli import main as cli_main


def test_run_converts_trains_saves_and_reloads_with_remote_code(tmp_path, capsys, monkeypatch):
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
    # greedy with the KV cache after the reload = without it = in this process
    assert sample["tokens"] == sample["uncached_tokens"] == summary["sample_in_process"]["tokens"]
    assert len(sample["tokens"]) == 3 and summary["sample_check"] == "identical"
    after = out / "inspection" / "after"
    assert {"depth_attention.png", "depth_attention_compare.png", "magnitudes.png"} <= {
        p.name for p in after.iterdir()}
    labels = [m["label"] for m in json.loads((after / "inspection.json").read_text())["models"]]
    assert labels == ["trained", "converted"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]  # keep_last=1
    for key in ("converted", "final", "metrics"):
        assert (tmp_path / summary["paths"][key]).exists(), key
    printed = capsys.readouterr().out
    assert "held-out perplexity" in printed and str(out / "final") in printed

    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert cli_main(args) == 0  # the same command again: the job is finished, nothing is redone or rewritten
    reset_accelerate()
    assert "finished its 2 steps earlier: nothing to do" in capsys.readouterr().out
    assert files == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}

    longer = [a if a != "2" or args[i - 1] != "--steps" else "3" for i, a in enumerate(args)]
    assert cli_main([*longer, "--schedule-steps", "2", "--no-inspect"]) == 0  # a finished job continued
    reset_accelerate()
    assert "continuing from step 2 to 3: the cosine schedule keeps its horizon of 2 steps" in capsys.readouterr().out
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 3

    from hf_attnres.training import pipeline

    real = pipeline.generate_sample
    monkeypatch.setattr(pipeline, "generate_sample", lambda *a: {**real(*a), "tokens": [-1], "text": "elsewhere"})
    assert cli_main([*args, "--no-inspect", "--fresh"]) == 2  # the reloaded folder no longer generates what this process does
    reset_accelerate()
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # one line, no traceback
    assert len(errors) == 1 and "does not reproduce the trained model" in errors[0] and "'elsewhere'" in errors[0]


def test_sample_problem_names_the_disagreement(tmp_path):
    from hf_attnres.training.pipeline import sample_problem

    same = {"text": " is", "tokens": [1, 2], "uncached_text": " is", "uncached_tokens": [1, 2]}
    assert sample_problem({"text": " is", "tokens": [1, 2]}, same, tmp_path) is None
    broken_cache = {**same, "text": ",,", "tokens": [3, 3]}
    assert "with its KV cache but ' is' without" in sample_problem({"text": " is", "tokens": [1, 2]}, broken_cache,
                                                                    tmp_path)
    assert "this process generated ' it'" in sample_problem({"text": " it", "tokens": [1, 5]}, same, tmp_path)
