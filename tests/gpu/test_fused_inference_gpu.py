"""The compiled steps of tunelab.models.fused_inference on CUDA equal their PyTorch reference twins on random inputs
(fp32: relative error < 1e-5; bf16: < 1e-2), including sizes the first call did not see (dynamic shapes), and a
Qwen2.5-VL-3B-wide vision tower scores the same with them installed. Their speed is in benchmarks/mcqa.py.

    python3 -m pytest tests/gpu/test_fused_inference_gpu.py -m gpu -p no:cacheprovider -o addopts="" -s
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_vision_attention_gpu import features, tower

from tunelab.models.fused_inference import (
    RMS_NORM,
    SILU_MUL,
    VISION_ROTARY,
    install_fused_inference,
    rms_norm_reference,
    silu_mul_reference,
    vision_rotary_reference,
)
from tunelab.models.vision_attention import install_grouped_window_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_steps_equal_their_twins(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    for tokens in (4096, 1000, 77):  # the later sizes reuse the dynamic-shape kernel
        hidden = torch.randn(tokens, 1280, device="cuda", dtype=dtype) * 3
        weight = torch.randn(1280, device="cuda", dtype=dtype)
        normed = RMS_NORM(hidden, weight, 1e-6)
        assert relative_error(normed, rms_norm_reference(hidden, weight, 1e-6)) < TOLERANCE[dtype]
        gate, up = (torch.randn(tokens, 3420, device="cuda", dtype=dtype) for _ in range(2))
        assert relative_error(SILU_MUL(gate, up), silu_mul_reference(gate, up)) < TOLERANCE[dtype]
        query, key = (torch.randn(tokens, 16, 80, device="cuda", dtype=dtype) for _ in range(2))
        angles = torch.rand(tokens, 80, device="cuda") * 6
        for got, want in zip(
            VISION_ROTARY(query, key, angles.cos(), angles.sin()),
            vision_rotary_reference(query, key, angles.cos(), angles.sin()),
            strict=True,
        ):
            assert relative_error(got, want) < TOLERANCE[dtype]
    assert not (RMS_NORM.failed or SILU_MUL.failed or VISION_ROTARY.failed), "the compiler fell back"
    assert RMS_NORM.compiled is not None


@torch.no_grad()
def test_a_bf16_tower_scores_the_same_with_the_fused_steps() -> None:
    grid = torch.tensor([[1, 32, 32]] * 4 + [[1, 32, 24]], device="cuda")
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 3 * 2 * 14 * 14, device="cuda")
    plain = tower(torch.bfloat16)
    install_grouped_window_attention(plain)
    fused = copy.deepcopy(plain)
    assert install_fused_inference(fused) > 0
    assert relative_error(features(fused, pixels, grid), features(plain, pixels, grid)) < 1e-2
