"""Numerics against references: our loss equals the model's own; packed equals unpacked per example; gradient
accumulation normalised by target tokens makes 8 x 1 and 2 x 4 the same update."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from fixtures import make_tiny_llama, make_tokenizer

from tunelab.config import RunConfig
from tunelab.data import text as textdata
from tunelab.tasks import sft
from tunelab.train.loop import accumulate_window


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Variable-length chat examples, some multi-turn."""
    rng = random.Random(seed)
    words = ["sky", "blue", "하늘", "grass", "green", "train", "lemon", "city", "바다", "music"]
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "Answer briefly."}] if i % 2 else []
        for _ in range(1 + i % 3):
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 12)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 9)))})
        out.append({"id": str(i), "messages": messages})
    return out


@pytest.fixture(scope="module")
def setup() -> tuple:
    tokenizer = make_tokenizer("chatml")
    examples, _ = sft.tokenize_conversations(conversations(16), tokenizer, "chat", max_length=512)
    model = make_tiny_llama(tokenizer, seed=0).eval()
    return tokenizer, examples, model


def test_loss_equals_model_own_loss(setup: tuple) -> None:
    tokenizer, examples, model = setup
    batch = textdata.collate(examples[:6], tokenizer.pad_token_id)
    with torch.no_grad():
        ours = sft.lm_loss_sum(model, batch) / textdata.count_targets(batch["labels"])
        reference = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert abs(float(ours) - float(reference)) < 1e-6


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_and_unpacked_per_example_losses_agree(setup: tuple, attention: str) -> None:
    tokenizer, examples, model = setup
    model = copy.deepcopy(model)
    model.config._attn_implementation = attention
    per_example = []
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor([example["labels"]])
            logits = model(input_ids=ids).logits
            per_example.append(float(F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)))
        rows = textdata.pack_examples(examples, max_length=400, seed=0)
        assert len(rows) < len(examples)  # several examples really share a row
        batch = textdata.collate(rows, tokenizer.pad_token_id)
        logits = model(**textdata.model_inputs(batch), use_cache=False).logits
        token_losses = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="none"
        ).view(len(rows), -1)
    packed = []
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for begin, end in zip(starts, starts[1:], strict=False):
            # token t's loss sits at t - 1 after the shift; an example's targets are its tokens 1 .. end-1
            targets = (batch["labels"][r, begin + 1 : end] != -100).sum()
            packed.append((row["input_ids"][begin:end], float(token_losses[r, begin : end - 1].sum() / targets)))
    by_ids = {tuple(e["input_ids"]): loss for e, loss in zip(examples, per_example, strict=True)}
    assert len(packed) == len(examples)
    for ids, loss in packed:  # the mean loss of each example over its own targets
        assert loss == pytest.approx(by_ids[tuple(ids)], abs=1e-5)


def _grads_after_window(model: torch.nn.Module, tokenizer, examples: list[dict], micro: int) -> dict:
    config = RunConfig.model_validate({"method": {"kind": "full"}, "train": {"batch_size": micro}})
    model = copy.deepcopy(model).train()
    job = sft.make_job(config, model, tokenizer, examples, [], torch.device("cpu"))
    accelerator = Accelerator(cpu=True)
    batches = [job.collate(examples[i : i + micro]) for i in range(0, len(examples), micro)]
    accumulate_window(job, model, batches, accelerator)
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradient_accumulation_normalises_by_window_tokens(setup: tuple) -> None:
    tokenizer, examples, model = setup
    window = examples[:8]
    lengths = [textdata.count_targets(torch.tensor([e["labels"]])) for e in window]
    assert len(set(lengths)) > 3  # variable length, so a per-micro-batch mean would differ
    one_batch = _grads_after_window(model, tokenizer, window, micro=8)
    four_micro = _grads_after_window(model, tokenizer, window, micro=2)
    for name, grad in one_batch.items():
        assert torch.allclose(grad, four_micro[name], atol=1e-6, rtol=0), name
    # and the window gradient is the gradient of the mean loss over all the window's targets
    reference = copy.deepcopy(model).train()
    batch = textdata.collate(window, tokenizer.pad_token_id)
    reference(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss.backward()
    for name, parameter in reference.named_parameters():
        assert torch.allclose(parameter.grad, one_batch[name], atol=1e-6, rtol=0), name
