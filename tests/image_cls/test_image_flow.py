"""image_cls through the verbs: train -> run folder -> eval -> predict -> export (timm layout, INT8), and an
exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from image_fixtures import write_config
from safetensors.torch import load_file

from tunelab.cli import main


def test_train_eval_predict_export_int8(image_workspace: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(image_workspace, model={"name": "test_resnet"}, train={"max_steps": 6, "eval_every": 3})
    assert main(["train", str(config)]) == 0
    run = image_workspace / "cfg"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run)
    for name in (
        "classes.json",
        "confusion_matrix.png",
        "curves.png",
        "summary.json",
        "best/model.safetensors",
        "best/ema.safetensors",
        "checkpoints/step-000006/state.pt",
    ):
        assert (run / name).exists(), name
    assert json.loads((run / "classes.json").read_text()) == ["blue", "green", "red"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert {"loss", "accuracy", "macro_f1", "ema_loss", "ema_accuracy", "ema_macro_f1"} <= evals[0].keys()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["valid"]["confusion_matrix"] and set(summary["valid"]["per_class"]) == {"blue", "green", "red"}
    assert summary["samples_per_s"] > 0

    assert main(["eval", str(run)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= metrics.keys()

    rows = [{"id": f"x{i}", "image": f"{c}/{i}.png"} for i, c in enumerate(["red", "green", "blue", "red"])]
    pd.DataFrame(rows).to_csv(image_workspace / "images" / "test.csv", index=False)
    assert main(["predict", str(run), "--data", "images/test.csv", "--out", "preds.csv"]) == 0
    predictions = pd.read_csv(image_workspace / "preds.csv")
    assert list(predictions.columns) == ["id", "label", "prob_blue", "prob_green", "prob_red"]
    assert predictions["id"].tolist() == ["x0", "x1", "x2", "x3"]
    assert predictions[["prob_blue", "prob_green", "prob_red"]].sum(axis=1).round(4).eq(1).all()

    assert main(["export", str(run), "--out", "exported", "--int8"]) == 0
    exported = image_workspace / "exported"
    model = timm.create_model(f"local-dir:{exported}")  # timm's own folder layout
    assert model.num_classes == 3
    report = json.loads((exported / "int8_report.json").read_text())
    assert report["agreement"] >= 0.6 and report["int8_ms_per_image"] > 0
    int8 = torch.jit.load(str(exported / "model_int8.pt"))
    assert int8(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)).shape == (2, 3)


def test_resume_is_exact_and_workers_do_not_change_results(image_workspace: Path) -> None:
    config = write_config(image_workspace, train={"max_steps": 4, "eval_every": 2, "save_every": 2})
    assert main(["train", str(config)]) == 0
    run = image_workspace / "cfg"
    full = {
        name: load_file(str(run / "checkpoints/step-000004" / name))
        for name in ("model.safetensors", "ema.safetensors")
    }
    shutil.rmtree(run / "checkpoints/step-000004")
    assert main(["train", str(config), "--resume", "data.num_workers=2"]) == 0
    for name, expected in full.items():
        resumed = load_file(str(run / "checkpoints/step-000004" / name))
        for key, value in expected.items():
            assert torch.equal(resumed[key], value), (name, key)
    losses = [
        json.loads(line)["loss"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "train"
    ]
    assert len(losses) == 4


def test_int8_is_for_image_runs_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.yaml").write_text("task: sft\n")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out"), "--int8"]) == 2
    assert "--int8" in capsys.readouterr().err and not (tmp_path / "out").exists()
