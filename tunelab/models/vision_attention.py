"""One attention call per run of equal-length windows in Qwen2-VL / Qwen2.5-VL vision towers.

Without flash-attention, transformers' Qwen2-VL and Qwen2.5-VL vision attention splits the patch sequence at
`cu_seqlens` and calls attention once per piece: per image in Qwen2-VL, per 112-pixel window in Qwen2.5-VL. A batch
of 32 images at 448 px is 16 windows an image, so 28 windowed layers make about 14,500 small SDPA calls per forward;
measured on an H100 that loop, bound by kernel launches, took 0.69 s of a 0.85 s scoring forward. Here pieces of
equal length that follow each other (every window of an image whose grid the window size divides, every image of
one size) are stacked into one batched SDPA call. The arithmetic is the same attention over the same pieces;
tests/mcqa/test_vision_attention.py checks outputs and gradients against transformers' own loop.

Installed per module instance (never on the class) and only where the tower uses SDPA; flash-attention already
takes `cu_seqlens` in one call, and eager stays transformers' reference.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
import torch.nn.functional as F

# the attention modules whose forward this one reproduces (transformers 5.x: same code in both)
MODULES = {
    "transformers.models.qwen2_vl.modeling_qwen2_vl": "VisionAttention",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl": "Qwen2_5_VLVisionAttention",
}


def piece_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    """The lengths of the pieces that `cu_seqlens` (cumulative offsets, starting at 0) cuts, read once per tensor.

    The tower hands the same two tensors (windows, whole images) to all its layers, so keeping the lengths on the
    tensor spares the other layers a GPU -> CPU sync each; a sync stops the CPU from queueing the next layers'
    kernels while the GPU works. The lengths live and die with the tensor."""
    lengths = getattr(cu_seqlens, "_tunelab_piece_lengths", None)
    if lengths is None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        cu_seqlens._tunelab_piece_lengths = lengths
    return lengths


def grouped_forward(
    self: Any,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The vision attention forward of transformers' Qwen2-VL family with its per-piece loop batched: qkv, vision
    rotary embedding, attention within each piece of `cu_seqlens`, output projection."""
    # the fused twin where tunelab.models.fused_inference installed it (GPU scoring), else transformers' own
    rotary = getattr(self, "tunelab_rotary", None) or sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    seq = hidden_states.shape[0]
    query, key, value = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    query, key = rotary(query, key, cos, sin)  # [seq, heads, head_dim]
    lengths = piece_lengths(cu_seqlens)
    outputs, start, index = [], 0, 0
    while index < len(lengths):
        length, count = lengths[index], 1
        while index + count < len(lengths) and lengths[index + count] == length:
            count += 1
        end = start + count * length
        if length:

            def pieces(tensor: torch.Tensor, n: int = count, size: int = length, a: int = start, b: int = end):
                return tensor[a:b].reshape(n, size, *tensor.shape[1:]).transpose(1, 2)  # [n, heads, size, dim]

            attended = F.scaled_dot_product_attention(
                pieces(query),
                pieces(key),
                pieces(value),
                dropout_p=self.attention_dropout if self.training else 0.0,
                scale=self.scaling,
            )
            outputs.append(attended.transpose(1, 2).reshape(end - start, -1))
        start, index = end, index + count
    return self.proj(torch.cat(outputs, dim=0))


def install_grouped_window_attention(model: torch.nn.Module) -> int:
    """Give every Qwen2-VL / Qwen2.5-VL vision attention module of `model` that runs SDPA the grouped forward;
    returns how many were changed (0 for other families)."""
    changed = 0
    for module in model.modules():
        cls = type(module)
        if MODULES.get(cls.__module__) != cls.__name__:
            continue
        if getattr(module.config, "_attn_implementation", None) != "sdpa":
            continue
        if not hasattr(sys.modules[cls.__module__], "apply_rotary_pos_emb_vision"):
            continue
        module.forward = types.MethodType(grouped_forward, module)
        changed += 1
    return changed
