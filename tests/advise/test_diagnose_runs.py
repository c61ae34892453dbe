"""Real runs on a tiny random Llama, diagnosed from their run folders: a deliberately overfit run, a learning rate
far too high, one far too low, and a healthy run that must raise no alarm. Each prints its prescription."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures import save_tiny_model_dir, write_chat_data

from tunelab.advise.diagnose import diagnose_run, render_text
from tunelab.config import load_config
from tunelab.tasks import sft


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("runs")
    save_tiny_model_dir(folder / "model")
    write_chat_data(folder / "chat.jsonl", 64, seed=1)
    write_chat_data(folder / "few.jsonl", 8, seed=1)
    write_chat_data(folder / "valid.jsonl", 16, seed=101)
    return folder


def run(folder: Path, name: str, monkeypatch: pytest.MonkeyPatch, **sections: dict) -> Path:
    """Train a tiny run (full fine-tuning by default, lr 1e-3, an evaluation every 4 steps) and return its folder."""
    monkeypatch.setenv("TUNELAB_CACHE", str(folder / "cache"))
    config = {
        "model": {"name": str(folder / "model")},
        "method": {"kind": "full"},
        "data": {"train": str(folder / "chat.jsonl"), "valid_split": 0.25, "max_length": 160},
        "train": {"epochs": 4, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "eval_every": 4, "save_every": 10_000},
        "eval": {"samples": 0},
        "output": {"dir": str(folder / name), "keep_last": 1},
    }
    for key, value in sections.items():
        config[key] = {**config[key], **value}
    return sft.train(load_config(config))


def diagnosed(run_dir: Path) -> list[str]:
    diagnosis = diagnose_run(run_dir)
    print(render_text(diagnosis))  # the prescription, shown with -s
    assert (run_dir / "diagnosis.json").exists()
    return diagnosis.kinds()


def test_overfit_run(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 8 examples, 40 epochs at a constant lr: train loss goes to ~0 while valid loss turns up
    data = {"train": str(workspace / "few.jsonl"), "valid": str(workspace / "valid.jsonl")}
    train = {"epochs": 40, "lr": 3e-3, "schedule": "constant", "eval_every": 8}
    kinds = diagnosed(run(workspace, "overfit", monkeypatch, data=data, train=train))
    assert kinds[0] == "overfitting"


def test_lr_far_too_high(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # LoRA at 5e-2 (250x the usual 2e-4): the model collapses to a constant guess, as the seeds' 5e-3 run did
    kinds = diagnosed(run(workspace, "high", monkeypatch, method={"kind": "lora"}, train={"lr": 5e-2}))
    assert kinds[0] in ("lr_too_high", "nonfinite", "loss_spikes", "grad_explosion")


def test_lr_far_too_low(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kinds = diagnosed(run(workspace, "low", monkeypatch, method={"kind": "lora"}, train={"lr": 1e-7}))
    assert kinds[0] in ("lr_too_low", "underfitting")


def test_healthy_run(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert diagnosed(run(workspace, "healthy", monkeypatch, train={"lr": 5e-3})) == []
