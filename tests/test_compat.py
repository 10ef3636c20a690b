"""A Hub folder written with the newest transformers loads and generates on the oldest supported release.

`make test` builds a second virtual environment with the oldest transformers that setup.cfg admits
(`.venv-oldest`), runs the release-sensitive test files in it, and points HF_ATTNRES_OLDEST_PYTHON at its
interpreter for this test: the folder saved here is loaded there with trust_remote_code, in a process that
cannot import hf_attnres, as a user of an older release would load it from the Hub.
"""

import configparser
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from _tiny import tiny_attnres, token_ids, without_fused_kernels
from hf_attnres import save_for_hub

OLDEST_PYTHON = os.environ.get("HF_ATTNRES_OLDEST_PYTHON")

LOAD = textwrap.dedent("""
    import sys
    sys.modules["hf_attnres"] = None
    import torch, transformers
    print(transformers.__version__)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        generated = model.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
        torch.save({"logits": model(ids).logits, "generated": generated}, sys.argv[3])
""")


def lower_bound() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parents[1] / "setup.cfg")
    return re.search(r"transformers>=([\d.]+)", cfg["options"]["install_requires"]).group(1)


@pytest.mark.skipif(not OLDEST_PYTHON, reason="set HF_ATTNRES_OLDEST_PYTHON (make test does) to test the lower end")
def test_hub_folder_loads_with_oldest_supported_transformers(tmp_path):
    model = tiny_attnres("block")
    save_for_hub(model, tmp_path / "model")
    ids = token_ids()
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([OLDEST_PYTHON, "-I", "-c", LOAD, str(tmp_path / "model"), str(tmp_path / "ids.pt"),
                          str(tmp_path / "out.pt")], check=True, env=env, capture_output=True, text=True)
    assert Version(run.stdout.splitlines()[0]) == Version(lower_bound()), run.stdout  # really the old release
    old = torch.load(tmp_path / "out.pt")
    with torch.no_grad(), without_fused_kernels():  # the same code path as the old process (no hf_attnres)
        assert torch.equal(old["logits"], model(ids).logits)
        uncached = model.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(old["generated"], uncached)
