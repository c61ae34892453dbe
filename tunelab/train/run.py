"""The run folder and the pieces every task's `train` shares: folder checks, accelerator, summary, plots."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from tunelab.config import RunConfig, config_to_yaml
from tunelab.errors import UserError
from tunelab.track.metrics import read_metrics, truncate_after
from tunelab.track.plots import plot_curves
from tunelab.train import checkpoint as ckpt

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")


def prepare_run_dir(config: RunConfig, resume: bool) -> tuple[Path, Path | None]:
    """Check the output folder and return (run_dir, checkpoint to resume from).

    A folder that already holds a run is refused unless resuming or output.overwrite is true.
    """
    run_dir = Path(config.output.dir)
    holds_run = run_dir.exists() and any((run_dir / marker).exists() for marker in RUN_MARKERS)
    if resume:
        if not holds_run:
            raise UserError(f"--resume: {run_dir} holds no run to continue. Drop --resume to start a new run.")
        ckpt.clean_partial(run_dir)
        saved = ckpt.list_checkpoints(run_dir)
        if not saved:
            raise UserError(
                f"--resume: {run_dir} has no complete checkpoint yet (the run stopped before its first "
                "save). Start it again with output.overwrite=true."
            )
        truncate_after(run_dir / "metrics.jsonl", int(saved[-1].name.split("-")[-1]))
        return run_dir, saved[-1]
    if holds_run:
        if not config.output.overwrite:
            raise UserError(
                f"Output folder {run_dir} already holds a run. Continue it with --resume, choose another "
                "output.dir, or replace it with output.overwrite=true."
            )
        for marker in (*RUN_MARKERS, "best", "summary.json", "curves.png", "predictions.csv", "diagnosis.json"):
            target = run_dir / marker
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None


def write_config(run_dir: Path, config: RunConfig) -> None:
    """The resolved config, every default filled."""
    (run_dir / "config.yaml").write_text(config_to_yaml(config), encoding="utf-8")


def make_accelerator(dtype: torch.dtype) -> Any:
    """An Accelerator whose mixed precision matches the model dtype (none on CPU)."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    precision = "no"
    if cuda and dtype == torch.bfloat16:
        precision = "bf16"
    elif cuda and dtype == torch.float16:
        precision = "fp16"
    return Accelerator(mixed_precision=precision, cpu=not cuda)


def finish_run(run_dir: Path, summary: dict[str, Any], started: float, extra: dict[str, Any] | None = None) -> dict:
    """Write summary.json and curves.png; return the summary."""
    records, _ = read_metrics(run_dir / "metrics.jsonl")
    summary = {**summary, "wall_s": round(time.time() - started, 2), **(extra or {})}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    plot_curves(records, run_dir / "curves.png")
    return summary
