"""Vision-language models for mcqa: AutoModelForImageTextToText + AutoProcessor from a hub id, a local folder or an
embedded name, the processor's image size, and the parts of the model (vision encoder, projector, language model)
with what trains in each and at which learning rate (seed 004's component strategy).

The parts are found by module name, which every image-text-to-text family in transformers spells one of a few
ways: Qwen2-VL / Qwen2.5-VL `visual` with its `merger`, LLaVA-style `vision_tower` + `multi_modal_projector`,
Idefics3 / SmolVLM `vision_model` + `connector`. Everything else (decoder, embeddings, head) is the language model.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from tunelab.config import MethodConfig, ModelConfig, TrainPartsConfig
from tunelab.errors import UserError
from tunelab.models.fused_inference import install_fused_inference
from tunelab.models.vision_attention import install_grouped_window_attention

VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "merger", "connector", "mm_projector")
PARTS = ("vision", "projector", "language")
VLM_METHODS = ("lora", "qlora", "dora", "full")


def part_of(name: str) -> str:
    """'vision', 'projector' or 'language' for a parameter or module name (the projector may sit inside the vision
    encoder, as Qwen2-VL's visual.merger, so it is looked for first)."""
    pieces = name.split(".")
    if any(piece in PROJECTOR_NAMES for piece in pieces):
        return "projector"
    if any(piece in VISION_NAMES for piece in pieces):
        return "vision"
    return "language"


def part_roots(model: torch.nn.Module) -> dict[str, list[str]]:
    """The outermost module names of the vision encoder and the projector (e.g. model.visual, model.visual.merger)."""
    roots: dict[str, list[str]] = {"vision": [], "projector": []}
    for name, _ in model.named_modules():
        part = part_of(name) if name else "language"
        if part == "language":
            continue
        leaf = name.split(".")[-1]
        if leaf in (PROJECTOR_NAMES if part == "projector" else VISION_NAMES):
            if not any(name.startswith(root + ".") for root in roots[part]):
                roots[part].append(name)
    return roots


# ----------------------------------------------------------------------------------------------- loading


def resolve_vlm_path(name: str, log: Any = None) -> str:
    """Embedded VLM names become their assembled cache folder; hub ids and folders pass through."""
    from tunelab.models import embedded_vlm

    if embedded_vlm.is_embedded(name) and not Path(name).is_dir():
        return str(embedded_vlm.embedded_vlm_dir(name, log=log))
    return name


def load_processor(config: ModelConfig, path: str | None = None, apply_size: bool = True) -> Any:
    """AutoProcessor with model.image_size applied (min = max pixels = image_size^2 where the processor has them);
    apply_size False for a run's saved processor, which already has it."""
    from transformers import AutoProcessor

    from tunelab.models.load import check_model_source

    path = path or resolve_vlm_path(config.name)
    if apply_size:  # a run's saved processor sits beside an adapter, which check_model_source rightly refuses
        check_model_source(path)
    try:
        processor = AutoProcessor.from_pretrained(
            path, trust_remote_code=config.trust_remote_code, revision=config.revision
        )
    except (OSError, ValueError, TypeError) as error:
        raise UserError(
            f"Could not load a processor (image processor + tokenizer) from '{config.name}': "
            f"{str(error).strip().rstrip('.')}. mcqa needs an image-text-to-text model folder with its processor "
            "files (preprocessor_config.json, tokenizer files), a reachable hub id, or the embedded "
            "'llava-mobilenetv2-smollm2'."
        ) from None
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise UserError(
            f"'{config.name}' has a {type(processor).__name__}, not a vision-language processor (image processor + "
            "tokenizer). mcqa needs an image-text-to-text model such as Qwen2.5-VL or a LLaVA-style model."
        )
    if config.image_size and apply_size:
        set_image_size(processor, config.image_size, config.name)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None:  # only fills masked positions; eos is safe because the loss never reads it
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # every row ends at the answer position, so one logits_to_keep serves all
    return processor


def set_image_size(processor: Any, size: int, model_name: str) -> None:
    """Resize images to about size x size pixels: Qwen2-VL-style processors through min / max pixels (the seed's
    IMAGE_SIZE 384 -> 448), size-free CNN encoders (the embedded model) through resize and crop sizes."""
    images = processor.image_processor
    pixels = size * size
    # Qwen2-VL-style: a pixel budget (min_pixels / max_pixels; transformers 5 keeps it as size's shortest_edge /
    # longest_edge, in pixels) and a merge size
    if hasattr(images, "min_pixels") or hasattr(images, "merge_size"):
        if hasattr(images, "min_pixels"):
            images.min_pixels, images.max_pixels = pixels, pixels
        if getattr(images, "size", None) is not None and _get(images.size, "longest_edge") is not None:
            images.size = type(images.size)(**{**dict(images.size), "shortest_edge": pixels, "longest_edge": pixels})
        return
    if _is_embedded_folder(processor):
        images.size = {"shortest_edge": size}
        images.crop_size = {"height": size, "width": size}
        return
    raise UserError(
        f"model.image_size={size}: the processor of '{model_name}' ({type(images).__name__}) has a fixed input size "
        "set by its vision encoder. Set model.image_size: null for this model."
    )


def _get(size: Any, key: str) -> Any:
    """A key of a size dict (a dict, or transformers 5's SizeDict)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _is_embedded_folder(processor: Any) -> bool:
    from tunelab.models.embedded_vlm import MARKER_FILE

    folder = getattr(processor.tokenizer, "name_or_path", "") or ""
    return bool(folder) and (Path(folder) / MARKER_FILE).is_file()


def projector_starts_untrained(path: str) -> bool:
    """Whether the model folder is a tunelab embedded assembly, whose projector is random (a pretrained VLM's
    projector is already aligned with its language model)."""
    from tunelab.models.embedded_vlm import MARKER_FILE

    return (Path(path) / MARKER_FILE).is_file()


def load_vlm(config: ModelConfig, method_kind: str, device: torch.device, path: str | None = None) -> torch.nn.Module:
    """AutoModelForImageTextToText with dtype, attention and quantization resolved for `device`. QLoRA quantizes
    the language model only: the vision encoder and projector stay in the compute dtype."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from tunelab.models.load import check_model_source, quantization_config, resolve_dtype

    path = path or resolve_vlm_path(config.name)
    check_model_source(path)
    dtype = resolve_dtype(config.dtype, device)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": config.trust_remote_code,
        "revision": config.revision,
    }
    if config.attn_implementation != "auto":
        kwargs["attn_implementation"] = config.attn_implementation
    quant = quantization_config(config, method_kind, dtype)
    if quant is not None:  # quantize the language model only
        quant.llm_int8_skip_modules = [*_unquantized_roots(path, config), "lm_head"]
        kwargs["quantization_config"] = quant
    if device.type == "cuda":  # load straight onto the GPU
        kwargs["device_map"] = {"": device.index or 0}
    model_type = None
    try:
        model_type = AutoConfig.from_pretrained(
            path, trust_remote_code=config.trust_remote_code, revision=config.revision
        ).model_type
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        what = f" (its model_type is '{model_type}', which is not an image-text-to-text model)" if model_type else ""
        raise UserError(
            f"Could not load an image-text-to-text model from '{config.name}'{what}: "
            f"{str(error).strip().rstrip('.')[:300]}. mcqa needs a vision-language model (Qwen2-VL, Qwen2.5-VL, "
            "LLaVA-style, Idefics3 / SmolVLM) as a folder or a reachable hub id, or the embedded "
            "'llava-mobilenetv2-smollm2'."
        ) from None
    if model.config.get_text_config().use_cache is not None:
        model.config.get_text_config().use_cache = False  # no cache in training; it conflicts with checkpointing
    install_grouped_window_attention(model)  # Qwen2-VL family under SDPA: one attention call per run of windows
    if device.type == "cuda":  # compiled RMSNorm / SwiGLU / vision rotary when scoring (no autograd)
        install_fused_inference(model)
    return model


