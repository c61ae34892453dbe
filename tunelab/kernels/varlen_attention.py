"""Padding-free attention for packed rows (data.packing) on a GPU: PyTorch's variable-length flash attention.

A packed row holds several examples, each with position ids restarting at 0 (data/text.py:pack_examples). Under
SDPA transformers turns those restarts into a block-diagonal 4-D mask; with an explicit mask SDPA cannot use its
flash / cuDNN kernels, and the masked kernel still computes every (query, key) pair of the whole row, so a row of
eight 256-token examples costs the attention FLOPs of one 2,048-token sequence, eight times the useful work.

`varlen_attention_forward` (registered with transformers as the attention implementation "tunelab_varlen")
instead flattens the batch to (tokens, heads, dim), reads each example's boundaries from the position ids and runs
`torch.nn.attention.varlen.varlen_attn` (causal flash attention over each example separately): no FLOPs on other
examples or on padding. Everything else (eval mode, generation with a cache, rows that do not start at position
0, sliding windows, dropout, CPU tensors, a torch without varlen_attn) goes to transformers' own SDPA function,
with the mask SDPA would get: the implementation builds SDPA's masks.

`use_varlen_attention(model)` switches a model to it (train.fast_kernels with data.packing on CUDA). The GPU test
compares the packed loss and gradients with each example run alone (tests/gpu/test_varlen_attention_gpu.py).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import warnings
from typing import Any

import torch
import torch.nn.functional as F

NAME = "tunelab_varlen"


@functools.cache
def _varlen_function() -> tuple[Any, frozenset[str]] | None:
    """torch's varlen_attn and the keyword names its version takes, or None when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_available() -> bool:
    """Whether this torch has variable-length flash attention and a CUDA device to run it."""
    return _varlen_function() is not None and torch.cuda.is_available()


def sequence_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(cumulative offsets of the sequences in the flattened batch, int32; the longest length) where every
    position-id restart to 0 starts a sequence, or None when a row does not start at 0 (its tokens would join the
    previous row's last sequence). Read once per position-ids tensor (one GPU -> CPU copy): the model hands the
    same tensor to all its layers and to the checkpoint recompute; the result lives and dies with the tensor."""
    cached = getattr(position_ids, "_tunelab_varlen", False)
    if cached is not False:
        return cached
    rows, length = position_ids.shape[0], position_ids.shape[-1]
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    count = torch.tensor([rows * length], device=flat.device)
    offsets = torch.cat([starts, count]).to(torch.int32)
    # one transfer: the offsets decide both validity and the longest sequence
    host = offsets.cpu()
    lengths = host[1:] - host[:-1]
    row_starts = torch.arange(rows, dtype=torch.int32) * length
    valid = bool(torch.isin(row_starts, host[:-1]).all()) and int(lengths.min()) > 0
    result = (offsets, int(lengths.max())) if valid else None
    position_ids._tunelab_varlen = result
    return result


def _usable(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict, dropout: float) -> bool:
    return (
        module.training
        and query.is_cuda
        and query.dtype in (torch.bfloat16, torch.float16)
        and kwargs.get("position_ids") is not None
        and query.shape[2] == key.shape[2]  # no KV cache
        and dropout == 0.0
        and getattr(module, "is_causal", True)
        and kwargs.get("is_causal") is not False
        and getattr(module, "sliding_window", None) is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
        and _varlen_function() is not None
    )


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: queries [batch, heads, seq, dim], keys / values [batch, kv heads, seq,
    dim]; returns [batch, seq, heads, dim] (as SDPA's function does) and no weights."""
    boundaries = sequence_boundaries(kwargs["position_ids"]) if _usable(module, query, key, kwargs, dropout) else None
    if boundaries is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    offsets, longest = boundaries
    out = _varlen_core(query, key, value, offsets, longest, scaling)
    return out, None


def _varlen_core(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offsets: torch.Tensor,
    longest: int,
    scaling: float | None,
) -> torch.Tensor:
    """Causal attention of each sequence of the flattened batch: [batch, heads, seq, dim] in, [batch, seq, heads,
    dim] out. Adapts to the varlen_attn of this torch (causality, scale and grouped heads spelled per version)."""
    function, names = _varlen_function()
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * length, kv_heads, value.shape[-1])
    options: dict[str, Any] = {}
    if "window_size" in names:
        options["window_size"] = (-1, 0)  # causal
    else:
        options["is_causal"] = True
    default_scale = dim**-0.5
    if scaling is not None and abs(scaling - default_scale) > 1e-12 * default_scale:
        if "scale" in names:
            options["scale"] = scaling
        else:
            q = q * (scaling / default_scale)
    if kv_heads != heads:
        if "enable_gqa" in names:
            options["enable_gqa"] = True
        else:  # an older varlen_attn: every query head gets its own copy of its key / value head
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
    out = function(q, k, v, offsets, offsets, longest, longest, **options)
    return out.view(batch, length, heads, out.shape[-1])


