"""Where metrics go: a JSONL file (always), the console, and Accelerate's trackers when installed."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def resolve_trackers(report_to: str) -> list[str]:
    """Tracker names for `Accelerator(log_with=...)`.

    "auto": TensorBoard when it is installed (it needs no account); "all": every tracker Accelerate finds;
    "none"; or a comma-separated list such as "tensorboard,wandb".
    """
    from accelerate.utils import is_tensorboard_available

    if report_to in ("none", ""):
        return []
    if report_to == "auto":
        return ["tensorboard"] if is_tensorboard_available() else []
    if report_to == "all":
        return ["all"]
    return [name.strip() for name in report_to.split(",") if name.strip()]


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Logs dicts of numbers under a step: JSONL on the main process, plus the Accelerate trackers.

    The file holds each (kind, step) once: a resumed run that logs a step again replaces the old record.
    """

    def __init__(self, accelerator, path: str | Path, echo=print):
        self.accelerator, self.path, self.echo = accelerator, Path(path), echo
        self._logged: set[tuple[str, int]] = set()
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_file():
                self._logged = {(r["kind"], r["step"]) for r in read_metrics(self.path)}

    def truncate(self, step: int) -> None:
        """Drop the records logged after `step` (a run resumed from that step logs them again)."""
        if self.accelerator.is_main_process and self.path.is_file():
            self._rewrite(lambda r: r["step"] <= step)

    def _rewrite(self, keep) -> None:
        kept = [r for r in read_metrics(self.path) if keep(r)]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)
        self._logged = {(r["kind"], r["step"]) for r in kept}

    def log(self, kind: str, step: int, values: dict, *, console: str | None = None) -> None:
        if self.accelerator.is_main_process:
            if (kind, step) in self._logged:
                self._rewrite(lambda r: (r["kind"], r["step"]) != (kind, step))
            record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
            record.update({k: _clean(v) for k, v in values.items()})
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self._logged.add((kind, step))
            if console:
                self.echo(console)
        if self.accelerator.trackers:
            self.accelerator.log({f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))},
                                 step=step)


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    """Records of a metrics.jsonl file (optionally of one kind: "train", "eval", ...)."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]
