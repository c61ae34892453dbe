"""A LoRA projection `x W^T + b + s (x A^T) B^T` as one autograd function, for peft's LoRA layers on a GPU.

peft computes the low-rank path as separate modules: `lora_B(lora_A(x)) * scaling`, then `result + that`. Each of
those is a pass over the full output activations (tokens x out_features) in forward, the scaling and the add again
in backward, and under autocast peft first copies the input to the adapter's fp32 and autocast copies it back. For
the MLP projections of a 1B model at 8k tokens a step that is ~128 MiB per pass, per layer, three times a step
(forward, checkpoint recompute, backward).

`LoraProjection` adds the low-rank product to the base product's output with one `addmm_` (a rank-r GEMM that
reads and writes the output once: one pass instead of peft's three; the H100 profile in BENCHMARKS.md puts these
passes at ~11% of a 1B LoRA step), and its backward computes the input gradient as `dY W + s (dY B) A` the same
way. It saves only what peft's modules save (the input and the rank-r intermediate), never the dequantized weight
of a 4-bit layer: that is dequantized again in backward, as bitsandbytes does.

`lora_projection_reference` is the plain PyTorch twin (peft's own formula). tests/kernels/test_lora_projection.py
compares them on the CPU (fp32) and tests/gpu/test_fast_kernels_gpu.py on CUDA (bf16).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


def lora_projection_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """peft's vanilla LoRA forward: base linear, plus the low-rank path scaled."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scaling


def dense_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense (out x in) tensor of `dtype`; 4-bit weights are dequantized."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnb_functional

        weight = bnb_functional.dequantize_4bit(weight.data, quant_state)
    return weight if weight.dtype == dtype else weight.to(dtype)


class LoraProjection(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W frozen, computed in x's dtype; gradients for x, A and B.

    A and B may be kept in another dtype (peft trains them in fp32): they are cast inside, and their gradients
    returned in their own dtype, so no autograd cast nodes sit around every projection."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        base: torch.nn.Module,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        dtype = x.dtype
        weight = dense_weight(base, dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        flat = x.reshape(-1, x.shape[-1])
        low = flat @ a.t()  # tokens x r
        out = F.linear(flat, weight, bias)
        out.addmm_(low, b.t(), alpha=scaling)  # one pass over the output instead of peft's three
        ctx.save_for_backward(x, low, a, b)
        ctx.base, ctx.scaling, ctx.adapter_dtypes = base, scaling, (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, low, a, b = ctx.saved_tensors
        scaling = ctx.scaling
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        flat = x.reshape(-1, x.shape[-1])
        grad_low = (grad @ b).mul_(scaling)  # tokens x r: dL/d(x A^T)
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[3]:
            grad_b = (grad.t() @ low).mul_(scaling).to(ctx.adapter_dtypes[1])
        if ctx.needs_input_grad[2]:
            grad_a = (grad_low.t() @ flat).to(ctx.adapter_dtypes[0])
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dense_weight(ctx.base, grad.dtype)
            grad_x.addmm_(grad_low, a)
            grad_x = grad_x.view(x.shape)
        return grad_x, None, grad_a, grad_b, None, None


def _eligible(layer: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The active adapter's name when LoraProjection computes exactly what peft's forward would, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):  # DoRA and other variants
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, torch.nn.Identity) and not (dropout.p == 0 or not dropout.training):
        return None
    base = layer.get_base_layer()
    if base.weight.requires_grad or layer.lora_B[name].bias is not None:
        return None
    quantized = getattr(base.weight, "quant_state", None) is not None
    if quantized and not torch.is_grad_enabled():
        return None  # generation: bitsandbytes' 4-bit GEMV beats dequantizing the whole weight per token
    if not quantized and type(base) is not torch.nn.Linear:
        return None
    return name


def _compute_dtype(x: torch.Tensor, weight_dtype: torch.dtype, adapter_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype every operand runs in: autocast's half dtype, or the common dtype when there is no autocast."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return dtype if dtype in (torch.bfloat16, torch.float16) else None
    if x.dtype == weight_dtype == adapter_dtype:
        return x.dtype
    return None  # mixed dtypes without autocast: peft's casts define the numbers, keep its path


def fast_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Installed as a LoRA layer's forward: LoraProjection where eligible, peft's own forward otherwise."""
    name = _eligible(self, x, args, kwargs)
    if name is not None:
        base = self.get_base_layer()
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        quant_state = getattr(base.weight, "quant_state", None)
        weight_dtype = quant_state.dtype if quant_state is not None else base.weight.dtype
        dtype = _compute_dtype(x, weight_dtype, lora_a.dtype)
        if dtype is not None:
            bias = base.bias.to(dtype) if base.bias is not None else None
            # no autocast context needed: every operand is cast to `dtype` explicitly, so autocast changes nothing
            return LoraProjection.apply(x.to(dtype), base, lora_a, lora_b, float(self.scaling[name]), bias)
    return type(self).forward(self, x, *args, **kwargs)


def install_lora_projections(model: torch.nn.Module) -> int:
    """Give every peft LoRA linear layer (dense or bitsandbytes 4-bit base) the fused forward, per instance;
    returns how many layers changed. Layers it cannot serve exactly (DoRA, dropout, several active adapters,
    merged) fall back to peft's forward call by call."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return 0
    classes: tuple[type, ...] = (LoraLinear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        classes += (LoraLinear4bit,)
    except (ImportError, AttributeError):  # bitsandbytes missing: peft leaves the class out
        pass
    changed = 0
    for module in model.modules():
        if type(module) in classes:
            module.forward = types.MethodType(fast_lora_forward, module)
            changed += 1
    return changed
