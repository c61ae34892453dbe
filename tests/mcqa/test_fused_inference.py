"""tunelab.models.fused_inference: its reference twins are transformers' own formulas (a tiny random Qwen2-VL and a
Qwen2.5-VL vision tower give identical outputs with and without them installed), and only the Qwen2-VL family
changes. The compiled path runs on CUDA only; tests/gpu/test_fused_inference_gpu.py checks it against the twins."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from test_vision_attention import GRIDS, run, tower

from tunelab.config import RunConfig
from tunelab.models import vlm
from tunelab.models.fused_inference import install_fused_inference
from tunelab.models.vision_attention import install_grouped_window_attention


def test_twins_equal_transformers_in_a_qwen2_5_vl_tower() -> None:
    reference = tower("qwen2_5_vl", "sdpa")
    fused = copy.deepcopy(reference)
    install_grouped_window_attention(reference)
    install_grouped_window_attention(fused)
    # per block: two norms, the MLP and the attention; plus the merger's norm
    assert install_fused_inference(fused) == 4 * len(fused.blocks) + 1
    grid = torch.tensor(GRIDS)
    torch.manual_seed(1)
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 3 * 2 * 14 * 14)
    with torch.no_grad():
        torch.testing.assert_close(run(fused, pixels, grid), run(reference, pixels, grid), rtol=0, atol=0)


def test_twins_equal_transformers_in_a_whole_model(vlm_dirs: dict[str, Path]) -> None:
    for family, folder in vlm_dirs.items():
        config = RunConfig(task="mcqa", model={"name": str(folder)})
        model = vlm.load_vlm(config.model, "lora", torch.device("cpu")).eval()  # on a CPU: nothing installed
        fused = copy.deepcopy(model)
        changed = install_fused_inference(fused)
        if family == "llava":
            assert changed == 0  # other families keep transformers' code
            continue
        assert changed > 0
        torch.manual_seed(0)
        ids = torch.randint(0, 100, (2, 12))
        with torch.no_grad():
            torch.testing.assert_close(fused(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
