"""Bad input through the real command line: every case exits 2 with a message that names the file, row or key and
says what to do, prints no traceback, and leaves nothing half-written (output.dir is not created, or, when it
already holds a run, is left exactly as it was)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import save_tiny_model_dir, write_alpaca_data, write_chat_data

from tunelab.cli import main

USER_ERROR = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny chatml Llama for the whole module (only read, never written)."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("bad-input") / "model")


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> Path:
    """A workspace with good data files; the current folder, so relative data paths resolve from it."""
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    write_chat_data(tmp_path / "chat.jsonl", 24, seed=1)
    write_alpaca_data(tmp_path / "alpaca.csv", 24, seed=2)
    return tmp_path


def write_config(folder: Path, model_dir: Path, name: str = "run", **sections: dict) -> Path:
    """A tiny run config (2 steps, max_length 128, batch 4) at folder/NAME.yaml writing into folder/NAME."""
    config: dict = {
        "model": {"name": str(model_dir)},
        # max_truncated 1: a few examples are longer than 128 tokens, and truncation is not what is tested here
        "data": {"train": "chat.jsonl", "max_length": 128, "max_truncated": 1.0},
        "train": {"max_steps": 2, "batch_size": 4, "grad_accum": 1},
        "eval": {"samples": 0},
        "output": {"dir": str(folder / name)},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """Run the command line in-process; return (exit code, stdout + stderr with line wrapping undone)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def assert_user_error(code: int, text: str, *needles: str) -> None:
    """Exit 2, no traceback, and every needle in the message."""
    assert code == USER_ERROR, text
    assert "Traceback" not in text, text
    assert "internal error" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"


def train_fails(capsys: pytest.CaptureFixture, config: Path, *needles: str, overrides: tuple[str, ...] = ()) -> str:
    """`tunelab train CONFIG` exits 2 with the needles in its message and creates no output folder."""
    out_dir = Path(yaml.safe_load(config.read_text())["output"]["dir"])
    code, text = cli(capsys, "train", config, *overrides)
    assert_user_error(code, text, *needles)
    assert not out_dir.exists(), f"{out_dir} was created by a failed run"
    return text


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its content and its modification time."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------------------------- data files


