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
from tunelab.errors import RunStopped, UserError
from tunelab.models.adapters import lora_inputs_uncast
from tunelab.train import checkpoint as ckpt
from tunelab.train.distributed import Parallel, check_distributed
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
    # Loadable weights (adapter or model) into a folder. Under fsdp / deepspeed it gets a third argument, the whole
    # trainable tensors gathered from the shards, to pass to save_pretrained(state_dict=...).
    save_weights: Callable[..., None]
    units_in: Callable[[dict[str, torch.Tensor]], int]  # tokens or samples, for throughput
    unit: str = "tokens"
    # Optional: per-example sampling weights; each epoch then draws len(train_data) examples with replacement
    # (a balanced sampler) from the same seeded generator as the shuffle, so resume stays exact.
    sample_weights: Sequence[float] | None = None
    # Optional: called with (model, step) after every optimizer step (e.g. timm's ModelEmaV3 update).
    after_step: Callable[[torch.nn.Module, int], None] | None = None
    # Worker processes that read and collate upcoming micro-batches while the model trains (0: in the loop).
    # train_data may define set_epoch(epoch), called before each epoch's items are read, for per-item seeding.
    num_workers: int = 0


def metric_mode(metric: str, mode: str) -> str:
    """min for losses and perplexity, max for everything else, unless the config says."""
    if mode != "auto":
        return mode
    return "min" if "loss" in metric or "perplexity" in metric else "max"


def _due(every: int | str, step: int, epoch_end: bool) -> bool:
    return epoch_end if every == "epoch" else step % int(every) == 0


def epoch_batches(
    n_examples: int, batch_size: int, seed: int, epoch: int, weights: Sequence[float] | None = None
) -> list[list[int]]:
    """The micro-batches of one epoch: a permutation seeded by (seed, epoch), so a resumed run sees the same.

    With `weights`, n_examples indices drawn with replacement in proportion to them (a weighted sampler)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if weights is None:
        order = torch.randperm(n_examples, generator=generator).tolist()
    else:
        probabilities = torch.as_tensor(weights, dtype=torch.float64)
        order = torch.multinomial(probabilities, n_examples, replacement=True, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def accumulate_window(
    job: TrainingJob,
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    accelerator: Any,
    check_finite: bool = True,
    parallel: Parallel | None = None,
    stand_ins: int = 0,
) -> tuple[torch.Tensor, Any]:
    """Forward and backward over one accumulation window; returns (summed loss as a 0-d tensor, window target
    count, a 0-d device tensor with several processes).

    Each micro-batch's summed loss is divided by the targets of the whole window on all processes, so the
    accumulated gradient is the gradient of the window's mean loss whatever the micro-batch split.
    With check_finite, raises NonFinite on a non-finite loss before its backward (and before any optimizer
    step); that check waits for the device, so the loop defers it on CUDA (see Loop.check_pending).

    The last `stand_ins` micro-batches repeat a real one so that this process runs as many forwards and backwards
    as the others when an epoch's last window is short: their loss counts 0, but DDP's all-reduce, FSDP's gathers
    and ZeRO's reductions stay in step across processes.
    """
    parallel = parallel or Parallel(accelerator, None)
    world = accelerator.num_processes
    real = len(micro_batches) - stand_ins
    window_targets: Any = sum(job.targets_in(b) for b in micro_batches[:real])
    if world > 1:
        # summed on the device and left there: reading it back would stall every step until the GPU is idle
        window_targets = accelerator.reduce(
            torch.tensor(float(window_targets), device=accelerator.device), reduction="sum"
        ).clamp(min=1)
    loss_total = torch.zeros((), device=accelerator.device)
    # under half-precision autocast, LoRA layers take their input uncast (peft's fp32 copy and autocast's copy back
    # are two passes over the activations per projection, for the same numbers); the context spans the backward,
    # so checkpointed blocks recompute exactly as they first ran
    with lora_inputs_uncast(model, active=half_autocast(accelerator)):
        for index, batch in enumerate(micro_batches):
            # non_blocking: a pinned batch (loader workers pin on CUDA) is copied without stalling the host
            batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
            last = index == len(micro_batches) - 1
            with parallel.sync_gradients(model, last), accelerator.autocast():
                loss = job.loss_sum(model, batch)
            if check_finite and not torch.isfinite(loss):
                raise NonFinite("loss", float(loss.detach()))
            if index >= real:
                loss = loss * 0.0
            # DDP and FSDP average gradients over processes; multiply back so the result is sum / window_targets.
            parallel.backward(loss * world / (window_targets if world > 1 else max(window_targets, 1)), last)
            loss_total = loss_total + loss.detach().float()
    return loss_total, window_targets


def half_autocast(accelerator: Any) -> bool:
    """Whether the accelerator's autocast runs in bf16 / fp16 (CUDA mixed precision; never on a CPU)."""
    return getattr(accelerator, "mixed_precision", "no") in ("bf16", "fp16")


