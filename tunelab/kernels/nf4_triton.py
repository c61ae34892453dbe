"""NF4 / FP4 dequantization of a bitsandbytes 4-bit weight in one Triton kernel, double quantization included.

bitsandbytes dequantizes a double-quantized weight in three launches: the 8-bit block scales to fp32 (its blockwise
kernel), `+= offset` (a torch add), then the 4-bit codes times their block's scale to bf16. For QLoRA training
every frozen projection is dequantized three times a step (forward, checkpoint recompute, backward): on an H100 the
three launches took 28 ms of a 400 ms 8B QLoRA step, the 4-bit kernel moving ~2 TB/s (BENCHMARKS.md). Here one
kernel reads each packed byte once, decodes both of its codes, computes their block's scale from the 8-bit scale,
its second-level scale and the offset in registers, and writes the two values side by side.

The arithmetic is bitsandbytes' own, in its order (scale = code2[q] * absmax2 rounded to fp32, then + offset,
then code[nibble] * scale rounded to the output dtype; no fused multiply-add), so the result equals
bitsandbytes.functional.dequantize_4bit bit for bit (tests/gpu/test_fast_kernels_gpu.py). The 16 code values are
read from the weight's own quant_state.code, not hard-coded. Imported only where Triton is (CUDA, or
TRITON_INTERPRET=1 for the CPU test).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 64  # quantization blocks per program (64 x 64 codes); a module setting so a benchmark can sweep it


@triton.jit
def _dequantize_kernel(
    packed, code, absmax, code2, absmax2, offset, out, n_blocks,
    HALF: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """ROWS quantization blocks per program, one per row: HALF packed bytes (2 * HALF codes) and one scale each."""
    blocks = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    inside = blocks < n_blocks
    columns = tl.arange(0, HALF)
    byte = tl.load(packed + blocks[:, None] * HALF + columns[None, :], mask=inside[:, None], other=0).to(tl.int32)
    if NESTED:  # the block's scale is itself quantized: code2[q] * absmax2[its block], then + offset (in fp32)
        quantized_scale = tl.load(absmax + blocks, mask=inside, other=0).to(tl.int32)
        scale = tl.load(code2 + quantized_scale) * tl.load(absmax2 + blocks // BLOCKSIZE2, mask=inside, other=0.0)
        scale = scale + tl.load(offset)
    else:
        scale = tl.load(absmax + blocks, mask=inside, other=0.0)
    high = tl.load(code + (byte >> 4)) * scale[:, None]  # a byte holds two codes, the first in its high nibble
    low = tl.load(code + (byte & 15)) * scale[:, None]
    values = tl.interleave(high, low).to(out.dtype.element_ty)  # (ROWS, 2 * HALF): the codes in order
    positions = blocks[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
    tl.store(out + positions, values, mask=inside[:, None])


def supported(packed: torch.Tensor, quant_state: Any) -> bool:
    """Whether `dequantize` serves this weight: NF4, contiguous packed bytes, a power-of-2 block size dividing the
    weight, fp32 scales (or 8-bit scales with fp32 second-level scales and a tensor offset), a 16-entry fp32 code
    table, all on the weight's device."""
    nested = bool(quant_state.nested)
    absmax = quant_state.absmax
    code = quant_state.code
    checks = [
        packed.is_cuda and packed.is_contiguous() and packed.dtype == torch.uint8,
        quant_state.quant_type == "nf4",
        quant_state.blocksize >= 2 and quant_state.blocksize & (quant_state.blocksize - 1) == 0,  # a power of 2
        packed.numel() * 2 == _numel(quant_state.shape) and _numel(quant_state.shape) % quant_state.blocksize == 0,
        code.numel() == 16 and code.dtype == torch.float32 and code.device == packed.device,
        absmax.is_contiguous() and absmax.device == packed.device,
        quant_state.dtype in (torch.bfloat16, torch.float16, torch.float32),
    ]
    if nested:
        state2 = quant_state.state2
        checks += [
            absmax.dtype == torch.uint8 and not state2.nested and isinstance(quant_state.offset, torch.Tensor),
            quant_state.offset.numel() == 1 and quant_state.offset.dtype == torch.float32,
            quant_state.offset.device == packed.device,
            state2.code.dtype == state2.absmax.dtype == torch.float32,
            state2.code.device == state2.absmax.device == packed.device and state2.absmax.is_contiguous(),
        ]
    else:
        checks.append(absmax.dtype == torch.float32)
    return all(checks)


def _numel(shape: Any) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def dequantize(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """The dense weight of a bitsandbytes 4-bit parameter (shape and dtype from its quant_state)."""
    out = torch.empty(quant_state.shape, dtype=quant_state.dtype, device=packed.device)
    n_blocks = out.numel() // quant_state.blocksize
    if quant_state.nested:
        state2 = quant_state.state2
        code2, absmax2, blocksize2 = state2.code, state2.absmax, state2.blocksize
        offset = quant_state.offset.reshape(1)
    else:
        code2 = absmax2 = offset = quant_state.absmax  # unused (NESTED false); any tensor will do
        blocksize2 = 1
    grid = (triton.cdiv(n_blocks, ROWS_PER_PROGRAM),)
    _dequantize_kernel[grid](
        packed, quant_state.code, quant_state.absmax, code2, absmax2, offset, out, n_blocks,
        HALF=quant_state.blocksize // 2, BLOCKSIZE2=blocksize2, NESTED=bool(quant_state.nested),
        ROWS=ROWS_PER_PROGRAM, enable_fp_fusion=False,
    )  # fmt: skip
    return out
