"""`hf-attnres` as a user meets it: options generated from the jobs' dataclasses (help, defaults, --config files,
flags over files) and every mistake or fault answered in one line with exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import errno
import json
import os
import types
from pathlib import Path

import pytest
from test_training_helpers import make_attnres_dir, make_llama_dir, make_text_dir, reset_accelerate

from hf_attnres.cli import build_parser, main
from hf_attnres.training.config import TrainConfig


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _one_line_error(capsys, *needles: str) -> str:
    """The error: one line of stderr (progress bars of the work before it aside), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# --------------------------------------------------------------------------------------------------------
# Options generated from the dataclasses
# --------------------------------------------------------------------------------------------------------
def test_every_option_has_help_and_defaults_come_from_the_dataclass():
    parsers = _subparsers()
    assert {"train", "eval", "run", "convert", "inspect", "ab", "demo"} <= set(parsers)
    for name, parser in parsers.items():
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, (name, action.dest)
    train = {a.dest: a for a in parsers["train"]._actions}
    for dest in ("lora_r", "lora_alpha", "lora_dropout"):
        assert train[dest].help.endswith(f"(default: {getattr(TrainConfig, dest)})"), dest
    assert f"(default: {TrainConfig.lr})" in train["lr"].help  # written once, in the dataclass
    assert "pass the old value when raising --max-steps on resume" in train["schedule_steps"].help
    assert train["convert_verify"].option_strings == ["--verify", "--no-verify"]
    run = {a.dest: a for a in parsers["run"]._actions}
    assert "(default: 1)" in run["keep_last"].help and "(default: 40)" in run["steps"].help
    eval_help = parsers["eval"].format_help()
    assert "--max-steps" not in eval_help and "--json FILE" in eval_help


def _capture_train(monkeypatch) -> list[TrainConfig]:
    from hf_attnres.training import trainer

    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        return types.SimpleNamespace(final_dir=Path(cfg.output_dir) / "final",
                                     metrics_file=Path(cfg.output_dir) / "metrics.jsonl")

    monkeypatch.setattr(trainer, "train", fake_train)
    return seen


def test_config_file_then_flags(tmp_path, monkeypatch):
    seen = _capture_train(monkeypatch)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model: some/model\noutput-dir: runs/x\nmax_steps: 10\nlr: 1e-4\ndata: docs/\n"
                         "train_mode: lora\nverify: false\nadam_betas: [0.9, 0.99]\n")
    assert main(["train", "--config", str(yaml_file), "--max-steps", "20", "--data", "a", "--data", "b"]) == 0
    cfg = seen[-1]
    assert (cfg.model, cfg.output_dir, cfg.max_steps, cfg.data) == ("some/model", "runs/x", 20, ["a", "b"])
    assert cfg.lr == 1e-4 and cfg.train_mode == "lora" and cfg.convert_verify is False
    assert cfg.adam_betas == (0.9, 0.99) and cfg.seq_len == TrainConfig.seq_len  # the rest: the defaults

    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"model": "m", "output_dir": "o", "data": "docs/", "streaming": True,
                                     "max_steps": 5}))
    assert main(["train", "--config", str(json_file), "other/model", "--no-streaming"]) == 0
    cfg = seen[-1]
    assert (cfg.model, cfg.data, cfg.streaming, cfg.max_steps) == ("other/model", ["docs/"], False, 5)


def test_convert_config_and_the_keyword_call_agree(tmp_path, monkeypatch):
    from hf_attnres.conversion import ConvertConfig, convert
    from hf_attnres.conversion.convert import convert_checkpoint

    seen = []
    monkeypatch.setattr(convert, "convert_checkpoint",
                        lambda cfg: seen.append(cfg) or types.SimpleNamespace(summary=lambda: "ok"))
    (tmp_path / "c.yaml").write_text("mode: full\nmax_shard_size: 500MB\n")
    assert main(["convert", "src", "out", "--config", str(tmp_path / "c.yaml"), "--no-verify", "--dtype", "bf16"]) == 0
    assert seen[-1] == ConvertConfig(src="src", out="out", mode="full", max_shard_size="500MB", verify=False,
                                     dtype="bf16")
    with pytest.raises(TypeError, match="not both"):
        convert_checkpoint(ConvertConfig(src="a", out="b"), mode="full")
    with pytest.raises(TypeError):
        convert_checkpoint("a", "b", moed="full")  # a misspelt option is an error, not ignored