class NonFinite(Exception):
    """A NaN or inf loss or gradient norm (turned into RunStopped with advice by the loop)."""

    def __init__(self, what: str, value: float, step: int | None = None) -> None:
        super().__init__(f"{what} {value}")
        # step: set when the check was deferred (CUDA) and found the value after that step's update
        self.what, self.value, self.step = what, value, step


def train_loop(
    job: TrainingJob,
    config: RunConfig,
    run_dir: Path,
    accelerator: Any,
    log: Any,
    progress_cls: Any,
    resume_from: Path | None = None,
) -> dict[str, Any]:
    """Train to the end (or an early stop) and return the run summary. Raises RunStopped on a non-finite loss."""
    loop = Loop(job, config, run_dir, accelerator, log)
    if resume_from is not None:
        loop.resume(resume_from)
    progress = progress_cls(loop.total_steps, loop.state["step"], enabled=accelerator.is_main_process)
    loop.progress = progress
    try:
        loop.run()
    except NonFinite as error:
        loop.stop_nonfinite(error)
    finally:
        progress.close()
    return loop.summary()


class Loop:
    """The state of one training run and its steps. `state` is what a checkpoint stores to continue exactly."""

    def __init__(self, job: TrainingJob, config: RunConfig, run_dir: Path, accelerator: Any, log: Any) -> None:
        self.job, self.config, self.train, self.run_dir = job, config, config.train, run_dir
        self.accelerator, self.log, self.progress = accelerator, log, None
        self.world = accelerator.num_processes
        self.n_batches = math.ceil(len(job.train_data) / self.train.batch_size)
        self.window_size = self.train.grad_accum * self.world
        steps_per_epoch = math.ceil(self.n_batches / self.window_size)
        self.total_steps = self.train.max_steps or max(1, math.ceil(self.train.epochs * steps_per_epoch))
        check_distributed(config, self.world)  # also for tasks that build their accelerator without the config
        self.parallel = Parallel(accelerator, self.train)
        self.model, self.optimizer, optimizer = self.parallel.prepare(
            job.model, lambda model: create_optimizer(model, self.train)
        )
        self.scheduler = create_scheduler(optimizer, self.train, self.total_steps)
        self.ema = WeightEMA(self.unwrapped, self.train.ema) if self.train.ema else None
        self.mode = metric_mode(self.train.early_stop.metric, self.train.early_stop.mode)
        self.state: dict[str, Any] = {
            "step": 0,
            "epoch": 0,
            "batch": 0,
            "best": None,
            "best_step": None,
            "bad_evals": 0,
            "units": 0,
            "seconds": 0.0,
        }
        self.last_eval: dict[str, float] = {}
        self.stopped_early = False
        self._batches: tuple[int, list[list[int]]] = (-1, [])
        self._loader: Any = None  # this epoch's background batch iterator when job.num_workers > 0

    @property
    def guards_norm(self) -> bool:
        """Whether a non-finite gradient norm stops the run: not under fp16, whose loss scaler produces inf norms
        on purpose (and then skips the step)."""
        return not self.parallel.scales_loss

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The model without accelerate's wrappers (for saving, EMA and evaluation)."""
        return self.accelerator.unwrap_model(self.model)

    def resume(self, path: Path) -> None:
        """Load a checkpoint: weights, optimizer, scheduler, EMA, position, and RNG states last. Whole tensors are
        cut into this process's shards, so a checkpoint resumes on another number of processes."""
        parallel = self.parallel

        def load_weights(weights: dict[str, torch.Tensor]) -> None:
            if not parallel.deepspeed:  # DeepSpeed restores weights and their fp32 masters from its own files
                parallel.load_trainable_state(self.model, weights)

        training_state, self.state = ckpt.load_checkpoint(path, self.unwrapped, load_weights)
        self.resume_optimizer(path, training_state)
        self.scheduler.load_state_dict(training_state["scheduler"])
        if self.ema is not None and training_state.get("ema"):
            saved = training_state["ema"]
            self.ema.load_state_dict(parallel.shard_tensors(saved, self.ema.shadow) if parallel.gathers else saved)
        patience = self.train.early_stop.patience
        self.stopped_early = bool(patience and self.state["bad_evals"] >= patience)
        ranks = training_state.get("rng_ranks")
        # each process continues its own streams when the process count is unchanged, else rank 0's
        if ranks and len(ranks) == self.world:
            rng = ckpt.unpack_rng_state(ranks[self.accelerator.process_index])
        else:
            rng = training_state["rng"]
        ckpt.set_rng_state(rng)  # last, so nothing above draws from the restored streams

    def resume_optimizer(self, path: Path, training_state: dict[str, Any]) -> None:
        """The optimizer state of a checkpoint. Every checkpoint holds it whole, which one process, ddp or fsdp on
        any number of processes read; DeepSpeed reads its own shards, written by DeepSpeed with the same ZeRO
        stage on as many processes."""
        saved_by = training_state.get("deepspeed") or {"strategy": "a run without DeepSpeed"}
        if not self.parallel.deepspeed:
            self.parallel.load_optimizer_state(self.optimizer, training_state["optimizer"])
            return
        if saved_by["strategy"] != self.parallel.kind or saved_by.get("processes") != self.world:
            where = f" on {saved_by['processes']} processes" if "processes" in saved_by else ""
            raise UserError(
                f"--resume: {path} was written by {saved_by['strategy']}{where}; train.distributed "
                f"{self.parallel.kind} on {self.world} processes resumes only its own DeepSpeed shards. Continue with "
                "the setting and --gpus it was trained with, or with train.distributed fsdp / ddp (or one process), "
                "which read any checkpoint."
            )
        self.parallel.load_engine(path / "deepspeed")

    def epoch_batches(self) -> list[list[int]]:
        """This epoch's micro-batches (computed once per epoch)."""
        epoch = self.state["epoch"]
        if self._batches[0] != epoch:
            data = self.job.train_data
            batches = epoch_batches(len(data), self.train.batch_size, self.train.seed, epoch, self.job.sample_weights)
            self._batches, self._loader = (epoch, batches), None
            if hasattr(data, "set_epoch"):
                data.set_epoch(epoch)
        return self._batches[1]

    def process_share(self, window: list[list[int]]) -> tuple[list[list[int]], int]:
        """(this process's micro-batches of a window, how many of them are stand-ins): every world-th one, plus
        copies of the window's first when the window is too short for every process to get as many (see
        accumulate_window)."""
        mine = window[self.accelerator.process_index :: self.world]
        stand_ins = math.ceil(len(window) / self.world) - len(mine)
        return mine + window[:1] * stand_ins, stand_ins

    def micro_batches(self, mine: list[list[int]]) -> list[dict[str, torch.Tensor]]:
        """Collated micro-batches for this process's share of the window; read ahead by workers when the job
        has them (a DataLoader over the rest of this epoch's planned batches, in the same order)."""
        if not self.job.num_workers:
            return [self.job.collate([self.job.train_data[i] for i in batch]) for batch in mine]
        if self._loader is None:
            batches = self._batches[1]
            planned = [
                batch
                for start in range(self.state["batch"], len(batches), self.window_size)
                for batch in self.process_share(batches[start : start + self.window_size])[0]
            ]
            self._loader = iter(
                torch.utils.data.DataLoader(
                    self.job.train_data,
                    batch_sampler=planned,
                    collate_fn=self.job.collate,
                    num_workers=self.job.num_workers,
                    pin_memory=self.accelerator.device.type == "cuda",
                    prefetch_factor=4,
                    # the workers' base seed comes from here, not from the global stream that the run draws from
                    generator=torch.Generator().manual_seed(self.train.seed * 1_000_003 + self.state["epoch"]),
                )
            )
        return [next(self._loader) for _ in mine]

    def run(self) -> None:
        """Optimizer steps until the end, evaluating and saving when due."""
        device = self.accelerator.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.model.train()
        units, seconds = 0, 0.0  # throughput counts training time only, not evaluation or saving
        # Reading a loss or norm waits for the GPU, and a wait every step leaves it idle while Python prepares the
        # next one (about 8% of a convnext_tiny step on an H100). On CUDA the NaN guard therefore reads them at
        # the points that wait anyway (log, evaluation, save, end), always before a checkpoint is written.
        defer = device.type == "cuda"
        pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        while self.state["step"] < self.total_steps and not self.stopped_early:
            started = time.perf_counter()
            batches = self.epoch_batches()
            window = batches[self.state["batch"] : self.state["batch"] + self.window_size]
            mine, stand_ins = self.process_share(window)
            micro = self.micro_batches(mine)
            units += sum(self.job.units_in(batch) for batch in micro[: len(micro) - stand_ins])
            loss_total, targets = accumulate_window(
                self.job, self.model, micro, self.accelerator, not defer, self.parallel, stand_ins
            )
            grad_norm, lr = self.optimizer_step(check_finite=not defer)
            pending.append((self.state["step"] + 1, loss_total, grad_norm if self.guards_norm else None))
            self.state["step"] += 1
            self.state["batch"] += len(window)
            epoch_end = self.state["batch"] >= len(batches)
            if epoch_end:
                self.state["epoch"] += 1
                self.state["batch"] = 0
            step, last = self.state["step"], self.state["step"] >= self.total_steps
            log_now = step % self.train.log_every == 0 or last
            eval_now = self.job.evaluate is not None and (_due(self.train.eval_every, step, epoch_end) or last)
            save_now = _due(self.train.save_every, step, epoch_end) or last
            if device.type == "cuda" and (log_now or eval_now or save_now):
                # wait for the GPU only where time is read; between those points the next step's batch and
                # kernels are queued while this step's optimizer and EMA kernels still run
                torch.cuda.synchronize()
            seconds += time.perf_counter() - started
            if log_now or eval_now or save_now or not defer:
                check_pending(pending)
                pending = []
            if log_now:
                loss = float(_global_sum(self.accelerator, loss_total)) / max(float(targets), 1)
                norm = None if grad_norm is None else float(grad_norm)
                self.log_train(loss, lr, norm, _global_sum(self.accelerator, units), seconds)
                units, seconds = 0, 0.0
            if eval_now:
                self.evaluate(step)
            elif self.job.evaluate is None and last:  # no validation data: the final weights are the best
                self.save_best()
            if _due(self.train.save_every, step, epoch_end) or last or self.stopped_early:
                self.save(step)

    def optimizer_step(self, check_finite: bool = True) -> tuple[torch.Tensor | None, float]:
        """Clip, step, schedule, EMA; returns (gradient norm before clipping as a 0-d tensor, learning rate used).
        With check_finite, a non-finite norm raises NonFinite before the step (else check_pending reads it)."""
        grad_norm = None
        if self.train.max_grad_norm is not None:
            grad_norm = self.parallel.clip_grad_norm(self.model, self.train.max_grad_norm)
        if grad_norm is not None:
            grad_norm = torch.as_tensor(grad_norm).detach().float()
            if check_finite and self.guards_norm and not torch.isfinite(grad_norm):
                raise NonFinite("gradient norm", float(grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        engine_norm = self.parallel.step(self.optimizer)  # DeepSpeed clips inside its step and reports the norm
        if engine_norm is not None:
            grad_norm = torch.as_tensor(float(engine_norm))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.unwrapped)
        if self.job.after_step is not None:
            self.job.after_step(self.unwrapped, self.state["step"] + 1)
        return grad_norm, lr

    def epoch_progress(self) -> float:
        """Epochs done, as a fraction."""
        return round(self.state["epoch"] + self.state["batch"] / self.n_batches, 4)

    def log_train(self, loss: float, lr: float, grad_norm: float | None, units: float, seconds: float) -> None:
        """A train record in metrics.jsonl and on the progress bar."""
        self.state["units"] += units
        self.state["seconds"] += seconds
        rate = units / seconds if seconds > 0 else None
        record = {
            "event": "train",
            "step": self.state["step"],
            "epoch": self.epoch_progress(),
            "split": "train",
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            f"{self.job.unit}_per_s": rate,
            "mem_gib": self.peak_memory_gib(),
        }
        self.log.write(record)
        self.progress.update(self.state["step"], record)

    def weights_for_eval(self) -> Any:
        """Context in which the model holds the weights to evaluate and keep (EMA when enabled)."""
        return self.ema.applied(self.unwrapped) if self.ema else nullcontext()

    def save_best(self) -> None:
        """Replace best/ with the current (or EMA) weights (gathered from the shards first, by every process)."""
        with self.weights_for_eval():
            weights = self.parallel.trainable_state(self.model) if self.parallel.gathers else None
            if self.accelerator.is_main_process:
                ckpt.replace_folder(self.run_dir / "best", lambda folder: self.save_weights(folder, weights))

    def save_weights(self, folder: Path, weights: dict[str, torch.Tensor] | None) -> None:
        """The job's loadable weights into `folder`; sharded models pass their gathered trainable tensors, which
        peft's and transformers' save_pretrained take as state_dict."""
        if weights is None:
            self.job.save_weights(self.unwrapped, folder)
        else:
            self.job.save_weights(self.unwrapped, folder, weights)

    def evaluate(self, step: int) -> None:
        """Validation metrics; best/ and early stopping follow the configured metric."""
        metric, patience = self.train.early_stop.metric, self.train.early_stop.patience
        self.model.eval()
        with self.weights_for_eval(), torch.no_grad():
            metrics = self.job.evaluate(self.unwrapped)
        self.model.train()
        self.last_eval = metrics
        value = metrics.get(metric)
        if value is None:
            raise RunStopped(
                f"train.early_stop.metric is '{metric}' but evaluation returned only: "
                f"{', '.join(metrics)}. Set it to one of those."
            )
        best = self.state["best"]
        improved = best is None or (value < best if self.mode == "min" else value > best)
        if improved:
            self.state.update(best=value, best_step=step, bad_evals=0)
            self.save_best()
        else:
            self.state["bad_evals"] += 1
        self.log.write(
            {
                "event": "eval",
                "step": step,
                "epoch": self.epoch_progress(),
                "split": "valid",
                **metrics,
                "best": improved,
            }
        )
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        self.progress.print(f"step {step}: {shown}{' (best)' if improved else ''}")
        if patience and self.state["bad_evals"] >= patience:
            self.stopped_early = True
            self.log.write(
                {
                    "event": "early_stop",
                    "step": step,
                    "metric": metric,
                    "best": self.state["best"],
                    "best_step": self.state["best_step"],
                }
            )
            self.progress.print(f"early stop at step {step}: no better {metric} in {patience} evaluations")

    def save(self, step: int) -> None:
        """A complete, resumable checkpoint in the single-process format: sharded tensors are gathered whole by
        every process, then rank 0 writes (DeepSpeed's optimizer shards are written by each process)."""
        parallel, main = self.parallel, self.accelerator.is_main_process
        weights = parallel.trainable_state(self.model) if parallel.gathers else None
        optimizer_state = parallel.optimizer_state(self.optimizer, self.model, self.state["step"])
        ema = None
        if self.ema is not None:
            ema = parallel.whole_tensors(self.ema.state_dict()) if parallel.gathers else self.ema.state_dict()
        # each process's own streams, so a resume on as many processes continues each exactly
        rng_ranks = ckpt.gather_rng_states() if self.world > 1 else None
        if parallel.deepspeed:
            if main:
                ckpt.fresh_folder(ckpt.temporary_folder(self.run_dir, step))
            self.accelerator.wait_for_everyone()
            parallel.save_engine(ckpt.temporary_folder(self.run_dir, step) / "deepspeed")
            self.accelerator.wait_for_everyone()
        if not main:
            return
        training_state = {
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "ema": ema,
            "rng_ranks": rng_ranks,
            "deepspeed": {"strategy": parallel.kind, "processes": self.world} if parallel.deepspeed else None,
        }
        ckpt.save_checkpoint(
            self.run_dir,
            step,
            self.unwrapped,
            training_state,
            dict(self.state),
            lambda folder: self.save_weights(folder, weights),
            self.config.output.keep_last,
            weights=weights,
            fresh=not parallel.deepspeed,
        )

    def stop_nonfinite(self, error: NonFinite) -> None:
        """Log and raise RunStopped with advice; the weights were not updated and no checkpoint is overwritten."""
        step, lr = error.step or self.state["step"] + 1, self.train.lr
        self.log.write({"event": "stopped", "step": step, "reason": f"non-finite {error.what}", "value": error.value})
        saved = ckpt.list_checkpoints(self.run_dir)
        where = f"The last good checkpoint, {saved[-1]}, is kept as it was." if saved else "No checkpoint was written."
        when = "before the weights were updated" if error.step is None else "before any checkpoint held those weights"
        raise RunStopped(
            f"The {error.what} became {error.value} at optimizer step {step}; training stopped {when}. "
            f"{where} Likely causes: a learning rate too high (train.lr is {lr:g}; try {lr / 10:g}), "
            "fp16 overflow (use model.dtype: bf16 or fp32 where the hardware allows), or broken rows in the data. "
            f"`tunelab diagnose {self.run_dir}` reads the curves."
        )

    def peak_memory_gib(self) -> float | None:
        """Peak allocated GPU memory so far, of the most loaded GPU when there are several (collective)."""
        peak = _memory_gib(self.accelerator.device)
        if peak is None or self.world == 1:
            return peak
        most = self.accelerator.reduce(torch.tensor(peak, device=self.accelerator.device), reduction="max")
        return round(float(most), 3)

    def summary(self) -> dict[str, Any]:
        """What summary.json reports about training."""
        seconds = self.state["seconds"]
        return {
            "steps": self.state["step"],
            "total_steps": self.total_steps,
            "epochs": self.epoch_progress(),
            "best": {
                "metric": self.train.early_stop.metric,
                "value": self.state["best"],
                "step": self.state["best_step"],
            },
            "final": self.last_eval,
            "stopped_early": self.stopped_early,
            f"{self.job.unit}_per_s": self.state["units"] / seconds if seconds else None,
            "peak_mem_gib": self.peak_memory_gib(),
        }


def check_pending(pending: list[tuple[int, torch.Tensor, torch.Tensor | None]]) -> None:
    """Raise NonFinite for the first (step, loss, gradient norm) in `pending` holding a NaN or inf."""
    for step, loss, grad_norm in pending:
        if not torch.isfinite(loss):
            raise NonFinite("loss", float(loss), step)
        if grad_norm is not None and not torch.isfinite(grad_norm):
            raise NonFinite("gradient norm", float(grad_norm), step)


def _global_sum(accelerator: Any, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor(float(value), device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="sum"))


def _memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