@functools.cache
def self_check(device_index: int) -> str | None:
    """None when variable-length attention on this GPU equals SDPA run per sequence (outputs and gradients, bf16,
    relative error < 2e-2), else why not. Run once per process and device before a model is switched: torch
    versions spell varlen_attn differently, and a packed run must not find that out mid-training."""
    try:
        device = torch.device("cuda", device_index)
        generator = torch.Generator(device=device).manual_seed(0)
        lengths, heads, kv_heads, dim = [5, 70, 3, 50], 4, 2, 64
        total = sum(lengths)

        def rand(*shape: int) -> torch.Tensor:
            tensor = torch.randn(*shape, device=device, generator=generator, dtype=torch.float32)
            return tensor.to(torch.bfloat16).requires_grad_()

        q, k, v = rand(1, heads, total, dim), rand(1, kv_heads, total, dim), rand(1, kv_heads, total, dim)
        grad = torch.randn(1, total, heads, dim, device=device, generator=generator).to(torch.bfloat16)
        offsets = torch.tensor([0] + list(itertools.accumulate(lengths)), device=device, dtype=torch.int32)
        out = _varlen_core(q, k, v, offsets, max(lengths), None)
        got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
        pieces = []
        for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
            kk = k[:, :, start:stop].repeat_interleave(heads // kv_heads, dim=1)
            vv = v[:, :, start:stop].repeat_interleave(heads // kv_heads, dim=1)
            pieces.append(F.scaled_dot_product_attention(q[:, :, start:stop], kk, vv, is_causal=True))
        reference = torch.cat(pieces, dim=2).transpose(1, 2)
        want = [reference, *torch.autograd.grad(reference, (q, k, v), grad)]
        for name, mine, theirs in zip(("output", "dq", "dk", "dv"), got, want, strict=True):
            error = float((mine.float() - theirs.float()).norm() / theirs.float().norm())
            if not error < 2e-2:
                return f"{name} differs from SDPA by {error:.1e}"
    except Exception as error:  # noqa: BLE001 - any failure means: keep SDPA
        return f"{type(error).__name__}: {error}"[:300]
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the fallback gets exactly SDPA's masks


def use_varlen_attention(model: torch.nn.Module) -> bool:
    """Switch a model whose text layers use SDPA to "tunelab_varlen" (its config and sub-configs); returns whether
    it changed. Other implementations (eager, flash attention, flex) are left as the user chose them. On a GPU
    the kernel is first checked against SDPA (self_check); if it fails, the model keeps SDPA with a warning."""
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.is_cuda:
        problem = self_check(parameter.device.index or 0)
        if problem is not None:
            warnings.warn(
                f"data.packing: variable-length attention is not usable here ({problem}); packed rows keep SDPA "
                "with a block-diagonal mask (correct, but attention spends FLOPs across examples).",
                stacklevel=2,
            )
            return False
    _register()
    changed = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = NAME
            changed = True
    return changed
