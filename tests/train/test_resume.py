"""Exact resume: a run killed with SIGKILL at a random moment and resumed ends with bitwise the same trainable
weights as an uninterrupted run (CPU, fp32, LoRA with dropout so the RNG state matters too)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from fixtures import save_tiny_model_dir, write_chat_data
from safetensors.torch import load_file

from tunelab.train.checkpoint import list_checkpoints

STEPS = 24


def write_config(tmp: Path, model_dir: Path, data: Path, out: Path) -> Path:
    config = {
        "model": {"name": str(model_dir)},
        "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": str(data), "valid_split": 0.2, "max_length": 160},
        "train": {
            "max_steps": STEPS,
            "batch_size": 2,
            "grad_accum": 2,
            "lr": 5e-3,
            "eval_every": 6,
            "save_every": 3,
            "ema": 0.9,
            "seed": 7,
        },
        "eval": {"samples": 0},
        "output": {"dir": str(out), "keep_last": 2},
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tunelab(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tunelab", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def final_weights(run: Path) -> dict:
    return load_file(str(list_checkpoints(run)[-1] / "trainable.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir(tmp_path / "model")
    data = write_chat_data(tmp_path / "chat.jsonl", 48, seed=3)
    env = {**os.environ, "TUNELAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    straight = tmp_path / "straight"
    process = tunelab("train", str(write_config(tmp_path, model_dir, data, straight)), env=env)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output

    killed = tmp_path / "killed"
    config = write_config(tmp_path, model_dir, data, killed)
    rng = random.Random()
    for _attempt in range(5):  # kill at a random moment after the first checkpoint, before the end
        process = tunelab("train", str(config), *(["--resume"] if list_checkpoints(killed) else []), env=env)
        deadline = time.time() + 120
        while not list_checkpoints(killed) and time.time() < deadline and process.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            break
        process.communicate()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    stopped_at = int(list_checkpoints(killed)[-1].name.split("-")[1])
    assert stopped_at < STEPS

    process = tunelab("train", str(config), "--resume", env=env)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "resuming from" in output

    expected, got = final_weights(straight), final_weights(killed)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert (tensor == got[name]).all(), f"{name} differs after resume from step {stopped_at}"
    # best/ and the metrics log continue cleanly: one train record per step, no duplicates
    import json

    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["event"] == "train"]
    assert steps == list(range(1, STEPS + 1))
    assert (killed / "best" / "adapter_model.safetensors").exists()
