"""Progress bars on rank 0 only: training (step, loss, lr, tokens/s, ETA, GPU memory) and long work outside
training (prediction, evaluation: rows done, rows/s, ETA)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


@contextmanager
def work_bar(label: str, total: int, unit: str = "rows") -> Iterator[Callable[[int], None]]:
    """A bar over `total` items of work outside training (prediction, evaluation); yields `advance(n)`, called as
    items finish. Shows items done, items a second, elapsed time and ETA on stderr; other ranks stay silent.
    Not for use inside training, whose own bar is live (rich draws one live display at a time)."""
    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task(label, total=total, rate="")
    started, done = time.perf_counter(), 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        rate = done / max(time.perf_counter() - started, 1e-9)
        progress.update(task, advance=count, rate=f"{rate:,.1f} {unit}/s")

    with progress:
        yield advance
