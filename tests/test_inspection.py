"""Inspection numbers checked against independent computations (spec §2-§3 transcribed literally), plus the
figures / JSON / CLI plumbing. Tiny random models only; the whole file runs in well under 30 s on CPU."""

from __future__ import annotations

import argparse
import json
import math
import sys

import pytest
import torch

from hf_attnres.inspection import (
    DEFAULT_TEXTS,
    ModelInspection,
    collect_inspection,
    inspect_model,
    read_texts,
    tokenize_batches,
)

TEXTS = ["The cat sat on the mat.", "A much longer sentence, so that the batch needs right padding here.", "Hi."]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: thread start-up costs more than it saves, badly so on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _available(row):
    return [w for w in row if w is not None]


# --------------------------------------------------------------------------------------------------------
# Depth-attention weights
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["block", "full"])
def test_depth_rows_sum_to_one_and_follow_source_layout(insp_make_model, insp_tokenizer, mode):
    model = insp_make_model(mode, layers=3, block_size=4)
    insp = collect_inspection(model, insp_tokenizer, TEXTS, batch_size=2, gradients=False)
    dm = insp.depth_attention
    config = model.config
    assert len(dm.rows) == config.num_sublayers + 1 and dm.rows[-1] == "final output"
    assert len(dm.columns) == config.num_blocks + 1 and dm.columns[0] == "embedding"
    for i, row in enumerate(dm.weights):
        n = config.num_sources(i)
        assert all(w is not None for w in row[:n]) and all(w is None for w in row[n:])  # masked cells blank
        assert math.isclose(sum(row[:n]), 1.0, abs_tol=1e-6)
        assert dm.sources[i] == config.source_names(i)
        expect_partial = n - 1 if config.source_names(i)[-1].endswith("(partial)") else None
        assert dm.partial[i] == expect_partial
    if mode == "block":  # size 4 over 6 sublayers: sublayers 1-3 and 5 read a partial block
        assert dm.partial == [None, 1, 1, 1, None, 2, None]
    else:
        assert all(p is None for p in dm.partial) and dm.columns[-1] == "sublayer 6"
    # random queries: some rows far from uniform
    assert max(abs(w - 1 / len(_available(r))) for r in dm.weights for w in _available(r)) > 0.05


@pytest.mark.parametrize("mode", ["block", "full"])
def test_zero_queries_give_uniform_rows(insp_make_model, insp_tokenizer, mode):
    model = insp_make_model(mode, layers=3, block_size=2, queries="zero")
    insp = collect_inspection(model, insp_tokenizer, TEXTS, batch_size=2, gradients=False)
    for row in insp.depth_attention.weights:
        available = _available(row)
        assert available == pytest.approx([1 / len(available)] * len(available), abs=1e-6)


