"""The verbs end to end on a tiny model: train -> run folder -> eval -> predict -> export --merge, plus the
tokenization cache, packing, recipes and init."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from fixtures import save_tiny_model_dir, write_alpaca_data, write_chat_data
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.recipes import list_recipes, recipe_path, recipe_text
from tunelab.tasks import sft


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    save_tiny_model_dir(tmp_path / "model")
    write_chat_data(tmp_path / "chat.jsonl", 40, seed=1)
    write_alpaca_data(tmp_path / "alpaca.csv", 40, seed=2)
    return tmp_path


def config_file(folder: Path, name: str, **sections: dict) -> Path:
    config = {
        "model": {"name": str(folder / "model")},
        "data": {"train": "chat.jsonl", "max_length": 160},
        "train": {"max_steps": 6, "batch_size": 4, "grad_accum": 1, "lr": 5e-3, "eval_every": 3, "save_every": 3},
        "eval": {"samples": 1, "max_new_tokens": 4},
        "output": {"dir": str(folder / name)},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_eval_predict_export(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(config_file(workspace, "run"))]) == 0
    run = workspace / "run"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run)  # the run folder is printed last
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "curves.png",
        "summary.json",
        "best/adapter_model.safetensors",
        "checkpoints/step-000006/trainable.safetensors",
        "checkpoints/step-000006/state.pt",
    ):
        assert (run / name).exists(), name
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["weight_decay"] == 0.0 and resolved["method"]["target"] == "all-linear"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "epoch"} <= r.keys() for r in train_records)
    assert [r["step"] for r in records if r["event"] == "eval"] == [3, 6]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6 and summary["tokens_per_s"] > 0

    assert main(["eval", str(run)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"loss", "perplexity", "token_accuracy"}
    best = [r for r in records if r["event"] == "eval" and r["best"]][-1]
    assert metrics["loss"] == pytest.approx(best["loss"], abs=1e-5)  # best/ holds the best evaluation's weights

    test_rows = [{"id": f"q{i}", "instruction": f"What color is item {i}?"} for i in range(5)]
    pd.DataFrame(test_rows).to_csv(workspace / "test.csv", index=False)
    assert main(["predict", str(run), "--data", "test.csv", "--out", "preds.csv"]) == 0
    predictions = pd.read_csv(workspace / "preds.csv", keep_default_na=False)
    assert predictions["id"].tolist() == [r["id"] for r in test_rows] and "prediction" in predictions

    assert main(["export", str(run), "--out", str(workspace / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(workspace / "merged").eval()
    assert (workspace / "merged" / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    adapted = PeftModel.from_pretrained(base, run / "best").eval()
    tokenizer = AutoTokenizer.from_pretrained(workspace / "merged")
    ids = tokenizer("What color is the sky? 하늘", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)
    assert main(["export", str(run), "--out", str(workspace / "adapter")]) == 0
    assert (workspace / "adapter" / "adapter_config.json").exists()


def test_packing_alpaca_and_tokenization_cache(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = sft.tokenize_conversations
    monkeypatch.setattr(sft, "tokenize_conversations", lambda *a, **k: calls.append(1) or original(*a, **k))
    path = config_file(workspace, "packed", data={"train": "alpaca.csv", "packing": True, "template": "alpaca"})
    assert main(["train", str(path)]) == 0
    first = len(calls)
    assert first == 2  # train and valid
    assert main(["train", str(path), "output.overwrite=true"]) == 0
    assert len(calls) == first  # the second run read the cache
    assert main(["train", str(path), "output.overwrite=true", "data.max_length=150"]) == 0
    assert len(calls) == first + 2  # a setting that changes tokenization misses the cache


def test_every_recipe_loads_and_validates() -> None:
    names = [n for n in list_recipes() if n != "full"]
    assert {"sft-demo", "sft-lora-24gb", "sft-qlora-t4"} <= set(names)
    for name in names:
        config = load_config(recipe_path(name))
        assert config.task == name.split("-")[0]  # recipes are named TASK-...
    full = yaml.safe_load(recipe_text("full"))
    assert load_config(full).train.lr == 2.0e-4


def test_init_prints_a_loadable_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["init", "sft-demo"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml").model.name == "smollm2-135m-instruct"
    assert main(["recipes"]) == 0
    assert "sft-qlora-t4" in capsys.readouterr().out


def test_tensorboard_mirror(workspace: Path) -> None:
    pytest.importorskip("tensorboard")
    path = config_file(workspace, "board", train={"tensorboard": True, "max_steps": 2, "eval_every": 2})
    assert main(["train", str(path)]) == 0
    events = list((workspace / "board" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
