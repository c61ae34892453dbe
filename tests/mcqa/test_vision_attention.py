"""The grouped vision attention (tunelab/models/vision_attention.py) equals transformers' per-piece loop: outputs
and gradients of tiny random Qwen2-VL and Qwen2.5-VL vision towers, fp32, on images whose windows come in equal and
unequal lengths."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from tunelab.models.vision_attention import install_grouped_window_attention

# images as (t, h, w) patch grids: two of one size (a run of equal pieces), one whose last windows are partial
GRIDS = [[1, 16, 16], [1, 16, 16], [1, 12, 20]]


def tower(family: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "qwen2_vl":
        config = Qwen2VLConfig(
            vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2}
        ).vision_config
        cls = Qwen2VisionTransformerPretrainedModel
    else:
        config = Qwen2_5_VLConfig(
            vision_config={
                "depth": 3,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 4,
                "out_hidden_size": 32,
                "window_size": 112,
                "fullatt_block_indexes": [1],
            }
        ).vision_config
        cls = Qwen2_5_VisionTransformerPretrainedModel
    config._attn_implementation = attn
    return cls(config).float()


def run(model: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    out = model(pixels, grid_thw=grid)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_grouped_attention_equals_the_per_piece_loop(family: str) -> None:
    reference, grouped = tower(family, "sdpa"), tower(family, "sdpa")
    assert install_grouped_window_attention(grouped) == len(grouped.blocks)
    grid = torch.tensor(GRIDS)
    torch.manual_seed(1)
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 3 * 2 * 14 * 14)
    expected, actual = run(reference, pixels, grid), run(grouped, pixels, grid)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    expected.square().sum().backward()
    actual.square().sum().backward()
    for (name, a), (_, b) in zip(grouped.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_only_sdpa_towers_change() -> None:
    assert install_grouped_window_attention(tower("qwen2_5_vl", "eager")) == 0
    assert install_grouped_window_attention(torch.nn.Linear(2, 2)) == 0