def _literal_depth_attention(model, input_ids):
    """Spec §2-§3 written out: sources from the raw sublayer outputs, alpha = softmax(w . RMSNorm(v)).

    Returns, per sublayer and for the final aggregation, the weights (seq, n) and the mixed input h (seq, d).
    """
    base = model.model
    config = model.config
    size = config.sublayers_per_block
    outputs = {}
    handles = []
    for t, layer in enumerate(base.layers):
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=2 * t: outputs.__setitem__(i, o[0])))
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o, i=2 * t + 1: outputs.__setitem__(i, o)))
    with torch.no_grad():
        embedding = base.embed_tokens(input_ids)[0].double()
        model(input_ids=input_ids)
    for h in handles:
        h.remove()
    f = [outputs[i][0].double() for i in range(config.num_sublayers)]

    def rms_norm(v, norm):
        return norm.weight.double() * v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)

    result = []
    torch.set_grad_enabled(False)
    for i in range(config.num_sublayers + 1):
        done = i // size  # blocks completed before sublayer i
        sources = [embedding] + [sum(f[n * size : (n + 1) * size]) for n in range(done)]
        if i > done * size:
            sources.append(sum(f[done * size : i]))  # partial sum of the current block
        if i < config.num_sublayers:
            res = base.layers[i // 2].self_attn_res if i % 2 == 0 else base.layers[i // 2].mlp_res
        else:
            res = base.final_res
        w = res.pseudo_query.double()
        logits = torch.stack([(rms_norm(v, res.key_norm) * w).sum(-1) for v in sources], dim=-1)
        alpha = torch.softmax(logits, dim=-1)
        mixed = sum(alpha[:, j, None] * v for j, v in enumerate(sources))
        result.append((alpha, mixed))
    torch.set_grad_enabled(True)
    return result


@pytest.mark.parametrize("mode,block_size", [("block", 4), ("full", None)])
def test_depth_weights_and_input_rms_match_literal_transcription(insp_make_model, insp_tokenizer, mode, block_size):
    model = insp_make_model(mode, layers=3, block_size=block_size or 2)
    insp = collect_inspection(model, insp_tokenizer, TEXTS, batch_size=3, gradients=False)  # padded batch
    n_rows = model.config.num_sublayers + 1
    alpha_sum = [0.0] * n_rows
    rms_sum = [0.0] * n_rows
    tokens = 0
    for text in TEXTS:  # one text at a time: no padding at all
        ids = torch.tensor([insp_tokenizer(text)["input_ids"]])
        tokens += ids.shape[1]
        for i, (alpha, mixed) in enumerate(_literal_depth_attention(model, ids)):
            alpha_sum[i] = alpha_sum[i] + alpha.sum(0)
            rms_sum[i] += float(mixed.pow(2).mean(-1).sqrt().sum())
    assert insp.num_tokens == tokens
    for i in range(n_rows):
        expected = (alpha_sum[i] / tokens).tolist()
        assert _available(insp.depth_attention.weights[i]) == pytest.approx(expected, abs=1e-5), i
        measured_rms = insp.input_rms[i] if i < n_rows - 1 else insp.final_input_rms
        assert measured_rms == pytest.approx(rms_sum[i] / tokens, rel=1e-4), i


# --------------------------------------------------------------------------------------------------------
# Magnitudes and gradients on a plain Llama (the standard-residual reference)
# --------------------------------------------------------------------------------------------------------
def _manual_llama_pass(model, ids):
    """Re-run every sublayer of a Llama by hand from `output_hidden_states` (no hooks)."""
    out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    seq = ids.shape[1]
    causal = torch.full((1, 1, seq, seq), float("-inf")).triu(1)
    pos = torch.arange(seq)[None]
    rotary = model.model.rotary_emb(hs[0], pos)
    inputs, outputs = [], []
    stream = hs[0]
    for t, layer in enumerate(model.model.layers):
        assert torch.allclose(stream, hs[t], atol=1e-5)  # the manual pass tracks the real stream
        attn = layer.self_attn(hidden_states=layer.input_layernorm(stream), position_embeddings=rotary,
                               attention_mask=causal)[0]
        mid = stream + attn
        mlp = layer.mlp(layer.post_attention_layernorm(mid))
        inputs += [stream, mid]
        outputs += [attn, mlp]
        stream = mid + mlp
    return out, hs, inputs, outputs, stream


def _mean_rms(x):
    return float(x.detach().pow(2).mean(-1).sqrt().sum())


@pytest.mark.parametrize("kind", ["llama", "none"])
def test_rms_matches_direct_computation(insp_make_model, insp_tokenizer, kind):
    model = insp_make_model(kind, layers=3)
    insp = collect_inspection(model, insp_tokenizer, TEXTS, batch_size=2, gradients=False)
    assert insp.depth_attention is None and insp.attn_res_mode == "none"
    in_sum = [0.0] * 6
    out_sum = [0.0] * 6
    final_sum, tokens = 0.0, 0
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([insp_tokenizer(text)["input_ids"]])
            _, _, inputs, outputs, final = _manual_llama_pass(model, ids)
            tokens += ids.shape[1]
            for i in range(6):
                in_sum[i] += _mean_rms(inputs[i])
                out_sum[i] += _mean_rms(outputs[i])
            final_sum += _mean_rms(final)
    assert insp.input_rms == pytest.approx([s / tokens for s in in_sum], rel=1e-4)
    assert insp.output_rms == pytest.approx([s / tokens for s in out_sum], rel=1e-4)
    assert insp.final_input_rms == pytest.approx(final_sum / tokens, rel=1e-4)


def test_gradients_match_autograd(insp_make_model, insp_tokenizer):
    model = insp_make_model("llama", layers=3)
    text = DEFAULT_TEXTS[1][:120]
    insp = collect_inspection(model, insp_tokenizer, [text])
    ids = torch.tensor([insp_tokenizer(text)["input_ids"]])
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    for h in out.hidden_states:
        h.retain_grad()
    out.loss.backward()
    assert insp.loss == pytest.approx(float(out.loss.detach()), rel=1e-5)
    # h_{t+1} = h_t + attn_t + mlp_t: the gradient w.r.t. MLP output t is the one w.r.t. hidden state t + 1
    # (hidden_states[-1] is after the final norm, so the last layer is not covered by this identity).
    for t in range(2):
        assert insp.output_grad_norm[2 * t + 1] == pytest.approx(float(out.hidden_states[t + 1].grad.norm()), rel=1e-4)
    for i, layer in enumerate(model.model.layers):
        for j, module in ((2 * i, layer.self_attn), (2 * i + 1, layer.mlp)):
            expected = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in module.parameters()))
            assert insp.param_grad_norm[j] == pytest.approx(expected, rel=1e-4)
    model.zero_grad(set_to_none=True)


