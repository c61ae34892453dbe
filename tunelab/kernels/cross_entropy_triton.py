"""Cross-entropy of a chunk of logits and its gradient in one Triton kernel, for kernels/linear_cross_entropy.py.

Per row: the log-sum-exp of the logits (an online max and sum over the vocabulary, fp32), the loss
`lse - logit[target]`, then the gradient `softmax - one_hot(target)` written over the logits in their own dtype
(zero on ignored rows). Two reads and one write of the logits; the PyTorch chunk takes about six passes in fp32. So
the chunks can hold ~4x more rows in the same memory, and the two matrix products around them run at a larger M
(liger-kernel sizes its chunks as tokens / (vocabulary / hidden): 128 rows for Llama-3.1-8B, where its products ran
at ~350 TFLOP/s on an H100, BENCHMARKS.md).

The arithmetic follows the PyTorch chunk (kernels/linear_cross_entropy.py), which is the twin the tests compare
against. Imported only where Triton is (a CUDA device, or TRITON_INTERPRET=1 for the CPU test).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # vocabulary columns per loop iteration of a row's program


@triton.jit
def _cross_entropy_kernel(
    logits, row_stride, targets, losses, n_cols, ignore_index, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    start = logits + row * row_stride
    target = tl.load(targets + row)
    running_max = -float("inf")
    running_sum = 0.0
    for offset in range(0, n_cols, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        x = tl.load(start + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    valid = target != ignore_index
    safe_target = tl.where(valid, target, 0)
    picked = tl.load(start + safe_target).to(tl.float32)
    tl.store(losses + row, tl.where(valid, lse - picked, 0.0))
    for offset in range(0, n_cols, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(start + cols, mask=inside, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(cols == safe_target, 1.0, 0.0)
        grad = tl.where(valid, grad, 0.0)
        tl.store(start + cols, grad.to(logits.dtype.element_ty), mask=inside)


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-row cross-entropy (fp32, 0 on ignored rows) of `logits` (rows x V, last dimension contiguous) for
    `targets` (rows); the gradient of their sum with respect to the logits is written over `logits`."""
    assert logits.stride(-1) == 1 and targets.is_contiguous(), "cross_entropy_triton: operands must be contiguous"
    rows, cols = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _cross_entropy_kernel[(rows,)](logits, logits.stride(0), targets, losses, cols, ignore_index, BLOCK=BLOCK)
    return losses
