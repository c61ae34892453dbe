"""The run folder and the pieces every task's `train` shares: folder checks, accelerator, summary, plots."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from tunelab.config import RunConfig, config_to_yaml
from tunelab.errors import UserError
from tunelab.track.metrics import MetricsLog, NullLog, read_metrics, truncate_after
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


def configure_cuda_allocator() -> None:
    """Use expandable segments unless the user chose allocator settings: with batches of varying padded length,
    the default caching allocator reserved 63 GiB for 14 GiB of live tensors and stalled the first QLoRA steps
    (BENCHMARKS.md, Llama-3.2-1B smoke). Must run before the first CUDA allocation."""
    import os

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def preflight(config: RunConfig, resume: bool, processes: int | None = None) -> None:
    """Checks that cost nothing and must fail before any work (loading a model, tokenizing, making the run
    folder): an occupied run folder, missing data files, quantization this machine cannot do, a missing package,
    a train.distributed that cannot run with `processes` (default: this launch's)."""
    from tunelab.data.readers import require_file
    from tunelab.models.load import check_quantization
    from tunelab.train.distributed import check_distributed

    configure_cuda_allocator()
    check_run_folder(config, resume)
    if not config.data.train:
        raise UserError("data.train is not set. Point it at a CSV, JSONL or Parquet file.")
    require_file(config.data.train, "data.train")
    if config.data.valid:
        require_file(config.data.valid, "data.valid")
    check_quantization(config.model, config.method.kind)
    check_distributed(config, processes)
    if config.train.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise UserError(
                "train.tensorboard is true but the tensorboard package is not installed: "
                "pip install 'tunelab[tensorboard]', or set train.tensorboard=false."
            )


def warn_if_over_memory(config: RunConfig, accelerator: Any) -> None:
    """On CUDA, print a warning (main process) when `tunelab plan` puts this run over the GPU's memory."""
    import torch

    device = accelerator.device
    if device.type != "cuda" or not accelerator.is_main_process:
        return
    from tunelab.advise.plan import warn_if_too_big
    from tunelab.track.progress import console

    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    bf16 = torch.cuda.is_bf16_supported()
    warn_if_too_big(config, total_gib, console.print, bf16=bf16, gpus=accelerator.num_processes)


def check_run_folder(config: RunConfig, resume: bool) -> None:
    """Refuse an output.dir that holds another run (unless overwriting), a --resume without a run, or a file."""
    run_dir = Path(config.output.dir)
    if not resume and not config.output.overwrite and any((run_dir / m).exists() for m in RUN_MARKERS):
        raise UserError(
            f"Output folder {run_dir} already holds a run. Continue it with --resume, choose another "
            "output.dir, or replace it with output.overwrite=true."
        )
    if resume and not any((run_dir / m).exists() for m in RUN_MARKERS):  # prepare_run_dir says it too, but late
        raise UserError(f"--resume: {run_dir} holds no run to continue. Drop --resume to start a new run.")
    if resume and not ckpt.list_checkpoints(run_dir):  # prepare_run_dir says it too, but after loading the model
        raise UserError(
            f"--resume: {run_dir} has no complete checkpoint yet (the run stopped before its first "
            "save). Start it again with output.overwrite=true."
        )
    check_writable_folder(run_dir, "output.dir")


def check_writable_folder(folder: Path, key: str) -> None:
    """UserError when `folder` cannot be made or written: it, or a parent, is a file, or the nearest existing
    parent is read-only. Checked up front, since otherwise the failure comes after loading and tokenizing."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == Path(folder).absolute() else f"cannot be made: {existing} is a file"
        raise UserError(f"{key} {folder} {where}, not a folder. Choose another {key}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key} {folder}: no permission to write in {existing}. Choose another {key}.")


def open_run(config: RunConfig, resume: bool, accelerator: Any) -> tuple[Path, Path | None, Any]:
    """Prepare the run folder on the main process (others wait), and return (run_dir, checkpoint to resume
    from, metrics log). Only the main process writes the log; the others get a log that drops records."""
    if accelerator.is_main_process:
        run_dir, resume_from = prepare_run_dir(config, resume)
        write_config(run_dir, config)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        run_dir = Path(config.output.dir)
        saved = ckpt.list_checkpoints(run_dir) if resume else []
        resume_from = saved[-1] if saved else None
        return run_dir, resume_from, NullLog()
    return run_dir, resume_from, MetricsLog(run_dir / "metrics.jsonl", tensorboard=config.train.tensorboard)


def write_config(run_dir: Path, config: RunConfig) -> None:
    """The resolved config, every default filled."""
    (run_dir / "config.yaml").write_text(config_to_yaml(config), encoding="utf-8")


def make_accelerator(dtype: torch.dtype, config: RunConfig | None = None) -> Any:
    """An Accelerator whose mixed precision matches the model dtype (none on CPU). Under torchrun or
    `accelerate launch` it joins the process group (NCCL on GPUs, gloo on CPUs); with `config`, it follows
    train.distributed (DeepSpeed's plugin for deepspeed-*; see train/distributed.py)."""
    from tunelab.train import distributed

    if config is not None:
        from tunelab.track.progress import console

        distributed.note_single_process(config, distributed.process_count(), console.print)
    return distributed.make_accelerator(dtype, config)


def finish_run(run_dir: Path, summary: dict[str, Any], started: float, extra: dict[str, Any] | None = None) -> dict:
    """Write summary.json and curves.png; return the summary."""
    records, _ = read_metrics(run_dir / "metrics.jsonl")
    summary = {**summary, "wall_s": round(time.time() - started, 2), **(extra or {})}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    plot_curves(records, run_dir / "curves.png")
    return summary
