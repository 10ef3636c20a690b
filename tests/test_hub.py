"""Hub folders load with trust_remote_code in a process that cannot import hf_attnres."""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _tiny import tiny_attnres, token_ids
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


def load_without_package(path, ids, tmp_path) -> dict:
    """ISOLATED_LOAD's results for the folder `path` and `ids`, from a fresh interpreter without hf_attnres."""
    torch.save(ids, tmp_path / "ids.pt")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    # -I: isolated mode (no user site, no PYTHONPATH, no cwd on sys.path)
    subprocess.run([sys.executable, "-I", "-c", ISOLATED_LOAD, str(path), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True, env=env, cwd=tmp_path)
    return torch.load(tmp_path / "out.pt")


def test_trust_remote_code_load_without_package(hub_folder, tmp_path):
    model, path = hub_folder
    ids = token_ids()
    remote = load_without_package(path, ids, tmp_path)
    with torch.no_grad():  # hf_attnres imported here: the default implementation computes the same, bit for bit
        local = model(ids).logits
        uncached = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(remote["logits"], local)
    assert torch.equal(remote["generated"], uncached)
    # the folder's own code, loaded in this process, where hf_attnres is imported (the Auto classes would pick
    # the package's registered classes here)
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    remote_class = get_class_from_dynamic_module("modeling_attnres.AttnResForCausalLM", str(path))
    assert remote_class.__module__.startswith("transformers_modules")
    same_process = remote_class.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.equal(same_process(ids).logits, remote["logits"])


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


@pytest.mark.parametrize("how", ["save_pretrained", "Trainer.save_model"])
def test_native_save_writes_a_folder_that_loads_without_package(how, tmp_path):
    """A natively imported model saved the standard ways (also what push_to_hub uploads: it saves with
    save_pretrained) carries its code, and loads where hf_attnres is absent."""
    model = tiny_attnres("block")
    path = tmp_path / "model"
    if how == "save_pretrained":
        model.save_pretrained(path)
    else:
        from transformers import Trainer, TrainingArguments

        Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[])).save_model(path)
    for name in CODE_FILES:
        assert (path / name).is_file(), name
    ids = token_ids()
    remote = load_without_package(path, ids, tmp_path)
    with torch.no_grad():
        assert torch.equal(remote["logits"], model(ids).logits)


def test_modeling_file_uses_no_private_torch_api_and_does_not_look_for_the_package():
    """The Hub file computes the same wherever it runs: no private torch names, no `sys` (so no look-up of
    hf_attnres in sys.modules), no import of hf_attnres."""
    from hf_attnres.modeling import modeling_attnres

    source = Path(modeling_attnres.__file__).read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch"):
            assert not any(part.startswith("_") for part in node.module.split(".")), node.module
            assert not any(alias.name.startswith("_") for alias in node.names), ast.dump(node)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            assert "'sys'" not in ast.dump(node) and "hf_attnres" not in ast.dump(node), ast.dump(node)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
            assert not node.attr.startswith("_"), node.attr
