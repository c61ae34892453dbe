"""Dequantized 4-bit weights kept from a recompute's forward for its backward (lora_projection.dense_kept_for_backward,
entered by the layer graphs' recompute): LoraProjection, LoraQKV and LoraMLP dequantize each weight once instead of
twice there, with the same outputs and gradients bit for bit; a kept weight is handed to backward and freed by it
(nothing stays on the autograd context); outside the context, and with the switch off, every call dequantizes.

The 4-bit layer is a stand-in whose "dequantization" returns a stored dense weight and counts the calls, so the
bookkeeping is tested on the CPU; the real NF4 kernels are checked in tests/kernels/test_nf4_dequantize.py and on
the GPU (tests/gpu/test_graphed_layers_gpu.py: graphed QLoRA equals the eager fast path)."""

from __future__ import annotations

import types
import weakref

import pytest
import torch

from tunelab.kernels import lora_projection
from tunelab.kernels.lora_mlp import LoraMLP, output_unused
from tunelab.kernels.lora_projection import LoraProjection, dense_kept_for_backward
from tunelab.kernels.lora_qkv import LoraQKV


class _FourBit(torch.nn.Module):
    """A frozen layer whose weight carries a quant_state, as bitsandbytes' Params4bit does."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(out_features * in_features // 2, 1), requires_grad=False)
        self.weight.quant_state = types.SimpleNamespace(dense=torch.randn(out_features, in_features) / 8)


@pytest.fixture()
def dequantized(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref]:
    made: list[weakref.ref] = []

    def fake_dequantize(packed: torch.Tensor, quant_state: types.SimpleNamespace) -> torch.Tensor:
        dense = quant_state.dense.clone()
        made.append(weakref.ref(dense))
        return dense

    monkeypatch.setattr(lora_projection, "dequantize_nf4", fake_dequantize)
    return made


def _adapters(shapes: list[tuple[int, int]], rank: int = 4) -> list[torch.Tensor]:
    adapters = []
    for out_features, in_features in shapes:
        adapters += [
            (torch.randn(rank, in_features) / 4).requires_grad_(),
            (torch.randn(out_features, rank) / 4).requires_grad_(),
        ]
    return adapters


def _run(function: str, keep: bool, made: list[weakref.ref]) -> tuple[list[torch.Tensor], int, list[weakref.ref]]:
    """Forward and backward of one fused function on fixed inputs: its results, how many dequantizations, and
    those of their results still alive after backward (while the outputs and their graph are)."""
    torch.manual_seed(0)
    hidden, inter, kv = 16, 24, 8
    x = torch.randn(2, 5, hidden, requires_grad=True)
    if function == "projection":
        bases = (_FourBit(hidden, hidden),)
        adapters = _adapters([(hidden, hidden)])
        call = lambda: (LoraProjection.apply(x, bases[0], *adapters, 2.0, None),)  # noqa: E731
    elif function == "qkv":
        bases = (_FourBit(hidden, hidden), _FourBit(kv, hidden), _FourBit(kv, hidden))
        adapters = _adapters([(hidden, hidden), (kv, hidden), (kv, hidden)])
        call = lambda: LoraQKV.apply(x, bases, (2.0, 2.0, 2.0), *adapters)  # noqa: E731
    else:
        bases = (_FourBit(inter, hidden), _FourBit(inter, hidden), _FourBit(hidden, inter))
        adapters = _adapters([(inter, hidden), (inter, hidden), (hidden, inter)])
        call = lambda: (LoraMLP.apply(x, bases, (2.0, 2.0, 2.0), *adapters),)  # noqa: E731
    grads_out = [torch.randn(2, 5, base.weight.quant_state.dense.shape[0]) for base in bases]
    if function == "mlp":
        grads_out = grads_out[2:]
    made_before = len(made)
    if keep:
        with output_unused(), dense_kept_for_backward():
            outputs = call()
    else:
        outputs = call()
    # a recompute's output is not read (LoraMLP's is uninitialised there): backward gets the same gradients
    torch.autograd.backward(list(outputs), grads_out)
    results = [x.grad.clone()] + [a.grad.clone() for a in adapters]
    if not (keep and function == "mlp"):
        results += [out.detach().clone() for out in outputs]
    refs = made[made_before:]
    alive = [ref for ref in refs if ref() is not None]  # checked while the autograd graph (and its contexts) lives
    return results, len(refs), alive


@pytest.mark.parametrize(("function", "plain", "kept"), [("projection", 2, 1), ("qkv", 6, 3), ("mlp", 6, 3)])
def test_each_weight_dequantized_once_same_results(
    dequantized: list[weakref.ref], function: str, plain: int, kept: int
) -> None:
    expected, plain_count, _ = _run(function, False, dequantized)
    results, kept_count, alive = _run(function, True, dequantized)
    assert plain_count == plain and kept_count == kept  # the MLP's down projection: recompute skips it
    # the gradients (and, where the recompute makes it, the output) equal the plain call's
    assert all(torch.equal(a, b) for a, b in zip(results, expected[: len(results)], strict=True))
    assert not alive  # each kept weight was handed to backward and freed there, not left on the context


def test_switch_off_dequantizes_every_time(dequantized: list[weakref.ref], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(lora_projection.KEEP_DENSE_ENABLED, "on", False)
    _, count, _ = _run("qkv", True, dequantized)
    assert count == 6


def test_dense_weights_are_never_kept(dequantized: list[weakref.ref]) -> None:
    """A bf16 / fp32 base weight is used as it is: nothing to keep, nothing copied."""
    base = torch.nn.Linear(16, 16, bias=False).requires_grad_(False)
    a, b = _adapters([(16, 16)])
    x = torch.randn(3, 16, requires_grad=True)
    with dense_kept_for_backward():
        out = LoraProjection.apply(x, base, a, b, 2.0, None)
    out.sum().backward()
    assert not dequantized
    assert out.grad_fn is not None and not getattr(out.grad_fn, "kept_weights", {})


@pytest.mark.parametrize(("setting", "freed", "kept"), [("auto", 1 << 30, True), ("auto", 0, False), (True, 0, True),
                                                         (False, 1 << 30, False)])  # fmt: skip
def test_keep_dequantized_setting(setting: object, freed: int, kept: bool) -> None:
    """train.keep_dequantized auto: on when the input embedding's move to CPU memory freed GPU memory."""
    from tunelab.config import load_config
    from tunelab.kernels.fast_path import apply_keep_dequantized
    from tunelab.kernels.graphed_layers import LayerRecorder

    config = load_config({"method": {"kind": "qlora"}, "data": {"train": "x.jsonl"},
                          "train": {"keep_dequantized": setting}})  # fmt: skip
    model = torch.nn.Module()
    model._tunelab_layer_recorder = LayerRecorder()
    assert apply_keep_dequantized(model, config, freed) is kept
    assert model._tunelab_layer_recorder.keep_dense is kept
    assert apply_keep_dequantized(torch.nn.Module(), config, freed) is False  # no layer graphs: nothing to keep
