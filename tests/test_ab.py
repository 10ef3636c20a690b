"""`hf-attnres ab`: the arms start as the same function, the interval against hand-computed cases, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_training_helpers import load_weights, make_llama_dir, make_text_dir, reset_accelerate

from hf_attnres.ab import ABConfig, paired_difference, run_ab, student_t_quantile
from hf_attnres.training.metrics import read_metrics


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def test_student_t_quantiles_match_the_printed_table():
    # two-sided 95% and 99% critical values as printed in statistics tables (e.g. NIST/SEMATECH 1.3.6.7.2)
    table = {(0.975, 1): 12.706, (0.975, 3): 3.182, (0.975, 4): 2.776, (0.975, 15): 2.131, (0.975, 30): 2.042,
             (0.995, 10): 3.169, (0.95, 7): 1.895}
    for (p, df), value in table.items():
        assert student_t_quantile(p, df) == pytest.approx(value, abs=6e-4)
    assert student_t_quantile(0.025, 4) == pytest.approx(-2.776, abs=6e-4)


def test_paired_interval_by_hand():
    # Per-batch mean losses A: 2.5, 3.0, 2.25, 2.75; B: 2.25, 2.875, 2.375, 2.5 (4 tokens per batch).
    # Differences 0.25, 0.125, -0.125, 0.25: mean 0.125, sample sd sqrt(0.09375 / 3) = 0.176777,
    # half width t(0.975, 3) * sd / sqrt(4) = 3.182446 * 0.0883883 = 0.281290.
    a, b = [10.0, 12.0, 9.0, 11.0], [9.0, 11.5, 9.5, 10.0]
    d = paired_difference(a, b, [4, 4, 4, 4])
    assert d.difference == pytest.approx(0.125)
    assert (d.low, d.high) == pytest.approx((0.125 - 0.281290, 0.125 + 0.281290), abs=1e-5)
    assert not d.distinguishable and d.batches == 4 and d.tokens == 16
    shifted = paired_difference([x + 8.0 for x in a], b, [4, 4, 4, 4])  # +2 per token: far from zero
    assert shifted.difference == pytest.approx(2.125) and shifted.distinguishable
    with pytest.raises(ValueError, match="same batches"):
        paired_difference(a, b[:3], [4, 4, 4])


def _cfg(tmp_path, **kw) -> ABConfig:
    kw = {"max_steps": 4, **kw}
    return ABConfig(
        model=str(make_llama_dir(tmp_path / "llama")) if "model" not in kw else kw.pop("model"),
        output_dir=str(tmp_path / "ab"), data=[str(make_text_dir(tmp_path / "data", n_docs=10, chars=600))],
        seq_len=32, batch_size=2, save_every=2, eval_every=2, log_every=100, lr=3e-3, attnres_lr=3e-2,
        warmup_steps=1, validation_fraction=0.2, max_eval_blocks=8, progress=False, report_to="none", **kw)


def test_ab_arms_start_equal_and_report(tmp_path):
    cfg = _cfg(tmp_path)
    result = run_ab(cfg)
    out = tmp_path / "ab"
    none, block = (read_metrics(out / arm / "metrics.jsonl", "eval") for arm in ("none", "block"))
    # the same held-out tokens at the same steps, and at step 0 the same function (an exact conversion)
    assert [r["step"] for r in none] == [r["step"] for r in block] == [0, 2, 4]
    assert none[0]["batch_tokens"] == block[0]["batch_tokens"] and len(none[0]["batch_tokens"]) >= 2
    assert none[0]["batch_loss_sums"] == pytest.approx(block[0]["batch_loss_sums"], rel=1e-6)
    first = result["comparisons"]["block"]["by_step"][0]
    assert abs(first["difference"]) < 1e-6
    # the report's final difference is the difference of the two arms' logged held-out losses
    final = result["comparisons"]["block"]["final"]
    assert final["difference"] == pytest.approx(block[-1]["loss"] - none[-1]["loss"], abs=1e-9)
    assert final["low"] <= final["difference"] <= final["high"]
    # both arms trained on the same tokens with the same backbone settings; the baseline has no AttnRes weights
    a, b = load_weights(out / "none" / "final"), load_weights(out / "block" / "final")
    assert set(a) < set(b) and any("attn_res" in k or "pseudo_query" in k for k in set(b) - set(a))
    assert json.loads((out / "ab.json").read_text())["comparisons"]["block"]["sentence"]
    report = (out / "report.md").read_text()
    assert "minus baseline held-out loss is" in report and "distinguishable from zero" in report
    assert (out / "ab.png").stat().st_size > 0
    card = (out / "block" / "final" / "README.md").read_text()
    assert "Measured comparison" in card and result["comparisons"]["block"]["sentence"] in card


def test_ab_resumes_an_interrupted_arm_to_the_uninterrupted_result(tmp_path, monkeypatch):
    import hf_attnres.training.trainer as trainer_module

    reference = run_ab(_cfg(tmp_path / "ref"))
    reset_accelerate()

    class Killed(Exception):
        pass

    real_train = trainer_module.train

    def killed_at_step_3_of_block(cfg, on_step_end=None):
        def stop(state):
            if cfg.output_dir.endswith("block") and state.step == 3:
                raise Killed  # the process dies during the second arm; checkpoint step 2 is on disk
        return real_train(cfg, on_step_end=stop)

    monkeypatch.setattr(trainer_module, "train", killed_at_step_3_of_block)
    with pytest.raises(Killed):
        run_ab(_cfg(tmp_path / "b"))
    monkeypatch.setattr(trainer_module, "train", real_train)
    reset_accelerate()
    resumed = run_ab(_cfg(tmp_path / "b"))  # resume="latest" is ab's default; the finished arm is kept
    for arm in ("none", "block"):
        steps = [r["step"] for r in read_metrics(tmp_path / "b" / "ab" / arm / "metrics.jsonl", "train")]
        assert steps == [1, 2, 3, 4]  # no step twice
        assert resumed["arms"][arm]["eval_loss"] == pytest.approx(reference["arms"][arm]["eval_loss"], abs=1e-6)
    assert resumed["comparisons"]["block"]["final"]["difference"] == pytest.approx(
        reference["comparisons"]["block"]["final"]["difference"], abs=1e-6)


def test_ab_from_scratch_trains_three_arms_from_one_initialisation(tmp_path):
    overrides = tmp_path / "small.json"
    overrides.write_text(json.dumps({"num_hidden_layers": 4, "hidden_size": 32}))
    result = run_ab(_cfg(tmp_path, from_scratch=str(overrides), max_steps=2))
    out = tmp_path / "ab"
    assert set(result["arms"]) == {"none", "block", "full"}
    init = load_weights(out / "init")
    for arm in ("none", "block", "full"):
        start = load_weights(out / arm / "start")
        assert all(torch.equal(start[k], v) for k, v in init.items() if k in start)  # the same initialisation
        assert json.loads((out / arm / "start" / "config.json").read_text())["num_hidden_layers"] == 4
    losses0 = {arm: result["arms"][arm]["eval_loss"][0] for arm in result["arms"]}
    assert max(losses0.values()) - min(losses0.values()) < 1e-5 and math.isfinite(losses0["none"])


def test_ab_refuses_comparing_the_baseline_with_itself(tmp_path):
    with pytest.raises(ValueError, match="baseline with itself"):
        ABConfig(model="x", output_dir=str(tmp_path), convert_mode="none")
