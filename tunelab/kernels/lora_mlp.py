"""A Llama-family gated MLP whose three projections carry LoRA adapters, as one autograd function.

    y = down(silu(gate(x)) * up(x)),   each projection p(x) = x W_p^T + s_p (x A_p^T) B_p^T

Computed per projection (peft, or kernels/lora_projection.py) every low-rank term is at least one extra pass over
that projection's output, in forward, in the checkpoint recompute and in backward; for gate and up (tokens x I,
the largest activations of the layer) and for the down projection's input gradient (tokens x I again) those
passes were most of the `addmm_` time in the H100 profile (BENCHMARKS.md). Here:

- gate and up: the base GEMMs write G and U; the low-rank products x [A_g; A_u]^T come from one thin GEMM over x;
  the SwiGLU kernel adds Tg Bg^T and Tu Bu^T tile by tile while it reads G and U anyway;
- down: y starts as the thin product s (h A_d^T) B_d^T and the base GEMM accumulates into it (cuBLAS reads y in
  its epilogue: no separate pass); in backward the down projection's low-rank input gradient is added inside the
  SwiGLU backward kernel, which writes dG and dU over G and U;
- the input gradient is one buffer: the thin term first, then both base GEMMs accumulate into it (peft: three
  gradients summed by autograd).

It saves what the per-projection path saves (x, G, U, h and the rank-r products), dequantizes 4-bit weights where
it needs them (never stored), and returns fp32 gradients for fp32 adapters. The elementwise pieces run as Triton
kernels on CUDA (kernels/lora_swiglu_triton.py) and as their PyTorch twins below elsewhere; `lora_mlp_reference`
is the whole formula in plain PyTorch. tests/kernels/test_lora_mlp.py (CPU) and tests/gpu compare them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.kernels.adapter_cache import half_concat, half_copy
from tunelab.kernels.lora_projection import (
    _compute_dtype,
    _eligible,
    backward_weight,
    forward_weight,
    lora_projection_reference,
)

_OUTPUT_UNUSED = [0]


@contextlib.contextmanager
def output_unused() -> Iterator[None]:
    """Inside: LoraMLP computes only what its backward cannot (the gate and up GEMMs) and not its output (an
    uninitialised tensor of the right shape is returned). For a checkpoint recompute whose output nobody reads
    (kernels/graphed_layers.py): the down projection, ~27% of a Llama layer's GEMM work, is skipped, and so is
    the SwiGLU forward: backward's SwiGLU kernel writes h while it reads the same gate and up tiles, into the
    buffer of the gradient it has just consumed (one tokens x intermediate activation less in the layer's
    backward, and one pass over gate and up less)."""
    _OUTPUT_UNUSED[0] += 1
    try:
        yield
    finally:
        _OUTPUT_UNUSED[0] -= 1


def lora_mlp_reference(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    adapters: tuple[tuple[torch.Tensor, torch.Tensor], ...],
    scalings: tuple[float, float, float],
) -> torch.Tensor:
    """peft's formula: each projection base + scaled low-rank, then down(silu(gate) * up)."""
    (w_gate, w_up, w_down), ((a_g, b_g), (a_u, b_u), (a_d, b_d)) = weights, adapters
    gate = lora_projection_reference(x, w_gate, a_g, b_g, scalings[0])
    up = lora_projection_reference(x, w_up, a_u, b_u, scalings[1])
    return lora_projection_reference(F.silu(gate) * up, w_down, a_d, b_d, scalings[2])


@torch.autocast("cpu", enabled=False)
@torch.autocast("cuda", enabled=False)
def swiglu_lowrank_forward_torch(
    gate: torch.Tensor,
    up: torch.Tensor,
    t_gate: torch.Tensor,
    t_up: torch.Tensor,
    b_gate: torch.Tensor,
    b_up: torch.Tensor,
) -> torch.Tensor:
    """The Triton forward kernel's twin: silu(gate + t_gate b_gate^T) * (up + t_up b_up^T), computed in fp32 as
    g * sigmoid(g) * u (the kernel's order, and the backward twin's when it recomputes h: the same values)."""
    g = gate.float() + t_gate.float() @ b_gate.float().t()
    u = up.float() + t_up.float() @ b_up.float().t()
    return (g * torch.sigmoid(g) * u).to(gate.dtype)