def test_batching_and_padding_do_not_change_numbers(insp_make_model, insp_tokenizer):
    model = insp_make_model("block", layers=2, block_size=2)
    one = collect_inspection(model, insp_tokenizer, TEXTS, batch_size=1)
    padded = collect_inspection(model, insp_tokenizer, TEXTS, batch_size=3)
    assert one.num_tokens == padded.num_tokens and one.loss == pytest.approx(padded.loss, rel=1e-5)
    for key in ("input_rms", "output_rms", "output_grad_norm", "param_grad_norm", "pseudo_query_grad_norm"):
        assert getattr(padded, key) == pytest.approx(getattr(one, key), rel=1e-4, abs=1e-9), key
    for a, b in zip(one.depth_attention.weights, padded.depth_attention.weights):
        assert _available(a) == pytest.approx(_available(b), abs=1e-6)


def test_inspection_leaves_model_untouched(insp_make_model, insp_tokenizer):
    model = insp_make_model("block", layers=2, block_size=2).train()
    model.model.embed_tokens.weight.requires_grad_(False)
    collect_inspection(model, insp_tokenizer, TEXTS[:1])
    assert model.training and not model.model.embed_tokens.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_tokenize_batches_right_pads_without_pad_token(insp_tokenizer):
    batches = tokenize_batches(insp_tokenizer, ["abc", "a"], max_tokens=2, batch_size=2)
    ids, mask = batches[0]
    assert mask.tolist() == [[1, 1], [1, 0]] and ids.shape == (2, 2)
    with pytest.raises(ValueError):
        tokenize_batches(insp_tokenizer, [], max_tokens=8)


# --------------------------------------------------------------------------------------------------------
# Files: API, JSON, CLI
# --------------------------------------------------------------------------------------------------------
def _assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_inspect_model_writes_figures_and_json(insp_make_model, insp_tokenizer, tmp_path):
    pytest.importorskip("matplotlib")
    model = insp_make_model("block", layers=3, block_size=4)
    llama = insp_make_model("llama", layers=3)
    report = inspect_model(model, insp_tokenizer, TEXTS, tmp_path, label="attnres", compare_with=llama,
                           compare_label="llama")
    assert set(report.figures) == {"depth_attention", "magnitudes", "gradients"}
    for path in report.figures.values():
        _assert_png(path)
    data = json.loads(report.json_path.read_text())
    assert data["format"] == "hf-attnres-inspection" and data["version"] == 1
    assert data["figures"]["depth_attention"] == "depth_attention.png"
    first, second = data["models"]
    assert (first["label"], second["label"]) == ("attnres", "llama")
    assert second["depth_attention"] is None and second["attn_res_mode"] == "none"
    assert first["depth_attention"]["weights"] == report.models[0].depth_attention.weights
    assert ModelInspection.from_dict(first) == report.models[0]  # redraw from the JSON alone
    for m in data["models"]:
        for key in ("input_rms", "output_rms", "output_grad_norm", "param_grad_norm", "sublayer_kinds"):
            assert len(m[key]) == 6, key
        assert m["sublayer_kinds"][:2] == ["attention", "mlp"] and m["num_tokens"] == first["num_tokens"]


