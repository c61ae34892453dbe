"""The query, key and value LoRA projections of an attention block as one autograd function.

    q, k, v = p_q(x), p_k(x), p_v(x),   each p(x) = x W^T + s (x A^T) B^T

All three read the same input. Per projection (kernels/lora_projection.py) each one reads x again for its thin
product x A^T in forward and in the checkpoint recompute, and again for its A gradient in backward; each backward
writes its own tokens x hidden input gradient, and autograd adds the three (two more passes over a tokens x hidden
tensor). Here, as LoraMLP does for gate and up:

- one thin GEMM x [A_q; A_k; A_v]^T gives the three rank-r products (x read once);
- backward: the A gradients come from one GEMM [U_q U_k U_v]^T x, and the input gradient is one buffer, the
  thin term [U_q U_k U_v] [A_q; A_k; A_v] first, then the three base GEMMs accumulate into it.

transformers' attention code calls q_proj, k_proj and v_proj one after another on the same tensor. The group
installed on an attention module (`install_qkv_groups`) keeps that code: q_proj's forward computes all three
and hands k and v to the next k_proj and v_proj calls on the very same input tensor (same object, unchanged
version); any other call goes through the layer's own forward. `lora_qkv_reference` is the plain twin;
tests/kernels/test_lora_qkv.py (CPU) and tests/gpu/test_fast_kernels_gpu.py compare them.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.kernels.adapter_cache import half_concat, half_copy
from tunelab.kernels.lora_projection import (
    _compute_dtype,
    _eligible,
    backward_weight,
    forward_weight,
    lora_projection_reference,
)

NAMES = ("q_proj", "k_proj", "v_proj")
# attention blocks whose three projections are LoRA layers run them as one LoraQKV while this is on
FUSED_QKV_ENABLED = {"on": True}


def lora_qkv_reference(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    adapters: tuple[tuple[torch.Tensor, torch.Tensor], ...],
    scalings: tuple[float, ...],
) -> tuple[torch.Tensor, ...]:
    """peft's formula for each projection: base + scaled low-rank."""
    return tuple(
        lora_projection_reference(x, weight, a, b, scaling)
        for weight, (a, b), scaling in zip(weights, adapters, scalings, strict=True)
    )


