"""The converter's check sees what users see: it generates with the cache, and a broken cache fails it.

A transformers release once renamed the cache argument; the model then started an empty cache at every step,
its uncached logits stayed identical and the converter said "identical". Here that bug is re-created (the
model drops the cache it is given) and the conversion must refuse to write the folder.
"""

from __future__ import annotations

import pytest

from hf_attnres.cli import main as cli_main
from hf_attnres.modeling import modeling_attnres


def test_converter_compares_cached_with_uncached_generation(conv_tiny_checkpoint, tmp_path, capsys):
    src, _ = conv_tiny_checkpoint("llama")
    assert cli_main(["convert", str(src), str(tmp_path / "ok"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "with the cache = without it" in out and out.split("with the cache = without it")[1].startswith(": yes")


def test_broken_cached_generation_fails_the_conversion(conv_tiny_checkpoint, tmp_path, monkeypatch, capsys):
    src, _ = conv_tiny_checkpoint("llama")
    real_forward = modeling_attnres.AttnResModel.forward

    def forgets_the_cache(self, *args, **kwargs):  # the 5.24/5.25 bug: every step starts an empty cache
        for name in ("cache", "past_key_values"):
            if kwargs.get(name) is not None:
                kwargs[name] = type(kwargs[name])(config=self.config)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_attnres.AttnResModel, "forward", forgets_the_cache)
    assert cli_main(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "with the KV cache" in err and "differs from the one without it" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_uses_generate(conv_tiny_checkpoint, use_cache):
    """`greedy` is `generate` (the users' path) and ignores EOS, so it always returns the asked length."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_attnres.conversion.verify import greedy

    src, _ = conv_tiny_checkpoint("llama")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    tokens = greedy(model, prompt, 12, use_cache=use_cache)
    # reference: argmax of the full-sequence forward, one token at a time
    ids = prompt
    for _ in range(12):
        with torch.no_grad():
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert tokens == ids[0, 4:].tolist()
