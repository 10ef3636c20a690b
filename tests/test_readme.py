"""The README's Python snippets run as written, each in a fresh interpreter (as a reader would paste them).

Only what a snippet leaves to the reader is supplied: a saved tiny AttnRes folder with a tokenizer where the
snippet names a Hub repo or `path`, and `model` / `input_ids` where it continues an earlier snippet. A snippet
that loads a folder without `import hf_attnres` runs with stdin closed, so a "run the custom code? [y/N]"
prompt fails the test instead of waiting.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_training_helpers import tiny_config_kwargs, tiny_tokenizer

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)

LOAD_TINY = (
    "import torch, hf_attnres\n"
    "from transformers import AutoModelForCausalLM\n"
    "model = AutoModelForCausalLM.from_pretrained('tiny')\n"
    "input_ids = torch.randint(3, 100, (2, 9))\n"
)


def _setup(snippet: str) -> tuple[str, dict[str, str]]:
    """(code run before the snippet, replacements in it) for each README snippet, told apart by what it does."""
    if "save_for_hub(model" in snippet:
        return "", {}
    if "you/my-attnres" in snippet:
        return "", {'"you/my-attnres"': "'tiny'"}
    if "output_depth_attentions" in snippet:
        return LOAD_TINY, {}
    if "attn_res_implementation=" in snippet:
        return "path = 'tiny'\n", {}
    raise AssertionError(f"a README snippet this test does not know; add its setup here:\n{snippet}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from hf_attnres import AttnResConfig, AttnResForCausalLM, save_for_hub

    work = tmp_path_factory.mktemp("readme")
    model = AttnResForCausalLM(AttnResConfig(attn_res_mode="block", attn_res_block_size=2, **tiny_config_kwargs()))
    save_for_hub(model, work / "tiny", tokenizer=tiny_tokenizer())
    return work


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs_as_written(index, workdir):
    snippet = SNIPPETS[index]
    prelude, replacements = _setup(snippet)
    for old, new in replacements.items():
        snippet = snippet.replace(old, new)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "modules")}
    proc = subprocess.run([sys.executable, "-c", prelude + snippet], cwd=workdir, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, f"README snippet {index} failed:\n{SNIPPETS[index]}\n{proc.stderr[-3000:]}"
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
