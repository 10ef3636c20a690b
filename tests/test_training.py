"""Training building blocks against direct computations: schedules, parameter groups, packing, the
token-normalised loss under gradient accumulation, evaluation, checkpoint discovery."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from test_training_helpers import make_text_dir, reset_accelerate, tiny_config_kwargs, tiny_tokenizer
from torch.utils.data import DataLoader

from hf_attnres import AttnResConfig, AttnResForCausalLM
from hf_attnres.training.checkpoints import list_checkpoints, resolve_resume
from hf_attnres.training.data import (
    PackedBlocks,
    epoch_blocks,
    load_documents,
    split_documents,
    tokenize_and_pack,
)
from hf_attnres.training.evaluate import evaluate
from hf_attnres.training.config import TrainConfig
from hf_attnres.training.optim import build_scheduler, is_attn_res_param, param_groups
from hf_attnres.training.trainer import accumulate_gradients


@pytest.fixture()
def accelerator():
    from accelerate import Accelerator

    reset_accelerate()
    yield Accelerator(cpu=True)
    reset_accelerate()


def tiny_model(seed=0, queries="zero"):
    torch.manual_seed(seed)
    model = AttnResForCausalLM(AttnResConfig(attn_res_mode="block", attn_res_block_size=2, **tiny_config_kwargs()))
    if queries == "random":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("pseudo_query"):
                    p.normal_(0, 1)
    return model


def _lrs(total: int, n: int, **kw) -> list[float]:
    """The learning rate each of `n` optimizer steps runs with (peak lr 1), stepping as the trainer does."""
    cfg = TrainConfig(model="m", output_dir="o", lr=1.0, **kw)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


def test_lr_schedules_follow_their_formulas():
    """Against the formulas (linear warmup s/w from 0; cosine to min_lr_ratio; WSD with a linear decay over
    the last decay_ratio of the steps), including steps past the horizon (clamped, not climbing back)."""
    w, total, lo = 10, 100, 0.1
    cosine = [s / w if s < w else lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * (min(s, total) - w) / (total - w)))
              for s in range(130)]
    assert _lrs(total, 130, scheduler="cosine", warmup_steps=w, min_lr_ratio=lo) == pytest.approx(cosine)
    assert cosine[55] == pytest.approx(0.55) and cosine[129] == pytest.approx(lo)  # half way; past the end

    decay = 20  # decay_ratio 0.2 of 100 steps
    wsd = [lo + (1 - lo) * s / w if s < w else 1.0 if s < total - decay
           else lo + (1 - lo) * (1 - (min(s, total) - (total - decay)) / decay) for s in range(110)]
    assert _lrs(total, 110, scheduler="wsd", warmup_steps=w, min_lr_ratio=lo, decay_ratio=0.2) == pytest.approx(wsd)
    assert wsd[10:80] == [1.0] * 70 and wsd[90] == pytest.approx(0.55) and wsd[105] == pytest.approx(lo)

    assert _lrs(50, 60, scheduler="constant", warmup_steps=0) == [1.0] * 60
    assert _lrs(50, 60, scheduler="constant", warmup_ratio=0.1) == pytest.approx([min(1.0, s / 5) for s in range(60)])
    # schedule_steps keeps the horizon of a shorter run: the cosine ends at step 50 and stays at its minimum
    kept = _lrs(total, total, scheduler="cosine", warmup_steps=w, min_lr_ratio=lo, schedule_steps=50)
    assert kept[:50] == pytest.approx([s / w if s < w else lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * (s - w) / 40))
                                       for s in range(50)])
    assert kept[50:] == pytest.approx([lo] * 50)


def test_param_groups_give_attnres_own_lr_and_no_decay():
    model = tiny_model()
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, attnres_lr=1e-2, weight_decay=0.1)}
    attn_ids = {id(p) for n, p in model.named_parameters() if n.endswith(("pseudo_query", "key_norm.weight"))}
    assert {id(p) for p in groups["attnres"]["params"]} == attn_ids
    assert groups["attnres"]["lr"] == 1e-2 and groups["attnres"]["weight_decay"] == 0.0
    assert groups["backbone"]["weight_decay"] == 0.1 and all(p.ndim == 2 for p in groups["backbone"]["params"])
    assert all(p.ndim == 1 for p in groups["backbone_no_decay"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    assert is_attn_res_param("base_model.model.model.layers.0.mlp_res.modules_to_save.default.pseudo_query")
    assert not is_attn_res_param("model.layers.0.mlp.down_proj.weight")


def test_packing_puts_eos_between_documents_and_split_is_by_document(tmp_path):
    tok = tiny_tokenizer()
    import datasets

    ds = datasets.Dataset.from_list([{"text": "ab"}, {"text": "cde"}, {"text": "f"}])
    blocks = tokenize_and_pack(ds, tok, seq_len=3)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    expected = ids("ab") + [eos] + ids("cde") + [eos] + ids("f") + [eos]
    assert blocks.tolist() == [expected[0:3], expected[3:6], expected[6:9]]

    docs = load_documents([str(make_text_dir(tmp_path / "d", n_docs=10, chars=300))])
    train, val = split_documents(docs, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8 and not set(train["text"]) & set(val["text"])
    assert split_documents(docs, 0.2, seed=3)[1]["text"] == val["text"]  # deterministic
    b = torch.arange(40).reshape(20, 2)
    e0, e0b, e1 = (epoch_blocks(b, e, 7, 16).order.tolist() for e in (0, 0, 1))
    assert e0 == e0b and e0 != e1 and len(set(e0)) == 16


def test_load_documents_from_jsonl_parquet_and_errors(tmp_path):
    import datasets

    rows = [{"body": f"document {i}", "id": i} for i in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "b.parquet"))
    for name in ("a.jsonl", "b.parquet"):
        ds = load_documents([str(tmp_path / name)], text_column="body")
        assert ds.column_names == ["text"] and ds["text"] == [r["body"] for r in rows]
    with pytest.raises(ValueError, match="--text-column"):
        load_documents([str(tmp_path / "a.jsonl")])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_documents([str(tmp_path / "a.jsonl"), str(tmp_path / "missing.txt")])
    assert len(load_documents([])) == 41  # the embedded corpus


def test_accumulated_loss_is_normalised_by_step_token_count():
    """Two micro-batches with different numbers of targets: the gradient equals that of one batch whose loss
    is the sum of all token losses over their total count (not the mean of the two micro-batch means)."""
    torch.manual_seed(0)
    model = tiny_model(queries="random")
    reference = copy.deepcopy(model)
    ids = torch.randint(3, 100, (4, 24))
    labels = ids.clone()
    labels[2:, :20] = -100  # the second micro-batch has far fewer targets
    micro = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]

    from accelerate import Accelerator

    reset_accelerate()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    prepared = accelerator.prepare(model)
    loss = accumulate_gradients(accelerator, prepared, micro)

    logits = reference(input_ids=ids).logits
    targets = labels[:, 1:]
    token_losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
    direct = token_losses.sum() / (targets != -100).sum()
    direct.backward()
    assert loss == pytest.approx(direct.item(), abs=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name
    per_micro_mean = sum(token_losses[s].sum() / (targets[s] != -100).sum() for s in (slice(0, 2), slice(2, 4))) / 2
    assert abs(per_micro_mean.item() - direct.item()) > 1e-3  # the naive average would have failed this test
    reset_accelerate()


def test_evaluate_matches_direct_perplexity_and_entropy(accelerator):
    model = tiny_model(queries="zero").eval()
    torch.manual_seed(1)
    blocks = torch.randint(3, 100, (7, 32))  # 7 blocks, batch 3: a partial last batch
    loader = accelerator.prepare_data_loader(DataLoader(PackedBlocks(blocks), batch_size=3))
    metrics = evaluate(accelerator.prepare(model), loader, accelerator)
    with torch.no_grad():
        direct = model(input_ids=blocks, labels=blocks).loss.item()
    assert metrics["loss"] == pytest.approx(direct, abs=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(direct), rel=1e-5)
    assert metrics["tokens"] == 7 * 31
    assert metrics["depth_entropy/mean"] == pytest.approx(1.0, abs=1e-6)  # zero queries: uniform weights
    assert "depth_entropy/layer0.attn" not in metrics  # one source: nothing to route
    routed = evaluate(accelerator.prepare(tiny_model(queries="random")), loader, accelerator)
    assert routed["depth_entropy/mean"] < 0.99


def test_latest_checkpoint_is_the_highest_complete_step(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_00000009", "step_00000010", ".step_00000011.tmp", "step_2"):
        (root / name).mkdir(parents=True)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 9, 10]
    assert resolve_resume("latest", tmp_path).name == "step_00000010"
    assert resolve_resume("latest", tmp_path / "nothing") is None
    with pytest.raises(FileNotFoundError, match="latest"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
