"""Tests for the chatterbot-corpus demo chat data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tunelab.data import demo_data
from tunelab.data.demo_data import write_demo_sft_data
from tunelab.errors import UserError

needs_corpus = pytest.mark.skipif(
    importlib.util.find_spec("chatterbot_corpus") is None,
    reason="needs: pip install --no-deps chatterbot-corpus==1.3.3",
)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_missing_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "chatterbot_corpus" else real(n, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps chatterbot-corpus==1\.3\.3"):
        write_demo_sft_data(tmp_path)


def test_clean_turns() -> None:
    assert demo_data._clean([" hi ", 42, "x"]) == ("hi", "42")  # trailing user turn dropped, scalar coerced
    assert demo_data._clean(["hi", "  "]) is None
    assert demo_data._clean(["only a question"]) is None
    assert demo_data._clean("not a list") is None


@needs_corpus
def test_files_and_shape(tmp_path: Path) -> None:
    result = write_demo_sft_data(tmp_path / "a")
    rows = {split: _read(result[split]) for split in ("train", "valid", "test")}
    assert {s: len(r) for s, r in rows.items()} == result["counts"]
    assert rows["train"] and rows["valid"] and rows["test"]
    assert set(result["languages"]) == {"english", "korean"}
    for split in ("train", "valid"):
        for row in rows[split]:
            roles = [m["role"] for m in row["messages"]]
            assert roles[-1] == "assistant" and "assistant" in roles
            assert roles == ["user", "assistant"] * (len(roles) // 2)
            assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
    for row in rows["test"]:
        assert row["id"] and row["messages"][-1]["role"] == "user"
    ids = [row["id"] for split in rows.values() for row in split]
    assert len(ids) == len(set(ids))
    first = {s: {r["messages"][0]["content"].casefold() for r in rows[s]} for s in rows}
    assert not first["train"] & first["valid"] and not first["train"] & first["test"]
    assert any(r["id"].startswith("korean-") for r in rows["valid"])


@needs_corpus
def test_deterministic(tmp_path: Path) -> None:
    a = write_demo_sft_data(tmp_path / "a", seed=3)
    b = write_demo_sft_data(tmp_path / "b", seed=3)
    c = write_demo_sft_data(tmp_path / "c", seed=4)
    for split in ("train", "valid", "test"):
        assert a[split].read_bytes() == b[split].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()


@needs_corpus
def test_system_prompt_and_single_language(tmp_path: Path) -> None:
    result = write_demo_sft_data(tmp_path, languages=("korean",), system_prompt="Be brief.")
    assert set(result["languages"]) == {"korean"}
    for row in _read(result["train"]):
        assert row["messages"][0] == {"role": "system", "content": "Be brief."}
