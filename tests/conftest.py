"""Pytest fixtures wrapping the offline helpers in ``tests/fixtures.py`` (import it for the plain functions)."""

from __future__ import annotations

# isort: off
import tunelab  # noqa: F401 - first: its torchvision import hook (tunelab._compat) precedes transformers

# isort: on
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures import (
    FAMILIES,
    make_tiny_llama,
    make_tokenizer,
    save_tiny_model_dir,
    write_alpaca_data,
    write_chat_data,
)
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Each main tokenizer family in turn: "llama3", "chatml", "gemma"."""
    return request.param


@pytest.fixture
def tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A fresh tiny tokenizer of every main family (parametrized through ``family``)."""
    return make_tokenizer(family)


@pytest.fixture
def tokenizer_factory() -> Callable[[str], PreTrainedTokenizerFast]:
    """``make_tokenizer`` itself, for tests that pick the family."""
    return make_tokenizer


@pytest.fixture
def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-3 style: bos <|begin_of_text|>, eos <|eot_id|>, no pad token."""
    return make_tokenizer("llama3")


@pytest.fixture
def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2.5 style: eos <|im_end|>, pad <|endoftext|>, no bos."""
    return make_tokenizer("chatml")


@pytest.fixture
def gemma_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma-3 style: bos <bos>, eos <eos>, pad <pad>; system folded into the first user turn."""
    return make_tokenizer("gemma")


@pytest.fixture
def gemma2_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma-2 style: like ``gemma_tokenizer`` but the template raises on a system message."""
    return make_tokenizer("gemma2")


@pytest.fixture
def tiny_model(chatml_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A tiny random Llama sized to the chatml tokenizer (seed 0)."""
    return make_tiny_llama(chatml_tokenizer, seed=0)


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A folder holding a chatml tokenizer and a tiny Llama, loadable with ``Auto*.from_pretrained``."""
    return save_tiny_model_dir(tmp_path / "tiny-model", family="chatml")


@pytest.fixture
def alpaca_csv(tmp_path: Path) -> Path:
    """64 rows of instruction,input,output CSV (seed 0)."""
    return write_alpaca_data(tmp_path / "alpaca.csv", n=64, seed=0)


@pytest.fixture
def chat_jsonl(tmp_path: Path) -> Path:
    """64 conversations of ``{"messages": [...]}`` JSONL (seed 0)."""
    return write_chat_data(tmp_path / "chat.jsonl", n=64, seed=0)
