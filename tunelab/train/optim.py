"""Optimizer and learning-rate schedule: AdamW without weight decay on norms and biases, warmup then
cosine / linear / constant."""

from __future__ import annotations

import math

import torch

from tunelab.config import TrainConfig

LR_SCALE_ATTRIBUTE = "lr_scale"  # a float set on a parameter: its learning rate is train.lr times it


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (norm weights, biases, 1-D tensors), and
    by learning-rate multiplier: a parameter carrying an `lr_scale` attribute (mcqa's per-part rates, set by
    tunelab.models.vlm) gets its own group with that multiplier (key "lr_scale").

    Decay on norm gains and biases only pulls them to zero without regularising anything (the convention of
    BERT, GPT-2 and timm's param_groups_weight_decay)."""
    buckets: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        no_decay = parameter.ndim <= 1 or name.endswith(".bias") or "norm" in name.lower()
        scale = float(getattr(parameter, LR_SCALE_ATTRIBUTE, 1.0))
        buckets.setdefault((scale, no_decay), []).append(parameter)
    groups = []
    # groups at train.lr first: the loop logs the first group's rate
    for (scale, no_decay), params in sorted(
        buckets.items(), key=lambda item: (item[0][0] != 1.0, -item[0][0], item[0][1])
    ):
        group = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        if scale != 1.0:
            group["lr_scale"] = scale
        groups.append(group)
    return groups


def create_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (fused on CUDA where torch has it); a group with an lr_scale starts
    at train.lr times it (the schedule then multiplies every group's own rate)."""
    groups = param_groups(model, train.weight_decay)
    for group in groups:
        group["lr"] = train.lr * group.get("lr_scale", 1.0)
    fused = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.adam_betas, fused=fused or None)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step` (0-based count of optimizer steps taken)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def create_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup over `train.warmup` of the steps, then the configured decay."""
    warmup_steps = int(round(train.warmup * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, train.schedule)
    )
