"""The GPU fast path of LoRA / QLoRA training for decoder LMs (train.fast_kernels), put together.

- kernels/lora_projection.py: every LoRA projection as one autograd function, the low-rank product added inside
  the base GEMM (pure PyTorch; works on any device, on by default only with CUDA);
- kernels/lora_qkv.py: an attention block's query, key and value LoRA projections as one function (their input
  read once for the three low-rank products, one input-gradient buffer); pure PyTorch like the projections;
- kernels/fast_blocks.py: liger-kernel's RMSNorm, SwiGLU and rotary kernels (CUDA, Llama-family models);
- kernels/varlen_attention.py: with data.packing, each packed example attends through variable-length flash
  attention (no FLOPs across examples or on padding);
- kernels/graphed_layers.py: each checkpointed layer replayed as CUDA graphs (train.cuda_graphs), the recompute
  without the down projection's output;
- QLoRA keeps the norms and embeddings in bf16 (peft's prepare_model_for_kbit_training upcasts them to fp32,
  which doubles the embedding and head memory and makes every head product cast the weight back to bf16).

The fused cross-entropy (train.fused_loss, kernels/causal_lm_loss.py) is separate and on by default with CUDA.
"""

from __future__ import annotations

import torch

from tunelab.config import RunConfig
from tunelab.kernels.fast_blocks import install_fast_blocks
from tunelab.kernels.graphed_layers import install_layer_graphs
from tunelab.kernels.host_embedding import MIN_BYTES, offload_input_embedding, why_not_offloadable
from tunelab.kernels.lora_projection import install_lora_projections
from tunelab.kernels.lora_qkv import install_qkv_groups
from tunelab.kernels.offload import offload_checkpoints
from tunelab.kernels.varlen_attention import use_varlen_attention, varlen_available


def fast_kernels_enabled(config: RunConfig, device: torch.device) -> bool:
    """train.fast_kernels resolved: auto is on with CUDA for one process or DDP; true forces it (the CPU then
    gets only the LoRA projections); false keeps transformers' and peft's code everywhere."""
    setting = config.train.fast_kernels
    if setting == "auto":
        return device.type == "cuda" and config.train.distributed == "ddp"
    return bool(setting)


def keep_half_norms(config: RunConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether QLoRA should keep non-quantized weights in bf16 (fast path on, bf16 compute)."""
    return config.method.kind == "qlora" and dtype == torch.bfloat16 and fast_kernels_enabled(config, device)


def apply_fast_kernels(model: torch.nn.Module, config: RunConfig, device: torch.device) -> dict[str, int]:
    """Install the fast path on `model` (on its device) when enabled; returns how many modules of each kind
    changed (empty when off)."""
    if not fast_kernels_enabled(config, device):
        return {}
    counts = {"lora_projection": install_lora_projections(model), "lora_qkv": install_qkv_groups(model)}
    if device.type == "cuda":
        counts.update(install_fast_blocks(model))
        # packed rows: variable-length flash attention per example instead of SDPA over a block-diagonal mask
        if config.data.packing and varlen_available():
            counts["varlen_attention"] = int(use_varlen_attention(model))
        if config.train.cuda_graphs and not counts.get("varlen_attention"):
            # varlen attention reads the example boundaries on the CPU each step: nothing to replay
            recorder = install_layer_graphs(model, require_headroom=config.train.cuda_graphs == "auto")
            counts["layer_graphs"] = recorder.layers if recorder is not None else 0
    return counts


def apply_checkpoint_offload(model: torch.nn.Module, config: RunConfig, device: torch.device) -> int:
    """model.offload_checkpoints: move the checkpointed layers' inputs to CPU memory (CUDA, checkpointing on);
    returns how many layers. auto: decoder-only models, one process or ddp."""
    setting = config.model.offload_checkpoints
    if device.type != "cuda" or not setting:
        return 0
    if setting == "auto":
        encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        if encoder_decoder or config.train.distributed != "ddp":
            return 0
    return offload_checkpoints(model)


def apply_embedding_offload(model: torch.nn.Module, config: RunConfig, device: torch.device) -> int:
    """model.offload_embedding: keep a frozen, untied input embedding in pinned CPU memory (kernels/host_embedding.py);
    returns the bytes of GPU memory freed. auto: CUDA, one process; true insists (and says why it cannot)."""
    from tunelab.errors import UserError
    from tunelab.train.distributed import process_count

    setting = config.model.offload_embedding
    if device.type != "cuda" or not setting:
        return 0
    if process_count() > 1:
        if setting is True:
            raise UserError(
                "model.offload_embedding: true needs one process (DDP, FSDP and DeepSpeed keep every parameter on "
                "the GPUs); set it to auto or false."
            )
        return 0
    min_bytes = 0 if setting is True else MIN_BYTES  # true: whatever the size
    if setting is True and (reason := why_not_offloadable(model, min_bytes)) is not None:
        raise UserError(f"model.offload_embedding: true, but {reason}; set it to auto or false.")
    return offload_input_embedding(model, min_bytes)


def apply_keep_dequantized(model: torch.nn.Module, config: RunConfig, embedding_bytes_freed: int) -> bool:
    """train.keep_dequantized: whether the layer graphs' recompute keeps dequantized 4-bit weights for the backward
    (kernels/lora_projection.py); auto: when the input embedding moved to CPU memory. Returns the setting in force."""
    recorder = getattr(model, "_tunelab_layer_recorder", None)
    setting = config.train.keep_dequantized
    keep = embedding_bytes_freed > 0 if setting == "auto" else bool(setting)
    if recorder is not None:
        recorder.keep_dense = keep
    return keep and recorder is not None
