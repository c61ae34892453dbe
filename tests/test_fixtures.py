"""Checks that the offline test helpers behave like the real tokenizers and models they stand in for."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from fixtures import ALL_FAMILIES, make_tiny_llama, make_tokenizer, save_tiny_model_dir
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

TEXT = "Hello world! The sky is blue. 안녕하세요, 하늘은 파란색입니다. ünïcødé 😀 tabs\tand\nnewlines"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is the sky? 하늘은?"},
    {"role": "assistant", "content": "Blue. 파란색."},
]
RENDERED = {
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat color is the sky? 하늘은?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nBlue. 파란색.<|eot_id|>",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat color is the sky? 하늘은?<|im_end|>\n"
    "<|im_start|>assistant\nBlue. 파란색.<|im_end|>\n",
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\nWhat color is the sky? 하늘은?<end_of_turn>\n"
    "<start_of_turn>model\nBlue. 파란색.<end_of_turn>\n",
}
GENERATION_PROMPT = {
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatml": "<|im_start|>assistant\n",
    "gemma": "<start_of_turn>model\n",
}
SPECIALS = {
    "llama3": (
        "<|begin_of_text|>",
        "<|eot_id|>",
        None,
        ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
    ),
    "chatml": (None, "<|im_end|>", "<|endoftext|>", ["<|im_start|>"]),
    "gemma": ("<bos>", "<eos>", "<pad>", ["<start_of_turn>", "<end_of_turn>", "<unk>"]),
}


def test_round_trip_and_offsets(tokenizer: PreTrainedTokenizerFast) -> None:
    assert tokenizer.is_fast
    assert 400 <= tokenizer.vocab_size <= 1000
    enc = tokenizer(TEXT, return_offsets_mapping=True, add_special_tokens=False)
    assert tokenizer.decode(enc["input_ids"]) == TEXT
    assert len(enc["offset_mapping"]) == len(enc["input_ids"])
    assert enc["offset_mapping"][-1][1] == len(TEXT)
    assert all(0 <= a <= b <= len(TEXT) for a, b in enc["offset_mapping"])


def test_special_tokens_are_single_ids(family: str, tokenizer: PreTrainedTokenizerFast) -> None:
    bos, eos, pad, others = SPECIALS[family]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (bos, eos, pad)
    for token in [t for t in (bos, eos, pad) if t] + others:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token
        assert token in tokenizer.all_special_tokens
    assert tokenizer.decode(tokenizer.encode(f"a{eos}b", add_special_tokens=False), skip_special_tokens=True) == "ab"


def test_bos_added_only_where_the_real_tokenizer_adds_it(family: str, tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("hi")
    if family == "chatml":
        assert ids == tokenizer.encode("hi", add_special_tokens=False)
    else:
        assert ids[0] == tokenizer.bos_token_id and ids[1:] == tokenizer.encode("hi", add_special_tokens=False)
    assert tokenizer.eos_token_id not in ids


def test_llama3_has_no_pad_and_gemma_has_unk() -> None:
    llama = make_tokenizer("llama3")
    assert llama.pad_token is None and llama.pad_token_id is None and llama.unk_token is None
    assert make_tokenizer("chatml").bos_token is None
    assert make_tokenizer("gemma").unk_token == "<unk>"


def test_chat_template_renders(family: str, tokenizer: PreTrainedTokenizerFast) -> None:
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == RENDERED[family]
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(GENERATION_PROMPT[family])
    without = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=False)
    assert prompt == without + GENERATION_PROMPT[family]
    assert RENDERED[family].startswith(without)


def test_qwen_default_system_prompt() -> None:
    text = make_tokenizer("chatml").apply_chat_template(CONVERSATION[1:2], tokenize=False)
    assert text.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    )


def test_gemma2_rejects_system_role() -> None:
    tokenizer = make_tokenizer("gemma2")
    with pytest.raises(TemplateError, match="System role not supported"):
        tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.apply_chat_template(CONVERSATION[1:], tokenize=False) == RENDERED["gemma"].replace(
        "Be brief.\n\n", ""
    )


def test_tokenizers_are_independent_and_cached() -> None:
    first = make_tokenizer("llama3")
    first.pad_token = first.eos_token
    assert make_tokenizer("llama3").pad_token is None
    start = time.perf_counter()
    for family in ALL_FAMILIES:
        make_tokenizer(family)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ValueError, match="unknown tokenizer family"):
        make_tokenizer("mistral")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_save_and_reload_tokenizer(family: str, tmp_path: Path) -> None:
    tokenizer = make_tokenizer(family)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode(TEXT) == tokenizer.encode(TEXT)
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
    )
    assert len(loaded) == len(tokenizer)


def test_tiny_llama_forward(tokenizer: PreTrainedTokenizerFast) -> None:
    model = make_tiny_llama(tokenizer, seed=0)
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert not model.config.tie_word_embeddings
    batch = tokenizer([TEXT], return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)
    same = make_tiny_llama(tokenizer, seed=0)
    assert torch.equal(same.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(make_tiny_llama(tokenizer, seed=1).lm_head.weight, model.lm_head.weight)


def test_save_tiny_model_dir_reloads(tmp_path: Path) -> None:
    path = save_tiny_model_dir(tmp_path / "model", family="chatml")
    assert (path / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    reference = make_tiny_llama(make_tokenizer("chatml"), seed=0).eval()
    batch = tokenizer(["안녕 hello"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model.eval()(**batch).logits, reference(**batch).logits)


def test_datasets_are_deterministic_and_well_formed(alpaca_csv: Path, chat_jsonl: Path, tmp_path: Path) -> None:
    from fixtures import write_alpaca_data, write_chat_data

    assert write_alpaca_data(tmp_path / "again.csv", 64, 0).read_bytes() == alpaca_csv.read_bytes()
    assert write_chat_data(tmp_path / "again.jsonl", 64, 0).read_bytes() == chat_jsonl.read_bytes()
    assert write_chat_data(tmp_path / "other.jsonl", 64, 1).read_bytes() != chat_jsonl.read_bytes()
    with alpaca_csv.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 64 and list(rows[0]) == ["instruction", "input", "output"]
    assert any(not r["input"] for r in rows) and all(r["output"] for r in rows)
    assert any("색" in r["output"] for r in rows)
    conversations = [json.loads(line)["messages"] for line in chat_jsonl.read_text(encoding="utf-8").splitlines()]
    assert len(conversations) == 64
    roles = [[m["role"] for m in messages] for messages in conversations]
    assert ["system", "user", "assistant", "user", "assistant"] in roles
    assert ["user", "assistant", "user", "assistant"] in roles and ["user", "assistant"] in roles
    assert any(any("\uac00" <= ch <= "\ud7a3" for m in c for ch in m["content"]) for c in conversations)
    for family in ("llama3", "chatml", "gemma"):
        tokenizer = make_tokenizer(family)
        for messages in conversations:
            assert tokenizer.apply_chat_template(messages, tokenize=False)
