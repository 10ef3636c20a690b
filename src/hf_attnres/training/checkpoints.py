"""Training checkpoints: `OUTPUT/checkpoints/step_00000100/`, written atomically, the last K kept.

`run_clm_no_trainer.py` picks the "latest" checkpoint by sorting names as strings and comparing modification
times, which misses it; here the step is parsed from the name and the highest complete one wins. A folder
is renamed into place only after every process has written its part, so a crash never leaves a partial
checkpoint that `--resume latest` would pick; a killed save's `.step_N.tmp` is removed at the next start.
Each checkpoint also holds `trainer_state.json` (step, the run's length and schedule horizon), read before
anything is loaded to tell a finished run from one to continue.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

_NAME = re.compile(r"^step_(\d+)$")
_TMP = re.compile(r"^\.step_\d+\.tmp$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Loop position, saved in every checkpoint through `accelerator.register_for_checkpointing`."""

    step: int = 0  # optimizer steps completed
    tokens: int = 0  # training tokens seen, all processes

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def remove_stale_saves(output_dir: str | Path) -> list[Path]:
    """Delete `.step_N.tmp` folders of saves that were killed (call on the main process before training:
    the run owns its output folder, so no other process saves there)."""
    root = checkpoints_dir(output_dir)
    stale = [p for p in root.iterdir() if p.is_dir() and _TMP.match(p.name)] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: None, "latest" (None if there is none yet) or an explicit folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder (use 'latest' or a step_N folder).")
    return path


def read_trainer_state(checkpoint: Path) -> dict | None:
    """`trainer_state.json` of a checkpoint (None for checkpoints of older releases)."""
    path = Path(checkpoint) / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def save_checkpoint(accelerator, output_dir: str | Path, step: int, keep_last: int, info: dict | None = None) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed when all processes are done; prunes old ones.

    `info` (the run's length, schedule horizon, ...) is written as `trainer_state.json` with the step.
    """
    root = checkpoints_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(info or {})}, indent=2), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def share_weights_with(checkpoint: Path, final_dir: Path) -> bool:
    """Replace the checkpoint's `model.safetensors` by a hard link to the final folder's identical file.

    The last checkpoint and `final/` hold the same fp32 weights (538 MB for SmolLM2-135M); linking stores
    them once. Only when both are single safetensors files with the same tensors (names, dtypes, shapes
    and bytes, compared by safetensors' own loader): a tied `lm_head` is absent from both or handled by
    `safetensors.torch.load_model` when accelerate loads the state. Returns whether it linked.
    """
    from safetensors import safe_open

    ours, theirs = Path(checkpoint) / "model.safetensors", Path(final_dir) / "model.safetensors"
    if not (ours.is_file() and theirs.is_file()) or os.path.samefile(ours, theirs):
        return False
    with safe_open(str(ours), "pt") as a, safe_open(str(theirs), "pt") as b:
        names = set(a.keys())
        if names != set(b.keys()) or any(not a.get_tensor(k).equal(b.get_tensor(k)) for k in names):
            return False
    link = ours.with_name(".model.safetensors.link")
    try:
        os.link(theirs, link)
    except OSError:  # a filesystem without hard links: keep the copy
        return False
    os.replace(link, ours)
    return True
