"""Cross-entropy fused with the output projection, computed in chunks of tokens so that the full logits tensor
(tokens x vocabulary, 12 bytes an element at the peak of the plain path) never exists.

Three implementations of one function, `sum over rows of -log softmax(hidden @ weight.T + bias)[target]`:

- `linear_cross_entropy_reference`: the plain PyTorch twin (F.linear, then F.cross_entropy in fp32), which every
  fast version is tested against;
- `chunked_linear_cross_entropy`: PyTorch only, any device: per chunk of rows it computes the logits, the loss
  and at once the gradients of the hidden states (and of the weight and bias where they train), and keeps only
  those; backward scales them by the incoming gradient. The same three matrix products as the plain path, no
  recompute, and the transient memory is one chunk's logits;
- the same chunks with the softmax, the loss and the gradient in one Triton pass over each chunk's logits, in
  place in the compute dtype (kernels/cross_entropy_triton.py), so a chunk holds ~4x the rows in the same memory
  and the matrix products run at a larger size (impl "triton");
- liger-kernel's `LigerFusedLinearCrossEntropyFunction` (the same scheme with its own kernel, its chunks sized
  tokens / (vocabulary / hidden): 128 rows for Llama-3.1-8B) when it is installed and the tensors are on CUDA.

`fused_linear_cross_entropy` picks one and follows the surrounding autocast the way the plain path does: the
matrix products run in the autocast dtype, the softmax in fp32.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Transient fp32 logits per chunk: 256 MiB keeps a chunk's matrix product large enough to run at full rate on a
# GPU (e.g. 256 rows x 128256 vocabulary x 2048 hidden, ~134 GFLOP) while staying small next to the weights.
CHUNK_BYTES = 256 * 2**20

Impl = Literal["auto", "chunked", "triton", "liger", "reference"]


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden` (rows x H) projected by `weight` (V x H): the plain path, logits in full."""
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and gradients chunk by chunk in forward; backward only scales the stored gradients."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        ignore_index: int,
        chunk_rows: int,
        rows_kernel: Any = None,
    ) -> torch.Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        rows = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # fp32 accumulators: the weight gradient is a sum over every chunk, so bf16 partial sums would lose bits
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            chunk = hidden[start:end]
            target = targets[start:end]
            if rows_kernel is not None:
                # one pass: the rows' losses, and the gradient written over the logits in the compute dtype
                grad = F.linear(chunk, weight, bias)
                loss += rows_kernel(grad, target.contiguous(), ignore_index).sum()
                if grad_bias is not None:
                    grad_bias += grad.float().sum(0)
            else:
                valid = target != ignore_index
                safe_target = torch.where(valid, target, 0).unsqueeze(1)
                logits = F.linear(chunk, weight, bias).float()
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe_target).squeeze(1)
                loss += torch.where(valid, lse - picked, 0.0).sum()
                if not (need_hidden or need_weight or need_bias):
                    continue
                # d loss / d logits = softmax - one_hot(target), zero on ignored rows; in place on the fp32 logits
                grad = logits.sub_(lse.unsqueeze(1)).exp_()
                grad.scatter_add_(1, safe_target, torch.full_like(picked, -1.0).unsqueeze(1))
                grad.mul_(valid.unsqueeze(1))
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
                grad = grad.to(chunk.dtype)  # the plain path's backward also runs the projection in this dtype
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                grad_weight += (grad.t() @ chunk).float()
            del grad  # before the next chunk's logits: one chunk's transient memory at a time, not two
        ctx.save_for_backward(
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
        )
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss.to(torch.float32)
        out = []
        for grad in (grad_hidden, grad_weight, grad_bias):
            out.append(None if grad is None else (grad * scale).to(grad.dtype))
        return out[0], out[1], out[2], None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int | None = None,
    kernel: bool = False,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden` (rows x H) under `weight` (V x H), at most `chunk_rows` rows of logits at a
    time (default: CHUNK_BYTES of logits: fp32 in PyTorch, the compute dtype with `kernel`, the Triton pass of
    kernels/cross_entropy_triton.py). Equal to linear_cross_entropy_reference, forward and backward."""
    hidden = hidden.contiguous()  # the hidden gradient is written row-slice by row-slice
    rows_kernel = None
    if kernel:
        from tunelab.kernels.cross_entropy_triton import cross_entropy_rows_ as rows_kernel
    if chunk_rows is None:
        logit_bytes = hidden.element_size() if kernel else 4
        chunk_rows = max(1, CHUNK_BYTES // (logit_bytes * weight.shape[0]))
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, int(chunk_rows), rows_kernel)


def liger_available() -> bool:
    """Whether liger-kernel (and so Triton) can be imported."""
    try:
        from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction  # noqa: F401
    except Exception:  # ImportError, or Triton failing to find a driver
        return False
    return True


def _liger_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
) -> torch.Tensor:
    from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction

    # positional: _input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction
    loss = LigerFusedLinearCrossEntropyFunction.apply(
        hidden, weight, targets, bias, None, ignore_index, 0.0, 0.0, "sum"
    )
    return (loss[0] if isinstance(loss, tuple) else loss).float()


def triton_available() -> bool:
    """Whether the Triton cross-entropy pass (kernels/cross_entropy_triton.py) can be imported."""
    try:
        from tunelab.kernels import cross_entropy_triton  # noqa: F401
    except Exception:  # ImportError, or Triton failing to find a driver
        return False
    return True


def liger_chunk_rows(rows: int, hidden: int, vocab: int) -> int:
    """The rows per chunk liger-kernel's fused linear cross-entropy uses (its own sizing rule)."""
    per_row = -(-vocab // hidden)
    return 1 << max(0, (-(-rows // per_row) - 1).bit_length())


def resolve_impl(impl: Impl, device: torch.device, rows: int = 0, hidden: int = 1, vocab: int = 1) -> str:
    """The implementation `impl` means on `device` for `rows` x `hidden` inputs and a `vocab`-row head. auto on
    CUDA: liger where its chunks have at least 256 rows, else the chunked loss with the Triton pass (liger's
    128-row chunks ran the Llama-3.1-8B head at 324 TFLOP/s on an H100, the Triton pass's 1,046-row chunks at 602,
    for 256 MiB of transient logits instead of 31: benchmarks/fused_loss_micro.py, BENCHMARKS.md); the PyTorch
    chunks elsewhere."""
    if impl != "auto":
        return impl
    if device.type != "cuda":
        return "chunked"
    liger = liger_available()
    if liger and liger_chunk_rows(rows, hidden, vocab) >= 256:
        return "liger"
    if triton_available():
        return "triton"
    return "liger" if liger else "chunked"


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Summed cross-entropy of `hidden` (rows x H) projected by `weight` (V x H) onto `targets` (rows), without
    the full logits tensor. Under autocast the projection runs in the autocast dtype, as nn.Linear would."""
    device_type = hidden.device.type
    dtype = hidden.dtype
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    chosen = resolve_impl(impl, hidden.device, hidden.shape[0], hidden.shape[-1], weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        if chosen == "liger":
            return _liger_linear_cross_entropy(hidden.contiguous(), weight, targets.contiguous(), bias, ignore_index)
        if chosen == "reference":
            return linear_cross_entropy_reference(hidden, weight, targets, bias, ignore_index)
        return chunked_linear_cross_entropy(hidden, weight, targets, bias, ignore_index, kernel=chosen == "triton")
