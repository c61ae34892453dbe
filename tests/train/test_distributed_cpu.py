"""The same config on 1 or 2 processes (gloo on the CPU): DDP and FSDP with 2 x accum 1 equal 1 process with
accum 2 (same global batches), a 2-process checkpoint resumes on 1 process and the reverse, and a 2-process
evaluation or prediction equals the 1-process one.

FSDP here is tunelab's own FSDP2 path (torch's fully_shard on a gloo process group), the code that runs on GPUs:
accelerate's FSDP plugin would not shard on gloo at all (it falls back to DDP on CPU process groups)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import save_tiny_model_dir, write_chat_data
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def config(tmp: Path, name: str, accum: int, steps: int | None, **train: object) -> Path:
    """A LoRA run of `steps` optimizer steps (None: one epoch) with batch 2 x `accum` per process."""
    extra_model, extra_eval = train.pop("model", {}), train.pop("eval", {})
    body = {
        "model": {"name": str(tmp / "model"), **extra_model},
        "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(tmp / "chat.jsonl"), "valid_split": 0.25, "max_length": 160},
        "train": {
            "max_steps": steps,
            "epochs": 1,
            "batch_size": 2,
            "grad_accum": accum,
            "lr": 5e-3,
            "eval_every": 3,
            "save_every": 3,
            "seed": 5,
            "warmup": 0.0,
            **train,
        },
        "eval": {"samples": 0, "max_new_tokens": 8, **extra_eval},
        "output": {"dir": str(tmp / name)},
    }
    path = tmp / f"{name}-{accum}-{steps}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def tunelab(tmp: Path, *args: str) -> str:
    env = {**os.environ, "TUNELAB_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tunelab", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def weights(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors"))


def assert_close(a: dict, b: dict, tolerance: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= tolerance, name


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama, 40 conversations (30 train, 10 valid) and the 1-process reference run (accum 2, 6 steps)."""
    tmp = tmp_path_factory.mktemp("distributed")
    save_tiny_model_dir(tmp / "model")
    write_chat_data(tmp / "chat.jsonl", 40, seed=4)
    tunelab(tmp, "train", str(config(tmp, "single", accum=2, steps=6)))
    return tmp


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_and_resume_across(workdir: Path, strategy: str) -> None:
    tmp, run = workdir, workdir / strategy
    out = tunelab(tmp, "train", str(config(tmp, strategy, 1, 6, distributed=strategy)), "--gpus", "2")
    assert out.strip().splitlines()[-1] == str(run)  # printed once, by rank 0
    assert_close(weights(tmp / "single", 6), weights(run, 6))
    logged = records(run)
    assert [r["step"] for r in logged if r["event"] == "train"] == list(range(1, 7))  # one log, no duplicates
    assert next(r for r in logged if r["event"] == "start")["processes"] == 2
    single = records(tmp / "single")
    evals = [[r for r in rows if r["event"] == "eval"] for rows in (single, logged)]
    for a, b in zip(*evals, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)  # sharded evaluation sums to the same valid loss
    # best/ holds whole adapter tensors (gathered from the shards under fsdp), equal to the 1-process ones
    best = [load_file(str(folder / "best/adapter_model.safetensors")) for folder in (tmp / "single", run)]
    assert_close(*best)
    # the checkpoint is in the 1-process format: the AdamW state of whole tensors, equal to the 1-process one
    state = torch.load(run / "checkpoints/step-000006/state.pt", weights_only=True)["optimizer"]
    reference = torch.load(tmp / "single/checkpoints/step-000006/state.pt", weights_only=True)["optimizer"]
    assert state["param_groups"] == reference["param_groups"]
    for index, entry in reference["state"].items():
        assert_close(entry, state["state"][index])

    # a 2-process checkpoint continues on 1 process (and the reverse), ending where the uninterrupted run ends
    for source, target, accum, extra in (
        (strategy, f"{strategy}-to-single", 2, ()),
        ("single", f"single-to-{strategy}", 1, ("--gpus", "2")),
    ):
        shutil.copytree(tmp / source, tmp / target)
        shutil.rmtree(tmp / target / "checkpoints" / "step-000006")  # as if killed after step 3
        resumed = config(tmp, target, accum, 6, distributed=strategy)
        tunelab(tmp, "train", str(resumed), "--resume", *extra)
        assert_close(weights(tmp / "single", 6), weights(tmp / target, 6))


def test_fsdp_epoch_end_checkpointing_ema_and_sampling(workdir: Path) -> None:
    """A whole epoch of 15 micro-batches: the last window holds one, so the second process runs a stand-in; with
    gradient checkpointing inside the FSDP blocks, EMA shards, and answers generated by both processes in step."""
    tmp = workdir
    common = {"ema": 0.9, "model": {"gradient_checkpointing": True}, "eval": {"samples": 2, "max_new_tokens": 6}}
    tunelab(tmp, "train", str(config(tmp, "epoch-single", 2, None, **common)))
    tunelab(tmp, "train", str(config(tmp, "epoch-fsdp", 1, None, distributed="fsdp", **common)), "--gpus", "2")
    single, fsdp = tmp / "epoch-single", tmp / "epoch-fsdp"
    assert [r["step"] for r in records(fsdp) if r["event"] == "train"] == list(range(1, 9))
    assert_close(weights(single, 8), weights(fsdp, 8))
    ema = [torch.load(run / "checkpoints/step-000008/state.pt", weights_only=True)["ema"] for run in (single, fsdp)]
    assert_close(*ema)
    best = [load_file(str(run / "best/adapter_model.safetensors")) for run in (single, fsdp)]
    assert_close(*best)
    answers = [json.loads((run / "summary.json").read_text())["samples_after"] for run in (single, fsdp)]
    assert answers[0] == answers[1] and len(answers[0]) == 2


def test_two_process_predictions_and_metrics_equal_one_process(workdir: Path) -> None:
    """`predict --gpus 2` writes the file `predict` writes; `eval --gpus 2` gives the same metrics (each process takes
    every other batch of the batches one process makes, so every row sees the same padding)."""
    tmp, run = workdir, workdir / "single"
    data = str(tmp / "chat.jsonl")
    tunelab(tmp, "predict", str(run), "--data", data, "--out", str(tmp / "one.csv"))
    out = tunelab(tmp, "predict", str(run), "--data", data, "--out", str(tmp / "two.csv"), "--gpus", "2")
    assert out.strip().splitlines() == [str(tmp / "two.csv")]
    assert (tmp / "one.csv").read_text() == (tmp / "two.csv").read_text()
    one = json.loads(tunelab(tmp, "eval", str(run)))
    two = json.loads(tunelab(tmp, "eval", str(run), "--gpus", "2"))
    assert one.keys() == two.keys()
    for key in one:
        assert one[key] == pytest.approx(two[key], rel=1e-9)
