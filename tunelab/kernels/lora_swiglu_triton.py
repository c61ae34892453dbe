"""Triton kernels for kernels/lora_mlp.py: SwiGLU with the gate's and up's low-rank LoRA terms added inside.

Forward: h = silu(G + Tg Bg^T) * (U + Tu Bu^T), where G, U are the base projections (tokens x I, bf16), Tg, Tu the
rank-r products x A^T (tokens x r) and Bg, Bu the LoRA B matrices already scaled (I x r). The rank-r products are
computed per tile with `tl.dot` on data already in registers, so the low-rank terms cost no pass over the
activations (peft: three passes per projection; an `addmm_` after the GEMM: one).

Backward: with dH = dH_base + Ud Ad (the down projection's input gradient, its low-rank term added here the same
way), dG = dH * u * silu'(g) and dU = dH * silu(g), written over G and U (each tile is read before it is written).
With `store_h` it also writes h = silu(g) * u over dH_base (for a recompute that skipped the forward kernel: h is
computed from the same g and u in the same order as the forward kernel does, so it is the same h).

Plain PyTorch twins: lora_mlp.swiglu_lowrank_forward_torch / swiglu_lowrank_backward_torch. Imported only where
Triton is (a CUDA device, or TRITON_INTERPRET=1 for the CPU tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# tile of the (tokens x I) activations per program, and warps; a module setting so
# benchmarks/lora_kernels_micro.py can sweep it on a GPU
TILES = {"forward": (32, 128, 4), "backward": (32, 128, 4)}  # best of 7 on an H100 (lora_kernels_micro)


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
def _gate_up(
    gate_at, up_at, mask, t_gu, b_gate, b_up, rows, cols, n_rows, n_cols, rank_gate, rank_up,
    RANK_GATE: tl.constexpr, RANK_UP: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """g = G + Tg Bg^T and u = U + Tu Bu^T on one tile, fp32 (T = [Tg | Tu] rows of rank_gate + rank_up; B: I x r)."""
    t_stride = rank_gate + rank_up
    g = tl.load(gate_at, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_at, mask=mask, other=0.0).to(tl.float32)
    g += _low_rank_tile(t_gu, t_stride, b_gate, 1, rank_gate, rows, cols, n_rows, n_cols, rank_gate, RANK_GATE, IEEE)
    u += _low_rank_tile(
        t_gu + rank_gate, t_stride, b_up, 1, rank_up, rows, cols, n_rows, n_cols, rank_up, RANK_UP, IEEE
    )
    return g, u


@triton.jit
def _forward_kernel(
    gate, up, out, t_gu, b_gate, b_up, n_rows, n_cols, rank_gate, rank_up,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_GATE: tl.constexpr, RANK_UP: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None] * n_cols + cols[None, :]
    g, u = _gate_up(
        gate + offsets, up + offsets, mask, t_gu, b_gate, b_up, rows, cols, n_rows, n_cols, rank_gate, rank_up,
        RANK_GATE, RANK_UP, IEEE,
    )  # fmt: skip
    h = g * tl.sigmoid(g) * u
    tl.store(out + offsets, h.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    grad_h, u_down, a_down, gate, up, t_gu, b_gate, b_up, n_rows, n_cols, rank_down, rank_gate, rank_up,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_DOWN: tl.constexpr, RANK_GATE: tl.constexpr,
    RANK_UP: tl.constexpr, IEEE: tl.constexpr, STORE_H: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None] * n_cols + cols[None, :]
    dh = tl.load(grad_h + offsets, mask=mask, other=0.0).to(tl.float32)
    # u_down: tokens x rank_down; a_down: rank_down x I
    dh += _low_rank_tile(u_down, rank_down, a_down, n_cols, 1, rows, cols, n_rows, n_cols, rank_down, RANK_DOWN, IEEE)
    g, u = _gate_up(
        gate + offsets, up + offsets, mask, t_gu, b_gate, b_up, rows, cols, n_rows, n_cols, rank_gate, rank_up,
        RANK_GATE, RANK_UP, IEEE,
    )  # fmt: skip
    sig = tl.sigmoid(g)
    silu = g * sig
    d_gate = dh * u * (sig + silu * (1.0 - sig))
    d_up = dh * silu
    tl.store(gate + offsets, d_gate.to(gate.dtype.element_ty), mask=mask)
    tl.store(up + offsets, d_up.to(up.dtype.element_ty), mask=mask)
    if STORE_H:  # this tile of grad_h was read above; the forward kernel's h = g * sigmoid(g) * u, same order
        tl.store(grad_h + offsets, (silu * u).to(grad_h.dtype.element_ty), mask=mask)


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot needs every dimension >= 16


def _dense(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous() for t in tensors)


def swiglu_lowrank_forward(gate, up, t_gate, t_up, b_gate, b_up) -> torch.Tensor:  # noqa: ANN001
    """silu(gate + t_gate b_gate^T) * (up + t_up b_up^T) for contiguous (tokens x I) gate / up, t_gate / t_up the
    two column blocks of one contiguous (tokens x (r_g + r_u)) tensor, contiguous (I x r) b_gate / b_up."""
    rows, cols = gate.shape
    t_gu = _joined(t_gate, t_up)
    assert _dense(gate, up, b_gate, b_up), "lora_swiglu_triton: operands must be contiguous"
    out = torch.empty_like(gate)
    block_m, block_n, warps = TILES["forward"]
    _forward_kernel[(triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))](
        gate, up, out, t_gu, b_gate, b_up, rows, cols, t_gate.shape[1], t_up.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, RANK_GATE=_rank_block(t_gate.shape[1]), RANK_UP=_rank_block(t_up.shape[1]),
        IEEE=gate.dtype == torch.float32, num_warps=warps,
    )  # fmt: skip
    return out


def swiglu_lowrank_backward(grad_h, u_down, a_down, gate, up, t_gate, t_up, b_gate, b_up, store_h=False):  # noqa: ANN001, ANN201
    """The gradients of swiglu_lowrank_forward for the upstream gradient grad_h + u_down a_down (all contiguous),
    written over gate and up (returned); with `store_h`, the forward's output h written over grad_h and returned
    third."""
    rows, cols = gate.shape
    t_gu = _joined(t_gate, t_up)
    assert _dense(grad_h, u_down, a_down, gate, up, b_gate, b_up), "lora_swiglu_triton: operands must be contiguous"
    block_m, block_n, warps = TILES["backward"]
    _backward_kernel[(triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))](
        grad_h, u_down, a_down, gate, up, t_gu, b_gate, b_up, rows, cols, u_down.shape[1], t_gate.shape[1],
        t_up.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, RANK_DOWN=_rank_block(u_down.shape[1]),
        RANK_GATE=_rank_block(t_gate.shape[1]), RANK_UP=_rank_block(t_up.shape[1]), IEEE=gate.dtype == torch.float32,
        STORE_H=store_h, num_warps=warps,
    )  # fmt: skip
    return (gate, up, grad_h) if store_h else (gate, up)


def _joined(t_gate: torch.Tensor, t_up: torch.Tensor) -> torch.Tensor:
    """The contiguous (tokens x (r_g + r_u)) tensor whose two column blocks t_gate and t_up are (LoraMLP makes
    them so); a copy when they are separate tensors."""
    width = t_gate.shape[1] + t_up.shape[1]
    base = t_gate
    joined = (
        t_gate.stride() == (width, 1)
        and t_up.stride() == (width, 1)
        and t_up.data_ptr() == t_gate.data_ptr() + t_gate.shape[1] * t_gate.element_size()
    )
    if joined:
        return base
    return torch.cat([t_gate, t_up], dim=1)
