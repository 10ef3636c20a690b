"""Write model folders that load from the Hub without hf_attnres installed (``trust_remote_code=True``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from transformers import PreTrainedModel

from .modeling.configuration_attnres import AUTO_MAP

CODE_FILES = ("configuration_attnres.py", "modeling_attnres.py")


def _check_writable_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder: choose another output path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty: choose another output path, or pass overwrite=True (--force).")


def umask() -> int:
    """The process umask, read without changing it (os.umask would briefly change it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(parent: str | os.PathLike, names: tuple[str, ...]) -> list[Path]:
    """Delete `.NAME.tmp-PID-*` / `.NAME.old-PID` folders that `atomic_output_dir` left in `parent` when its
    process was killed: those whose process is gone (or that name none: older releases). A folder of a
    live process (a save under way) is left alone. Returns what was removed."""
    parent, removed = Path(parent), []
    if not parent.is_dir():
        return removed
    for name in names:
        for tmp in [*parent.glob(f".{name}.tmp-*"), *parent.glob(f".{name}.old-*")]:
            pid = tmp.name.split(".tmp-" if ".tmp-" in tmp.name else ".old-", 1)[1].split("-", 1)[0]
            if tmp.is_dir() and not (pid.isdigit() and _pid_alive(int(pid))):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path` that replaces `path` only on success.

    A failure (or Ctrl-C) leaves `path` untouched and no half-written folder behind; a `kill -9` leaves
    `.NAME.tmp-PID-*`, which `remove_stale_temporaries` deletes later. The folder gets the permissions of a
    plain `mkdir` under the umask (mkdtemp's are 0700, unreadable to other users of a shared machine).
    """
    path = Path(path)
    _check_writable_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o777 & ~umask())
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def save_for_hub(
    model: PreTrainedModel,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    max_shard_size: str | int = "2GB",
    model_card: str | None = None,
    overwrite: bool = False,
    save_function=None,
    state_dict: dict | None = None,
) -> Path:
    """Save an AttnRes model as a self-contained Hub folder.

    The folder holds `config.json` with `auto_map` (AutoConfig, AutoModel, AutoModelForCausalLM), the two
    code files, safetensors weights sharded at `max_shard_size` (Hub-friendly, unlike the 50GB default),
    the generation config, the tokenizer when given, and `README.md` when `model_card` is given. It is
    written to a temporary folder and renamed when complete. `save_function` and `state_dict` are passed to
    `save_pretrained` (e.g. `accelerator.save` and `accelerator.get_state_dict(model)` under FSDP).
    """
    if getattr(model.config, "model_type", None) != "attnres":
        raise TypeError(
            f"save_for_hub expects an AttnRes model, got model_type={getattr(model.config, 'model_type', None)!r}; "
            "convert a Llama-family checkpoint first (hf-attnres convert)."
        )
    type(model.config).register_for_auto_class("AutoConfig")
    # FSDP2 swaps in a subclass of the model's class: register (and so copy) the AttnRes class itself
    model_class = next(c for c in type(model).__mro__ if c.__name__ in ("AttnResForCausalLM", "AttnResModel"))
    model_class.register_for_auto_class("AutoModelForCausalLM" if hasattr(model, "lm_head") else "AutoModel")
    model.config.auto_map = dict(AUTO_MAP)
    kwargs = {"max_shard_size": max_shard_size}
    if save_function is not None:
        kwargs["save_function"] = save_function
    if state_dict is not None:
        kwargs["state_dict"] = state_dict
    path = Path(path)
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, **kwargs)
        missing = [f for f in CODE_FILES if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"save_pretrained did not copy {missing}; the folder would not load remotely.")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if model_card is not None:
            (tmp / "README.md").write_text(model_card, encoding="utf-8")
    return path


def push_folder(folder: str | Path, repo_id: str, *, commit_message: str = "Upload AttnRes model (hf-attnres)",
                private: bool | None = None, api=None) -> tuple[str, str]:
    """Upload a finished folder to the Hub, creating the repo if needed; returns (repo id, commit URL).
    The one upload helper of the package (conversion, training and the run job call it).

    The repo id is the one `create_repo` returns: a bare name gains the user's namespace.
    """
    from huggingface_hub import HfApi

    api = api or HfApi()
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(repo, "repo_id", repo_id)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    return repo_id, str(getattr(commit, "commit_url", commit))
