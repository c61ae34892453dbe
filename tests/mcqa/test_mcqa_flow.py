"""mcqa end to end through the command line on tiny random Qwen2-VL and LLaVA-style models: train, eval (with
permutation TTA), predict (submission in the test file's order, probs.csv), export, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from vlm_fixtures import read_json, write_config

from tunelab.cli import main


def run_cli(*argv: object) -> int:
    """The command line in-process."""
    return main([str(a) for a in argv])


def test_train_eval_predict_export(vlm_dir: Path, qa_ws: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(qa_ws, vlm_dir, eval={"batch_size": 8, "tta": "permute"})
    assert run_cli("train", config) == 0
    run = qa_ws / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    parts = {row["part"]: row for row in start["parameter_groups"]}
    assert parts["vision"]["trainable"] == 0 and parts["projector"]["trainable"] > 0
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all(0.0 <= r["accuracy"] <= 1.0 for r in evals)
    summary = read_json(run / "summary.json")
    assert summary["best"]["metric"] == "accuracy" and summary["samples_per_s"] > 0
    assert (run / "best" / "adapter_config.json").exists() and (run / "best" / "processor_config.json").exists()
    capsys.readouterr()

    assert run_cli("eval", run) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tta"] == "permute" and result["questions"] == 6 and 0.0 <= result["accuracy"] <= 1.0

    out = qa_ws / "sub" / "submission.csv"
    assert run_cli("predict", run, "--data", qa_ws / "test.csv", "--out", out) == 0
    shown = capsys.readouterr().err
    assert "predict" in shown and "passes/s" in shown  # the progress bar over forward passes (rows x TTA orders)
    submission = pd.read_csv(out, dtype=str)
    test = pd.read_csv(qa_ws / "test.csv", dtype=str)
    assert list(submission.columns) == ["id", "answer"]
    assert submission["id"].tolist() == test["id"].tolist()  # the test file's order and ids
    assert set(submission["answer"]) <= set("abcd")
    probs = pd.read_csv(out.with_name("probs.csv"))
    assert list(probs.columns) == ["id", "prob_a", "prob_b", "prob_c", "prob_d"]
    assert probs[["prob_a", "prob_b", "prob_c", "prob_d"]].sum(axis=1).round(4).eq(1.0).all()
    picked = probs[["prob_a", "prob_b", "prob_c", "prob_d"]].to_numpy().argmax(axis=1)
    assert ["abcd"[k] for k in picked] == submission["answer"].tolist()
    # the same prediction with worker processes handing over chunks (as on a GPU machine)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["data"]["num_workers"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    again = qa_ws / "sub-workers" / "submission.csv"
    assert run_cli("predict", run, "--data", qa_ws / "test.csv", "--out", again) == 0
    assert pd.read_csv(again, dtype=str).equals(submission)
    probs_again = pd.read_csv(again.with_name("probs.csv"))
    assert (probs_again.drop(columns="id") - probs.drop(columns="id")).abs().to_numpy().max() < 1e-4
    # the adapter folded into the (float32) weights before scoring: the same probabilities (merged equals unmerged)
    saved["eval"]["merge_lora"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    merged = qa_ws / "sub-merged" / "submission.csv"
    assert run_cli("predict", run, "--data", qa_ws / "test.csv", "--out", merged) == 0
    probs_merged = pd.read_csv(merged.with_name("probs.csv"))
    assert (probs_merged.drop(columns="id") - probs.drop(columns="id")).abs().to_numpy().max() < 1e-4

    assert run_cli("export", run, "--out", qa_ws / "merged", "--merge") == 0
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoModelForImageTextToText.from_pretrained(qa_ws / "merged")
    AutoProcessor.from_pretrained(qa_ws / "merged")


def test_resume_continues_exactly(vlm_dirs: dict[str, Path], qa_ws: Path) -> None:
    import shutil

    model_dir = vlm_dirs["llava"]
    full = write_config(qa_ws, model_dir, name="full", output={"keep_last": 3})
    assert run_cli("train", full) == 0
    # a run killed after its step-2 checkpoint: the same folder without what came later
    shutil.copytree(qa_ws / "full", qa_ws / "cut")
    shutil.rmtree(qa_ws / "cut" / "checkpoints" / "step-000004")
    cut = write_config(qa_ws, model_dir, name="cut", output={"keep_last": 3})
    assert run_cli("train", cut, "--resume") == 0
    losses = {}
    for name in ("full", "cut"):
        records = [json.loads(line) for line in (qa_ws / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [(r["step"], round(r["loss"], 5)) for r in records if r["event"] == "train"]
    assert losses["cut"] == losses["full"] and len(losses["full"]) == 4


def test_bf16_weights_with_a_trained_vision_encoder(vlm_dirs: dict[str, Path], qa_ws: Path) -> None:
    # bf16 frozen weights, fp32 trained parts (batch-norm buffers included) under CPU autocast: the demo's setting
    config = write_config(
        qa_ws,
        vlm_dirs["llava"],
        model={"name": str(vlm_dirs["llava"]), "dtype": "bf16"},
        method={"kind": "lora", "r": 4, "alpha": 8, "train_parts": {"vision": True, "vision_lr": 0.5}},
        train={"max_steps": 2, "batch_size": 4, "grad_accum": 1, "eval_every": 2, "save_every": 2},
    )
    assert run_cli("train", config) == 0
    records = [json.loads(line) for line in (qa_ws / "run" / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    assert {row["part"]: row["lr"] for row in start["parameter_groups"]}["vision"] == pytest.approx(0.5 * 1e-3)
    assert all(math.isfinite(r["loss"]) for r in records if r["event"] == "train")
