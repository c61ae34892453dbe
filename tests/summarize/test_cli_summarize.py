"""summarize through tunelab.cli.main: a short run of each model kind (train, eval, predict, export), and bad input
that must exit 2 with a clear message, no traceback and no run folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tiny import save_tiny_bart_dir, save_tiny_llama_dir, write_dialogues

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.evaluate import rouge
from tunelab.recipes import list_recipes, recipe_path

TAGS = ["#Person1#", "#Person2#", "#Person3#"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {"seq2seq": save_tiny_bart_dir(folder / "bart"), "causal": save_tiny_llama_dir(folder / "llama")}


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    write_dialogues(tmp_path / "train.csv", 24, 1)
    write_dialogues(tmp_path / "test.csv", 4, 3, with_summary=False)
    return tmp_path


def config_file(folder: Path, model_dir: Path, name: str, **sections: dict) -> Path:
    config = {
        "task": "summarize",
        "model": {"name": str(model_dir)},
        "data": {"train": "train.csv", "max_length": 512, "max_target_length": 160, "special_tokens": TAGS},
        "train": {"max_steps": 2, "batch_size": 4, "grad_accum": 1, "lr": 5e-3, "eval_every": 2, "save_every": 2},
        "eval": {"max_new_tokens": 6, "generate_subset": 2, "num_beams": 2, "no_repeat_ngram_size": 2},
        "output": {"dir": str(folder / name)},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("kind", ["seq2seq", "causal"])
def test_train_eval_predict_export(kind: str, models: dict[str, Path], workspace: Path, capsys) -> None:
    path = config_file(workspace, models[kind], "run", model={"kind": kind})
    assert main(["train", str(path)]) == 0
    run = workspace / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    assert start["kind"] == kind and start["data"]["train"]["prompts_cut"]["512"] == 0.0
    evals = [r for r in records if r["event"] == "eval"]
    assert evals and {"loss", "rouge1", "rouge2", "rougeL", "rouge_sum"} <= evals[-1].keys()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["metric"] == "rouge_sum" and summary["kind"] == kind and summary["tokens_per_s"] > 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["max_truncated"] == 0.01 and resolved["train"]["early_stop"]["metric"] == "rouge_sum"
    assert (run / "best" / "adapter_model.safetensors").exists()
    capsys.readouterr()

    assert main(["eval", str(run)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"loss", "rouge1", "rouge2", "rougeL", "rouge_sum"} <= metrics.keys()
    assert metrics["loss"] == pytest.approx(evals[-1]["loss"], rel=1e-4)  # best/ holds the evaluated weights

    assert main(["predict", str(run), "--data", "test.csv", "--out", "preds.csv"]) == 0
    predictions = pd.read_csv(workspace / "preds.csv", keep_default_na=False)
    assert list(predictions.columns) == ["id", "summary"] and len(predictions) == 4
    assert predictions["id"].tolist() == pd.read_csv(workspace / "test.csv")["id"].tolist()

    assert main(["export", str(run), "--out", str(workspace / "merged"), "--merge"]) == 0
    assert (workspace / "merged" / "model.safetensors").exists()


def expect_user_error(args: list[str], capsys, *needles: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_missing_columns_and_empty_dialogues(models: dict[str, Path], workspace: Path, capsys) -> None:
    frame = pd.read_csv(workspace / "train.csv")
    frame.rename(columns={"dialogue": "text"}).to_csv(workspace / "no_dialogue.csv", index=False)
    frame.drop(columns=["summary"]).to_csv(workspace / "no_summary.csv", index=False)
    frame.assign(dialogue=["" if i in (2, 5) else d for i, d in enumerate(frame["dialogue"])]).to_csv(
        workspace / "empty.csv", index=False
    )
    path = config_file(workspace, models["causal"], "bad")
    expect_user_error(["train", str(path), "data.train=no_dialogue.csv"], capsys, "no column 'dialogue'", "text")
    expect_user_error(["train", str(path), "data.train=no_summary.csv"], capsys, "no column 'summary'")
    expect_user_error(["train", str(path), "data.train=empty.csv"], capsys, "2 of 24 rows", "rows 3, 6")
    assert not (workspace / "bad").exists()


def test_over_long_summaries_stop_or_truncate(models: dict[str, Path], workspace: Path, capsys) -> None:
    path = config_file(workspace, models["seq2seq"], "long", data={"max_target_length": 30})
    err = expect_user_error(["train", str(path)], capsys, "data.max_target_length=30", "data.long_targets=truncate")
    assert "summaries are longer" in err and not (workspace / "long").exists()
    assert main(["train", str(path), "data.long_targets=truncate"]) == 0


def test_too_many_prompts_cut_stops_with_advice(models: dict[str, Path], workspace: Path, capsys) -> None:
    path = config_file(workspace, models["seq2seq"], "short", data={"max_length": 64})
    expect_user_error(["train", str(path)], capsys, "of the prompts would be cut", "data.max_length=")
    assert not (workspace / "short").exists()


def test_ko_morph_without_kiwipiepy(models, workspace: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kiwipiepy", None)
    rouge.get_tokenizer.cache_clear()
    path = config_file(workspace, models["causal"], "ko", eval={"rouge_tokenizer": "ko-morph"})
    expect_user_error(["train", str(path)], capsys, "kiwipiepy", "pip install")
    assert not (workspace / "ko").exists()
    rouge.get_tokenizer.cache_clear()


def test_model_kind_mismatch_names_what_the_folder_holds(models, workspace: Path, capsys) -> None:
    path = config_file(workspace, models["causal"], "kind1", model={"kind": "seq2seq"})
    expect_user_error(["train", str(path)], capsys, "model.kind is seq2seq", "decoder-only (causal)", "llama")
    path = config_file(workspace, models["seq2seq"], "kind2", model={"kind": "causal"})
    expect_user_error(["train", str(path)], capsys, "model.kind is causal", "encoder-decoder (seq2seq)", "bart")
    assert not (workspace / "kind1").exists() and not (workspace / "kind2").exists()


def test_summarize_recipes_load() -> None:
    names = [n for n in list_recipes() if n.startswith("summarize")]
    assert {"summarize-demo", "summarize-kobart", "summarize-qlora-llm"} <= set(names)
    for name in names:
        config = load_config(recipe_path(name))
        assert config.task == "summarize" and config.train.early_stop.metric == "rouge_sum"
