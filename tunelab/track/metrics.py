"""The run's metrics log: one JSON object per line in `metrics.jsonl`, appended and flushed as events happen."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends events ({"event": "train" | "eval" | ..., "step": ..., ...}) to a JSONL file, and mirrors the
    numbers of train / eval events to TensorBoard when asked."""

    def __init__(self, path: Path, tensorboard: bool = False) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._board = tensorboard_writer(path.parent / "tensorboard") if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; non-finite floats become null so every line stays valid JSON."""
        clean = {key: _finite(value) for key, value in record.items()}
        self._file.write(json.dumps(clean, ensure_ascii=False) + "\n")
        self._file.flush()
        if self._board is not None and record.get("event") in ("train", "eval"):
            split = "train" if record["event"] == "train" else "valid"
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                    self._board.add_scalar(f"{split}/{key}", value, record["step"])

    def close(self) -> None:
        """Close the file (and the TensorBoard writer)."""
        self._file.close()
        if self._board is not None:
            self._board.close()


class NullLog:
    """The log of processes other than the main one: records are dropped (rank 0 writes the run's log)."""

    def write(self, record: dict[str, Any]) -> None:
        """Drop the record."""

    def close(self) -> None:
        """Nothing to close."""


def tensorboard_writer(folder: Path) -> Any:
    """A TensorBoard SummaryWriter, or a clear error when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tunelab.errors import UserError

        raise UserError(
            "train.tensorboard is true but the tensorboard package is not installed: "
            "pip install 'tunelab[tensorboard]', or set train.tensorboard=false."
        ) from None
    return SummaryWriter(log_dir=str(folder))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """All whole records of a metrics file and the number of unreadable lines (a line cut off by a crash)."""
    records: list[dict[str, Any]] = []
    broken = 0
    if not path.exists():
        return records, broken
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            broken += 1
    return records, broken


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (written after the checkpoint a resumed run restarts from)."""
    records, _ = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= step and r.get("event") != "end"]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)
