"""The shape of the model a config names, for `tunelab plan`, without loading (or downloading) any weights.

The architecture config comes from a local folder's config.json, the Hugging Face cache, or a table of popular
hub ids (their published config.json values), so a plan works offline. The model is then built on PyTorch's meta
device (no memory, no weights): parameters and linear layers are counted from the real module tree, so any
architecture transformers knows is counted exactly, tied embeddings once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.config import RunConfig
from tunelab.errors import UserError

_LLAMA = {"model_type": "llama", "vocab_size": 128256, "rope_theta": 500000.0, "num_key_value_heads": 8}
_QWEN2 = {"model_type": "qwen2", "vocab_size": 151936, "rope_theta": 1000000.0}
_SMOL = {"model_type": "llama", "vocab_size": 49152, "tie_word_embeddings": True}
_GEMMA2 = {"model_type": "gemma2", "vocab_size": 256000, "head_dim": 256, "tie_word_embeddings": True}
_QWEN25_VL_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14}

# Published config.json values (the fields that set memory) of models users plan for most. Keyed by hub id in
# lower case; "-instruct" / "-it" variants share their base's shape.
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "meta-llama/llama-3.2-1b": _LLAMA
    | dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, head_dim=64)
    | {"tie_word_embeddings": True},
    "meta-llama/llama-3.2-3b": _LLAMA
    | dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, head_dim=128)
    | {"tie_word_embeddings": True},
    "meta-llama/llama-3.1-8b": _LLAMA
    | dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, head_dim=128),
    "meta-llama/meta-llama-3-8b": _LLAMA
    | dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, head_dim=128),
    "mistralai/mistral-7b-v0.3": {"model_type": "mistral", "vocab_size": 32768, "num_key_value_heads": 8}
    | dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, head_dim=128),
    "qwen/qwen2.5-0.5b": _QWEN2
    | dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
    | {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen/qwen2.5-1.5b": _QWEN2
    | dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12)
    | {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen/qwen2.5-3b": _QWEN2
    | dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16)
    | {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen/qwen2.5-7b": _QWEN2
    | dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28)
    | {"num_key_value_heads": 4, "vocab_size": 152064},
    "google/gemma-2-2b": _GEMMA2
    | dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8)
    | {"num_key_value_heads": 4},
    "google/gemma-2-9b": _GEMMA2
    | dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16)
    | {"num_key_value_heads": 8},
    "huggingfacetb/smollm2-135m": _SMOL
    | dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9)
    | {"num_key_value_heads": 3},
    "huggingfacetb/smollm2-360m": _SMOL
    | dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15)
    | {"num_key_value_heads": 5},
    "huggingfacetb/smollm2-1.7b": _SMOL
    | dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32)
    | {"num_key_value_heads": 32},
    "qwen/qwen2.5-vl-3b": {
        "model_type": "qwen2_5_vl",
        "text_config": _QWEN2
        | dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16)
        | {"num_key_value_heads": 2, "tie_word_embeddings": True, "model_type": "qwen2_5_vl_text"},
        "vision_config": _QWEN25_VL_VISION | {"out_hidden_size": 2048},
        "tie_word_embeddings": True,
    },
    "qwen/qwen2.5-vl-7b": {
        "model_type": "qwen2_5_vl",
        "text_config": _QWEN2
        | dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28)
        | {"num_key_value_heads": 4, "vocab_size": 152064, "model_type": "qwen2_5_vl_text"},
        "vision_config": _QWEN25_VL_VISION | {"out_hidden_size": 3584},
    },
}
EMBEDDED_SHAPES = {"smollm2-135m-instruct": "huggingfacetb/smollm2-135m"}


@dataclass
class Linear:
    """One nn.Linear of the model: where it is and its size."""

    name: str
    in_features: int
    out_features: int
    in_blocks: bool  # inside the repeated decoder / encoder blocks (quantized by bitsandbytes, LoRA all-linear)
    vision: bool = False  # part of a vision tower

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass
class ModelShape:
    """What the memory model needs to know about an architecture."""

    source: str  # where the shape came from, said in the plan
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int  # every parameter once (tied embeddings once)
    linears: list[Linear] = field(default_factory=list)
    encoder_decoder: bool = False
    vision: dict[str, int] | None = None  # hidden, layers, intermediate, patch, merge for VLMs
    vision_params: int = 0  # VLMs: the vision encoder's parameters (projector excluded)
    projector_params: int = 0  # VLMs: the projector's parameters
    image_tokens: int | None = None  # VLMs with a fixed number of language-model tokens per image (LLaVA-style)
    # parameters of an input embedding that model.offload_embedding could keep in CPU memory: an exact, untied
    # torch.nn.Embedding without max_norm (kernels/host_embedding.py why_not_offloadable); 0 for any other
    offloadable_embedding_params: int = 0

    @property
    def block_linear_params(self) -> int:
        """Parameters of the language model's block linears (what NF4 / int8 quantize)."""
        return sum(x.params for x in self.linears if x.in_blocks and not x.vision)

    def lora_params(self, rank: int, target: str | list[str]) -> int:
        """Adapter parameters for LoRA of this rank on the targets (all-linear: every block linear of the
        language model, as peft resolves it, without the output head)."""
        names = None if target == "all-linear" else {target} if isinstance(target, str) else set(target)
        chosen = [
            x
            for x in self.linears
            if x.in_blocks and not x.vision and (names is None or x.name.rsplit(".", 1)[-1] in names)
        ]
        return sum(rank * (x.in_features + x.out_features) for x in chosen)


