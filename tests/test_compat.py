"""A Hub folder written with the newest transformers loads and generates on the oldest supported release.

`make test` builds a second virtual environment with the oldest transformers that setup.cfg admits
(`.venv-oldest`), runs the release-sensitive test files in it, and points HF_ATTNRES_OLDEST_PYTHON at its
interpreter for this test: the folder saved here is loaded there with trust_remote_code, in a process that
cannot import hf_attnres, as a user of an older release would load it from the Hub.
"""

import os
import subprocess

import pytest
import torch
from packaging.version import Version

from _tiny import tiny_attnres, token_ids
from hf_attnres import save_for_hub
from release_matrix import lower_bound
from test_hub import ISOLATED_LOAD

OLDEST_PYTHON = os.environ.get("HF_ATTNRES_OLDEST_PYTHON")


@pytest.mark.skipif(not OLDEST_PYTHON, reason="set HF_ATTNRES_OLDEST_PYTHON (make test does) to test the lower end")
def test_hub_folder_loads_with_oldest_supported_transformers(tmp_path):
    version = subprocess.run([OLDEST_PYTHON, "-I", "-c", "import transformers; print(transformers.__version__)"],
                             check=True, capture_output=True, text=True).stdout.strip()
    assert Version(version) == lower_bound()  # really the old release
    model = tiny_attnres("block")
    save_for_hub(model, tmp_path / "model")
    ids = token_ids()
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([OLDEST_PYTHON, "-I", "-c", ISOLATED_LOAD, str(tmp_path / "model"), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True, env=env, cwd=tmp_path)
    old = torch.load(tmp_path / "out.pt")
    with torch.no_grad():  # the default implementation is the Hub file's, with or without hf_attnres
        assert torch.equal(old["logits"], model(ids).logits)
        uncached = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(old["generated"], uncached)