def test_depth_attention_compare_draws_both_maps_and_the_change(insp_make_model, insp_tokenizer, tmp_path,
                                                                 monkeypatch):
    pytest.importorskip("matplotlib")
    from hf_attnres.inspection import plots

    drawn = []
    real = plots._heatmap
    monkeypatch.setattr(plots, "_heatmap", lambda ax, insp, values, *a, **k: drawn.append(
        (insp.label, values.copy())) or real(ax, insp, values, *a, **k))
    before = insp_make_model("block", layers=3, block_size=4, queries="zero")
    after = insp_make_model("block", layers=3, block_size=4, queries="random")
    report = inspect_model(after, insp_tokenizer, TEXTS, tmp_path, label="trained", compare_with=before,
                           compare_label="converted", gradients=False)
    assert set(report.figures) == {"depth_attention", "depth_attention_compare", "magnitudes"}
    _assert_png(report.figures["depth_attention_compare"])
    single, left, right, change = drawn  # depth_attention.png, then the three panels of the comparison
    assert [single[0], left[0], right[0], change[0]] == ["trained", "converted", "trained", "trained"]
    weights = [[math.nan if w is None else w for w in row] for row in report.models[1].depth_attention.weights]
    assert torch.allclose(torch.tensor(left[1]), torch.tensor(weights, dtype=torch.float64), equal_nan=True)
    assert torch.allclose(torch.tensor(change[1]), torch.tensor(right[1] - left[1]), equal_nan=True)
    assert abs(torch.nan_to_num(torch.tensor(change[1]))).max() > 0.01  # random queries moved the weights


def test_plots_false_needs_no_matplotlib(insp_make_model, insp_tokenizer, tmp_path, monkeypatch):
    from hf_attnres.inspection.plots import PlotDependencyError, require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(PlotDependencyError, match=r"hf-attnres\[plot\]"):
        require_matplotlib()
    with pytest.raises(RuntimeError, match="matplotlib"):
        inspect_model(insp_make_model("none", layers=2), insp_tokenizer, TEXTS, tmp_path / "a")
    report = inspect_model(insp_make_model("none", layers=2), insp_tokenizer, TEXTS, tmp_path / "b", plots=False,
                           gradients=False)
    assert report.figures == {} and json.loads(report.json_path.read_text())["models"][0]["output_grad_norm"] is None


def test_read_texts(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("First paragraph\nwrapped here.\n\nSecond one.\n")
    assert read_texts(txt) == [txt.read_text()]  # one document per file, as train and eval read it
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three"}\n')
    assert read_texts(jl, max_texts=2) == ["one", "two"]
    jl.write_text('{"content": "one"}\n')
    with pytest.raises(ValueError, match="text"):
        read_texts(jl)
    with pytest.raises(FileNotFoundError):
        read_texts(tmp_path / "missing.txt")


def _run_cli(argv):
    from hf_attnres.inspection.cli import register

    parser = argparse.ArgumentParser(prog="hf-attnres")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_inspect_with_compare(insp_make_model, insp_tokenizer, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    attnres_dir, llama_dir = tmp_path / "attnres", tmp_path / "llama"
    insp_make_model("full", layers=2).save_pretrained(attnres_dir)
    insp_make_model("llama", layers=2).save_pretrained(llama_dir)
    for folder in (attnres_dir, llama_dir):
        insp_tokenizer.save_pretrained(folder)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out"
    assert _run_cli(["inspect", str(attnres_dir), "--compare", str(llama_dir), "--data", str(data),
                     "--out", str(out), "--max-tokens", "16"]) == 0
    for name in ("depth_attention.png", "magnitudes.png", "gradients.png"):
        _assert_png(out / name)
    report = json.loads((out / "inspection.json").read_text())
    first, second = report["models"]
    assert first["label"] == "attnres (AttnRes full)" and second["label"] == "llama"
    assert first["num_texts"] == 3 and first["num_tokens"] == sum(min(16, len(t)) for t in TEXTS)
    assert first["depth_attention"]["columns"] == ["embedding"] + [f"sublayer {i}" for i in range(1, 5)]
    assert "wrote" in capsys.readouterr().out


def test_cli_errors_are_reported(tmp_path, capsys):
    from hf_attnres.cli import main

    assert main(["inspect", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-plots"]) == 2
    assert "error" in capsys.readouterr().err
    tmp_path.joinpath("empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--no-plots"]) == 2
    assert "config.json" in capsys.readouterr().err
