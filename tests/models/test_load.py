"""Model loading decisions: dtype per device (fp16 on pre-Ampere GPUs, never bf16 there), pad token choice."""

from __future__ import annotations

import pytest
import torch
from fixtures import make_tokenizer

from tunelab.errors import UserError
from tunelab.models.load import ensure_pad_token, resolve_dtype


def test_auto_dtype_is_fp32_on_cpu() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize(("has_bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_gpus(monkeypatch: pytest.MonkeyPatch, has_bf16: bool, expected: torch.dtype) -> None:
    # a T4 / V100 reports no bf16: auto must pick fp16 there (the seeds' "bf16=True on a T4" is wrong)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: has_bf16)
    assert resolve_dtype("auto", "cuda") == expected


def test_bf16_on_a_gpu_without_it_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(UserError, match="no bf16 support"):
        resolve_dtype("bf16", "cuda")


def test_missing_pad_token_becomes_a_non_eos_token() -> None:
    tokenizer = make_tokenizer("llama3")
    assert tokenizer.pad_token is None
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_pad_equal_to_eos_is_replaced() -> None:
    tokenizer = make_tokenizer("chatml")
    tokenizer.pad_token = tokenizer.eos_token  # SmolLM2 ships pad == eos
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_padding_never_masks_a_real_eos_in_labels() -> None:
    from tunelab.data import text as textdata
    from tunelab.tasks import sft

    tokenizer = make_tokenizer("chatml")
    tokenizer.pad_token = tokenizer.eos_token
    ensure_pad_token(tokenizer)
    conversations = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]}
        for text in ("a", "a much longer answer here")
    ]
    examples, _ = sft.tokenize_conversations(conversations, tokenizer, "chat", 64)
    batch = textdata.collate(examples, tokenizer.pad_token_id)
    eos_targets = (batch["labels"] == tokenizer.eos_token_id).sum(dim=1)
    assert eos_targets.tolist() == [1, 1]  # every answer ends with a learned end-of-turn
