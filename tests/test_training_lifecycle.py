"""Runs as users re-run them: a finished run is a no-op, a longer --max-steps continues (with the schedule
change said), metrics.jsonl holds each step once, killed saves are cleaned, published folders are readable,
and the last checkpoint shares its weights with final/."""

from __future__ import annotations

import os

import pytest
import torch
from test_training_helpers import load_weights, make_attnres_dir, make_text_dir, reset_accelerate

from hf_attnres.training import TrainConfig, train
from hf_attnres.training.checkpoints import list_checkpoints
from hf_attnres.training.metrics import read_metrics


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return make_attnres_dir(root / "model"), make_text_dir(root / "data", n_docs=10, chars=600)


def _cfg(inputs, out, **kw) -> TrainConfig:
    model, data = inputs
    kw = {"max_steps": 4, **kw}
    return TrainConfig(model=str(model), output_dir=str(out), data=[str(data)], seq_len=32, batch_size=2,
                       save_every=2, keep_last=1, eval_every=2, lr=3e-3, attnres_lr=3e-2, warmup_steps=1,
                       validation_fraction=0.2, max_eval_blocks=4, progress=False, report_to="none",
                       resume="latest", **kw)


def _keys(path) -> list[tuple[str, int]]:
    return [(r["kind"], r["step"]) for r in read_metrics(path)]


def test_rerun_of_finished_run_does_nothing_but_say_so(inputs, tmp_path, capsys):
    first = train(_cfg(inputs, tmp_path / "run"))
    metrics_before = first.metrics_file.read_bytes()
    final_mtime = (first.final_dir / "model.safetensors").stat().st_mtime_ns
    reset_accelerate()
    capsys.readouterr()
    again = train(_cfg(inputs, tmp_path / "run"))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "finished its 4 steps already: nothing to do" in text
    assert "training " not in text and "eval @" not in text and "saved" not in text
    assert first.metrics_file.read_bytes() == metrics_before  # no new rows
    assert (first.final_dir / "model.safetensors").stat().st_mtime_ns == final_mtime  # not saved again
    assert again.steps == 4 and again.train_seconds == 0.0
    assert again.eval_after["loss"] == pytest.approx(first.eval_after["loss"])
    assert again.eval_before["loss"] == pytest.approx(first.eval_before["loss"])


def test_longer_max_steps_continues_exactly_and_says_how_the_schedule_changes(inputs, tmp_path, capsys):
    reference = train(_cfg(inputs, tmp_path / "ref", max_steps=6, schedule_steps=4))
    reset_accelerate()
    train(_cfg(inputs, tmp_path / "run", max_steps=4))
    reset_accelerate()
    capsys.readouterr()
    continued = train(_cfg(inputs, tmp_path / "run", max_steps=6, schedule_steps=4))
    text = capsys.readouterr().out
    assert "continuing from step 4 to 6: the cosine schedule keeps its horizon of 4 steps" in text
    a, b = load_weights(reference.final_dir), load_weights(continued.final_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    keys = _keys(continued.metrics_file)
    assert len(keys) == len(set(keys))  # each (kind, step) once, though step 4 was evaluated and summarised
    assert [s for k, s in keys if k == "train"] == list(range(1, 7))
    assert [s for k, s in keys if k == "summary"] == [4, 6]

    reset_accelerate()
    capsys.readouterr()
    train(_cfg(inputs, tmp_path / "run", max_steps=8))
    assert ("continuing from step 6 to 8: the cosine schedule's horizon grows from 4 to 8 steps"
            in capsys.readouterr().out)


def test_killed_saves_are_removed_and_published_folders_follow_the_umask(inputs, tmp_path):
    out = tmp_path / "run"
    stale = [out / "checkpoints" / ".step_00000002.tmp", out / ".final.tmp-999999999-abc", out / ".final.tmp-xyz"]
    live = out / f".converted.tmp-{os.getpid()}-abc"  # a save under way in a live process
    for p in (*stale, live):
        p.mkdir(parents=True)
        (p / "model.safetensors").write_bytes(b"partial")
    old = os.umask(0o022)
    try:
        result = train(_cfg(inputs, out, max_steps=2))
    finally:
        os.umask(old)
    assert not any(p.exists() for p in stale) and live.is_dir()
    assert (result.final_dir.stat().st_mode & 0o777) == 0o755
    [(step, last)] = list_checkpoints(out)
    assert step == 2 and (last.stat().st_mode & 0o777) == 0o755
    # the last checkpoint stores the weights once, shared with final/ (a hard link)
    assert os.path.samefile(last / "model.safetensors", result.final_dir / "model.safetensors")


def test_resume_from_a_checkpoint_sharing_final_weights_loads_them(inputs, tmp_path):
    first = train(_cfg(inputs, tmp_path / "run", max_steps=2))
    weights = load_weights(first.final_dir)
    reset_accelerate()
    continued = train(_cfg(inputs, tmp_path / "run", max_steps=3, save_final=True))
    assert continued.steps == 3
    after = load_weights(continued.final_dir)
    assert any(not torch.equal(weights[k], after[k]) for k in weights)
    # the old final/ was replaced atomically: the step-2 checkpoint was pruned, its linked file with it
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [3]