class LoraQKV(torch.autograd.Function):
    """Three frozen base layers with LoRA adapters (A, B each) applied to one input, computed in x's dtype; returns
    their three outputs; gradients for x and the six adapter matrices (in their own dtypes)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bases: tuple[torch.nn.Module, ...],
        scalings: tuple[float, ...],
        *adapters: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        dtype = x.dtype
        flat = x.reshape(-1, x.shape[-1])
        lora_as, lora_bs = adapters[0::2], adapters[1::2]
        # half copies made once per optimizer step (kernels/adapter_cache.py); B with its scaling folded in
        a_cat, a_cat_t = half_concat(tuple(lora_as), dtype)
        halves = [half_copy(b, dtype, scaling) for b, scaling in zip(lora_bs, scalings, strict=True)]
        ranks = tuple(a.shape[0] for a in lora_as)
        low = flat @ a_cat_t  # tokens x (r_q + r_k + r_v)
        outputs, start = [], 0
        for base, (_, b_t), rank in zip(bases, halves, ranks, strict=True):
            bias = getattr(base, "bias", None)
            if bias is None:
                out = low[:, start : start + rank] @ b_t  # the thin term first; the base GEMM accumulates into it
                out.addmm_(flat, forward_weight(ctx, base, dtype).t())
            else:  # Qwen2's q / k / v: the biased base GEMM first, the thin term accumulated (LoraProjection's order)
                out = F.linear(flat, forward_weight(ctx, base, dtype), bias.to(dtype))
                out.addmm_(low[:, start : start + rank], b_t)
            outputs.append(out.view(*x.shape[:-1], out.shape[-1]))
            start += rank
        ctx.save_for_backward(x, low, a_cat, *(b for b, _ in halves))
        ctx.bases, ctx.scalings, ctx.ranks = bases, scalings, ranks
        ctx.adapter_dtypes = [t.dtype for t in adapters]
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, low, a_cat, *halves = ctx.saved_tensors
        dtype = low.dtype
        flat = x.reshape(-1, x.shape[-1])
        grads = [g.reshape(-1, g.shape[-1]).to(dtype) for g in grad_outputs]
        # dL/d(x A^T) per projection (the scaling inside the half B), side by side like the forward's products
        grad_low = torch.cat([grad @ b for grad, b in zip(grads, halves, strict=True)], dim=1)
        adapter_grads: list[torch.Tensor | None] = []
        grad_a_cat = grad_low.t() @ flat  # the three A gradients from one GEMM: x read once
        start = 0
        for index, (grad, rank, scaling) in enumerate(zip(grads, ctx.ranks, ctx.scalings, strict=True)):
            piece = slice(start, start + rank)
            adapter_grads.append(grad_a_cat[piece].to(ctx.adapter_dtypes[2 * index]))
            grad_b = (grad.t() @ low[:, piece]).mul_(scaling)
            adapter_grads.append(grad_b.to(ctx.adapter_dtypes[2 * index + 1]))
            start += rank
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_low @ a_cat  # the thin term first; the three base GEMMs accumulate into it
            for grad, base in zip(grads, ctx.bases, strict=True):
                grad_x.addmm_(grad, backward_weight(ctx, base, dtype))
            grad_x = grad_x.view(x.shape)
        return (grad_x, None, None, *adapter_grads)


def fused_lora_qkv(layers: tuple[Any, ...], hidden: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """LoraQKV for three peft LoRA layers reading `hidden` when LoraProjection could serve each exactly, with frozen
    base biases if any (Qwen2), in one compute dtype; None otherwise (the caller keeps the per-projection path)."""
    names, dtypes, adapters = [], set(), []
    for layer in layers:
        if not hasattr(layer, "lora_A") or not hasattr(layer, "get_base_layer"):
            return None
        name = _eligible(layer, hidden, (), {})
        bias = layer.get_base_layer().bias
        if name is None or (bias is not None and bias.requires_grad):
            return None
        base = layer.get_base_layer()
        quant_state = getattr(base.weight, "quant_state", None)
        lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
        weight_dtype = quant_state.dtype if quant_state is not None else base.weight.dtype
        dtypes.add(_compute_dtype(hidden, weight_dtype, lora_a.dtype))
        adapters += [lora_a, lora_b]
        names.append(name)
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    if dtype is None:
        return None
    bases = tuple(layer.get_base_layer() for layer in layers)
    scalings = tuple(float(layer.scaling[name]) for layer, name in zip(layers, names, strict=True))
    return LoraQKV.apply(hidden.to(dtype), bases, scalings, *adapters)


class _QKVGroup:
    """The three projection layers of one attention block, their own forwards, and the key and value computed by
    the last query call, waiting for the k_proj / v_proj calls on the same input."""

    def __init__(self, layers: tuple[Any, ...]) -> None:
        self.layers = layers
        # each layer's forward before grouping: an instance forward (LoraProjection's) or the class's
        self.previous = {
            name: layer.__dict__.get("forward") or types.MethodType(type(layer).forward, layer)
            for name, layer in zip(NAMES, layers, strict=True)
        }
        self.waiting: tuple[torch.Tensor, int, dict[str, torch.Tensor]] | None = None

    def take(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The output computed for `name` by the last query call, when `x` is that call's input, unchanged."""
        if self.waiting is None:
            return None
        source, version, outputs = self.waiting
        if x is not source or x._version != version or name not in outputs:
            return None
        out = outputs.pop(name)
        if not outputs:
            self.waiting = None
        return out


def _query_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    group: _QKVGroup = self._tunelab_qkv_group
    group.waiting = None  # a new attention call: whatever waited is not for it
    if FUSED_QKV_ENABLED["on"] and not args and not kwargs:
        fused = fused_lora_qkv(group.layers, x)
        if fused is not None:
            query, key, value = fused
            group.waiting = (x, x._version, {"k_proj": key, "v_proj": value})
            return query
    return group.previous["q_proj"](x, *args, **kwargs)


def _key_value_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    group: _QKVGroup = self._tunelab_qkv_group
    name = self._tunelab_qkv_name
    if not args and not kwargs:
        out = group.take(name, x)
        if out is not None:
            return out
    return group.previous[name](x, *args, **kwargs)


def install_qkv_groups(model: torch.nn.Module) -> int:
    """Group the q_proj / k_proj / v_proj LoRA layers of every attention block of `model` (after
    install_lora_projections); returns how many blocks. Calls it cannot serve go through each layer's own forward.
    Not for encoder-decoders or cross-attention, whose key and value read another tensor than the query (the
    grouped call would compute them for nothing)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return 0
    blocks = 0
    for module in model.modules():
        if getattr(module, "is_cross_attention", False):
            continue
        layers = tuple(getattr(module, name, None) for name in NAMES)
        if not all(hasattr(layer, "lora_A") and hasattr(layer, "get_base_layer") for layer in layers):
            continue
        if any(hasattr(layer, "_tunelab_qkv_group") for layer in layers):
            continue  # grouped already
        group = _QKVGroup(layers)
        for name, layer in zip(NAMES, layers, strict=True):
            layer._tunelab_qkv_group = group
            layer._tunelab_qkv_name = name
            forward = _query_forward if name == "q_proj" else _key_value_forward
            layer.forward = types.MethodType(forward, layer)
        blocks += 1
    return blocks
