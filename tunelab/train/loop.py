"""The one training loop: forward, loss, backward, accumulate, clip, step, schedule, EMA, log, evaluate,
checkpoint. Every task hands it a TrainingJob; it runs on accelerate, so one CPU process and N GPUs run the
same code.

Gradient accumulation is normalised by the number of target tokens in the whole accumulation window (all
micro-batches, all processes): each micro-batch contributes loss_sum / window_targets, so batch 8 x accum 1 and
batch 2 x accum 4 give the same update on variable-length data (a per-micro-batch mean would weight short
batches' tokens more).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.config import RunConfig
from tunelab.errors import RunStopped
from tunelab.train import checkpoint as ckpt
from tunelab.train.ema import WeightEMA
from tunelab.train.optim import create_optimizer, create_scheduler


@dataclass
class TrainingJob:
    """What a task hands the loop: the model, the data and how to turn a batch into a loss."""

    model: torch.nn.Module
    train_data: Sequence[Any]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    targets_in: Callable[[dict[str, torch.Tensor]], int]  # positions the loss is summed over (normalisation)
    loss_sum: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # summed, not averaged
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None  # valid metrics ("loss" among them); None: none
    save_weights: Callable[[torch.nn.Module, Path], None]  # loadable weights (adapter or model) into a folder
    units_in: Callable[[dict[str, torch.Tensor]], int]  # tokens or samples, for throughput
    unit: str = "tokens"


def metric_mode(metric: str, mode: str) -> str:
    """min for losses and perplexity, max for everything else, unless the config says."""
    if mode != "auto":
        return mode
    return "min" if "loss" in metric or "perplexity" in metric else "max"


def _due(every: int | str, step: int, epoch_end: bool) -> bool:
    return epoch_end if every == "epoch" else step % int(every) == 0


def epoch_batches(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: a permutation seeded by (seed, epoch), so a resumed run sees the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def train_loop(
    job: TrainingJob,
    config: RunConfig,
    run_dir: Path,
    accelerator: Any,
    log: Any,
    progress_cls: Any,
    resume_from: Path | None = None,
) -> dict[str, Any]:
    """Train to the end (or early stop) and return the run summary. Raises RunStopped on a non-finite loss."""
    train = config.train
    world = accelerator.num_processes
    n_batches = math.ceil(len(job.train_data) / train.batch_size)
    window_size = train.grad_accum * world
    steps_per_epoch = math.ceil(n_batches / window_size)
    total_steps = train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))

    model = job.model
    optimizer = create_optimizer(model, train)
    scheduler = create_scheduler(optimizer, train, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = WeightEMA(accelerator.unwrap_model(model), train.ema) if train.ema else None
    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "best": None,
        "best_step": None,
        "bad_evals": 0,
        "units": 0,
        "seconds": 0.0,
    }
    if resume_from is not None:
        training_state, state = ckpt.load_checkpoint(resume_from, accelerator.unwrap_model(model))
        optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        if ema is not None and training_state.get("ema"):
            ema.load_state_dict(training_state["ema"])
        ckpt.set_rng_state(training_state["rng"])  # last, so nothing above draws from the restored streams

    mode = metric_mode(train.early_stop.metric, train.early_stop.mode)
    progress = progress_cls(total_steps, state["step"], enabled=accelerator.is_main_process)
    device = accelerator.device
    batches_cache: dict[int, list[list[int]]] = {}
    last_eval: dict[str, float] = {}
    stopped_early = bool(train.early_stop.patience and state["bad_evals"] >= train.early_stop.patience)
    interval_units, interval_start = 0, time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def save_best() -> None:
        ckpt.replace_folder(run_dir / "best", lambda d: job.save_weights(accelerator.unwrap_model(model), d))

    def evaluate_now(step: int, epoch_end: bool) -> None:
        nonlocal last_eval, stopped_early
        model.eval()
        with ema.applied(accelerator.unwrap_model(model)) if ema else nullcontext(), torch.no_grad():
            metrics = job.evaluate(accelerator.unwrap_model(model))
            last_eval = metrics
            value = metrics.get(train.early_stop.metric)
            if value is None:
                raise RunStopped(
                    f"train.early_stop.metric is '{train.early_stop.metric}' but evaluation returned "
                    f"only: {', '.join(metrics)}. Pick one of those."
                )
            improved = state["best"] is None or (value < state["best"] if mode == "min" else value > state["best"])
            if improved:
                state.update(best=value, best_step=step, bad_evals=0)
                if accelerator.is_main_process:
                    ckpt.replace_folder(
                        run_dir / "best", lambda d: job.save_weights(accelerator.unwrap_model(model), d)
                    )
            else:
                state["bad_evals"] += 1
        model.train()
        log.write(
            {
                "event": "eval",
                "step": step,
                "epoch": round(state["epoch"] + state["batch"] / n_batches, 4),
                "split": "valid",
                **metrics,
                "best": improved,
            }
        )
        progress.print(
            f"step {step}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            + (" (best)" if improved else "")
        )
        patience = train.early_stop.patience
        if patience and state["bad_evals"] >= patience:
            stopped_early = True
            log.write(
                {
                    "event": "early_stop",
                    "step": step,
                    "metric": train.early_stop.metric,
                    "best": state["best"],
                    "best_step": state["best_step"],
                }
            )
            progress.print(f"early stop at step {step}: no better {train.early_stop.metric} for {patience} evaluations")

    def save_now(step: int) -> None:
        if not accelerator.is_main_process:
            return
        training_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema else None,
        }
        ckpt.save_checkpoint(
            run_dir,
            step,
            accelerator.unwrap_model(model),
            training_state,
            dict(state),
            lambda d: job.save_weights(accelerator.unwrap_model(model), d),
            config.output.keep_last,
        )

    model.train()
    while state["step"] < total_steps and not stopped_early:
        epoch = state["epoch"]
        if epoch not in batches_cache:
            batches_cache = {epoch: epoch_batches(len(job.train_data), train.batch_size, train.seed, epoch)}
        batches = batches_cache[epoch]
        window = batches[state["batch"] : state["batch"] + window_size]
        mine = [job.collate([job.train_data[i] for i in b]) for b in window[accelerator.process_index :: world]]
        window_targets = _global_sum(accelerator, sum(job.targets_in(b) for b in mine))
        loss_total = 0.0
        for index, batch in enumerate(mine):
            batch = {k: v.to(device) for k, v in batch.items()}
            sync = index == len(mine) - 1
            with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                loss = job.loss_sum(model, batch)
            if not torch.isfinite(loss):
                _stop_nonfinite(log, state, float(loss), run_dir, train.lr)
            # DDP averages gradients over processes; multiply back so the result is sum / window_targets.
            accelerator.backward(loss * world / max(window_targets, 1))
            loss_total += float(loss.detach())
            interval_units += job.units_in(batch)
        grad_norm = None
        if train.max_grad_norm is not None:
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm))
            if not math.isfinite(grad_norm) and accelerator.mixed_precision != "fp16":
                _stop_nonfinite(log, state, grad_norm, run_dir, train.lr, what="gradient norm")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        state["step"] += 1
        state["batch"] += len(window)
        epoch_end = state["batch"] >= len(batches)
        if epoch_end:
            state["epoch"] += 1
            state["batch"] = 0
        step = state["step"]
        loss_mean = _global_sum(accelerator, loss_total) / max(window_targets, 1)
        if step % train.log_every == 0 or step == total_steps:
            elapsed = time.perf_counter() - interval_start
            units = _global_sum(accelerator, interval_units)
            state["units"] += units
            state["seconds"] += elapsed
            record = {
                "event": "train",
                "step": step,
                "epoch": round(state["epoch"] + state["batch"] / n_batches, 4),
                "split": "train",
                "loss": loss_mean,
                "lr": lr,
                "grad_norm": grad_norm,
                f"{job.unit}_per_s": units / elapsed if elapsed > 0 else None,
                "mem_gib": _memory_gib(device),
            }
            log.write(record)
            progress.update(step, {**record, "tokens_per_s": record.get(f"{job.unit}_per_s")})
            interval_units, interval_start = 0, time.perf_counter()
        last_step = step >= total_steps
        if job.evaluate is not None and (_due(train.eval_every, step, epoch_end) or last_step):
            evaluate_now(step, epoch_end)
        elif job.evaluate is None and last_step and accelerator.is_main_process:  # no validation: best is last
            with ema.applied(accelerator.unwrap_model(model)) if ema else nullcontext():
                save_best()
        if _due(train.save_every, step, epoch_end) or last_step or stopped_early:
            save_now(step)
    progress.close()
    return {
        "steps": state["step"],
        "total_steps": total_steps,
        "epochs": state["epoch"] + state["batch"] / n_batches,
        "best": {"metric": train.early_stop.metric, "value": state["best"], "step": state["best_step"]},
        "final": last_eval,
        "stopped_early": stopped_early,
        f"{job.unit}_per_s": state["units"] / state["seconds"] if state["seconds"] else None,
        "peak_mem_gib": _memory_gib(device),
    }


def _global_sum(accelerator: Any, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor(float(value), device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="sum"))


def _memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def _stop_nonfinite(
    log: Any, state: dict[str, Any], value: float, run_dir: Path, lr: float, what: str = "loss"
) -> None:
    step = state["step"] + 1
    log.write({"event": "stopped", "step": step, "reason": f"non-finite {what}", "value": value})
    saved = ckpt.list_checkpoints(run_dir)
    where = f"The last good checkpoint, {saved[-1]}, is kept as it was." if saved else "No checkpoint was written."
    raise RunStopped(
        f"The {what} became {value} at optimizer step {step}; training stopped before the weights were updated. "
        f"{where} Likely causes: a learning rate too high (train.lr is {lr:g}; try {lr / 10:g}), fp16 overflow "
        "(use model.dtype: bf16 or fp32 where the hardware allows), or broken rows in the data. "
        f"`tunelab diagnose {run_dir}` reads the curves."
    )