@torch.autocast("cpu", enabled=False)
@torch.autocast("cuda", enabled=False)
def swiglu_lowrank_backward_torch(
    grad_h: torch.Tensor,
    u_down: torch.Tensor,
    a_down: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    t_gate: torch.Tensor,
    t_up: torch.Tensor,
    b_gate: torch.Tensor,
    b_up: torch.Tensor,
    store_h: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The Triton backward kernel's twin: for dH = grad_h + u_down a_down, dG = dH u silu'(g) and dU = dH silu(g),
    written over gate and up (returned), computed in fp32; with `store_h`, also h = silu(g) u (the forward's
    output) written over grad_h and returned third."""
    dh = grad_h.float() + u_down.float() @ a_down.float()
    g = gate.float() + t_gate.float() @ b_gate.float().t()
    u = up.float() + t_up.float() @ b_up.float().t()
    sig = torch.sigmoid(g)
    silu = g * sig
    gate.copy_(dh * u * (sig + silu * (1 - sig)))
    up.copy_(dh * silu)
    if store_h:
        grad_h.copy_(silu * u)
        return gate, up, grad_h
    return gate, up


def _pieces(tensor: torch.Tensor) -> tuple[Any, Any]:
    """The elementwise kernels for this tensor's device: Triton on CUDA (when importable), PyTorch otherwise."""
    if tensor.is_cuda:
        try:
            from tunelab.kernels import lora_swiglu_triton as triton_kernels
        except ImportError:
            pass
        else:
            return triton_kernels.swiglu_lowrank_forward, triton_kernels.swiglu_lowrank_backward
    return swiglu_lowrank_forward_torch, swiglu_lowrank_backward_torch


class LoraMLP(torch.autograd.Function):
    """y = down(silu(gate(x)) * up(x)) for three frozen base layers with LoRA adapters (A, B per projection),
    computed in x's dtype; gradients for x and the six adapter matrices (in their own dtypes)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bases: tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module],
        scalings: tuple[float, float, float],
        a_gate: torch.Tensor,
        b_gate: torch.Tensor,
        a_up: torch.Tensor,
        b_up: torch.Tensor,
        a_down: torch.Tensor,
        b_down: torch.Tensor,
    ) -> torch.Tensor:
        dtype = x.dtype
        forward_piece, _ = _pieces(x)
        s_gate, s_up, s_down = scalings
        flat = x.reshape(-1, x.shape[-1])
        # half copies made once per optimizer step (kernels/adapter_cache.py); B with the scaling folded in, so
        # no pass scales a full activation; [A_gate; A_up] so one thin GEMM reads x once for both projections
        bg, _ = half_copy(b_gate, dtype, s_gate)
        bu, _ = half_copy(b_up, dtype, s_up)
        bd, bd_t = half_copy(b_down, dtype, s_down)
        a_gu, a_gu_t = half_concat((a_gate, a_up), dtype)
        ad, ad_t = half_copy(a_down, dtype)
        rank_gate = a_gate.shape[0]
        t_gu = flat @ a_gu_t
        t_gate, t_up = t_gu[:, :rank_gate], t_gu[:, rank_gate:]
        gate = flat @ forward_weight(ctx, bases[0], dtype).t()
        up = flat @ forward_weight(ctx, bases[1], dtype).t()
        if _OUTPUT_UNUSED[0]:
            # a recompute whose output nobody reads: backward recomputes h inside its SwiGLU kernel (written over
            # the down projection's input gradient, which that kernel has just read), so neither h nor y is made
            h = t_down = None
            out = gate.new_empty(gate.shape[0], bd_t.shape[1])
        else:
            h = forward_piece(gate, up, t_gate, t_up, bg, bu)
            t_down = h @ ad_t
            out = t_down @ bd_t  # the thin term first; the base GEMM accumulates into it in its epilogue
            out.addmm_(h, forward_weight(ctx, bases[2], dtype).t())
        ctx.save_for_backward(x, gate, up, t_gu, h, t_down, a_gu, ad, bg, bu, bd)
        ctx.bases, ctx.scalings, ctx.rank_gate = bases, scalings, rank_gate
        ctx.adapter_dtypes = [t.dtype for t in (a_gate, b_gate, a_up, b_up, a_down, b_down)]
        ctx.used = False
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:  # the saved G and U were overwritten by the first backward
            raise RuntimeError("LoraMLP cannot run backward twice (retain_graph); turn train.fast_kernels off")
        ctx.used = True
        x, gate, up, t_gu, h, t_down, a_gu, ad, bg, bu, bd = ctx.saved_tensors
        _, backward_piece = _pieces(x)
        dtypes = ctx.adapter_dtypes
        s_gate, s_up, s_down = ctx.scalings
        rank = ctx.rank_gate
        t_gate, t_up = t_gu[:, :rank], t_gu[:, rank:]
        dtype = gate.dtype
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        flat = x.reshape(-1, x.shape[-1])

        # down projection: y = h W_d^T + t_down bd^T with t_down = h A_d^T
        u_down = grad @ bd  # tokens x r: dL/d(t_down), the scaling inside bd
        grad_h = grad @ backward_weight(ctx, ctx.bases[2], dtype)
        # SwiGLU, with dL/dh's low-rank term u_down A_d added inside: dG, dU written over G, U (and, after a
        # recompute that skipped it, h over grad_h)
        if h is None:
            d_gate, d_up, h = backward_piece(grad_h, u_down, ad, gate, up, t_gate, t_up, bg, bu, store_h=True)
            t_down = h @ ad.t()
        else:
            d_gate, d_up = backward_piece(grad_h, u_down, ad, gate, up, t_gate, t_up, bg, bu)
        del grad_h
        grad_b_down = (grad.t() @ t_down).mul_(s_down).to(dtypes[5])
        grad_a_down = (u_down.t() @ h).to(dtypes[4])
        del h, t_down
        # gate and up: dL/d(t_gate) = dG bg, dL/d(t_up) = dU bu (scalings inside bg, bu)
        v_gu = torch.cat([d_gate @ bg, d_up @ bu], dim=1)
        grad_b_gate = (d_gate.t() @ t_gate).mul_(s_gate).to(dtypes[1])
        grad_b_up = (d_up.t() @ t_up).mul_(s_up).to(dtypes[3])
        grad_a_gu = v_gu.t() @ flat
        grad_a_gate, grad_a_up = grad_a_gu[:rank].to(dtypes[0]), grad_a_gu[rank:].to(dtypes[2])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = v_gu @ a_gu  # the thin term first; both base GEMMs accumulate into it
            grad_x.addmm_(d_gate, backward_weight(ctx, ctx.bases[0], dtype))
            grad_x.addmm_(d_up, backward_weight(ctx, ctx.bases[1], dtype))
            grad_x = grad_x.view(x.shape)
        return grad_x, None, None, grad_a_gate, grad_b_gate, grad_a_up, grad_b_up, grad_a_down, grad_b_down


def fused_lora_mlp(module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """LoraMLP for a gated MLP module (gate_proj / up_proj / down_proj) when all three are peft LoRA layers that
    LoraProjection could serve exactly, with no bias, in one compute dtype; None otherwise (the caller keeps the
    per-projection path)."""
    projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    names = []
    for layer in projections:
        if not hasattr(layer, "lora_A") or not hasattr(layer, "get_base_layer"):
            return None
        name = _eligible(layer, hidden, (), {})
        if name is None or layer.get_base_layer().bias is not None:
            return None
        names.append(name)
    dtypes = set()
    adapters: list[torch.Tensor] = []
    for layer, name in zip(projections, names, strict=True):
        base = layer.get_base_layer()
        quant_state = getattr(base.weight, "quant_state", None)
        lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
        weight_dtype = quant_state.dtype if quant_state is not None else base.weight.dtype
        dtypes.add(_compute_dtype(hidden, weight_dtype, lora_a.dtype))
        adapters += [lora_a, lora_b]
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    if dtype is None:
        return None
    bases = tuple(layer.get_base_layer() for layer in projections)
    scalings = tuple(float(layer.scaling[name]) for layer, name in zip(projections, names, strict=True))
    return LoraMLP.apply(hidden.to(dtype), bases, scalings, *adapters)
