"""Training checkpoints: `OUTPUT/checkpoints/step_00000100/`, written atomically, the last K kept.

`run_clm_no_trainer.py` picks the "latest" checkpoint by sorting names as strings and comparing modification
times, which misses it; here the step is parsed from the name and the highest complete one wins. A folder
is renamed into place only after every process has written its part, so a crash never leaves a partial
checkpoint that `--resume latest` would pick.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

_NAME = re.compile(r"^step_(\d+)$")


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


def save_checkpoint(accelerator, output_dir: str | Path, step: int, keep_last: int) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed when all processes are done; prunes old ones."""
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
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
