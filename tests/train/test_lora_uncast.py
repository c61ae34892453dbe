"""LoRA layers take their input uncast during training under half-precision autocast (train/loop.py): the same
loss and the same adapter gradients as peft's cast to fp32 and back, through gradient checkpointing's recompute."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from fixtures import make_tiny_llama, make_tokenizer
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from test_numerics import conversations

from tunelab.config import RunConfig
from tunelab.models.adapters import lora_inputs_uncast
from tunelab.tasks import sft
from tunelab.train import loop


@pytest.fixture
def bf16_accelerator() -> Iterator[Accelerator]:
    """A CPU accelerator with bf16 autocast (its state is process-wide: reset before and after)."""
    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state(True)


def lora_model(tokenizer) -> torch.nn.Module:  # noqa: ANN001
    """Tiny Llama in bf16 with fp32 LoRA adapters (peft's default upcast) and non-reentrant checkpointing."""
    base = make_tiny_llama(tokenizer, seed=0).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():  # non-zero B: the low-rank path must carry gradient
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model.train()


def window_result(model, tokenizer, examples, accelerator) -> tuple[float, dict[str, torch.Tensor]]:  # noqa: ANN001
    config = RunConfig.model_validate({"method": {"kind": "lora"}, "train": {"batch_size": 4}})
    job = sft.make_job(config, model, tokenizer, examples, [], torch.device("cpu"))
    batches = [job.collate(examples[i : i + 4]) for i in range(0, len(examples), 4)]
    loss, _ = loop.accumulate_window(job, model, batches, accelerator)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return float(loss), grads


def test_uncast_lora_inputs_give_the_same_loss_and_gradients(bf16_accelerator: Accelerator) -> None:
    tokenizer = make_tokenizer("chatml")
    examples, _ = sft.tokenize_conversations(conversations(8), tokenizer, "chat", max_length=256)
    model = lora_model(tokenizer)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    seen: list[bool] = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append(module.cast_input_dtype_enabled))
    assert loop.half_autocast(bf16_accelerator)
    reference_model = copy.deepcopy(model)

    uncast_loss, uncast_grads = window_result(model, tokenizer, examples, bf16_accelerator)
    # forwards and checkpoint recomputes both ran uncast, and the layers are restored afterwards
    assert seen and not any(seen) and all(layer.cast_input_dtype_enabled for layer in layers)
    assert len(seen) > 2 * len(layers)  # two micro-batches, each forward plus its recompute

    original = loop.lora_inputs_uncast
    loop.lora_inputs_uncast = lambda model, active: lora_inputs_uncast(model, active=False)
    try:
        cast_loss, cast_grads = window_result(reference_model, tokenizer, examples, bf16_accelerator)
    finally:
        loop.lora_inputs_uncast = original
    assert uncast_loss == cast_loss
    assert uncast_grads.keys() == cast_grads.keys() and any(g.abs().sum() > 0 for g in uncast_grads.values())
    for name, grad in uncast_grads.items():  # bf16 -> fp32 -> bf16 is exact: the same numbers, bit for bit
        assert torch.equal(grad, cast_grads[name]), name


def test_no_uncast_without_half_autocast() -> None:
    AcceleratorState._reset_state(True)
    try:
        assert not loop.half_autocast(Accelerator(cpu=True))  # the CPU trains as before
    finally:
        AcceleratorState._reset_state(True)
