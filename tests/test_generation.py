"""Generation: caches, incremental decoding, left padding, logits_to_keep, loss.

References: transformers' own, unmodified Llama generating with its cache (a converted model computes its
function), the same model without a cache (or on the full sequence), each row generated alone, and for the
loss a hand-written shifted cross-entropy. `make test` runs this file on the oldest and the newest
transformers release we support: the cache argument was renamed between them.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache, pipeline

from _tiny import attnres_from_llama, tiny_attnres, tiny_llama, token_ids
from hf_attnres.modeling.modeling_attnres import CACHE_ARG

MODES = ["block", "full", "none"]


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_greedy_with_cache_equals_without(mode):
    model = tiny_attnres(mode)
    ids = token_ids(batch=1, seq=6)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache, without)
    assert with_cache.shape[1] == 18


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@torch.no_grad()
def test_converted_model_generates_what_llama_generates(mode, cache_implementation):
    """What users run: `generate` with its cache, against the unmodified Llama generating with its own."""
    llama = tiny_llama()
    model = attnres_from_llama(llama, mode)
    ids = token_ids(batch=1, seq=6)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, cache_implementation=cache_implementation,
              return_dict_in_generate=True, output_logits=True)
    expected, got = llama.generate(ids, **kw), model.generate(ids, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    # every step's logits, not only the argmax: a tiny random model soon repeats one token whatever it sees
    # (the bound: the conversion's fp32 rounding, ~1e-7, see test_identity.py)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_text_generation_pipeline_equals_llama(mode, insp_tokenizer):
    llama = tiny_llama(vocab_size=128)
    model = attnres_from_llama(llama, mode)
    kw = dict(max_new_tokens=20, do_sample=False)
    prompt = "The depth attention"
    expected = pipeline("text-generation", model=llama, tokenizer=insp_tokenizer)(prompt, **kw)
    got = pipeline("text-generation", model=model, tokenizer=insp_tokenizer)(prompt, **kw)
    assert got == expected and len(expected[0]["generated_text"]) > len(prompt) + 10


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
@torch.no_grad()
def test_incremental_decoding_equals_full_sequence(mode, cache_name):
    """Either name of the cache argument (`past_key_values` before transformers 5.24, `cache` since) works."""
    model = tiny_attnres(mode)
    ids = token_ids(batch=2, seq=10)
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    step = model(ids[:, :4], use_cache=True, **{cache_name: cache}).logits
    pieces = [step]
    for t in range(4, 10):
        pieces.append(model(ids[:, t:t + 1], use_cache=True, **{cache_name: cache}).logits)
    assert cache.get_seq_length() == 10
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_cache_passed_twice_is_refused():
    model = tiny_attnres("block")
    with pytest.raises(ValueError, match="not both"):
        model(token_ids(), cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


@torch.no_grad()
def test_static_cache_generation_equals_dynamic():
    model = tiny_attnres("block")
    ids = token_ids(batch=1, seq=5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kw)
    static = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(static, dynamic)
    cache = StaticCache(config=model.config, max_cache_len=32)
    first = model(ids, use_cache=True, **{CACHE_ARG: cache}).logits
    torch.testing.assert_close(first, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["block", "full"])
@torch.no_grad()
def test_left_padded_batch_equals_rows_alone(mode):
    model = tiny_attnres(mode)
    a, b = token_ids(batch=1, seq=7, seed=1)[0], token_ids(batch=1, seq=4, seed=2)[0]
    pad = 0
    batch = torch.stack([a, torch.cat([torch.full((3,), pad), b])])
    mask = torch.stack([torch.ones(7, dtype=torch.long), torch.cat([torch.zeros(3), torch.ones(4)]).long()])
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=pad)
    together = model.generate(batch, attention_mask=mask, **kw)
    alone_a = model.generate(a[None], **kw)
    alone_b = model.generate(b[None], **kw)
    assert torch.equal(together[0, 7:], alone_a[0, 7:])
    assert torch.equal(together[1, 7:], alone_b[0, 4:])


@torch.no_grad()
def test_logits_to_keep():
    model = tiny_attnres("block")
    ids = token_ids()
    full = model(ids).logits
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last, full[:, -1:])
    assert torch.equal(model(ids, logits_to_keep=0).logits, full)


def test_loss_is_shifted_cross_entropy_and_honours_num_items():
    model = tiny_attnres("block")
    ids = token_ids(seq=12)
    labels = ids.clone()
    labels[0, :5] = -100  # ignored positions
    out = model(input_ids=ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, model.config.vocab_size)
    expected = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # gradient-accumulation normalisation: a sum over tokens divided by the given count
    n = 50
    summed = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum") / n
    torch.testing.assert_close(model(input_ids=ids, labels=labels, num_items_in_batch=n).loss, summed)
