"""The causal-LM training loss without the full logits tensor: run the decoder body for the hidden states, keep
the target positions (labels != -100) and hand them with the output head's weight to the fused linear
cross-entropy (kernels/linear_cross_entropy.py).

Works for a plain transformers causal LM and for a peft model around one whose adapters sit inside the decoder
(LoRA, QLoRA, DoRA, IA3). `decoder_and_head` returns None where the shortcut would compute something else than
`model(...).logits` (prompt / prefix tuning prepend virtual tokens; heads that scale or soft-cap the logits; an
adapter or token wrapper on the head; a model wrapped for several processes, whose wrapper must see the
forward); the caller then keeps the plain path (`lm_loss_sum_reference`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.kernels.linear_cross_entropy import IGNORE_INDEX, Impl, fused_linear_cross_entropy

# Architectures whose CausalLM forward is exactly `lm_head(decoder(...).last_hidden_state)` in transformers 5
# (read from their modeling files); others (Gemma 2/3 soft-capping, Cohere and Granite logit scales, MoE routers
# adding an auxiliary loss) keep the plain path.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo", "olmo2", "smollm3"})
# Config attributes that change the logits after the head in some architectures; any set value disables the shortcut.
LOGIT_CHANGING_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_router_logits")
NOT_MODEL_INPUTS = ("labels", "real_tokens")


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder body, output head) of a causal LM whose logits are `head(body(...).last_hidden_state)`, or None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return None  # DDP / FSDP / DeepSpeed hooks run in the wrapper's forward; skipping it breaks their sync
    base = model
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        if getattr(model, "active_peft_config", None) is None or model.active_peft_config.is_prompt_learning:
            return None
        base = model.get_base_model()
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if any(getattr(config, name, None) not in (None, False) for name in LOGIT_CHANGING_ATTRS):
        return None
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(body, torch.nn.Module) or type(head) is not torch.nn.Linear:
        return None
    return body, head


def fused_loss_enabled(setting: bool | str, device: torch.device) -> bool:
    """train.fused_loss resolved on `device`: auto is on for CUDA (where the logits dominate memory and the chunked
    head is faster) and off elsewhere, so CPU runs keep the plain path and their exact numbers."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def lm_loss_sum_reference(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the target positions from the full logits, in fp32 (the plain path)."""
    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key not in NOT_MODEL_INPUTS}
    # use_cache=False: with a KV cache, transformers would ignore the packed position_ids boundaries
    logits = model(**inputs, use_cache=False).logits
    logits = logits[:, -labels.shape[1] :]  # prompt tuning prepends virtual-token positions to the logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def lm_loss_sum_fused(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    parts: tuple[torch.nn.Module, torch.nn.Linear] | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """lm_loss_sum_reference's value and gradients with the head's logits made only for target positions, a chunk
    at a time. Falls back to the reference where decoder_and_head finds no plain head."""
    parts = parts or decoder_and_head(model)
    if parts is None:
        return lm_loss_sum_reference(model, batch)
    body, head = parts
    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key not in NOT_MODEL_INPUTS}
    hidden = body(**inputs, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if not int(keep.sum()):  # nothing to learn in this micro-batch: a zero that still reaches the adapters
        return hidden.float().sum() * 0.0
    # boolean indexing copies only the target rows (about half the tokens in chat SFT); its backward scatters
    return fused_linear_cross_entropy(hidden[:, :-1][keep], head.weight, targets[keep], head.bias, impl=impl)
