"""The frozen input token embedding kept in pinned CPU memory, read by the GPU directly (model.offload_embedding).

LoRA / QLoRA training never updates the token embedding, and a step reads only the rows of the batch's tokens
(tokens x hidden: 32 MiB for 4k tokens of an 8B model) out of a table of vocabulary x hidden (128256 x 4096 in
bf16, 0.98 GiB for Llama-3.1-8B: 14% of an 8B QLoRA run's GPU memory). Here the table lives in pinned host memory
and a Triton kernel gathers the rows straight from it over PCIe (the GPU addresses pinned memory directly), so
the lookup stays asynchronous: no copy of the ids to the CPU, no wait for the GPU, nothing for the step to stall
on. Same values bit for bit (a gather).

Only an exact `torch.nn.Embedding` that is frozen and not shared with the output head moves (a model whose head
reuses the table keeps it on the GPU, as do subclasses such as Gemma's scaled embedding, whose forward differs).
The module keeps its class's interface: `weight` is still its parameter (on the CPU), state dicts and saving are
unchanged, and moving the model (`model.to(device)`) leaves the table where it is (a dtype change still applies).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

try:  # Triton comes with CUDA builds of PyTorch; without it nothing moves
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without Triton
    triton = None

MIN_BYTES = 64 << 20  # smaller tables stay on the GPU: too little memory to be worth a PCIe read a step


if triton is not None:

    @triton.jit
    def _gather_rows_kernel(table, ids, out, rows, hidden, BLOCK: tl.constexpr):
        """One program per (token, BLOCK columns): that piece of the token's row of `table` (host or device memory)
        copied to `out`. Many small programs keep many PCIe reads in flight (each takes ~1-2 us to come back). An id
        outside [0, rows) reads nothing and gives NaN (the loss shows it; reading past the table could crash the
        process)."""
        token = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < hidden
        row = tl.load(ids + token).to(tl.int64)
        valid = (row >= 0) & (row < rows)
        values = tl.load(table + tl.where(valid, row, 0) * hidden + columns, mask=inside)
        values = tl.where(valid, values, float("nan"))
        tl.store(out + token * hidden + columns, values.to(out.dtype.element_ty), mask=inside)


def gather_rows(table: torch.Tensor, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`table[ids]` written on `device` by a kernel that reads `table` where it is (pinned host memory on CUDA;
    any tensor under TRITON_INTERPRET=1). An id outside [0, rows) gives a row of NaN instead of a device assert."""
    flat = ids.reshape(-1).contiguous()
    hidden = table.shape[1]
    out = torch.empty((flat.numel(), hidden), dtype=table.dtype, device=device)
    if flat.numel():
        block = min(triton.next_power_of_2(hidden), 1024)
        grid = (flat.numel(), triton.cdiv(hidden, block))
        _gather_rows_kernel[grid](table, flat, out, table.shape[0], hidden, BLOCK=block)
    return out.reshape(*ids.shape, hidden)


class HostEmbedding(torch.nn.Embedding):
    """nn.Embedding whose (frozen) table lives in pinned CPU memory while its inputs come on a GPU.

    Made by changing an existing module's class (`move_to_host`), so every other attribute, hook and name stays."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Embedding's own argument name
        weight = self.weight
        if input.device == weight.device or not input.is_cuda:
            return super().forward(input)
        if torch.is_grad_enabled() and weight.requires_grad:  # unfrozen after the move: no gradient through here
            raise RuntimeError(
                "the input embedding was moved to CPU memory as frozen (model.offload_embedding) and is now "
                "trainable; set model.offload_embedding: false to train it"
            )
        return gather_rows(weight.detach(), input, input.device)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> HostEmbedding:
        """`model.to(device)` and friends: keep the table in host memory; apply a dtype change there."""
        probe = fn(torch.empty(0, dtype=self.weight.dtype))
        if probe.dtype != self.weight.dtype:
            self.weight.data = _pinned(self.weight.data.to(probe.dtype))
        return self


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.pin_memory() if torch.cuda.is_available() else tensor


def move_to_host(embedding: torch.nn.Embedding) -> None:
    """Move `embedding`'s table to (pinned) CPU memory and make the module gather from there."""
    weight = embedding.weight.data
    host = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=torch.cuda.is_available())
    host.copy_(weight)
    embedding.weight.data = host  # the GPU copy goes once nothing else refers to it
    embedding.__class__ = HostEmbedding


def why_not_offloadable(model: torch.nn.Module, min_bytes: int = MIN_BYTES) -> str | None:
    """Why `model`'s input embedding cannot (or, below `min_bytes`, need not) move to host memory; None: it can."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    if embedding is None or type(embedding) is not torch.nn.Embedding:  # noqa: E721 - subclasses change forward
        return "the input embedding is not a plain torch.nn.Embedding"
    weight = embedding.weight
    if weight.requires_grad:
        return "the input embedding is trained"
    if embedding.max_norm is not None:
        return "the input embedding renormalizes its rows (max_norm)"
    config = getattr(model, "config", None)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    head_weight = getattr(head, "weight", None)
    tied = bool(getattr(config, "tie_word_embeddings", False)) or (
        isinstance(head_weight, torch.Tensor) and head_weight.data_ptr() == weight.data_ptr()
    )
    if tied:
        return "the output head shares the input embedding's table"
    if weight.numel() * weight.element_size() < min_bytes:
        return f"the table is smaller than {min_bytes >> 20} MiB"
    if not weight.is_cuda:
        return "the input embedding is not on a GPU"
    return None


def offload_input_embedding(model: torch.nn.Module, min_bytes: int = MIN_BYTES) -> int:
    """Move `model`'s input embedding to pinned host memory where it can (see the module docstring), after a check
    that the GPU reads it correctly; returns the bytes of GPU memory freed (0 when it stays)."""
    if triton is None or why_not_offloadable(model, min_bytes) is not None:
        return 0
    embedding = model.get_input_embeddings()
    weight = embedding.weight.detach()
    rows = torch.tensor([0, weight.shape[0] - 1, weight.shape[0] // 2], device=weight.device)
    expected = weight[rows].clone()
    bytes_freed = weight.numel() * weight.element_size()
    move_to_host(embedding)
    try:  # the zero-copy read needs a GPU and driver that map pinned memory (UVA); check before relying on it
        same = torch.equal(gather_rows(embedding.weight.detach(), rows, rows.device), expected)
    except Exception:  # noqa: BLE001 - any failure means: keep the table on the GPU
        same = False
    if not same:
        embedding.weight.data = embedding.weight.data.to(rows.device)
        embedding.__class__ = torch.nn.Embedding
        return 0
    return bytes_freed
