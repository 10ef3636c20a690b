"""Tiny offline fixtures shared by the training tests (imported by tests/test_training*.py)."""

from __future__ import annotations

import string
from pathlib import Path

import torch


def tiny_tokenizer():
    """Character-level fast tokenizer (printable ASCII + newline), eos "</s>", ~100 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def tiny_config_kwargs(hidden: int = 32, layers: int = 2) -> dict:
    return dict(vocab_size=104, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=1,
                eos_token_id=2, bos_token_id=2, tie_word_embeddings=True)


def make_attnres_dir(path: Path, mode: str = "block", seed: int = 0, **overrides) -> Path:
    """A saved tiny random AttnRes model (2 layers, hidden 32) with its tokenizer."""
    from hf_attnres import AttnResConfig, AttnResForCausalLM

    torch.manual_seed(seed)
    extra = {"attn_res_block_size": 2} if mode == "block" else {}
    model = AttnResForCausalLM(AttnResConfig(attn_res_mode=mode, **extra, **{**tiny_config_kwargs(), **overrides}))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_llama_dir(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**tiny_config_kwargs())).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_text_dir(path: Path, n_docs: int = 12, chars: int = 2500) -> Path:
    """`n_docs` .txt documents cut from the embedded corpus (real English text)."""
    from hf_attnres.data import embedded_corpus

    path.mkdir(parents=True, exist_ok=True)
    text = "\n".join(d["text"] for d in embedded_corpus()[:3])
    for i in range(n_docs):
        (path / f"doc{i:02d}.txt").write_text(text[i * chars:(i + 1) * chars], encoding="utf-8")
    return path


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state so the next Accelerator starts fresh (in-process tests)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out
