"""liger-kernel's Triton RMSNorm, SwiGLU and rotary embedding inside a Llama-family decoder, for training on a GPU.

In transformers' code each of these is a chain of elementwise ops, every one a full pass over the activations, in
forward, in the checkpoint recompute and again in backward: RMSNorm upcasts to fp32 and takes five passes, SwiGLU
three, the rotary embedding about six over the queries and keys. liger-kernel computes each in one kernel per
direction (its fp32 internals match transformers' "llama" casting).

Installed per instance (RMSNorm and MLP modules get a new `forward`), only for architectures whose modules compute
exactly the reference formulas below (transformers 5's code for these families, read from their modeling files).
The rotary embedding is a module-level function in transformers, not a module: `install_fast_blocks` replaces that
function of the family with a dispatcher that runs liger's kernel on CUDA tensors and transformers' own function
otherwise, so other models of the process compute the same values either way (within bf16 rounding).
Each formula's plain twin is here; tests/gpu/test_fast_kernels_gpu.py compares them forward and backward.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.kernels.lora_mlp import fused_lora_mlp

# modeling modules whose RMSNorm, gated MLP and apply_rotary_pos_emb are exactly the references below
FAMILIES = {
    "llama": "transformers.models.llama.modeling_llama",
    "mistral": "transformers.models.mistral.modeling_mistral",
    "qwen2": "transformers.models.qwen2.modeling_qwen2",
    "qwen3": "transformers.models.qwen3.modeling_qwen3",
}
_ORIGINAL_ROTARY: dict[str, Callable[..., Any]] = {}
# the rotary dispatchers run liger's kernel only while this is on (tests turn it off for their plain runs)
ROTARY_ENABLED = {"on": True}
# MLPs whose three projections are LoRA layers run as one LoraMLP while this is on (benchmarks time both)
FUSED_MLP_ENABLED = {"on": True}


def rms_norm_reference(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalise in fp32, cast back to the input dtype, then scale."""
    dtype = hidden.dtype
    normed = hidden.to(torch.float32)
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation: silu(gate) * up."""
    return F.silu(gate) * up


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary embedding of [batch, heads, seq, dim] queries and keys with [batch, seq, dim] angles."""

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def liger_blocks_available() -> bool:
    """Whether liger-kernel's RMSNorm, SwiGLU and rotary functions import (liger-kernel and Triton installed)."""
    try:
        from liger_kernel.ops import LigerRMSNormFunction, LigerRopeFunction, LigerSiLUMulFunction  # noqa: F401
    except Exception:  # ImportError, or Triton failing to find a driver
        return False
    return True


def fast_rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm_reference in one Triton kernel each way (liger, llama casting)."""
    from liger_kernel.ops import LigerRMSNormFunction

    # positional: X, W, eps, offset, casting_mode, in_place (dX written over dY: it has no other reader), row_mode
    return LigerRMSNormFunction.apply(hidden, weight, eps, 0.0, "llama", True, None)


def fast_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """swiglu_reference in one Triton kernel each way (liger)."""
    from liger_kernel.ops import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up, 1.0, 1.0)


def fast_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary_reference in one Triton kernel each way (liger; queries and keys are rotated in their storage)."""
    from liger_kernel.ops import LigerRopeFunction

    return LigerRopeFunction.apply(q, k, cos, sin)


def _norm_forward(self: Any, hidden: torch.Tensor) -> torch.Tensor:
    if not hidden.is_cuda or hidden.dtype != self.weight.dtype:
        return type(self).forward(self, hidden)  # liger's output dtype rule differs when they differ
    return fast_rms_norm(hidden, self.weight, self.variance_epsilon)


def _mlp_forward(self: Any, hidden: torch.Tensor) -> torch.Tensor:
    if hidden.is_cuda and FUSED_MLP_ENABLED["on"]:
        fused = fused_lora_mlp(self, hidden)  # all three projections LoRA: one function, low-rank terms inside
        if fused is not None:
            return fused
    gate, up = self.gate_proj(hidden), self.up_proj(hidden)
    if not gate.is_cuda or gate.dtype != up.dtype:
        return self.down_proj(swiglu_reference(gate, up))
    return self.down_proj(fast_swiglu(gate, up))


def _rotary_dispatcher(original: Callable[..., Any]) -> Callable[..., Any]:
    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args, **kwargs):
        usable = ROTARY_ENABLED["on"] and q.is_cuda and not args and not kwargs
        # full rotary over [batch, heads, seq, dim] with [batch or 1, seq, dim] angles, one dtype throughout
        usable = usable and q.dim() == 4 and cos.dim() == 3 and cos.shape[-1] == q.shape[-1]
        if usable and q.dtype == k.dtype == cos.dtype == sin.dtype:
            return fast_rotary(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.tunelab_original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _family(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type if model_type in FAMILIES else None


def _is_norm(module: torch.nn.Module, modeling: str) -> bool:
    return (
        type(module).__module__ == modeling
        and type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def _is_gated_mlp(module: torch.nn.Module, modeling: str) -> bool:
    activation = getattr(module, "act_fn", None)
    silu = isinstance(activation, torch.nn.SiLU) or type(activation).__name__ == "SiLUActivation"
    return type(module).__module__ == modeling and silu and hasattr(module, "gate_proj")


def install_fast_blocks(model: torch.nn.Module) -> dict[str, int]:
    """Give a Llama / Mistral / Qwen2 / Qwen3 model (a peft wrapper around one too) liger's RMSNorm, SwiGLU and
    rotary kernels; returns how many modules of each kind changed (all 0 for other architectures or without
    liger-kernel). Call it once the model is on its GPU; the modules fall back to their own code on CPU tensors."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = _family(base)
    counts = {"rms_norm": 0, "swiglu": 0, "rotary": 0}
    if family is None or not liger_blocks_available():
        return counts
    modeling = FAMILIES[family]
    for module in base.modules():
        if _is_norm(module, modeling):
            module.forward = types.MethodType(_norm_forward, module)
            counts["rms_norm"] += 1
        elif _is_gated_mlp(module, modeling):
            module.forward = types.MethodType(_mlp_forward, module)
            counts["swiglu"] += 1
    module = importlib.import_module(modeling)
    if family not in _ORIGINAL_ROTARY:
        _ORIGINAL_ROTARY[family] = module.apply_rotary_pos_emb
        module.apply_rotary_pos_emb = _rotary_dispatcher(module.apply_rotary_pos_emb)
    counts["rotary"] = 1
    return counts
