"""Triton kernels for kernels/lora_mlp.py: SwiGLU with the gate's and up's low-rank LoRA terms added inside.

Forward: h = silu(G + Tg Bg^T) * (U + Tu Bu^T), where G, U are the base projections (tokens x I, bf16), Tg, Tu the
rank-r products x A^T (tokens x r) and Bg, Bu the LoRA B matrices already scaled (I x r). The rank-r products are
computed per tile with `tl.dot` on data already in registers, so the low-rank terms cost no pass over the
activations (peft: three passes per projection; an `addmm_` after the GEMM: one).

Backward: with dH = dH_base + Ud Ad (the down projection's input gradient, its low-rank term added here the same
way), dG = dH * u * silu'(g) and dU = dH * silu(g), written over G and U (each tile is read before it is written).

Plain PyTorch twins: lora_mlp.swiglu_lowrank_forward_torch / swiglu_lowrank_backward_torch. Imported only where
Triton is (a CUDA device, or TRITON_INTERPRET=1 for the CPU tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS, BLOCK_COLS, WARPS = 64, 64, 4


@triton.jit
def _low_rank_tile(
    left, left_stride, right, right_stride_k, right_stride_n, rows, cols, n_rows, n_cols, rank,
    BLOCK_RANK: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """(left[rows, :rank] @ right[:rank, cols]) in fp32; right is addressed as (k, n) through two strides."""
    ks = tl.arange(0, BLOCK_RANK)
    left_tile = tl.load(
        left + rows[:, None] * left_stride + ks[None, :],
        mask=(rows[:, None] < n_rows) & (ks[None, :] < rank),
        other=0.0,
    )
    right_tile = tl.load(
        right + ks[:, None] * right_stride_k + cols[None, :] * right_stride_n,
        mask=(ks[:, None] < rank) & (cols[None, :] < n_cols),
        other=0.0,
    )
    if IEEE:
        return tl.dot(left_tile, right_tile, input_precision="ieee")
    return tl.dot(left_tile, right_tile)


@triton.jit
def _forward_kernel(
    gate, up, out, t_gate, t_up, b_gate, b_up,
    n_rows, n_cols, rank_gate, rank_up,
    stride_gate, stride_up, stride_out, stride_t_gate, stride_t_up,
    b_gate_stride_k, b_gate_stride_n, b_up_stride_k, b_up_stride_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_GATE: tl.constexpr, RANK_UP: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    g = tl.load(gate + rows[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up + rows[:, None] * stride_up + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g += _low_rank_tile(
        t_gate, stride_t_gate, b_gate, b_gate_stride_k, b_gate_stride_n, rows, cols, n_rows, n_cols, rank_gate,
        RANK_GATE, IEEE,
    )  # fmt: skip
    u += _low_rank_tile(
        t_up, stride_t_up, b_up, b_up_stride_k, b_up_stride_n, rows, cols, n_rows, n_cols, rank_up, RANK_UP, IEEE
    )
    h = g * tl.sigmoid(g) * u
    tl.store(out + rows[:, None] * stride_out + cols[None, :], h.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    grad_h, u_down, a_down, gate, up, t_gate, t_up, b_gate, b_up,
    n_rows, n_cols, rank_down, rank_gate, rank_up,
    stride_grad_h, stride_u_down, a_down_stride_k, a_down_stride_n,
    stride_gate, stride_up, stride_t_gate, stride_t_up,
    b_gate_stride_k, b_gate_stride_n, b_up_stride_k, b_up_stride_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_DOWN: tl.constexpr, RANK_GATE: tl.constexpr,
    RANK_UP: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    dh = tl.load(grad_h + rows[:, None] * stride_grad_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dh += _low_rank_tile(
        u_down, stride_u_down, a_down, a_down_stride_k, a_down_stride_n, rows, cols, n_rows, n_cols, rank_down,
        RANK_DOWN, IEEE,
    )  # fmt: skip
    gate_at = gate + rows[:, None] * stride_gate + cols[None, :]
    up_at = up + rows[:, None] * stride_up + cols[None, :]
    g = tl.load(gate_at, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_at, mask=mask, other=0.0).to(tl.float32)
    g += _low_rank_tile(
        t_gate, stride_t_gate, b_gate, b_gate_stride_k, b_gate_stride_n, rows, cols, n_rows, n_cols, rank_gate,
        RANK_GATE, IEEE,
    )  # fmt: skip
    u += _low_rank_tile(
        t_up, stride_t_up, b_up, b_up_stride_k, b_up_stride_n, rows, cols, n_rows, n_cols, rank_up, RANK_UP, IEEE
    )
    sig = tl.sigmoid(g)
    silu = g * sig
    d_gate = dh * u * (sig + silu * (1.0 - sig))
    d_up = dh * silu
    tl.store(gate_at, d_gate.to(gate.dtype.element_ty), mask=mask)
    tl.store(up_at, d_up.to(up.dtype.element_ty), mask=mask)


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot needs every dimension >= 16


def _grid(rows: int, cols: int) -> tuple[int, int]:
    return (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(cols, BLOCK_COLS))


def swiglu_lowrank_forward(
    gate: torch.Tensor,
    up: torch.Tensor,
    t_gate: torch.Tensor,
    t_up: torch.Tensor,
    b_gate: torch.Tensor,
    b_up: torch.Tensor,
) -> torch.Tensor:
    """silu(gate + t_gate b_gate^T) * (up + t_up b_up^T), 2-D operands (rows with unit column stride)."""
    rows, cols = gate.shape
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    ieee = gate.dtype == torch.float32
    _forward_kernel[_grid(rows, cols)](
        gate, up, out, t_gate, t_up, b_gate, b_up,
        rows, cols, t_gate.shape[1], t_up.shape[1],
        gate.stride(0), up.stride(0), out.stride(0), t_gate.stride(0), t_up.stride(0),
        b_gate.stride(1), b_gate.stride(0), b_up.stride(1), b_up.stride(0),
        BLOCK_M=BLOCK_ROWS, BLOCK_N=BLOCK_COLS, RANK_GATE=_rank_block(t_gate.shape[1]),
        RANK_UP=_rank_block(t_up.shape[1]), IEEE=ieee, num_warps=WARPS,
    )  # fmt: skip
    return out


def swiglu_lowrank_backward(
    grad_h: torch.Tensor,
    u_down: torch.Tensor,
    a_down: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    t_gate: torch.Tensor,
    t_up: torch.Tensor,
    b_gate: torch.Tensor,
    b_up: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of swiglu_lowrank_forward for the upstream gradient grad_h + u_down a_down, written over
    gate and up (returned)."""
    rows, cols = gate.shape
    ieee = gate.dtype == torch.float32
    _backward_kernel[_grid(rows, cols)](
        grad_h, u_down, a_down, gate, up, t_gate, t_up, b_gate, b_up,
        rows, cols, u_down.shape[1], t_gate.shape[1], t_up.shape[1],
        grad_h.stride(0), u_down.stride(0), a_down.stride(0), a_down.stride(1),
        gate.stride(0), up.stride(0), t_gate.stride(0), t_up.stride(0),
        b_gate.stride(1), b_gate.stride(0), b_up.stride(1), b_up.stride(0),
        BLOCK_M=BLOCK_ROWS, BLOCK_N=BLOCK_COLS, RANK_DOWN=_rank_block(u_down.shape[1]),
        RANK_GATE=_rank_block(t_gate.shape[1]), RANK_UP=_rank_block(t_up.shape[1]), IEEE=ieee, num_warps=WARPS,
    )  # fmt: skip
    return gate, up
