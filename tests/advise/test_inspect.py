"""inspect finds planted faults: duplicates, train / test leakage, truncation at 512 vs 1024, chat-format faults,
conflicting labels, fully masked labels, and in images an unreadable / truncated file, duplicates and leakage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures import make_tokenizer, write_chat_data
from PIL import Image

from tunelab.advise.inspect import check_before_training, fatal_findings, inspect_config, inspect_file
from tunelab.advise.inspect_report import print_report
from tunelab.advise.inspect_text import normalise, script_mix
from tunelab.config import load_config
from tunelab.errors import UserError

LONG_ROWS = 3


def long_text(tokenizer, tokens: int) -> str:
    """A user message of about `tokens` tokens in the tiny tokenizer."""
    unit = "The sky is blue and the grass is green. "
    per_unit = len(tokenizer(unit, add_special_tokens=False)["input_ids"])
    return unit * (tokens // per_unit)


def chat(user: str, answer: str | None = "ok", role: str = "user") -> str:
    messages = [{"role": role, "content": user}] + ([{"role": "assistant", "content": answer}] if answer else [])
    return json.dumps({"messages": messages}, ensure_ascii=False)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train / valid / test JSONL with known faults planted in them."""
    folder = tmp_path_factory.mktemp("planted")
    tokenizer = make_tokenizer("chatml")
    lines = write_chat_data(folder / "base.jsonl", 40, seed=11).read_text().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    lines.append(lines[0])  # exact duplicate of row 1
    second["messages"][-2]["content"] = second["messages"][-2]["content"].upper() + "  !"
    lines.append(json.dumps(second, ensure_ascii=False))  # duplicate of row 2 after normalising
    lines += [chat(f"{i}. " + long_text(tokenizer, 700)) for i in range(LONG_ROWS)]  # cut at 512, fit in 1024
    lines.append(chat("hello", role="robot"))  # unknown role
    lines.append(chat("no answer here", answer=None))  # missing assistant turn
    two_users = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                              {"role": "assistant", "content": "c"}]}  # fmt: skip
    lines.append(json.dumps(two_users))
    lines.append(chat("Is the sky blue?", "yes"))
    lines.append(chat("is the sky  blue", "no"))  # the same prompt, another answer
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    test = [{"messages": first["messages"][:-1]}, {"messages": [{"role": "user", "content": "A brand new question"}]}]
    (folder / "test.jsonl").write_text("\n".join(json.dumps(t, ensure_ascii=False) for t in test) + "\n")
    (folder / "valid.jsonl").write_text(chat("Unseen prompt", "fine") + "\n" + lines[5] + "\n")
    return folder


def config_for(folder: Path, **data: object):
    files = {"train": str(folder / "train.jsonl"), "valid": str(folder / "valid.jsonl"),
             "test": str(folder / "test.jsonl")}  # fmt: skip
    return load_config({"data": {**files, **data}})


def ids(report) -> set[str]:
    return {f.id for f in report.findings}


def test_planted_text_faults_are_found(planted: Path) -> None:
    report = inspect_config(config_for(planted, max_length=1024), tokenizer=make_tokenizer("chatml"))
    found = ids(report)
    assert {"duplicates_train", "leakage_test", "leakage_valid", "unknown_role", "no_assistant", "user_twice",
            "conflicting_answers"} <= found  # fmt: skip
    assert report.splits["train"]["duplicates"] == {"exact": 1, "normalised": 2}
    assert report.splits["test"]["leakage"] == {"exact": 1, "normalised": 1}
    assert report.splits["valid"]["leakage"]["normalised"] == 1
    assert [f.id for f in fatal_findings(report)] == ["unknown_role", "no_assistant"]  # training would refuse them
    assert report.findings[0].fatal  # ranked: fatal first
    leak = next(f for f in report.findings if f.id == "leakage_test")
    assert leak.severity == "high" and "test 1 = train 1" in leak.evidence and leak.fix


def test_truncation_at_512_versus_1024(planted: Path) -> None:
    tokenizer = make_tokenizer("chatml")
    at_1024 = inspect_config(config_for(planted, max_length=1024), tokenizer=tokenizer)
    cut = at_1024.splits["train"]["tokens"]["cut"]
    assert cut["512"]["truncated"] == LONG_ROWS and cut["1024"]["truncated"] == 0
    assert "truncated" not in ids(at_1024)
    at_512 = inspect_config(config_for(planted, max_length=512), tokenizer=tokenizer)
    finding = next(f for f in at_512.findings if f.id == "truncated")
    assert finding.fatal and "data.max_length 512" in finding.headline  # 3 of 48 rows > max_truncated 5%
    assert "Raise data.max_length to" in finding.fix
    lenient = inspect_config(config_for(planted, max_length=512, max_truncated=0.2), tokenizer=tokenizer)
    assert next(f for f in lenient.findings if f.id == "truncated").severity == "medium"


def test_token_percentiles_per_split_and_field(planted: Path) -> None:
    report = inspect_config(config_for(planted), tokenizer=make_tokenizer("chatml"))
    pct = report.splits["train"]["tokens"]["percentiles"]
    assert set(pct) == {"total", "prompt", "answer"} and set(pct["total"]) == {"p50", "p90", "p95", "p99", "max"}
    assert pct["total"]["max"] > 512 > pct["total"]["p50"] and pct["prompt"]["max"] > pct["answer"]["max"]
    assert report.splits["test"]["tokens"]["percentiles"]["answer"]["max"] == 0  # test rows carry no answers


def test_all_labels_masked_is_fatal_and_stops_training(planted: Path) -> None:
    config = config_for(planted, max_length=8)
    report = inspect_config(config, tokenizer=make_tokenizer("chatml"))
    assert {"labels_masked", "truncated"} <= {f.id for f in fatal_findings(report)}
    with pytest.raises(UserError, match="every example has all its labels masked"):
        check_before_training(config, make_tokenizer("chatml"))