@pytest.mark.parametrize("name, text, needle", [
    ("bad.yaml", "model: m\n  output_dir: [o\n", "not valid YAML at line"),
    ("bad.json", '{"model": "m",}', "not valid JSON at line 1"),
    ("list.yaml", "- model\n", "expected `option: value` lines"),
    ("typo.yaml", "max_step: 3\n", "unknown option 'max_step' (did you mean max_steps?)"),
    ("value.yaml", "max_steps: ten\n", "'ten' is not a valid value"),
    ("choice.yaml", "train_mode: fast\n", "'fast' is not one of full, attnres-only, lora"),
    ("missing.yaml", None, "cannot read it"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, name, text, needle):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    assert main(["train", "m", "--output-dir", str(tmp_path / "o"), "--config", str(path)]) == 2
    _one_line_error(capsys, "hf-attnres train: error: --config", needle)


@pytest.mark.parametrize("argv, needle", [
    (["train", "m", "--output-dir", "o", "--train-mode", "fast"], "invalid choice: 'fast'"),
    (["train", "m", "--output-dir", "o", "--max-steps", "many"], "invalid int value: 'many'"),
    (["train", "m", "--output-dir", "o", "--max-steps", "0"], "max_steps must be >= 1"),
    (["train", "m", "--output-dir", "o", "--lernrate", "1"], "unrecognized arguments: --lernrate"),
    (["train", "--output-dir", "o"], "MODEL is required"),
    (["train", "m"], "--output-dir is required"),
    (["eval", "m", "--max-steps", "3"], "unrecognized arguments"),
    (["convert", "src", "out", "--mode", "none"], "invalid choice: 'none'"),
    (["inspect", "m", "--out", "o", "--text", "a", "--data", "b.txt"], "not both"),
    (["run", "--steps", "0"], "must be >= 1"),
])
def test_bad_options_are_one_line(capsys, argv, needle):
    assert main(argv) == 2
    _one_line_error(capsys, needle)


# --------------------------------------------------------------------------------------------------------
# Faults: a read-only output folder, a full disk, a file in the way
# --------------------------------------------------------------------------------------------------------
@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A folder nothing can be created in: chmod 0o500, or, as root (who ignores modes), a refusing os.mkdir."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).resolve().is_relative_to(folder.resolve()):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    yield folder


def test_read_only_output_folder(tmp_path, read_only_dir, capsys):
    llama = make_llama_dir(tmp_path / "llama")
    capsys.readouterr()
    assert main(["convert", str(llama), str(read_only_dir / "out"), "--no-verify", "--no-progress"]) == 2
    _one_line_error(capsys, "hf-attnres convert: error: cannot write", "Permission denied", "--output-dir")
    assert main(["run", "--model", str(llama), "--output-dir", str(read_only_dir / "run")]) == 2
    _one_line_error(capsys, "hf-attnres run: error: cannot write", str(read_only_dir / "run"))


def test_output_folder_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["run", "--model", "m", "--output-dir", str(tmp_path / "file" / "run")]) == 2
    _one_line_error(capsys, "part of that path is a file", "choose another --output-dir")


def test_full_disk(tmp_path, monkeypatch, capsys):
    from hf_attnres.conversion import convert

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert, "write_checkpoint", no_space)
    llama = make_llama_dir(tmp_path / "llama")
    capsys.readouterr()
    assert main(["convert", str(llama), str(tmp_path / "out"), "--no-verify", "--no-progress"]) == 2
    _one_line_error(capsys, "no space left on the device", "free some space")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["llama"]


# --------------------------------------------------------------------------------------------------------
# eval: progress, a short summary, --json for every number
# --------------------------------------------------------------------------------------------------------
def test_eval_summary_progress_and_json(tmp_path, monkeypatch, capsys):
    model = make_attnres_dir(tmp_path / "model")
    data = make_text_dir(tmp_path / "data", n_docs=6, chars=400)
    capsys.readouterr()
    argv = ["eval", str(model), "--data", str(data), "--all-data", "--seq-len", "32", "--batch-size", "2",
            "--max-eval-blocks", "6"]
    reset_accelerate()
    assert main([*argv, "--json", str(tmp_path / "eval.json")]) == 0
    captured = capsys.readouterr()
    full = json.loads((tmp_path / "eval.json").read_text())
    assert "evaluating" in captured.err and "3/3" in captured.err  # tqdm over the 3 batches
    first, entropy, where = captured.out.strip().splitlines()
    assert f"perplexity {full['perplexity']:.4g} (loss {full['loss']:.4f}" in first
    assert f"on {full['tokens']:,} tokens (6 blocks of 32)" in first
    assert f"depth-attention entropy {full['depth_entropy/mean']:.3f} on average over" in entropy
    assert where == f"every number: {tmp_path / 'eval.json'}"
    assert {"loss", "perplexity", "tokens", "seconds", "depth_entropy/layer0.mlp"} <= set(full)

    reset_accelerate()
    assert main([*argv, "--json", "-", "--no-progress"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed["perplexity"] == pytest.approx(full["perplexity"], rel=1e-6) and "evaluating" not in captured.err

    reset_accelerate()
    real_write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == "eval2.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert main([*argv, "--no-progress", "--json", str(tmp_path / "eval2.json")]) == 2
    _one_line_error(capsys, "hf-attnres eval: error: no space left on the device")
    reset_accelerate()


def test_ab_options_are_train_options_with_ab_defaults(monkeypatch):
    from hf_attnres.ab import run as ab_run
    from hf_attnres.cli import parse_config

    seen = []
    monkeypatch.setattr(ab_run, "run_ab", seen.append)
    assert main(["ab", "--output-dir", "runs/ab", "--max-steps", "16", "--lora-r", "4"]) == 0
    cfg = seen[-1]
    assert isinstance(cfg, ab_run.ABConfig) and cfg.model is None and cfg.resume == "latest"
    assert (cfg.max_steps, cfg.eval_every, cfg.lora_r) == (16, 2, 4)  # eval_every: max_steps / 8
    assert parse_config(["ab", "m", "--output-dir", "o", "--eval-every", "3"]).eval_every == 3
    with pytest.raises(SystemExit):
        parse_config(["ab", "--output-dir", "o", "--push-to-hub", "me/x"])  # ab does not push