def test_missing_data_file(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(ws, model_dir, data={"train": "nope.jsonl"})
    train_fails(capsys, config, "data.train is nope.jsonl", "does not exist", str(ws / "nope.jsonl"))
    config = write_config(ws, model_dir, data={"valid": "gone.jsonl"})  # the key that is wrong is named
    train_fails(capsys, config, "data.valid is gone.jsonl", "does not exist")


def test_missing_data_file_through_the_entry_point(ws: Path, model_dir: Path) -> None:
    """The installed entry point (`python -m tunelab`) in a fresh process: the same message, exit code 2."""
    config = write_config(ws, model_dir, data={"train": "nope.jsonl"})
    env = {**os.environ, "TUNELAB_CACHE": str(ws / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", str(config)], capture_output=True, text=True, cwd=ws, env=env
    )
    text = " ".join((done.stdout + done.stderr).split())
    assert_user_error(done.returncode, text, "nope.jsonl", "does not exist")
    assert not (ws / "run").exists()


def test_empty_data_file(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (ws / "empty.jsonl").write_text("")
    train_fails(capsys, write_config(ws, model_dir, data={"train": "empty.jsonl"}), "empty.jsonl", "is empty")
    (ws / "header.csv").write_text("instruction,input,output\n")  # a header and no rows is empty too
    train_fails(capsys, write_config(ws, model_dir, data={"train": "header.csv"}), "header.csv", "no rows")


def test_csv_without_the_answer_column(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (ws / "noanswer.csv").write_text("instruction,input,response\nSay hi,,hi\nSay bye,,bye\n")
    config = write_config(ws, model_dir, data={"train": "noanswer.csv"})
    train_fails(
        capsys, config, "noanswer.csv", "no column 'output'", "Columns found: instruction, input, response",
        "data.columns.output",
    )  # fmt: skip


def test_csv_with_no_known_column(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (ws / "odd.csv").write_text("question,answer\nSay hi,hi\n")
    config = write_config(ws, model_dir, data={"train": "odd.csv"})
    train_fails(capsys, config, "odd.csv", "Columns found: question, answer", "data.columns.instruction")


def test_malformed_jsonl_line(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    lines = (ws / "chat.jsonl").read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2][:-5]  # cut off the end of the third object
    (ws / "broken.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = write_config(ws, model_dir, data={"train": "broken.jsonl"})
    train_fails(capsys, config, "broken.jsonl", "line 3", "malformed JSON")


def test_file_that_is_not_utf8(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    text = "instruction,input,output\n하늘은 무슨 색인가요?,,파란색입니다.\n풀은 무슨 색인가요?,,초록색입니다.\n"
    (ws / "korean.csv").write_bytes(text.encode("cp949"))  # what Excel on a Korean Windows saves
    config = write_config(ws, model_dir, data={"train": "korean.csv"})
    train_fails(capsys, config, "korean.csv", "not UTF-8", "line 2", "iconv -f cp949 -t utf-8")
    (ws / "unicode.csv").write_bytes(text.encode("utf-16"))  # Excel's "Unicode Text": UTF-16 with a BOM
    config = write_config(ws, model_dir, data={"train": "unicode.csv"})
    train_fails(capsys, config, "unicode.csv", "is UTF-16, not UTF-8", "iconv -f utf-16 -t utf-8")


def test_some_empty_answers_are_dropped_and_reported(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    lines = (ws / "alpaca.csv").read_text(encoding="utf-8").splitlines()
    for index in (1, 5, 9):  # data rows 1, 5 and 9 lose their answer (column 3 is the last)
        lines[index] = lines[index].rsplit(",", 1)[0] + ","
    (ws / "some.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = write_config(ws, model_dir, data={"train": "some.csv", "template": "alpaca"})
    code, text = cli(capsys, "train", config)
    assert code == 0, text
    assert "warning:" in text and "dropped 3 of 24 rows with an empty answer" in text and "some.csv" in text
    assert "Traceback" not in text
    assert "Loading weights" not in text  # transformers' per-load progress bars are switched off by the CLI
    assert (ws / "run" / "summary.json").exists()
    start = json.loads((ws / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["data"]["train"]["examples"] + start["data"]["valid"]["examples"] == 21


def test_all_empty_answers(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (ws / "blank.csv").write_text("instruction,input,output\nSay hi,,\nSay bye,,  \n")
    config = write_config(ws, model_dir, data={"train": "blank.csv"})
    train_fails(capsys, config, "blank.csv", "all 2 rows have an empty answer", "'output'")


def test_unknown_role(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "narrator", "content": "once"}, {"role": "assistant", "content": "upon"}]},
    ]
    (ws / "roles.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = write_config(ws, model_dir, data={"train": "roles.jsonl"})
    train_fails(
        capsys, config, "roles.jsonl", "row 2", "message 1 has unknown role 'narrator'", "system, user, assistant"
    )


def test_conversation_without_an_assistant_turn(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
    ]
    (ws / "noturn.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = write_config(ws, model_dir, data={"train": "noturn.jsonl"})
    train_fails(capsys, config, "noturn.jsonl", "row 2", "no assistant turn", "role 'assistant'")


def test_message_without_content_or_with_an_image(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    text_key = {"messages": [{"role": "user", "text": "hi"}, {"role": "assistant", "content": "hello"}]}
    (ws / "textkey.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(text_key) + "\n")
    config = write_config(ws, model_dir, data={"train": "textkey.jsonl"})
    train_fails(capsys, config, "textkey.jsonl", "row 2", "message 1 has no 'content'", "keys found: role, text")
    image = [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is this?"}]
    row = {"messages": [{"role": "user", "content": image}, {"role": "assistant", "content": "A cat."}]}
    (ws / "image.jsonl").write_text(json.dumps(row) + "\n")
    config = write_config(ws, model_dir, data={"train": "image.jsonl"})
    train_fails(capsys, config, "image.jsonl", "row 1", "content part of type 'image'", "text only")


def test_content_given_as_text_parts_is_read(ws: Path) -> None:
    """The OpenAI / HF list-of-parts shape is read as its text (not trained on as the repr of a Python list)."""
    from tunelab.config import load_config
    from tunelab.tasks.sft import read_conversations

    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "the sky?"}]
    row = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Blue."}]}
    (ws / "parts.jsonl").write_text(json.dumps(row) + "\n")
    conversations = read_conversations("parts.jsonl", load_config({}))
    assert conversations[0]["messages"][0] == {"role": "user", "content": "What is\nthe sky?"}


def test_chat_format_on_a_file_without_messages(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(ws, model_dir, data={"train": "alpaca.csv", "format": "chat"})
    train_fails(
        capsys, config, "alpaca.csv", "no column 'messages'", "Columns found: instruction, input, output",
        "data.columns.messages",
    )  # fmt: skip


def test_malformed_csv_and_unknown_extension(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (ws / "ragged.csv").write_text("instruction,input,output\nSay hi,,hi\nSay bye,,bye,extra,fields\n")
    config = write_config(ws, model_dir, data={"train": "ragged.csv"})
    text = train_fails(capsys, config, "ragged.csv", "not a well-formed CSV", "line 3", "Check quoting")
    assert ". ." not in text and ".." not in text  # pandas' trailing newline is not left in the sentence
    (ws / "data.txt").write_text("Say hi\thi\n")
    config = write_config(ws, model_dir, data={"train": "data.txt"})
    train_fails(capsys, config, "data.txt", "unknown extension '.txt'", ".csv", ".jsonl", ".parquet")


# ----------------------------------------------------------------------------------------------- config


def test_unknown_config_key_suggests_the_nearest(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(ws, model_dir)
    train_fails(capsys, config, "unknown key 'train.learning_rate'", "Did you mean 'train.lr'?",
                overrides=("train.learning_rate=1e-4",))  # fmt: skip
    train_fails(capsys, config, "unknown key 'trian'", "Did you mean 'train'?", overrides=("trian.lr=1e-4",))
    (ws / "typo.yaml").write_text(config.read_text().replace("max_steps", "max_step"))  # in the file itself
    train_fails(capsys, ws / "typo.yaml", "typo.yaml", "unknown key 'train.max_step'", "'train.max_steps'")


def test_value_of_the_wrong_type(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(ws, model_dir)
    text = train_fails(
        capsys, config, "train.lr: got 'fast'", "with overrides train.lr=fast", overrides=("train.lr=fast",)
    )
    assert "valid number" in text and "Peak learning rate" in text  # says what is allowed and what the key does
    text = train_fails(capsys, config, "train.eval_every: got 'abc'", overrides=("train.eval_every=abc",))
    assert "1 invalid setting" in text and "or input should be 'epoch'" in text  # one line for int | 'epoch'


def test_config_file_that_does_not_exist(ws: Path, capsys: pytest.CaptureFixture) -> None:
    code, text = cli(capsys, "train", ws / "nope.yaml")
    assert_user_error(code, text, "nope.yaml", "does not exist", "tunelab init")


def test_invalid_yaml(ws: Path, capsys: pytest.CaptureFixture) -> None:
    (ws / "bad.yaml").write_text("model:\n  name: x\n train: [1, 2\n")
    code, text = cli(capsys, "train", ws / "bad.yaml")
    assert_user_error(code, text, "bad.yaml", "not valid YAML", "line 3")


def test_override_without_equals(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(ws, model_dir)
    train_fails(capsys, config, "train.lr", "key.sub=value", overrides=("train.lr",))


def test_config_path_that_is_a_folder(ws: Path, capsys: pytest.CaptureFixture) -> None:
    (ws / "somerun").mkdir()
    code, text = cli(capsys, "train", ws / "somerun")
    assert_user_error(code, text, "somerun is a folder", "config.yaml")


def test_command_line_usage_errors(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """Parser errors (typer raises its own copy of click's exceptions) exit 2 with click's usage message."""
    config = write_config(ws, model_dir)
    code, text = cli(capsys, "trian", config)
    assert_user_error(code, text, "No such command 'trian'", "Did you mean 'train'?", "--help")
    code, text = cli(capsys, "train")
    assert_user_error(code, text, "Missing argument 'config'", "Usage:")
    code, text = cli(capsys, "train", config, "--gpu", "2")
    assert_user_error(code, text, "No such option: --gpu", "--gpus")
    assert not (ws / "run").exists()


# ----------------------------------------------------------------------------------------------- model


def test_model_folder_that_does_not_exist(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(ws, model_dir, model={"name": str(ws / "no-such-model")})
    train_fails(capsys, config, "no-such-model", "does not exist", "model.name")


def test_model_folder_without_a_model(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (ws / "empty-model").mkdir()
    config = write_config(ws, model_dir, model={"name": str(ws / "empty-model")})
    train_fails(capsys, config, "empty-model", "no config.json", "model.name")


def test_model_name_that_is_a_file(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    weights = model_dir / "model.safetensors"  # the weights file instead of the folder that holds it
    config = write_config(ws, model_dir, model={"name": str(weights)})
    train_fails(capsys, config, f"model.name {weights} is a file", "model's folder", str(model_dir))


@pytest.mark.parametrize("override", ["method.kind=qlora", "model.quantize=nf4"])
def test_quantized_training_without_cuda(
    ws: Path, model_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, override: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    train_fails(capsys, write_config(ws, model_dir), "CUDA", "method.kind: lora", overrides=(override,))


# ----------------------------------------------------------------------------------------------- run folders


def test_resume_on_a_folder_without_a_run(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (ws / "run").mkdir()
    (ws / "run" / "notes.txt").write_text("mine")  # a folder the user made, holding something else
    before = snapshot(ws / "run")
    code, text = cli(capsys, "train", write_config(ws, model_dir), "--resume")
    assert_user_error(code, text, str(ws / "run"), "holds no run to continue", "Drop --resume")
    assert snapshot(ws / "run") == before and [p.name for p in (ws / "run").iterdir()] == ["notes.txt"]
    (ws / "run" / "config.yaml").write_text("{}")  # a run that was stopped before its first checkpoint
    (ws / "run" / "metrics.jsonl").write_text("")
    before = snapshot(ws / "run")
    code, text = cli(capsys, "train", write_config(ws, model_dir), "--resume")
    assert_user_error(code, text, "has no complete checkpoint yet", "output.overwrite=true")
    assert snapshot(ws / "run") == before


def test_output_dir_that_is_or_is_below_a_file(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (ws / "taken").write_text("a file")
    config = write_config(ws, model_dir, output={"dir": str(ws / "taken")})
    code, text = cli(capsys, "train", config)
    assert_user_error(code, text, f"output.dir {ws / 'taken'} is a file, not a folder", "Choose another output.dir")
    config = write_config(ws, model_dir, output={"dir": str(ws / "taken" / "run")})
    code, text = cli(capsys, "train", config)
    assert_user_error(code, text, "cannot be made", f"{ws / 'taken'} is a file", "Choose another output.dir")
    assert (ws / "taken").read_text() == "a file"


def test_output_folder_that_holds_another_run(ws: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(ws, model_dir)
    code, text = cli(capsys, "train", "--resume", config)  # nothing to resume yet
    assert_user_error(code, text, "--resume", "holds no run to continue", "Drop --resume")
    assert not (ws / "run").exists()
    code, text = cli(capsys, "train", config)
    assert code == 0, text
    before = snapshot(ws / "run")
    assert "summary.json" in before

    other = write_config(ws, model_dir, "other", data={"train": "alpaca.csv"}, output={"dir": str(ws / "run")})
    code, text = cli(capsys, "train", other)
    assert_user_error(code, text, str(ws / "run"), "already holds a run", "--resume", "output.overwrite=true")
    assert snapshot(ws / "run") == before

    code, text = cli(capsys, "train", other, "output.overwrite=true")
    assert code == 0, text
    assert "Traceback" not in text
    saved = yaml.safe_load((ws / "run" / "config.yaml").read_text())
    assert saved["data"]["train"].endswith("alpaca.csv")  # the folder now holds the new run
    assert snapshot(ws / "run") != before


def test_eval_and_predict_on_a_folder_that_is_not_a_run(ws: Path, capsys: pytest.CaptureFixture) -> None:
    (ws / "notarun").mkdir()
    code, text = cli(capsys, "eval", ws / "notarun")
    assert_user_error(code, text, "notarun", "not a tunelab run folder", "output.dir")
    code, text = cli(capsys, "predict", ws / "notarun", "--data", "alpaca.csv", "--out", ws / "preds.csv")
    assert_user_error(code, text, "notarun", "not a tunelab run folder")
    code, text = cli(capsys, "predict", ws / "missing", "--data", "alpaca.csv", "--out", ws / "preds.csv")
    assert_user_error(code, text, "Run folder", "missing", "does not exist", "output.dir")
    assert not (ws / "preds.csv").exists()
    assert list((ws / "notarun").iterdir()) == []


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """One finished tiny run for the eval / predict / export cases (only read by them)."""
    folder = tmp_path_factory.mktemp("trained")
    write_chat_data(folder / "chat.jsonl", 24, seed=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNELAB_CACHE", str(folder / "cache"))
        assert main(["train", str(write_config(folder, model_dir))]) == 0
    return folder / "run"


def test_eval_predict_export_with_bad_paths(ws: Path, trained_run: Path, capsys: pytest.CaptureFixture) -> None:
    """A missing --data, or an --out that cannot be written, fails before the model is loaded (for predict: not
    after generating every answer), and the run folder is left as it was."""
    before = snapshot(trained_run)
    (ws / "taken").write_text("a file")
    code, text = cli(capsys, "eval", trained_run, "--data", "nope.csv")
    assert_user_error(code, text, "--data nope.csv does not exist", str(ws / "nope.csv"))
    code, text = cli(capsys, "predict", trained_run, "--data", "nope.csv", "--out", "preds.csv")
    assert_user_error(code, text, "--data nope.csv does not exist")
    code, text = cli(capsys, "predict", trained_run, "--data", "alpaca.csv", "--out", ws)
    assert_user_error(code, text, f"--out {ws} is a folder", "predictions.csv")
    code, text = cli(capsys, "predict", trained_run, "--data", "alpaca.csv", "--out", "taken/preds.csv")
    assert_user_error(code, text, "--out taken/preds.csv cannot be made", f"{ws / 'taken'} is a file")
    code, text = cli(capsys, "export", trained_run, "--out", "taken")
    assert_user_error(code, text, "--out taken is a file, not a folder")
    (ws / "export").mkdir()
    (ws / "export" / "keep.txt").write_text("mine")
    code, text = cli(capsys, "export", trained_run, "--out", "export")
    assert_user_error(code, text, "export exists and is not empty")
    assert [p.name for p in (ws / "export").iterdir()] == ["keep.txt"]
    assert not (ws / "preds.csv").exists() and (ws / "taken").read_text() == "a file"
    assert snapshot(trained_run) == before


def test_init_unknown_recipe(capsys: pytest.CaptureFixture) -> None:
    code, text = cli(capsys, "init", "sft-lroa-24gb")
    assert_user_error(code, text, "No recipe named 'sft-lroa-24gb'", "Did you mean 'sft-lora-24gb'?")
    code, text = cli(capsys, "init", "nosuchrecipe")
    assert_user_error(code, text, "No recipe named 'nosuchrecipe'", "sft-demo", "tunelab recipes")
