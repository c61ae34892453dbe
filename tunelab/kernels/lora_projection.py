"""A LoRA projection `x W^T + b + s (x A^T) B^T` as one autograd function, for peft's LoRA layers on a GPU.

peft computes the low-rank path as separate modules: `lora_B(lora_A(x)) * scaling`, then `result + that`. Each of
those is a pass over the full output activations (tokens x out_features) in forward, the scaling and the add again
in backward, and under autocast peft first copies the input to the adapter's fp32 and autocast copies it back. For
the MLP projections of a 1B model at 8k tokens a step that is ~128 MiB per pass, per layer, three times a step
(forward, checkpoint recompute, backward).

`LoraProjection` writes the thin low-rank product `(x A^T)(s B)^T` first and lets the base GEMM accumulate into
it (`addmm_` with beta 1: cuBLAS reads the output in its epilogue, overlapped with the GEMM, instead of a separate
pass; the 2026-12-07 H100 profile in BENCHMARKS.md had the separate `addmm_` passes at ~11% of a 1B LoRA step),
and its backward computes the input gradient `(dY sB) A + dY W` the same way. It saves only what peft's modules
save (the input and the rank-r intermediate), never the dequantized weight of a 4-bit layer: that is dequantized
again in backward, as bitsandbytes does.

`lora_projection_reference` is the plain PyTorch twin (peft's own formula). tests/kernels/test_lora_projection.py
compares them on the CPU (fp32) and tests/gpu/test_fast_kernels_gpu.py on CUDA (bf16).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import functools
import types
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.kernels.adapter_cache import half_copy

# Order of the two products: the thin low-rank term first and the base GEMM accumulating into it (True), or the
# base GEMM first and the thin term added by a second addmm_ (False, the 2026-12-07 measured path). A switch only
# so benchmarks/lora_kernels_micro.py can time both on the same GPU.
THIN_TERM_FIRST = True


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
        weight = dequantize_nf4(weight.data, quant_state)
    return weight if weight.dtype == dtype else weight.to(dtype)


# Inside dense_kept_for_backward(): a 4-bit weight dequantized in a fused LoRA function's forward is kept on its
# autograd context for its backward (one dequantization less per weight). For a checkpoint recompute whose
# backward follows at once (kernels/graphed_layers.py records both as one CUDA graph): the layer's dense weights,
# bar the down projection that recompute skips, live from the recompute to their backward (~304 MiB on an 8B
# layer, ~88 MiB on a 1B one) and ~5 ms of dequantization a step is saved on an 8B QLoRA model (train.keep_dequantized
# decides). Never around an ordinary forward: its autograd graph lives until backward, so every layer's weights
# would stay dense.
_KEEP_DENSE = [0]
KEEP_DENSE_ENABLED = {"on": True}  # a switch for benchmarks/llm_sft.py's A/B toggle (keep_dense=0)


@contextlib.contextmanager
def dense_kept_for_backward() -> Iterator[None]:
    """Inside: fused LoRA functions keep each dequantized 4-bit weight from forward for backward (see above)."""
    _KEEP_DENSE[0] += 1
    try:
        yield
    finally:
        _KEEP_DENSE[0] -= 1


def forward_weight(ctx: Any, base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """dense_weight for a forward; inside dense_kept_for_backward a dequantized copy is also kept on `ctx`."""
    weight = dense_weight(base, dtype)
    if _KEEP_DENSE[0] and KEEP_DENSE_ENABLED["on"] and getattr(base.weight, "quant_state", None) is not None:
        if not hasattr(ctx, "kept_weights"):
            ctx.kept_weights = {}
        ctx.kept_weights[id(base)] = weight
    return weight


def backward_weight(ctx: Any, base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight forward kept on `ctx` (handed over: the context holds it no longer), else dense_weight."""
    kept = getattr(ctx, "kept_weights", None)
    weight = kept.pop(id(base), None) if kept else None
    if weight is not None and weight.dtype == dtype:
        return weight
    return dense_weight(base, dtype)


