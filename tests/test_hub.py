"""Hub folders load with trust_remote_code in a process that cannot import hf_attnres."""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _tiny import tiny_attnres, token_ids, without_fused_kernels
from hf_attnres import save_for_hub
from hf_attnres.hub import CODE_FILES

ISOLATED_LOAD = textwrap.dedent("""
    import sys
    sys.modules["hf_attnres"] = None  # any import of the package now fails loudly
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    folder, ids_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert AutoConfig.from_pretrained(folder, trust_remote_code=True).model_type == "attnres"
    assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "AttnResModel"
    ids = torch.load(ids_path)
    with torch.no_grad():  # what a Hub user runs: a forward, and generate with its cache (the default)
        generated = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        torch.save({"logits": model(ids).logits, "generated": generated}, out_path)
""")


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    model = tiny_attnres("block")
    path = tmp_path_factory.mktemp("hub") / "model"
    save_for_hub(model, path, max_shard_size="100KB")
    return model, path


def test_folder_contents(hub_folder):
    _, path = hub_folder
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_attnres.AttnResConfig",
        "AutoModel": "modeling_attnres.AttnResModel",
        "AutoModelForCausalLM": "modeling_attnres.AttnResForCausalLM",
    }
    assert config["model_type"] == "attnres" and config["attnres_version"]
    for name in CODE_FILES:
        assert (path / name).is_file()
    assert (path / "generation_config.json").is_file()
    shards = list(path.glob("*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file()  # max_shard_size honoured
    assert not list(path.parent.glob(".model.tmp-*"))  # no temporary folder left behind


def test_trust_remote_code_load_without_package(hub_folder, tmp_path):
    model, path = hub_folder
    ids = token_ids()
    torch.save(ids, tmp_path / "ids.pt")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    # -I: isolated mode (no user site, no PYTHONPATH, no cwd on sys.path)
    subprocess.run([sys.executable, "-I", "-c", ISOLATED_LOAD, str(path), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True, env=env, cwd=tmp_path)
    remote = torch.load(tmp_path / "out.pt")
    with torch.no_grad(), without_fused_kernels():  # the same code path as the remote process (no hf_attnres)
        local = model(ids).logits
        uncached = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(remote["logits"], local)
    assert torch.equal(remote["generated"], uncached)


def test_copied_code_imports_only_torch_transformers_stdlib(hub_folder):
    _, path = hub_folder
    allowed = {"torch", "transformers"} | set(sys.stdlib_module_names)
    for name in CODE_FILES:
        tree = ast.parse((path / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only flat same-folder modules
                    assert node.level == 1 and node.module in ("configuration_attnres",), ast.dump(node)
                    continue
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, (name, roots)


def test_save_refuses_non_empty_target(tmp_path):
    model = tiny_attnres("block")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        save_for_hub(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    save_for_hub(model, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()
