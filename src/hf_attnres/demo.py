"""`hf-attnres demo`: a small AttnRes model end to end, offline, in under a minute on a CPU.

Builds a Block AttnRes model from a config, saves it as a Hub folder, reloads that folder with
`trust_remote_code=True` in a fresh process that cannot import hf_attnres (what a Hub user gets), checks
that it computes the same logits and generates (with its KV cache) what this process generates without one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

RELOAD = textwrap.dedent("""
    import sys
    sys.modules["hf_attnres"] = None  # what a user without the package has
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=int(sys.argv[4]), do_sample=False)
    torch.save({"logits": logits, "generated": out, "class": type(model).__module__ + "." + type(model).__name__},
               sys.argv[3])
""")


# Both processes run the same reference code on the same machine, so the logits agree bit for bit in practice.
# Allowed: fp32 reassociation (a BLAS choosing another blocking in another process), 2e-5 on logits of order 1,
# the bound the equation tests measure for two summation orders; a wrong weight or code path is off by 1e-2 or more.
LOGIT_TOLERANCE = 2e-5


def run_demo(out_dir: str | os.PathLike, *, layers: int = 8, hidden: int = 128, new_tokens: int = 16,
             mode: str = "block", force: bool = False) -> dict:
    import torch

    from hf_attnres import AttnResConfig, AttnResForCausalLM, save_for_hub

    out_dir = Path(out_dir)
    config = AttnResConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, attn_res_mode=mode, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AttnResForCausalLM(config).eval()
    print(f"[1/3] built {type(model).__name__}: {mode} AttnRes, {layers} layers, "
          f"{config.num_blocks} blocks of {config.sublayers_per_block} sublayers, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    folder = save_for_hub(model, out_dir / "model", max_shard_size="50MB", overwrite=force)
    print(f"[2/3] saved a Hub-ready folder: {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")

    ids = torch.tensor([[1, 72, 101, 108, 108, 111, 32, 65, 116, 116, 110, 82, 101, 115]])
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(ids, Path(tmp) / "ids.pt")
        env = {**os.environ, "HF_MODULES_CACHE": str(Path(tmp) / "modules")}
        subprocess.run([sys.executable, "-I", "-c", RELOAD, str(folder), str(Path(tmp) / "ids.pt"),
                        str(Path(tmp) / "out.pt"), str(new_tokens)], check=True, env=env)
        remote = torch.load(Path(tmp) / "out.pt")
    with torch.no_grad():
        local = model(ids).logits
        uncached = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, use_cache=False)
    diff = (local - remote["logits"]).abs().max().item()
    same_tokens = torch.equal(uncached, remote["generated"])
    print(f"[3/3] reloaded with trust_remote_code as {remote['class']} in a process without hf_attnres: "
          f"max |logit difference| {diff:.1e} (allowed {LOGIT_TOLERANCE:.0e}); generated with its cache "
          f"{remote['generated'][0, ids.shape[1]:].tolist()}, {'the same as' if same_tokens else 'NOT the same as'} "
          "this process without a cache")
    if diff > LOGIT_TOLERANCE or not same_tokens:
        raise RuntimeError("the reloaded model does not compute what the original computes")
    return {"folder": folder, "generated": remote["generated"], "max_logit_difference": diff}


@dataclass
class DemoConfig:
    """`hf-attnres demo` (the options of `run_demo`)."""

    out: str = field(default="runs/demo", metadata={"help": "output folder"})
    mode: str = field(default="block", metadata={"help": "AttnRes variant", "choices": ("block", "full", "none")})
    layers: int = field(default=8, metadata={"help": "decoder layers"})
    hidden: int = field(default=128, metadata={"help": "hidden size"})
    new_tokens: int = field(default=16, metadata={"help": "tokens generated"})
    force: bool = field(default=False, metadata={"help": "replace an existing output folder"})


def register(subparsers) -> None:
    from .cli import add_job

    add_job(subparsers, "demo", DemoConfig, lambda c: run_demo(c.out, layers=c.layers, hidden=c.hidden,
                                                                new_tokens=c.new_tokens, mode=c.mode,
                                                                force=c.force) and 0,
            help="build, save, reload (trust_remote_code) and generate with a small model", description=__doc__)