def _unquantized_roots(path: str, config: ModelConfig) -> list[str]:
    """Full module names of the vision encoder and projector roots (e.g. model.visual), read from the model built on
    the meta device. transformers 5 matches llm_int8_skip_modules from the start of a module's name (or as its
    suffix), so the bare part names ('visual') skipped nothing and the vision tower and projector were quantized."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from tunelab.models.load import meta_skeleton

    arch = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code, revision=config.revision)
    with meta_skeleton():
        skeleton = AutoModelForImageTextToText.from_config(arch, trust_remote_code=config.trust_remote_code)
    roots = part_roots(skeleton)
    return roots["vision"] + roots["projector"]


# ----------------------------------------------------------------------------------------------- parts


# what a Qwen2-VL-style get_rope_index reads from a batch (transformers 5.x names)
ROPE_INPUTS = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")


def rope_positions(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The 3-D rotary positions [3, B, L] that a Qwen2-VL-family model would compute for `batch` (a CPU batch),
    computed here on the CPU; None for models without them (LLaVA-style) or a batch that lacks their inputs.

    The model builds them in its forward with a Python loop per row over GPU tensors, each row waiting on the GPU
    several times while the GPU has nothing queued; computed from the CPU batch before it is copied over, the
    same numbers cost no GPU idle time. Passed as `position_ids`, they replace that step and nothing else."""
    import inspect

    owner = next((m for m in model.modules() if callable(getattr(m, "get_rope_index", None))), None)
    if owner is None or "input_ids" not in batch or batch["input_ids"].device.type != "cpu":
        return None
    parameters = inspect.signature(owner.get_rope_index).parameters
    required = [
        name
        for name, p in parameters.items()
        if p.default is inspect.Parameter.empty and p.kind == p.POSITIONAL_OR_KEYWORD
    ]
    if any(name not in batch for name in required) or "image_grid_thw" not in batch:
        return None  # the model would not compute them either (transformers falls back to 1-D positions)
    inputs = {name: batch[name] for name in ROPE_INPUTS if name in parameters and name in batch}
    if "attention_mask" in parameters and "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    positions, _ = owner.get_rope_index(**inputs)
    return positions


