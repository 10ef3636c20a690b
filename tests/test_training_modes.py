"""What trains in each mode, the saved Hub-ready folder, --push-to-hub (offline), the CLI, on-the-fly conversion."""

from __future__ import annotations

import json

import pytest
import torch
from test_training_helpers import load_weights, make_attnres_dir, make_llama_dir, make_text_dir, reset_accelerate

from hf_attnres.cli import main as cli_main
from hf_attnres.training import TrainConfig, train
from hf_attnres.hub import push_folder


def _is_attnres(name: str) -> bool:
    return any(part in name for part in ("self_attn_res", "mlp_res", "final_res"))


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return make_attnres_dir(root / "model"), make_text_dir(root / "data", n_docs=8, chars=500)


def _train(inputs, out, **kw):
    model, data = inputs
    cfg = dict(model=str(model), output_dir=str(out), data=[str(data)], seq_len=32, batch_size=2, max_steps=3,
               lr=1e-2, attnres_lr=5e-2, warmup_steps=0, save_every=0, eval_every=0, validation_fraction=0.25,
               max_eval_blocks=4, progress=False, report_to="none")
    return train(TrainConfig(**{**cfg, **kw}))


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_attnres_only_trains_only_the_routing(inputs, tmp_path):
    result = _train(inputs, tmp_path / "run", train_mode="attnres-only")
    changed = _changed(load_weights(inputs[0]), load_weights(result.final_dir))
    assert changed and all(_is_attnres(k) for k in changed)
    assert any(k.endswith("pseudo_query") for k in changed)
    assert result.summary["trainable_parameters"] < result.summary["parameters"] / 10


def test_lora_merged_and_adapter_outputs(inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    merged = _train(inputs, tmp_path / "merged", train_mode="lora", lora_r=4)
    before, after = load_weights(inputs[0]), load_weights(merged.final_dir)
    assert after.keys() == before.keys()  # a plain AttnRes model: LoRA merged, no adapter keys
    changed = _changed(before, after)
    assert any(k.endswith("pseudo_query") for k in changed)  # AttnRes trained alongside (modules_to_save)
    assert any(k.endswith("q_proj.weight") for k in changed)  # LoRA merged into the projections
    assert not any(k.endswith(("embed_tokens.weight", "layernorm.weight")) for k in changed)
    model = AutoModelForCausalLM.from_pretrained(merged.final_dir)
    assert type(model).__name__ == "AttnResForCausalLM"

    reset_accelerate()
    adapter = _train(inputs, tmp_path / "adapter", train_mode="lora", lora_r=4, merge_lora=False)
    cfg = json.loads((adapter.final_dir / "adapter_config.json").read_text())
    assert set(cfg["modules_to_save"]) == {"self_attn_res", "mlp_res", "final_res"}
    assert {"q_proj", "down_proj"} <= set(cfg["target_modules"])


def test_final_folder_is_hub_ready_and_push_uploads_it(inputs, tmp_path):
    result = _train(inputs, tmp_path / "run")
    folder = result.final_dir
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_attnres.AttnResForCausalLM"
    for name in ("modeling_attnres.py", "configuration_attnres.py", "tokenizer.json", "README.md"):
        assert (folder / name).is_file(), name
    card = (folder / "README.md").read_text()
    for fact in (str(inputs[0]), str(inputs[1]), "| steps | 3 |", "| tokens | 192 |", "validation perplexity"):
        assert fact in card, fact
    assert f"{result.eval_after['perplexity']:.4f}" in card

    class FakeApi:  # records what huggingface_hub would be asked to do
        calls = []

        def create_repo(self, repo_id, private, exist_ok):
            self.calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            self.calls.append(("upload_folder", folder_path, repo_id))
            return "https://hub.example/commit/1"

    assert push_folder(folder, "me/attnres-tiny", api=FakeApi())[1] == "https://hub.example/commit/1"
    assert FakeApi.calls == [("create_repo", "me/attnres-tiny", None, True),
                             ("upload_folder", str(folder), "me/attnres-tiny")]


def test_cli_train_then_eval_reports_the_same_perplexity(inputs, tmp_path, capsys):
    model, data = inputs
    out = tmp_path / "run"
    rc = cli_main(["train", str(model), "--output-dir", str(out), "--data", str(data), "--seq-len", "32",
                   "--batch-size", "2", "--max-steps", "2", "--validation-fraction", "0.25", "--max-eval-blocks", "4",
                   "--no-progress", "--report-to", "none", "--save-every", "1", "--keep-last", "1"])
    assert rc == 0 and (out / "final" / "config.json").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
    last_eval = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "eval"][-1]
    reset_accelerate()
    capsys.readouterr()
    rc = cli_main(["eval", str(out / "final"), "--data", str(data), "--seq-len", "32", "--validation-fraction",
                   "0.25", "--max-eval-blocks", "4", "--json", str(tmp_path / "eval.json")])
    assert rc == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["perplexity"] == pytest.approx(last_eval["perplexity"], rel=1e-5)

    rc = cli_main(["train", str(model), "--output-dir", str(out), "--data", str(tmp_path / "missing")])
    assert rc == 2 and "missing" in capsys.readouterr().err


