"""train.fast_kernels wiring: auto leaves CPU runs on peft's and transformers' code (their numbers unchanged);
true installs the LoRA projections on a CPU too, and the first steps' losses match the plain path's."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.config import load_config
from tunelab.kernels.fast_path import fast_kernels_enabled
from tunelab.kernels.lora_projection import fast_lora_forward
from tunelab.tasks import sft

CPU = torch.device("cpu")


def config_for(model_dir: Path, fast: bool | str) -> object:
    return load_config(
        {
            "model": {"name": str(model_dir), "dtype": "fp32"},
            "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": "unused.jsonl"},
            "train": {"fast_kernels": fast},
        }
    )


def fused_layers(model: torch.nn.Module) -> int:
    return sum(getattr(m.forward, "__func__", None) is fast_lora_forward for m in model.modules())


def test_auto_is_off_on_cpu_and_on_for_one_cuda_process(tiny_model_dir: Path) -> None:
    config = config_for(tiny_model_dir, "auto")
    assert not fast_kernels_enabled(config, CPU)
    assert fast_kernels_enabled(config, torch.device("cuda"))
    config.train.distributed = "fsdp"
    assert not fast_kernels_enabled(config, torch.device("cuda"))
    assert fused_layers(sft.build_model(config_for(tiny_model_dir, "auto"), CPU)) == 0


def test_forced_on_cpu_trains_like_the_plain_path(tiny_model_dir: Path) -> None:
    losses = {}
    for fast in (False, True):
        torch.manual_seed(0)
        model = sft.build_model(config_for(tiny_model_dir, fast), CPU).train()
        assert (fused_layers(model) > 0) == fast
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        generator = torch.Generator().manual_seed(1)
        losses[fast] = []
        for _ in range(4):
            ids = torch.randint(0, 200, (2, 32), generator=generator)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            loss = sft.lm_loss_sum(model, batch) / (2 * 31)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[fast].append(float(loss))
    assert losses[True][-1] != losses[True][0]  # B moved off zero: the low-rank path carries the later steps
    for plain, fast in zip(losses[False], losses[True], strict=True):
        assert abs(plain - fast) / plain < 1e-5


def test_offload_hooks_wrap_each_checkpointed_layer_and_leave_cpu_tensors(tiny_model_dir: Path) -> None:
    """The hooks go around every decoder layer's checkpoint once; CPU tensors pass through untouched (the copies
    to pinned memory are for CUDA tensors, checked in tests/gpu/test_fast_kernels_gpu.py)."""
    from tunelab.kernels.fast_path import apply_checkpoint_offload
    from tunelab.kernels.offload import OffloadHooks, offload_checkpoints

    config = config_for(tiny_model_dir, False)
    config.model.gradient_checkpointing = True
    model = sft.build_model(config, CPU).train()
    assert apply_checkpoint_offload(model, config, CPU) == 0  # auto: nothing to move on a CPU
    layers = len(model.get_base_model().model.layers)
    assert offload_checkpoints(model) == layers
    assert offload_checkpoints(model) == 0  # already wrapped
    tensor = torch.randn(4, 1 << 20)
    hooks = OffloadHooks()
    assert hooks.unpack(hooks.pack(tensor)) is tensor
    ids = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    sft.lm_loss_sum(model, batch).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lora_dropout_says_the_fast_path_does_not_apply(tiny_model_dir: Path) -> None:
    from tunelab.track.progress import console

    config = config_for(tiny_model_dir, True)
    config.method.dropout = 0.05
    with console.capture() as captured:
        sft.build_model(config, CPU)
    assert "method.dropout is 0.05" in captured.get() and "method.dropout: 0" in captured.get()
    config.method.dropout = 0.0
    with console.capture() as captured:
        sft.build_model(config, CPU)
    assert "method.dropout" not in captured.get()
