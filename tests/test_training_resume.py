"""A run killed after step k and resumed ends with the weights of an uninterrupted run (fp32, <= 1e-6)."""

from __future__ import annotations

import pytest
import torch
from test_training_helpers import load_weights, make_attnres_dir, make_text_dir, reset_accelerate

from hf_attnres.training import TrainConfig, train
from hf_attnres.training.checkpoints import list_checkpoints
from hf_attnres.training.metrics import read_metrics


class Killed(Exception):
    pass


def _cfg(model, data, out, **kw) -> TrainConfig:
    kw = {"max_steps": 7, **kw}
    return TrainConfig(
        model=str(model), output_dir=str(out), data=[str(data)], seq_len=32, batch_size=2, grad_accum=2,
        save_every=2, keep_last=2, eval_every=3, log_every=100, lr=3e-3, attnres_lr=3e-2,
        warmup_steps=2, validation_fraction=0.2, max_eval_blocks=4, progress=False, report_to="none", **kw)


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    model = make_attnres_dir(tmp_path / "model")
    data = make_text_dir(tmp_path / "data", n_docs=10, chars=600)
    reference = train(_cfg(model, data, tmp_path / "a"))

    def kill_after_step_5(state):
        if state.step == 5:
            raise Killed  # the process dies: everything in memory is lost, checkpoint step 4 is on disk

    with pytest.raises(Killed):
        train(_cfg(model, data, tmp_path / "b"), on_step_end=kill_after_step_5)
    reset_accelerate()
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [2, 4]
    resumed = train(_cfg(model, data, tmp_path / "b", resume="latest"))

    assert resumed.steps == reference.steps == 7 and resumed.tokens == reference.tokens
    a, b = load_weights(reference.final_dir), load_weights(resumed.final_dir)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6
    moved = max((a[k] - v).abs().max().item() for k, v in load_weights(model).items() if k in a)
    assert moved > 1e-3  # the runs did train
    losses = lambda run: [r["loss"] for r in read_metrics(run.metrics_file, "train")]  # noqa: E731
    assert losses(resumed) == pytest.approx(losses(reference), abs=1e-6)  # re-logged steps replaced, not duplicated
    assert [r["step"] for r in read_metrics(resumed.metrics_file, "train")] == list(range(1, 8))
    assert resumed.eval_before["loss"] == pytest.approx(reference.eval_before["loss"])
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [6, 7]  # the last K=2 kept


def test_resume_latest_without_checkpoint_starts_fresh_and_resume_of_finished_run_is_a_no_op(tmp_path):
    model = make_attnres_dir(tmp_path / "model")
    data = make_text_dir(tmp_path / "data", n_docs=10, chars=600)
    first = train(_cfg(model, data, tmp_path / "a", resume="latest", max_steps=2))
    reset_accelerate()
    again = train(_cfg(model, data, tmp_path / "a", resume="latest", max_steps=2))
    assert first.steps == again.steps == 2 and again.train_seconds == 0.0
    a, b = load_weights(first.final_dir), load_weights(again.final_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