def vision_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the vision encoder's first floating-point weight (None when the model has no encoder found
    by name, or it is stored in an integer / quantized dtype)."""
    for name, parameter in model.named_parameters():
        if part_of(name) == "vision":
            return parameter.dtype if parameter.is_floating_point() else None
    return None


def frozen_parts_to_eval(model: torch.nn.Module) -> None:
    """Put the vision encoder in eval mode when none of its weights train: a frozen encoder must give the features it
    was trained to give (batch norm with its running statistics, which must not drift; no dropout). The loop sets
    the whole model to train mode, so this runs before every training forward (a cheap walk over the modules)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] in VISION_NAMES and part_of(name) == "vision" and module.training:
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()


def language_linear_names(model: torch.nn.Module, target: str | list[str]) -> list[str]:
    """Full names of the language model's linear layers that LoRA adapts (never the output head, never the
    vision encoder or the projector); `target` is all-linear or a list of module-name suffixes."""
    head = model.get_output_embeddings()
    wanted = None if target == "all-linear" else ({target} if isinstance(target, str) else set(target))
    names, suffixes = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head or part_of(name) != "language":
            continue
        suffixes.add(name.rsplit(".", 1)[-1])
        if wanted is None or name.rsplit(".", 1)[-1] in wanted:
            names.append(name)
    if not names:
        raise UserError(
            f"method.target {target} names no linear layer of the language model. Its linear layers: "
            f"{', '.join(sorted(suffixes))}; or use target: all-linear."
        )
    return names


