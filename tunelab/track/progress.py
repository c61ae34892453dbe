"""The training progress bar: step, loss, lr, tokens/s, ETA and GPU memory, on rank 0 only."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Under torchrun every process runs the same code: only rank 0 talks.
console = Console(stderr=True, quiet=int(os.environ.get("RANK", "0")) != 0)


class TrainProgress:
    """A rich progress bar over optimizer steps; silent when disabled (other ranks, tests)."""

    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        if not enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, info="")
        self._progress.start()

    def update(self, step: int, stats: dict[str, Any]) -> None:
        """Move to `step` and show the latest loss, lr, throughput and memory."""
        if self._progress is None:
            return
        parts = [f"loss {stats['loss']:.4f}", f"lr {stats['lr']:.2e}"]
        if stats.get("tokens_per_s"):
            parts.append(f"{stats['tokens_per_s']:,.0f} tok/s")
        if stats.get("samples_per_s"):
            parts.append(f"{stats['samples_per_s']:,.1f} samples/s")
        if stats.get("mem_gib"):
            parts.append(f"{stats['mem_gib']:.1f} GiB")
        self._progress.update(self._task, completed=step, info=" | ".join(parts))

    def print(self, message: str) -> None:
        """Print a line above the bar."""
        if self.enabled:
            (self._progress.console if self._progress else console).print(message)

    def close(self) -> None:
        """Stop drawing."""
        if self._progress is not None:
            self._progress.stop()