def dequantize_nf4(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """bitsandbytes.functional.dequantize_4bit(packed, quant_state): the same CUDA kernels, launched directly.

    bitsandbytes reaches its kernels through its Python wrapper, a registered torch op and a Python kernel that
    switches the CUDA device each call; for every projection three times a step (forward, recompute, backward)
    that made a 1B QLoRA step wait on the CPU (H100 profile: ~130 us of CPU per dequantization, GPU idle 25% of
    the step). Here the library's two C functions are called as its own CUDA backend calls them. Anything
    unusual (another device than the current one, a quantization layout it does not expect, a bitsandbytes
    without these functions) goes through bitsandbytes' own function; tests/gpu checks both are bit-identical.
    Where Triton is available and the layout is the usual NF4 one, kernels/nf4_triton.py does all of it in one
    launch instead of three (the same bits)."""
    if TRITON_DEQUANT["on"] and packed.is_cuda:
        triton_kernels = _nf4_triton()
        if triton_kernels is not None and triton_kernels.supported(packed, quant_state):
            try:
                return triton_kernels.dequantize(packed, quant_state)
            except Exception as error:  # noqa: BLE001 - a Triton that cannot build the kernel: bitsandbytes' kernels
                TRITON_DEQUANT["on"] = False
                message = f"NF4 dequantization: the Triton kernel failed ({error}); using bitsandbytes' kernels"
                warnings.warn(message, stacklevel=2)
    lib = _bnb_library()
    nested = quant_state.nested
    state2 = quant_state.state2 if nested else None
    usual = (
        lib is not None
        and packed.is_cuda
        and packed.device.index == torch.cuda.current_device()
        and quant_state.quant_type in ("nf4", "fp4")
        and quant_state.dtype in _DEQUANT_NAMES
        and quant_state.absmax.is_contiguous()
        and (nested or quant_state.absmax.dtype == torch.float32)
        and packed.is_contiguous()
    )
    if usual and nested:
        usual = not state2.nested and state2.dtype == state2.absmax.dtype == torch.float32
        usual = usual and state2.code.device == packed.device
    if not usual:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(packed, quant_state)
    stream = ct.c_void_p(torch._C._cuda_getCurrentRawStream(packed.device.index))
    absmax = quant_state.absmax
    if nested:  # double quantization: the block scales are themselves 8-bit blockwise-quantized
        scales = torch.empty(absmax.shape, dtype=torch.float32, device=packed.device)
        lib.cdequantize_blockwise_fp32(
            _ptr(state2.code), _ptr(absmax), _ptr(state2.absmax), _ptr(scales),
            ct.c_int32(state2.blocksize), ct.c_int32(absmax.numel()), stream,
        )  # fmt: skip
        scales += quant_state.offset
        absmax = scales
    out = torch.empty(quant_state.shape, dtype=quant_state.dtype, device=packed.device)
    function = getattr(lib, f"cdequantize_blockwise_{_DEQUANT_NAMES[quant_state.dtype]}_{quant_state.quant_type}")
    function(
        None, _ptr(packed), _ptr(absmax), _ptr(out), ct.c_int32(quant_state.blocksize), ct.c_int32(out.numel()), stream
    )
    return out


TRITON_DEQUANT = {"on": True}  # a switch so benchmarks can time bitsandbytes' kernels against the Triton one


@functools.cache
def _nf4_triton() -> Any:
    try:
        from tunelab.kernels import nf4_triton
    except ImportError:  # no Triton: bitsandbytes' kernels
        return None
    return nf4_triton


def dequantize_nf4_reference(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """The plain PyTorch twin of the NF4 dequantization (bitsandbytes' formula and order of operations): each
    byte holds two codes (high nibble first); value = code[nibble] * scale of its block of `blocksize` values;
    with double quantization the scale is code2[q] * absmax2[q's block of state2.blocksize] + offset (fp32)."""
    absmax = quant_state.absmax
    if quant_state.nested:
        state2 = quant_state.state2
        blocks = torch.arange(absmax.numel(), device=absmax.device) // state2.blocksize
        absmax = (state2.code[absmax.long()] * state2.absmax[blocks]) + quant_state.offset
    codes = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], dim=1).reshape(-1).long()
    values = quant_state.code[codes].reshape(-1, quant_state.blocksize) * absmax.reshape(-1, 1)
    return values.to(quant_state.dtype).reshape(quant_state.shape)


_DEQUANT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _ptr(tensor: torch.Tensor) -> ct.c_void_p:
    return ct.c_void_p(tensor.data_ptr())


@functools.cache
def _bnb_library() -> Any:
    """bitsandbytes' native CUDA library when it has the dequantization functions used here, else None."""
    try:
        from bitsandbytes.cextension import lib
    except Exception:  # noqa: BLE001 - not installed, or no CUDA build: bitsandbytes' own path decides
        return None
    names = ["cdequantize_blockwise_fp32"]
    names += [f"cdequantize_blockwise_{d}_{q}" for d in _DEQUANT_NAMES.values() for q in ("nf4", "fp4")]
    raw = getattr(lib, "_lib", None)  # the ctypes CDLL (its wrapper answers any name, failing only when called)
    if not getattr(lib, "compiled_with_cuda", False) or raw is None:
        return None
    if any(getattr(raw, name, None) is None for name in names):
        return None
    return lib


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
        weight = forward_weight(ctx, base, dtype)
        # half copies made once per optimizer step (kernels/adapter_cache.py); the scaling folded into B
        a, a_t = half_copy(lora_a, dtype)
        b, b_t = half_copy(lora_b, dtype, scaling)
        flat = x.reshape(-1, x.shape[-1])
        low = flat @ a_t  # tokens x r
        if bias is None and THIN_TERM_FIRST:
            # the thin product first, then the base GEMM accumulates into it: cuBLAS reads it in the GEMM's
            # epilogue instead of a separate pass over the output (peft: three passes)
            out = low @ b_t
            out.addmm_(flat, weight.t())
        else:
            out = F.linear(flat, weight, bias)
            out.addmm_(low, b_t)
        ctx.save_for_backward(x, low, a, b)
        ctx.base, ctx.scaling, ctx.adapter_dtypes = base, scaling, (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, low, a, b = ctx.saved_tensors
        scaling = ctx.scaling
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        flat = x.reshape(-1, x.shape[-1])
        grad_low = grad @ b  # tokens x r: dL/d(x A^T) (b holds the scaling)
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[3]:
            grad_b = (grad.t() @ low).mul_(scaling).to(ctx.adapter_dtypes[1])
        if ctx.needs_input_grad[2]:
            grad_a = (grad_low.t() @ flat).to(ctx.adapter_dtypes[0])
        if ctx.needs_input_grad[0] and THIN_TERM_FIRST:
            grad_x = grad_low @ a  # thin term first, the base GEMM accumulates into it (as in forward)
            grad_x.addmm_(grad, backward_weight(ctx, ctx.base, grad.dtype))
            grad_x = grad_x.view(x.shape)
        elif ctx.needs_input_grad[0]:
            grad_x = grad @ backward_weight(ctx, ctx.base, grad.dtype)
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
    if quantized and x.numel() == x.shape[-1]:
        # one token (generation's decode step): bitsandbytes' 4-bit GEMV beats dequantizing the whole weight.
        # Not `no_grad` as such: a checkpointed layer's forward runs under no_grad and must take the fused path
        # (it fell back to peft's per-projection path there: +13% GPU time a 1B QLoRA step, H100 profile)
        return None
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