def test_clean_data_passes_the_check(tmp_path: Path) -> None:
    write_chat_data(tmp_path / "train.jsonl", 30, seed=5)
    config = load_config({"data": {"train": str(tmp_path / "train.jsonl"), "max_length": 256}})
    report = check_before_training(config, make_tokenizer("chatml"))
    assert not fatal_findings(report) and "truncated" not in ids(report)


def test_outputs_json_html_and_terminal(planted: Path, tmp_path: Path) -> None:
    from rich.console import Console

    report = inspect_config(config_for(planted), out_dir=tmp_path, tokenizer=make_tokenizer("chatml"))
    saved = json.loads((tmp_path / "inspect.json").read_text())
    assert saved["fatal"] == ["unknown_role", "no_assistant"] and saved["findings"][0]["fix"]
    assert "lengths" not in saved  # raw lengths feed the plots only
    html = (tmp_path / "inspect.html").read_text()
    assert "data:image/png;base64," in html and "leakage" in html and "<table>" in html
    console = Console(record=True, width=140)
    print_report(report, console)
    text = console.export_text()
    assert text.index("message has a role") < text.index("50 rows; tokens p50")  # findings first, statistics after


def test_script_mix_per_field() -> None:
    mix = script_mix(["하늘은 파란색입니다", "The sky is blue", "漢字とかな", "Привет", "1234 !!"])
    assert mix["rows_by_dominant"] == {"hangul": 1, "latin": 1, "cjk": 1, "other": 1, "none": 1}
    assert mix["letters"]["hangul"] > 0 and sum(mix["letters"].values()) == pytest.approx(1.0, abs=1e-3)
    assert normalise("Hello,  WORLD!") == normalise("hello world")


def test_sft_answers_that_are_labels_get_label_statistics(tmp_path: Path) -> None:
    rows = [chat(f"Review {i}: good stuff", "positive") for i in range(20)]
    rows += [chat(f"Review {i}: bad stuff", "negative") for i in range(3)]
    rows += [chat("Review 0: good stuff", "negative")]  # conflicts with row 1
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    report = inspect_file(tmp_path / "train.jsonl", tokenizer=make_tokenizer("chatml"))
    labels = report.splits["train"]["labels"]
    assert labels["counts"] == {"positive": 20, "negative": 4} and labels["imbalance"] == 5.0
    assert {"label_imbalance", "conflicting_labels"} <= ids(report)


def test_labelled_table_file(tmp_path: Path) -> None:
    lines = ["text,label"] + [f"sample {i},cat" for i in range(12)] + ["sample 1,dog", "other,dog", "empty,"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    report = inspect_file(tmp_path / "labels.csv")
    assert report.kind == "labels" and report.splits["train"]["labels"]["conflicting_groups"] == 1
    assert {"conflicting_labels", "label_imbalance", "empty_label", "duplicates_train"} <= ids(report)


# ----------------------------------------------------------------------------------------------- images


def save_png(path: Path, seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i in range(10):
        save_png(root / "train" / "cat" / f"{i}.png", seed=i)
    for i in range(2):
        save_png(root / "train" / "dog" / f"{i}.png", seed=100 + i)
    shutil.copy(root / "train" / "cat" / "1.png", root / "train" / "cat" / "copy.png")  # duplicate inside train
    shutil.copy(root / "train" / "cat" / "2.png", root / "train" / "dog" / "relabelled.png")  # conflicting labels
    save_png(root / "test" / "dog" / "new.png", seed=200)
    (root / "test" / "cat").mkdir()
    shutil.copy(root / "train" / "cat" / "3.png", root / "test" / "cat" / "seen.png")  # leakage into test
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"this is not an image")
    whole = save_png(root / "train" / "dog" / "big.png", seed=300, size=(200, 200)).read_bytes()
    (root / "train" / "dog" / "big.png").write_bytes(whole[: len(whole) // 2])  # truncated file
    save_png(root / "train" / "cat" / "tiny.png", seed=400, size=(16, 16), mode="L")
    save_png(root / "train" / "cat" / "wide.png", seed=500, size=(300, 40))
    return root


def test_planted_image_faults_are_found(image_root: Path) -> None:
    report = inspect_file(image_root)
    found = ids(report)
    assert {"unreadable_images", "duplicate_images", "image_leakage", "conflicting_labels", "class_imbalance",
            "tiny_images", "extreme_aspect", "colour_modes"} <= found  # fmt: skip
    unreadable = next(f for f in report.findings if f.id == "unreadable_images")
    assert "2 image(s) cannot be read (1 truncated)" in unreadable.headline and "broken.jpg" in unreadable.evidence
    assert "seen.png" in next(f for f in report.findings if f.id == "image_leakage").evidence
    train = report.splits["train"]
    assert train["classes"] == {"cat": 14, "dog": 4} and train["modes"] == {"RGB": 15, "L": 1}
    assert train["width"]["max"] == 300 and train["aspect"]["max"] == 7.5
    assert not fatal_findings(report)


def test_image_table_file_with_outputs(image_root: Path, tmp_path: Path) -> None:
    rows = ["path,label", "train/cat/0.png,cat", "train/cat/copy.png,cat", "train/cat/1.png,cat", "missing.png,dog"]
    (image_root / "table.csv").write_text("\n".join(rows) + "\n")
    report = inspect_file(image_root / "table.csv", out_dir=tmp_path)
    assert report.kind == "images" and {"unreadable_images", "duplicate_images"} <= ids(report)
    assert "image width x height" in (tmp_path / "inspect.html").read_text()
