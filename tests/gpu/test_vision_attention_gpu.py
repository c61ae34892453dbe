"""The grouped vision attention on CUDA in bf16: a Qwen2.5-VL-3B-wide vision tower (4 blocks, one of them full
attention) with and without it, on 8 images of 448 px and one of 448 x 336, gives the same features (relative error
< 1e-2 against the fp32 loop on the same weights). Its speed is measured in benchmarks/mcqa_infer_profile.py.

    python3 -m pytest tests/gpu/test_vision_attention_gpu.py -m gpu -p no:cacheprovider -o addopts="" -s
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from tunelab.models.vision_attention import install_grouped_window_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]


def tower(dtype: torch.dtype) -> torch.nn.Module:
    vision = {"depth": 4, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048}
    config = Qwen2_5_VLConfig(vision_config=vision | {"fullatt_block_indexes": [3]}).vision_config
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2_5_VisionTransformerPretrainedModel(config).to("cuda", dtype).eval()


def features(model: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    out = model(pixels.to(model.dtype), grid_thw=grid)
    return (out if isinstance(out, torch.Tensor) else out.last_hidden_state).float()


@torch.no_grad()
def test_grouped_vision_attention_in_bf16_matches_the_fp32_loop() -> None:
    grid = torch.tensor([[1, 32, 32]] * 8 + [[1, 32, 24]], device="cuda")
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 3 * 2 * 14 * 14, device="cuda")
    reference = features(tower(torch.float32), pixels, grid)
    loop, grouped = tower(torch.bfloat16), tower(torch.bfloat16)
    assert install_grouped_window_attention(grouped) == 4
    for model in (loop, grouped):
        error = (features(model, pixels, grid) - reference).norm() / reference.norm()
        assert error < 1e-2, error
