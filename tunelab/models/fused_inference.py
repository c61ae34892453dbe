"""Fused elementwise steps for Qwen2-VL-family models when they score on a GPU.

Measured on an H100 with a Qwen2.5-VL-3B shape (benchmarks/mcqa_infer_profile.py), the vision tower's matmuls are
a minority of its time: every block runs RMSNorm twice and the vision rotary embedding on queries and keys as
chains of float32 elementwise ops, each a full pass over 32 images x 1,024 patches x 1,280 channels. Here the same
formulas (transformers' own, copied as reference twins below) are compiled by `torch.compile` into one kernel each:
one read and one write instead of five to ten passes.

Used only without autograd on CUDA (scoring, prediction, validation); training and CPU runs keep transformers' code
untouched. The first call compiles (a few seconds, once per process; shapes are dynamic, so batches of other sizes
do not compile again). If compiling fails (no Triton), the reference runs and a warning says so.
tests/gpu/test_fused_inference_gpu.py checks each fused step against its twin on random inputs.
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# transformers modules whose RMSNorm / MLP / vision attention these formulas reproduce (transformers 5.x)
FAMILY_MODULES = (
    "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
)


def rms_norm_reference(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2-VL's RMSNorm: normalise in float32, cast back, then scale (the order matters for bf16 results)."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(dtype)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation: silu(gate) * up."""
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def vision_rotary_reference(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision rotary embedding of Qwen2-VL / Qwen2.5-VL ([seq, heads, dim] queries and keys, [seq, dim] angles),
    computed in float32 and cast back."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q, k = query.float(), key.float()
    q_out = q * cos + _rotate_half(q) * sin
    k_out = k * cos + _rotate_half(k) * sin
    return q_out.to(query.dtype), k_out.to(key.dtype)


class Fused:
    """A reference function and its compiled twin; the twin runs on CUDA tensors without autograd."""

    def __init__(self, reference: Callable[..., Any], backend: str = "inductor") -> None:
        self.reference, self.backend = reference, backend
        self.compiled: Callable[..., Any] | None = None
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        if self.failed or torch.is_grad_enabled() or not args[0].is_cuda:
            return self.reference(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.reference, dynamic=True, backend=self.backend)
        try:
            return self.compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the reference gives the same numbers
            self.failed = True
            name = self.reference.__name__
            warnings.warn(f"fused {name} could not be compiled ({error}); using the reference", stacklevel=2)
            return self.reference(*args)


RMS_NORM, SILU_MUL, VISION_ROTARY = Fused(rms_norm_reference), Fused(silu_mul_reference), Fused(vision_rotary_reference)


def _norm_forward(self: Any, hidden: torch.Tensor) -> torch.Tensor:
    return RMS_NORM(hidden, self.weight, self.variance_epsilon)


def _mlp_forward(self: Any, hidden: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SILU_MUL(self.gate_proj(hidden), self.up_proj(hidden)))


def _is_norm(module: torch.nn.Module) -> bool:
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def _is_gated_mlp(module: torch.nn.Module) -> bool:
    # transformers' ACT2FN["silu"] is torch's SiLU or its own SiLUActivation (F.silu) depending on the release
    activation = getattr(module, "act_fn", None)
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")) and (
        isinstance(activation, torch.nn.SiLU) or type(activation).__name__ == "SiLUActivation"
    )


def install_fused_inference(model: torch.nn.Module) -> int:
    """Give the RMSNorm, gated-MLP and vision-attention modules of a Qwen2-VL-family model the fused steps
    (per instance, never on the class); returns how many modules changed (0 for other families)."""
    changed = 0
    for module in model.modules():
        cls = type(module)
        if cls.__module__ not in FAMILY_MODULES:
            continue
        if _is_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
        elif _is_gated_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
        elif hasattr(sys.modules[cls.__module__], "apply_rotary_pos_emb_vision") and hasattr(module, "qkv"):
            module.tunelab_rotary = VISION_ROTARY  # read by vision_attention.grouped_forward
        else:
            continue
        changed += 1
    return changed