def apply_parts(
    model: torch.nn.Module, method: MethodConfig, gradient_checkpointing: bool
) -> tuple[torch.nn.Module, dict[str, list[str]]]:
    """Freeze or train each part as method.train_parts and method.kind say; returns (model to train, part roots).

    The language model gets LoRA / QLoRA / DoRA (peft) or trains fully (kind full); trained vision or projector
    weights travel with the adapter as peft modules_to_save, so best/ loads with PeftModel.from_pretrained."""
    if method.kind not in VLM_METHODS:
        raise UserError(
            f"method.kind {method.kind} is not available for mcqa. Use one of: {', '.join(VLM_METHODS)} (the "
            "language model gets it; method.train_parts decides the vision encoder and the projector)."
        )
    parts = method.train_parts
    roots = part_roots(model)
    if parts.projector and not roots["projector"]:
        raise UserError(
            "method.train_parts.projector is true but no projector module was found in this model (looked for "
            f"{', '.join(PROJECTOR_NAMES)}). Set method.train_parts.projector: false."
        )
    if method.kind == "qlora":
        from peft import prepare_model_for_kbit_training

        # checkpointing is enabled below: peft's own call would also hook the vision encoder's embeddings
        compute_dtype = next((p.dtype for n, p in model.named_parameters() if part_of(n) == "vision"), None)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        # peft upcast every unquantized weight to fp32: a frozen vision encoder gains nothing from it but memory
        if compute_dtype is not None and not parts.vision:
            for root in _outermost(roots["vision"]):
                model.get_submodule(root).to(compute_dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.disable_input_require_grads()  # transformers hooked every sub-model's embeddings; see the next line
        _text_embeddings_require_grad(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trained_roots = (roots["vision"] if parts.vision else []) + (roots["projector"] if parts.projector else [])
    for root in _outermost(trained_roots):  # buffers too (batch-norm statistics): one dtype inside a trained part
        model.get_submodule(root).float()
    if method.kind == "full":
        for name, parameter in model.named_parameters():
            if part_of(name) == "language" or any(name.startswith(root + ".") for root in trained_roots):
                parameter.requires_grad_(True)
        return _with_lr_scales(_trainable_in_fp32(model), parts), roots
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=language_linear_names(model, method.target),
        modules_to_save=_outermost(trained_roots) or None,
        use_dora=method.kind == "dora",
        bias="none",
    )
    model = get_peft_model(model, lora)
    # peft re-hooks every sub-model's input embeddings under checkpointing; the hook above is the one wanted
    model.get_base_model().disable_input_require_grads()
    return _with_lr_scales(_trainable_in_fp32(model), parts), roots


def _text_embeddings_require_grad(model: torch.nn.Module) -> None:
    """Frozen text embeddings give outputs without grad, and checkpointed decoder blocks need an input that has one.
    Only the language model's embeddings get the hook: transformers' enable_input_require_grads hooks every
    sub-model's, the frozen vision encoder's patch embedding too, and its whole backward pass then runs for nothing
    (memory for its kept inputs, time for its gradients)."""

    def require_grad(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(require_grad)


def _outermost(names: list[str]) -> list[str]:
    return [n for n in names if not any(n.startswith(other + ".") for other in names if other != n)]


def _trainable_in_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Trained weights in fp32 (AdamW on bf16 weights loses small updates); frozen ones keep the load dtype."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
    return model


def _with_lr_scales(model: torch.nn.Module, parts: TrainPartsConfig) -> torch.nn.Module:
    """Mark each trained parameter with its part's learning-rate multiplier (read by train.optim.param_groups)."""
    from tunelab.train.optim import LR_SCALE_ATTRIBUTE

    scale = lr_scale_fn(parts)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            setattr(parameter, LR_SCALE_ATTRIBUTE, scale(name))
    return model


def lr_scale_fn(parts: TrainPartsConfig) -> Any:
    """Learning-rate multiplier by parameter name (vision / projector / language)."""
    scales = {"vision": parts.vision_lr, "projector": parts.projector_lr, "language": parts.language_lr}
    return lambda name: scales[part_of(name)]


def parameter_groups_table(model: torch.nn.Module, parts: TrainPartsConfig, lr: float) -> list[dict[str, Any]]:
    """One row per part: trainable tensors and parameters, frozen parameters, learning rate (printed at start)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "trainable": 0, "frozen": 0})
    for name, parameter in model.named_parameters():
        row = counts[part_of(name)]
        if parameter.requires_grad:
            row["tensors"] += 1
            row["trainable"] += parameter.numel()
        else:
            row["frozen"] += parameter.numel()
    scale = lr_scale_fn(parts)
    return [
        {"part": part, **counts[part], "lr": lr * scale(part_name(part)) if counts[part]["trainable"] else 0.0}
        for part in PARTS
        if part in counts
    ]


def part_name(part: str) -> str:
    """A representative parameter name of a part (for lr_scale_fn)."""
    return {"vision": "vision_tower.x", "projector": "multi_modal_projector.x", "language": "language_model.x"}[part]
