"""The same config on 1 or 2 processes (gloo on the CPU): DDP with 2 x accum 1 equals 1 process with accum 2
(same global batches), and a 2-process checkpoint resumes on 1 process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures import save_tiny_model_dir, write_chat_data
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def config(tmp: Path, name: str, accum: int, steps: int) -> Path:
    body = {
        "model": {"name": str(tmp / "model")},
        "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(tmp / "chat.jsonl"), "valid_split": 0.25, "max_length": 160},
        "train": {
            "max_steps": steps,
            "batch_size": 2,
            "grad_accum": accum,
            "lr": 5e-3,
            "eval_every": 3,
            "save_every": 3,
            "seed": 5,
            "warmup": 0.0,
        },
        "eval": {"samples": 0},
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


def test_ddp_two_processes_equal_one_process_and_resume_across(tmp_path: Path) -> None:
    save_tiny_model_dir(tmp_path / "model")
    write_chat_data(tmp_path / "chat.jsonl", 40, seed=4)
    tunelab(tmp_path, "train", str(config(tmp_path, "single", accum=2, steps=6)))
    out = tunelab(tmp_path, "train", str(config(tmp_path, "ddp", accum=1, steps=6)), "--gpus", "2")
    assert out.strip().splitlines()[-1] == str(tmp_path / "ddp")  # printed once, by rank 0
    assert_close(weights(tmp_path / "single", 6), weights(tmp_path / "ddp", 6))
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 7))  # one log, no duplicates
    start = next(r for r in records if r["event"] == "start")
    assert start["processes"] == 2
    single = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(
        [r for r in single if r["event"] == "eval"], [r for r in records if r["event"] == "eval"], strict=True
    ):  # sharded evaluation sums to the same valid loss
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)

    # a 2-process checkpoint continues on 1 process (and the reverse), ending where the uninterrupted run ends
    for source, target, accum, extra in (("ddp", "to-single", 2, ()), ("single", "to-ddp", 1, ("--gpus", "2"))):
        shutil.copytree(tmp_path / source, tmp_path / target)
        shutil.rmtree(tmp_path / target / "checkpoints" / "step-000006")  # as if killed after step 3
        tunelab(tmp_path, "train", str(config(tmp_path, target, accum=accum, steps=6)), "--resume", *extra)
        assert_close(weights(tmp_path / "single", 6), weights(tmp_path / target, 6))