def test_llama_folder_is_converted_on_the_fly(tmp_path):
    pytest.importorskip("hf_attnres.conversion", exc_type=ImportError)
    from hf_attnres import conversion

    if not hasattr(conversion, "convert_checkpoint"):
        pytest.skip("the converter (issue 3) is not in this tree yet")
    llama = make_llama_dir(tmp_path / "llama")
    data = make_text_dir(tmp_path / "data", n_docs=8, chars=500)
    result = _train((llama, data), tmp_path / "run", max_steps=1)
    assert (tmp_path / "run" / "converted" / "config.json").is_file()
    assert json.loads((result.final_dir / "config.json").read_text())["model_type"] == "attnres"
    assert result.summary["base_model"] == str(llama)


def test_streaming_jsonl_holds_out_first_documents_and_trains(tmp_path):
    from hf_attnres.data import embedded_corpus

    rows = [{"content": d["text"][:800]} for d in embedded_corpus()[:12]]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = make_attnres_dir(tmp_path / "model")
    result = _train((model, tmp_path / "docs.jsonl"), tmp_path / "run", streaming=True, validation_documents=3,
                    text_column="content", max_steps=2, save_every=1)
    assert result.steps == 2 and result.eval_before["tokens"] > 0
    assert result.eval_after["loss"] < result.eval_before["loss"]


def test_streaming_never_trains_on_held_out_documents_in_any_pass(tmp_path):
    """Each pass re-shuffles the stream (set_epoch): the held-out documents must stay the file's first N.
    Document i is tokenised as [i] * 5 + [EOS], so the packed blocks tell which documents they came from."""
    from contextlib import nullcontext

    from hf_attnres.training.data import build_train_data

    texts = [f"{i} " * 5 for i in range(30)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = TrainConfig(model="unused", output_dir=str(tmp_path / "run"), data=[str(tmp_path / "docs.jsonl")],
                      streaming=True, validation_documents=4, max_steps=1, seq_len=6)
    data = build_train_data(cfg, _WordTokenizer(), nullcontext)
    assert sorted(set(data.val_blocks.flatten().tolist()) - {_WordTokenizer.eos_token_id}) == [0, 1, 2, 3]
    stream, orders = data.train_stream, []
    for epoch in range(3):
        stream.set_epoch(epoch)
        blocks = [b["input_ids"].tolist() for b in stream]
        assert all(b == [b[0]] * 5 + [_WordTokenizer.eos_token_id] for b in blocks), epoch  # one document each
        assert sorted(b[0] for b in blocks) == list(range(4, 30)), epoch
        orders.append([b[0] for b in blocks])
    assert orders[0] != orders[1]  # re-shuffled per pass


class _WordTokenizer:
    """Tokenizer stand-in for packing: a number's word is its id."""

    eos_token_id = 999

    def __call__(self, texts, **kwargs):
        return {"input_ids": [[int(w) for w in t.split()] for t in texts]}


def test_sharded_final_save_rebuilds_a_plain_model_from_the_gathered_state_dict(inputs):
    """The FSDP2 / ZeRO-3 save path: a fresh AttnResForCausalLM with the gathered weights, tied embeddings."""
    from transformers import AutoModelForCausalLM

    from hf_attnres.training.output import _plain_model

    trained = AutoModelForCausalLM.from_pretrained(inputs[0])
    state = {k: v.clone() for k, v in trained.state_dict().items() if k != "lm_head.weight"}  # as gathered
    rebuilt = _plain_model(trained, state)
    assert type(rebuilt).__name__ == "AttnResForCausalLM"
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in state.items())
    assert rebuilt.lm_head.weight.data_ptr() == rebuilt.model.embed_tokens.weight.data_ptr()
    with pytest.raises(RuntimeError, match="does not match"):
        _plain_model(trained, {**state, "model.extra.weight": torch.zeros(1)})
