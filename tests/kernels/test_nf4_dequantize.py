"""NF4 dequantization: the Triton kernel (kernels/nf4_triton.py, run by Triton's interpreter on the CPU) equals its
plain PyTorch twin (lora_projection.dequantize_nf4_reference) bit for bit in fp32 and fp16 (bf16: within one bf16
step, as the interpreter rounds to bf16 its own way), with and without double quantization,
on weights quantized here the way bitsandbytes quantizes them (absmax per block, nearest NF4 code; the block
scales 8-bit quantized per 256 after subtracting their mean). On CUDA both are also checked against bitsandbytes
itself (tests/gpu/test_fast_kernels_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def _script() -> str:
    return textwrap.dedent(
        """
        import types
        import torch
        from tunelab.kernels import nf4_triton
        from tunelab.kernels.lora_projection import dequantize_nf4_reference

        NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])

        def quantize(weight, blocksize, nested, dtype):
            blocks = weight.float().reshape(-1, blocksize)
            absmax = blocks.abs().amax(dim=1)
            codes = (blocks / absmax[:, None]).unsqueeze(-1).sub(NF4).abs().argmin(-1).to(torch.uint8)
            packed = (codes.reshape(-1, 2)[:, 0] << 4 | codes.reshape(-1, 2)[:, 1]).contiguous()
            state = types.SimpleNamespace(code=NF4.clone(), blocksize=blocksize, shape=weight.shape, dtype=dtype,
                                          quant_type="nf4", nested=nested, absmax=absmax, state2=None, offset=None)
            if nested:
                offset = absmax.mean()
                centred = (absmax - offset).reshape(-1)
                padded = torch.nn.functional.pad(centred, (0, (-centred.numel()) % 256)).reshape(-1, 256)
                absmax2 = padded.abs().amax(dim=1).clamp_min(1e-12)
                code2 = torch.linspace(-1, 1, 256)
                scaled = padded / absmax2[:, None]
                q = scaled.unsqueeze(-1).sub(code2).abs().argmin(-1).to(torch.uint8).reshape(-1)[: centred.numel()]
                state.absmax, state.offset = q.contiguous(), offset.reshape(())
                state.state2 = types.SimpleNamespace(code=code2, absmax=absmax2, blocksize=256, nested=False)
            return packed, state

        g = torch.Generator().manual_seed(0)
        cases = [((96, 64), 64, True, torch.float32), ((40, 128), 64, False, torch.float32),
                 ((33, 64), 32, True, torch.float32), ((300, 256), 128, True, torch.float16),
                 ((96, 64), 64, True, torch.bfloat16)]
        for shape, blocksize, nested, dtype in cases:
            weight = torch.randn(*shape, generator=g) * 0.05
            packed, state = quantize(weight, blocksize, nested, dtype)
            nf4_triton.ROWS_PER_PROGRAM = 16  # several programs, the last one partly outside
            mine = nf4_triton.dequantize(packed, state)
            theirs = dequantize_nf4_reference(packed, state)
            assert mine.dtype == dtype and mine.shape == weight.shape, (mine.dtype, mine.shape)
            if dtype == torch.bfloat16:  # the interpreter rounds fp32 -> bf16 differently from CUDA: one bf16 step
                assert ((mine.float() - theirs.float()).abs() <= theirs.float().abs() * 2**-7).all(), shape
            else:
                assert torch.equal(mine, theirs), (shape, blocksize, nested, (mine - theirs).abs().max())
            # and the quantization round trip is what NF4 gives: within half a code step of the block's scale
            assert (mine.float() - weight).abs().max() < 0.2 * weight.abs().max()
        print("interpreter ok")
        """
    )


def test_nf4_kernel_equals_its_twin_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", _script()], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "interpreter ok" in result.stdout
