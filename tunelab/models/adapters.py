"""Fine-tuning methods applied to a loaded model: peft adapters (LoRA, QLoRA, DoRA, prefix, prompt, IA3),
full fine-tuning, or freezing all but the last N blocks."""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from tunelab.config import MethodConfig
from tunelab.errors import UserError

PEFT_KINDS = ("lora", "qlora", "dora", "prefix", "prompt", "ia3")


def is_peft(kind: str) -> bool:
    """Whether the method is a peft adapter (saved adapter-only)."""
    return kind in PEFT_KINDS


def apply_method(
    model: torch.nn.Module,
    method: MethodConfig,
    gradient_checkpointing: bool,
    trainable_token_indices: list[int] | None = None,
    keep_half: bool = False,
) -> torch.nn.Module:
    """Make only the method's parameters trainable and return the model to train (a PeftModel for adapters).

    `trainable_token_indices`: embedding rows trained beside a LoRA / QLoRA / DoRA adapter and saved with it (rows
    of tokens added to the tokenizer); peft keeps a tied output head in step.
    `keep_half` (QLoRA, the bf16 fast path): skip peft's prepare_model_for_kbit_training, which upcasts every
    non-quantized weight (norms, embeddings, head) to fp32; the rest of its preparation is the LoRA branch's."""
    if method.kind == "qlora" and not keep_half:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        # transformers 5.2x renamed the method; older releases (the GPU machine's 5.17) only have the old name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if is_peft(method.kind):  # frozen embeddings: make their output require grad so checkpointed blocks backprop
            model.enable_input_require_grads()
    if method.kind == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if method.kind == "freeze":
        return _freeze_all_but_last(model, method.freeze_keep_last)
    from peft import get_peft_model

    return get_peft_model(model, peft_config(model, method, trainable_token_indices))


def peft_config(model: torch.nn.Module, method: MethodConfig, trainable_token_indices: list[int] | None = None) -> Any:
    """The peft config for the method; `target: all-linear` resolves per architecture inside peft. The task type
    follows the model: SEQ_2_SEQ_LM for encoder-decoders (BART, T5), CAUSAL_LM otherwise."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    target = method.target
    task_type = TaskType.SEQ_2_SEQ_LM if getattr(model.config, "is_encoder_decoder", False) else TaskType.CAUSAL_LM
    if method.kind in ("lora", "qlora", "dora"):
        extra = {"trainable_token_indices": list(trainable_token_indices)} if trainable_token_indices else {}
        return LoraConfig(
            task_type=task_type,
            r=method.r,
            lora_alpha=method.alpha,
            lora_dropout=method.dropout,
            target_modules=_targets(model, target),
            use_dora=method.kind == "dora",
            bias="none",
            **extra,
        )
    if method.kind == "ia3":
        modules = _targets(model, target)
        feedforward = _feedforward_names(model, modules)
        return IA3Config(task_type=task_type, target_modules=modules, feedforward_modules=feedforward)
    if method.kind == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=method.num_virtual_tokens)
    return PromptTuningConfig(task_type=task_type, num_virtual_tokens=method.num_virtual_tokens)


def _targets(model: torch.nn.Module, target: str | list[str]) -> str | list[str]:
    if target == "all-linear":
        return "all-linear"
    names = [target] if isinstance(target, str) else list(target)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [name for name in names if name not in present]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(
            f"method.target names '{missing[0]}', which this model does not have. Its linear layers: "
            f"{', '.join(linear)}; or use target: all-linear."
        )
    return names


def _feedforward_names(model: torch.nn.Module, targets: str | list[str]) -> list[str]:
    """IA3 scales the input of feed-forward projections; pick the down-projection-like names."""
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if targets != "all-linear":
        linear &= set(targets)
    return sorted(name for name in linear if re.search(r"down|fc2|c_proj|w2|dense_4h", name))


def _freeze_all_but_last(model: torch.nn.Module, keep_last: int) -> torch.nn.Module:
    """Train only the last `keep_last` decoder blocks, the final norm and the output head (seed 003: 7B models
    with the last 2-3 layers unfrozen)."""
    blocks = _decoder_blocks(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for block in blocks[len(blocks) - keep_last :] if keep_last else []:
        for parameter in block.parameters():
            parameter.requires_grad_(True)
    head = model.get_output_embeddings()
    if head is not None:
        head.weight.requires_grad_(True)
    for name, module in model.named_modules():
        if name.endswith(("model.norm", "final_layernorm", "ln_f")):
            for parameter in module.parameters():
                parameter.requires_grad_(True)
    return model


def _decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    best: torch.nn.ModuleList | None = None
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise UserError("method.kind freeze: could not find the decoder blocks of this model; use lora or full.")
    return list(best)


def trainable_summary(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting shared tensors once."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if hasattr(parameter, "quant_state") or parameter.dtype == torch.uint8:
            # packed 4-bit: two values a byte, whatever the storage dtype (QLoRA stores them in bf16 / fp16)
            count = parameter.numel() * parameter.element_size() * 2
        total += count
        trainable += count if parameter.requires_grad else 0
    return trainable, total


_UNCAST_LAYERS: weakref.WeakKeyDictionary[torch.nn.Module, list[torch.nn.Module]] = weakref.WeakKeyDictionary()


@contextmanager
def lora_inputs_uncast(model: torch.nn.Module, active: bool = True) -> Iterator[None]:
    """Within an autocast to the frozen weights' half dtype, let LoRA layers take their input as it comes.

    peft casts each LoRA layer's input to its adapter's dtype (fp32 for trained adapters) before the low-rank
    matmuls, and autocast then casts it back to bf16 / fp16 for them: two full copies of the activations per
    projection, forward and backward, for the same numbers (bf16 -> fp32 -> bf16 is exact). Inactive without
    autocast, where the cast is what makes the dtypes match; DoRA layers keep it (their norms mix dtypes). For
    forwards without autograd: a checkpointed block recomputed during backward runs outside this context."""
    if not active:
        yield
        return
    layers = _UNCAST_LAYERS.get(model)
    if layers is None:  # found once per model: a walk over thousands of modules every forward adds up
        from peft.tuners.lora import LoraLayer

        layers = [
            m for m in model.modules() if isinstance(m, LoraLayer) and not any(getattr(m, "use_dora", {}).values())
        ]
        _UNCAST_LAYERS[model] = layers
    before = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, value in zip(layers, before, strict=True):
            layer.cast_input_dtype_enabled = value
