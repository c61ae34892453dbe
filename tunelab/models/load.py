"""Load tokenizers and causal LMs from a hub id, a local folder or an embedded name, with the right dtype,
attention kernel and quantization for the machine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tunelab.config import ModelConfig
from tunelab.errors import UserError

# Any one of these makes a folder loadable by AutoTokenizer (fast, sentencepiece or BPE vocab files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_dtype(requested: str, device: torch.device | str | None = None) -> torch.dtype:
    """The weight / compute dtype for `model.dtype`.

    auto: bf16 on GPUs that support it (Ampere and newer), fp16 on older GPUs such as the T4 and V100 (they have
    no bf16 units; "bf16=True on a T4" emulates or fails), fp32 on the CPU.
    """
    device = torch.device(device) if device is not None else _default_device()
    if requested == "fp32":
        return torch.float32
    if requested in ("bf16", "fp16") and device.type == "cpu":
        return torch.bfloat16 if requested == "bf16" else torch.float16
    if requested == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError(
                "model.dtype is bf16 but this GPU has no bf16 support (pre-Ampere, e.g. T4 / V100). "
                "Use model.dtype: fp16 or auto."
            )
        return torch.bfloat16
    if requested == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_model_path(name: str) -> str:
    """Embedded names become their cached local folder; hub ids and folders pass through unchanged."""
    from tunelab.models import embedded

    return embedded.resolve_model_path(name)


def check_model_source(name: str) -> None:
    """Refuse early and clearly when a local-looking model path does not exist, or is a folder without a model
    (transformers would otherwise fail deep inside with a ValueError about tokenizer backends)."""
    folder = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix != ""
    if looks_local and not folder.exists():
        raise UserError(
            f"Model folder {name} does not exist. Set model.name to an existing folder, a hub id, or "
            "the embedded default 'smollm2-135m-instruct'."
        )
    if folder.is_file():  # e.g. model.name pointing at model.safetensors or a .gguf instead of its folder
        raise UserError(
            f"model.name {name} is a file; it must be the model's folder (config.json, tokenizer files and "
            f"*.safetensors, as save_pretrained writes them), e.g. {folder.parent}."
        )
    if not folder.is_dir() or (folder / "config.json").exists():
        return
    if (folder / "adapter_config.json").exists():
        raise UserError(
            f"Model folder {name} holds a peft adapter, not a whole model. Set model.name to its base model, or "
            "make a standalone model with `tunelab export RUN --out FOLDER --merge`."
        )
    raise UserError(
        f"Model folder {name} has no config.json, so it is not a Hugging Face model folder (expected "
        "config.json, tokenizer files and *.safetensors, as save_pretrained writes them). Point model.name at "
        "the folder that holds them."
    )


def load_tokenizer(config: ModelConfig) -> Any:
    """The tokenizer, with a pad token that is not eos (padding never hides a real end of sequence)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(config.name)
    check_model_source(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=config.trust_remote_code, revision=config.revision
        )
    except (OSError, ValueError) as error:  # ValueError: a folder with a model but no usable tokenizer files
        folder = Path(path).expanduser()
        if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
            raise UserError(
                f"Model folder {config.name} has no tokenizer files ({', '.join(TOKENIZER_FILES)}). Save the "
                "tokenizer beside the weights (tokenizer.save_pretrained(folder)) or use the original model folder."
            ) from None
        raise UserError(
            f"Could not load a tokenizer from '{config.name}': {str(error).strip().rstrip('.')}. Use a folder "
            "that holds the tokenizer files, a reachable hub id, or the embedded 'smollm2-135m-instruct'."
        ) from None
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer: Any) -> None:
    """Set a pad token that differs from eos when the tokenizer has none (or pads with eos).

    The pad id only fills positions that are masked out of attention and labels, so any existing non-eos token
    works and the embedding matrix need not grow: unk, then bos, then the first id that is not eos.
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    for candidate in (tokenizer.unk_token, tokenizer.bos_token):
        if candidate is not None and tokenizer.convert_tokens_to_ids(candidate) != eos:
            tokenizer.pad_token = candidate
            return
    first = 0 if eos != 0 else 1
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(first)


def check_quantization(config: ModelConfig, method_kind: str) -> str:
    """The quantization to load with ('none', 'nf4' or 'int8'); UserError when this machine cannot do it.

    Cheap (no model is loaded), so `tunelab train` calls it before reading data or creating the run folder.
    """
    quantize = "nf4" if method_kind == "qlora" else config.quantize
    if quantize == "none":
        return quantize
    if not torch.cuda.is_available():
        raise UserError(
            f"{'method.kind: qlora' if method_kind == 'qlora' else 'model.quantize: ' + quantize} needs "
            "a CUDA GPU (bitsandbytes 4/8-bit kernels), and none is visible. On this machine use "
            "method.kind: lora with model.quantize: none."
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("Quantized loading needs bitsandbytes: pip install 'tunelab[gpu]'.")
    return quantize


def quantization_config(config: ModelConfig, method_kind: str, dtype: torch.dtype) -> Any | None:
    """bitsandbytes settings: NF4 with double quantization for QLoRA (compute dtype = model dtype), or int8."""
    quantize = check_quantization(config, method_kind)
    if quantize == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UserError("Quantized loading needs bitsandbytes: pip install 'tunelab[gpu]'.") from None
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def model_architecture(config: ModelConfig) -> tuple[str, str]:
    """('seq2seq' or 'causal', model_type) of a model, read from its config.json alone (no weights loaded):
    encoder-decoders (BART, T5, mT5) are seq2seq, everything else causal."""
    from transformers import AutoConfig

    path = resolve_model_path(config.name)
    check_model_source(path)
    try:
        model_config = AutoConfig.from_pretrained(
            path, trust_remote_code=config.trust_remote_code, revision=config.revision
        )
    except (OSError, ValueError) as error:
        raise UserError(
            f"Could not read the model config of '{config.name}': {str(error).strip().rstrip('.')}. Use a folder "
            "that holds config.json, a reachable hub id, or the embedded 'smollm2-135m-instruct'."
        ) from None
    kind = "seq2seq" if getattr(model_config, "is_encoder_decoder", False) else "causal"
    return kind, str(getattr(model_config, "model_type", "unknown"))


def load_causal_lm(config: ModelConfig, method_kind: str, device: torch.device) -> torch.nn.Module:
    """AutoModelForCausalLM with dtype, attention and quantization resolved for `device`."""
    return load_lm(config, method_kind, device, "causal")


def load_lm(config: ModelConfig, method_kind: str, device: torch.device, kind: str = "causal") -> torch.nn.Module:
    """AutoModelForCausalLM (kind causal) or AutoModelForSeq2SeqLM (kind seq2seq) with dtype, attention and
    quantization resolved for `device`; a model of the other kind is a UserError naming what the folder holds."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = resolve_model_path(config.name)
    check_model_source(path)
    dtype = resolve_dtype(config.dtype, device)
    quant = quantization_config(config, method_kind, dtype)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": config.trust_remote_code,
        "revision": config.revision,
    }
    if config.attn_implementation != "auto":
        kwargs["attn_implementation"] = config.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
    # load straight onto the GPU: no CPU copy, and the optimizer sees CUDA tensors (fused). Not under DeepSpeed
    # ZeRO-3, whose partitioned loading (transformers' zero.Init path) refuses a device_map.
    if device.type == "cuda" and not _deepspeed_zero3():
        kwargs["device_map"] = {"": device.index or 0}
    what = "causal LM" if kind == "causal" else "seq2seq model"
    try:
        model_config = AutoConfig.from_pretrained(
            path, trust_remote_code=config.trust_remote_code, revision=config.revision
        )
        encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
        if kind == "causal" and encoder_decoder:
            raise UserError(
                f"'{config.name}' is an encoder-decoder model ({model_config.model_type}); this task needs "
                "a decoder-only (causal LM) model."
            )
        if kind == "seq2seq" and not encoder_decoder:
            raise UserError(
                f"'{config.name}' is a decoder-only model ({model_config.model_type}); a seq2seq run needs an "
                "encoder-decoder model (BART, T5, mT5)."
            )
        auto_class = AutoModelForCausalLM if kind == "causal" else AutoModelForSeq2SeqLM
        model = auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise UserError(
            f"Could not load a {what} from '{config.name}': {str(error).strip().rstrip('.')}. Use a folder "
            "that holds the weights, a reachable hub id, or the embedded 'smollm2-135m-instruct'."
        ) from None
    return model


def use_gradient_checkpointing(config: ModelConfig, device: torch.device) -> bool:
    """Checkpointing is on by default on CUDA (memory), off on CPU (speed matters more there)."""
    return device.type == "cuda" if config.gradient_checkpointing is None else config.gradient_checkpointing


@contextmanager
def meta_skeleton() -> Iterator[None]:
    """Build models on the meta device (to count or name their modules, never to train them). Outside ZeRO-3's
    reach: while accelerate's DeepSpeedPlugin has registered a ZeRO-3 config, transformers partitions every model
    it builds and initializes its weights, which fails on meta tensors ("Cannot copy out of meta tensor", found
    on 2 H200s when sft's plan counted the model)."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        hf_deepspeed = None
    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    if saved is not None:  # transformers' registry is a module global; it is put back below
        hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        with torch.device("meta"):
            yield
    finally:
        if saved is not None:
            hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _deepspeed_zero3() -> bool:
    """Whether this process trains under DeepSpeed ZeRO-3 (accelerate's DeepSpeedPlugin registered it)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # a transformers without the integration cannot be running ZeRO-3
        return False
    return bool(is_deepspeed_zero3_enabled())
