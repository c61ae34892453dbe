"""LoraProjection (kernels/lora_projection.py) against its plain twin and against peft itself, on the CPU: the
same outputs and gradients in fp32 (relative error < 1e-5) and under bf16 autocast (< 1e-2); B = 0 gives the base
output; layers it cannot serve exactly (dropout, DoRA, merged, disabled) keep peft's forward."""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures import make_tiny_llama, make_tokenizer
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear

from tunelab.kernels.lora_projection import (
    LoraProjection,
    _eligible,
    install_lora_projections,
    lora_projection_reference,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


class _Base(torch.nn.Module):
    """A stand-in for the frozen base layer: LoraProjection only reads `.weight`."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


@pytest.mark.parametrize("with_bias", [False, True])
def test_function_equals_reference_fp32(with_bias: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 17, 48, requires_grad=True)
    weight = torch.randn(40, 48) / 7
    a = (torch.randn(8, 48) / 7).requires_grad_()
    b = (torch.randn(40, 8) / 3).requires_grad_()
    bias = torch.randn(40) if with_bias else None
    grad_out = torch.randn(3, 17, 40)

    out = LoraProjection.apply(x, _Base(weight), a, b, 2.0, bias)
    out.backward(grad_out)
    fast = [out.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone()]
    for t in (x, a, b):
        t.grad = None
    ref = lora_projection_reference(x, weight, a, b, 2.0, bias)
    ref.backward(grad_out)
    for got, want in zip(fast, [ref.detach(), x.grad, a.grad, b.grad], strict=True):
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-5


def peft_llama(tokenizer, dropout: float = 0.0, use_dora: bool = False) -> torch.nn.Module:  # noqa: ANN001
    base = make_tiny_llama(tokenizer, seed=0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", use_dora=use_dora)
    model = get_peft_model(base, config)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():  # non-zero B, so the low-rank path counts
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return model.train()


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, autocast: bool = False) -> tuple[torch.Tensor, dict]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_installed_model_equals_peft_fp32() -> None:
    tokenizer = make_tokenizer("llama3")
    plain = peft_llama(tokenizer)
    fast = copy.deepcopy(plain)
    layers = install_lora_projections(fast)
    assert layers == sum(isinstance(m, LoraLinear) for m in fast.modules()) > 0
    calls = []
    original_apply = LoraProjection.apply

    def counting_apply(*args):  # noqa: ANN002, ANN202
        calls.append(1)
        return original_apply(*args)

    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    want_loss, want = loss_and_grads(plain, ids)
    LoraProjection.apply = counting_apply
    try:
        got_loss, got = loss_and_grads(fast, ids)
    finally:
        LoraProjection.apply = original_apply
    assert len(calls) == layers  # every projection took the fused path
    assert rel_err(got_loss, want_loss) < 1e-5
    assert want.keys() == got.keys()
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name


def test_installed_model_under_bf16_autocast_matches_fp32() -> None:
    """bf16: the fused path's loss and adapter gradients against the fp32 computation of the same model are within
    1e-2, and no further off than peft's own bf16 path (both round the same products to bf16)."""
    tokenizer = make_tokenizer("llama3")
    plain = peft_llama(tokenizer)
    fast = copy.deepcopy(plain)
    install_lora_projections(fast)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    true_loss, truth = loss_and_grads(plain, ids)
    peft_loss, peft = loss_and_grads(plain, ids, autocast=True)
    got_loss, got = loss_and_grads(fast, ids, autocast=True)
    assert rel_err(got_loss, true_loss) < 1e-2
    fast_errors = torch.tensor([rel_err(got[name], truth[name]) for name in truth])
    peft_errors = torch.tensor([rel_err(peft[name], truth[name]) for name in truth])
    assert float(fast_errors.max()) < 1e-2 * 3, float(fast_errors.max())  # single tensors: a few bf16 roundings
    assert float(fast_errors.mean()) < 1e-2
    assert float(fast_errors.mean()) <= 1.2 * float(peft_errors.mean()), (fast_errors.mean(), peft_errors.mean())


def test_zero_b_gives_the_base_output() -> None:
    tokenizer = make_tokenizer("llama3")
    model = peft_llama(tokenizer)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.zeros_(parameter)
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(2))
    install_lora_projections(model)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert torch.equal(logits, base)


def test_layers_it_cannot_serve_keep_peft() -> None:
    tokenizer = make_tokenizer("llama3")
    x = torch.randn(2, 5, 64)
    dropout = peft_llama(tokenizer, dropout=0.1)
    layer = next(m for m in dropout.modules() if isinstance(m, LoraLinear))
    assert _eligible(layer, x, (), {}) is None  # dropout in training
    layer.eval()
    assert _eligible(layer, x, (), {}) == "default"  # dropout is the identity in eval
    dora = peft_llama(tokenizer, use_dora=True)
    layer = next(m for m in dora.modules() if isinstance(m, LoraLinear))
    assert _eligible(layer, x, (), {}) is None
    model = peft_llama(tokenizer)
    install_lora_projections(model)
    ids = torch.randint(0, len(tokenizer), (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
        assert _eligible(layer, x, (), {}) == "default"
        model.merge_adapter()
        assert _eligible(layer, x, (), {}) is None
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
    assert rel_err(merged, unmerged) < 1e-5
