"""The lower end of the supported transformers range (setup.cfg) loads our Hub folders.

`make test` installs the oldest supported transformers into `.venv/compat-transformers` (a pip --target
folder) and points HF_ATTNRES_COMPAT_TRANSFORMERS at it; the folder written with the current transformers is
then loaded with trust_remote_code by the old one, in a process that cannot import hf_attnres.
"""

import configparser
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from _tiny import tiny_attnres, token_ids, without_fused_kernels
from hf_attnres import save_for_hub

COMPAT = os.environ.get("HF_ATTNRES_COMPAT_TRANSFORMERS")

LOAD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    sys.modules["hf_attnres"] = None
    import torch, transformers
    print(transformers.__version__)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[3])).logits, sys.argv[4])
        out = model.generate(torch.load(sys.argv[3])[:1], max_new_tokens=5, do_sample=False)
    print(out.shape)
""")


def lower_bound() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parents[1] / "setup.cfg")
    return re.search(r"transformers>=([\d.]+)", cfg["options"]["install_requires"]).group(1)


@pytest.mark.skipif(not COMPAT, reason="set HF_ATTNRES_COMPAT_TRANSFORMERS (make test does) to test the lower end")
def test_hub_folder_loads_with_oldest_supported_transformers(tmp_path):
    model = tiny_attnres("block")
    save_for_hub(model, tmp_path / "model")
    ids = token_ids()
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, "-I", "-c", LOAD, COMPAT, str(tmp_path / "model"), str(tmp_path / "ids.pt"),
                          str(tmp_path / "out.pt")], check=True, env=env, capture_output=True, text=True)
    assert Version(run.stdout.splitlines()[0]) == Version(lower_bound()), run.stdout  # really the old version
    with torch.no_grad(), without_fused_kernels():  # the same code path as the old process (no hf_attnres)
        assert torch.equal(torch.load(tmp_path / "out.pt"), model(ids).logits)
