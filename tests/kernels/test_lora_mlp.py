"""LoraMLP (kernels/lora_mlp.py) on the CPU: the whole function (with the PyTorch twins of its kernels) equals the
plain formula and peft's own MLP in fp32 (relative error < 1e-5) for outputs and every gradient; under bf16
autocast it stays within 1e-2 of fp32; MLPs it cannot serve exactly are left to the per-projection path. The
Triton kernels themselves are checked against their twins by Triton's interpreter on the CPU (when Triton is
installed) and on the GPU in tests/gpu/test_fast_kernels_gpu.py."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from fixtures import make_tiny_llama, make_tokenizer
from peft import LoraConfig, get_peft_model

from tunelab.kernels import lora_mlp
from tunelab.kernels.lora_mlp import LoraMLP, fused_lora_mlp, lora_mlp_reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


class _Base(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


def _operands(hidden: int = 24, inner: int = 40, ranks: tuple[int, int, int] = (4, 8, 6)):  # noqa: ANN202
    torch.manual_seed(0)
    weights = (torch.randn(inner, hidden) / 5, torch.randn(inner, hidden) / 5, torch.randn(hidden, inner) / 6)
    adapters = []
    shapes = [(inner, hidden), (inner, hidden), (hidden, inner)]
    for (out_features, in_features), rank in zip(shapes, ranks, strict=True):
        a = (torch.randn(rank, in_features) / in_features**0.5).requires_grad_()
        b = (torch.randn(out_features, rank) / 3).requires_grad_()
        adapters.append((a, b))
    x = torch.randn(3, 11, hidden, requires_grad=True)
    return x, weights, adapters


def test_function_equals_reference_fp32() -> None:
    x, weights, adapters = _operands()
    scalings = (2.0, 0.5, 1.5)
    grad_out = torch.randn(3, 11, 24)
    leaves = [x] + [t for pair in adapters for t in pair]

    out = LoraMLP.apply(x, tuple(_Base(w) for w in weights), scalings, *leaves[1:])
    out.backward(grad_out)
    fast = [out.detach()] + [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    reference = lora_mlp_reference(x, weights, tuple(adapters), scalings)
    reference.backward(grad_out)
    want = [reference.detach()] + [t.grad for t in leaves]
    for index, (got, expected) in enumerate(zip(fast, want, strict=True)):
        assert got.shape == expected.shape, index
        assert rel_err(got, expected) < 1e-5, (index, rel_err(got, expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_without_output_gives_the_same_gradients(dtype: torch.dtype) -> None:
    """Under output_unused (the layer graphs' recompute) the forward skips the SwiGLU forward and the down
    projection; backward recomputes h in its SwiGLU piece. The gradients equal those after a full forward."""
    x, weights, adapters = _operands()
    x = x.detach().to(dtype).requires_grad_()
    bases = tuple(_Base(w.to(dtype)) for w in weights)
    scalings = (2.0, 0.5, 1.5)
    grad_out = torch.randn(3, 11, 24).to(dtype)
    leaves = [x] + [t for pair in adapters for t in pair]
    results = []
    for unused in (False, True):
        with lora_mlp.output_unused() if unused else contextlib.nullcontext():
            out = LoraMLP.apply(x, bases, scalings, *leaves[1:])
        assert out.shape == (3, 11, 24)
        out.backward(grad_out)
        results.append([t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the thin products' GEMMs may round differently
    for index, (full, skipped) in enumerate(zip(*results, strict=True)):
        assert rel_err(skipped, full) < tolerance, (index, rel_err(skipped, full))


def test_backward_twice_is_a_clear_error() -> None:
    x, weights, adapters = _operands()
    out = LoraMLP.apply(x, tuple(_Base(w) for w in weights), (1.0, 1.0, 1.0), *[t for p in adapters for t in p])
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        out.sum().backward()


def peft_llama(tokenizer, target="all-linear", bias=False):  # noqa: ANN001, ANN201
    base = make_tiny_llama(tokenizer, seed=0)
    if bias:
        for layer in base.model.layers:
            layer.mlp.up_proj.bias = torch.nn.Parameter(torch.randn(layer.mlp.up_proj.out_features) / 10)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target))
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():  # non-zero B, so the low-rank path counts
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return model.train()


def _install(model: torch.nn.Module) -> list[int]:
    """Every MLP forward through fused_lora_mlp (as fast_blocks does on CUDA); returns a call counter."""
    calls = []
    for layer in model.get_base_model().model.layers:
        mlp = layer.mlp

        def forward(self, hidden, original=type(mlp).forward):  # noqa: ANN001, ANN202
            fused = fused_lora_mlp(self, hidden)
            if fused is None:
                return original(self, hidden)
            calls.append(1)
            return fused

        mlp.forward = types.MethodType(forward, mlp)
    return calls


def _loss_and_grads(model, ids, autocast=False):  # noqa: ANN001, ANN202
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_installed_model_equals_peft() -> None:
    tokenizer = make_tokenizer("llama3")
    plain = peft_llama(tokenizer)
    fast = copy.deepcopy(plain)
    calls = _install(fast)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    want_loss, want = _loss_and_grads(plain, ids)
    got_loss, got = _loss_and_grads(fast, ids)
    assert len(calls) == 2  # both layers' MLPs took the fused function
    assert rel_err(got_loss, want_loss) < 1e-5
    assert want.keys() == got.keys()
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name
    # bf16 autocast: within bf16 rounding of the fp32 truth
    got_loss, got = _loss_and_grads(fast, ids, autocast=True)
    assert len(calls) == 4
    assert rel_err(got_loss, want_loss) < 1e-2
    errors = [rel_err(got[name], want[name]) for name in want]
    assert sum(errors) / len(errors) < 1e-2 and max(errors) < 3e-2


@pytest.mark.parametrize("case", ["attention only", "bias", "dropout"])
def test_mlps_it_cannot_serve_are_left_alone(case: str) -> None:
    tokenizer = make_tokenizer("llama3")
    if case == "attention only":
        model = peft_llama(tokenizer, target=["q_proj", "v_proj"])
    elif case == "bias":
        model = peft_llama(tokenizer, bias=True)
    else:
        model = peft_llama(tokenizer)
        model.get_base_model().model.layers[0].mlp.down_proj.lora_dropout["default"] = torch.nn.Dropout(0.1)
    mlp = model.get_base_model().model.layers[0].mlp
    assert fused_lora_mlp(mlp, torch.randn(2, 3, 64)) is None


def _interpreter_script() -> str:
    return textwrap.dedent(
        """
        import torch
        from tunelab.kernels import lora_mlp, lora_swiglu_triton as kernels

        def rel(a, b):
            return float((a.double() - b.double()).norm() / b.double().norm())

        g = torch.Generator().manual_seed(0)
        for rows, cols, ranks in [(100, 200, (8, 12, 4)), (64, 64, (16, 16, 16))]:
            gate = torch.randn(rows, cols, generator=g)
            up = torch.randn(rows, cols, generator=g)
            t = torch.randn(rows, ranks[0] + ranks[1], generator=g)
            t_gate, t_up = t[:, : ranks[0]], t[:, ranks[0] :]
            b_gate = torch.randn(cols, ranks[0], generator=g) / 3
            b_up = torch.randn(cols, ranks[1], generator=g) / 3
            got = kernels.swiglu_lowrank_forward(gate, up, t_gate, t_up, b_gate, b_up)
            want = lora_mlp.swiglu_lowrank_forward_torch(gate, up, t_gate, t_up, b_gate, b_up)
            assert rel(got, want) < 1e-5, ("forward", rel(got, want))
            grad_h = torch.randn(rows, cols, generator=g)
            u_down = torch.randn(rows, ranks[2], generator=g)
            a_down = torch.randn(ranks[2], cols, generator=g) / 3
            mine = kernels.swiglu_lowrank_backward(grad_h, u_down, a_down, gate.clone(), up.clone(), t_gate, t_up,
                                                   b_gate, b_up)
            theirs = lora_mlp.swiglu_lowrank_backward_torch(grad_h, u_down, a_down, gate.clone(), up.clone(),
                                                            t_gate, t_up, b_gate, b_up)
            for a, b in zip(mine, theirs):
                assert rel(a, b) < 1e-5, ("backward", rel(a, b))
            # store_h: the forward's h written over grad_h, the same values the forward kernel computes
            mine = kernels.swiglu_lowrank_backward(grad_h.clone(), u_down, a_down, gate.clone(), up.clone(), t_gate,
                                                   t_up, b_gate, b_up, store_h=True)
            theirs = lora_mlp.swiglu_lowrank_backward_torch(grad_h.clone(), u_down, a_down, gate.clone(), up.clone(),
                                                            t_gate, t_up, b_gate, b_up, store_h=True)
            for a, b in zip(mine, theirs):
                assert rel(a, b) < 1e-5, ("backward with h", rel(a, b))
            assert torch.equal(mine[2], got), "h from the backward kernel differs from the forward kernel's"
        print("interpreter ok")
        """
    )


def test_triton_kernels_equal_their_twins_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _interpreter_script()], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "interpreter ok" in result.stdout


def test_pieces_are_the_torch_twins_on_cpu() -> None:
    forward, backward = lora_mlp._pieces(torch.zeros(1))
    assert forward is lora_mlp.swiglu_lowrank_forward_torch
    assert backward is lora_mlp.swiglu_lowrank_backward_torch