def load_architecture(config: RunConfig) -> tuple[Any, str]:
    """The transformers config of model.name and where it came from; UserError when none can be had offline."""
    from transformers import AutoConfig

    name = config.model.name
    key = EMBEDDED_SHAPES.get(name.lower(), name.lower())
    key = key.removesuffix("-instruct").removesuffix("-it")
    folder = Path(name).expanduser()
    if (folder / "config.json").exists():
        raw = json.loads((folder / "config.json").read_text())
        return _from_dict(raw, f"{folder / 'config.json'}"), f"{folder / 'config.json'}"
    if key in KNOWN_SHAPES:
        return _from_dict(KNOWN_SHAPES[key]), f"tunelab's table of published shapes ({key})"
    try:  # a hub id already in the local Hugging Face cache
        cached = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=False)
        return cached, f"the Hugging Face cache ({name})"
    except Exception:  # noqa: BLE001 - any failure means: not cached
        pass
    known = ", ".join(sorted(KNOWN_SHAPES))
    raise UserError(
        f"plan: cannot find the architecture of model.name '{name}' offline (no config.json there, not in the "
        f"Hugging Face cache, not among the shapes tunelab knows: {known}). Point model.name at a folder holding "
        "the model's config.json (the weights are not needed)."
    )


def _from_dict(raw: dict[str, Any], where: str = "") -> Any:
    from transformers import AutoConfig

    fields = dict(raw)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise UserError(f"plan: {where or 'the model config'} has no model_type; is it a transformers config.json?")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (KeyError, ValueError) as error:
        raise UserError(f"plan: transformers does not know model_type '{model_type}' ({error}).") from None


def model_shape(config: RunConfig) -> ModelShape:
    """The ModelShape of the config's model, counted from the real module tree built on the meta device."""
    import transformers

    from tunelab.models.load import meta_skeleton

    arch, source = load_architecture(config)
    text = arch.get_text_config() if hasattr(arch, "get_text_config") else arch
    vision_config = getattr(arch, "vision_config", None)
    if vision_config is not None:
        auto = transformers.AutoModelForImageTextToText
    elif getattr(arch, "is_encoder_decoder", False):
        auto = transformers.AutoModelForSeq2SeqLM
    else:
        auto = transformers.AutoModelForCausalLM
    with meta_skeleton():
        model = auto.from_config(arch)
    linears = [
        Linear(name, m.in_features, m.out_features, ".layers." in name or ".layer." in name or ".blocks." in name)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    heads = text.num_attention_heads
    hidden = text.hidden_size
    vision, parts = None, {"vision": 0, "projector": 0}
    if vision_config is not None:
        from tunelab.models.vlm import part_of

        for name, parameter in model.named_parameters():
            part = part_of(name)
            if part != "language":
                parts[part] += parameter.numel()
        for linear in linears:
            linear.vision = part_of(linear.name) != "language"
        vision = {
            "hidden": getattr(vision_config, "hidden_size", getattr(vision_config, "embed_dim", 0)),
            "layers": getattr(vision_config, "depth", getattr(vision_config, "num_hidden_layers", 0)),
            "intermediate": getattr(vision_config, "intermediate_size", 0),
            "patch": getattr(vision_config, "patch_size", 14),
            "merge": getattr(vision_config, "spatial_merge_size", 1),
        }
    return ModelShape(
        source=source,
        model_type=arch.model_type,
        hidden=hidden,
        intermediate=getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", 4 * hidden),
        layers=getattr(text, "num_hidden_layers", None) or getattr(text, "decoder_layers", 1),
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads,
        vocab=text.vocab_size,
        params=sum(p.numel() for p in model.parameters()),
        linears=linears,
        encoder_decoder=bool(getattr(arch, "is_encoder_decoder", False)),
        vision=vision,
        vision_params=parts["vision"],
        projector_params=parts["projector"],
        image_tokens=getattr(arch, "image_seq_length", None),
        offloadable_embedding_params=offloadable_embedding_params(model),
    )


def offloadable_embedding_params(model: torch.nn.Module) -> int:
    """The input embedding's parameters when its type and ties let model.offload_embedding move it (the checks of
    kernels/host_embedding.py why_not_offloadable that a meta-device model can answer; whether it trains and its
    size in bytes depend on the run: plan_memory.py asks those); 0 otherwise. A meta tensor has no address, so a
    head sharing the table is found by identity, not data_ptr."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return 0
    if embedding is None or type(embedding) is not torch.nn.Embedding:  # noqa: E721 - subclasses change forward
        return 0
    if embedding.max_norm is not None:
        return 0
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if tied or getattr(head, "weight", None) is embedding.weight:
        return 0
    return embedding.weight.numel()
