"""Tiny offline vision-language models for the mcqa tests: a shrunk Qwen2-VL (real Qwen2VLConfig, Qwen2VLProcessor
with the real chat template and vision special tokens at the ids the config names) and a shrunk LLaVA-style model
(transformers' FastVlmForConditionalGeneration: a timm CNN tower, a 2-layer projector, a Llama; LlavaProcessor), both
with random weights, saved as folders that AutoModelForImageTextToText / AutoProcessor load. Plus tiny image data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from fixtures import make_tokenizer
from PIL import Image

# Qwen2-VL-7B-Instruct's chat template, verbatim (add_vision_id and video branches included).
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
LETTER_TEXT = "a b c d e f g h\n(a) (b) (c) (d) (e) (f) (g) (h)"


def chatml_vision_tokenizer():  # noqa: ANN201 - a PreTrainedTokenizerFast
    """The tiny chatml (Qwen2.5) tokenizer with Qwen2-VL's vision special tokens added after its vocabulary."""
    tokenizer = make_tokenizer("chatml")
    tokenizer.add_tokens(VISION_TOKENS, special_tokens=True)
    return tokenizer


def save_tiny_qwen2_vl(folder: Path, pixels: int = 56 * 56, seed: int = 0) -> Path:
    """A 2-layer Qwen2-VL (vision depth 1) with its processor; 56x56 images -> 4 image tokens."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = chatml_vision_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2VL_TEMPLATE,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def save_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """A LLaVA-style FastVLM: timm's test_efficientnet tower (random init), 2-layer projector, 2-layer Llama;
    32x32 images -> a 1x1 feature map -> 1 image token."""
    from transformers import (
        CLIPImageProcessor,
        FastVlmConfig,
        FastVlmForConditionalGeneration,
        LlamaConfig,
        LlavaProcessor,
        TimmWrapperConfig,
    )

    from tunelab.models.embedded_vlm import CHAT_TEMPLATE, IMAGE_TOKEN

    tokenizer = make_tokenizer("chatml")
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = TimmWrapperConfig(architecture="test_efficientnet", do_pooling=False, hidden_size=32)
    import timm

    vision.hidden_size = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).num_features
    config = FastVlmConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    )
    torch.manual_seed(seed)
    model = FastVlmForConditionalGeneration(config).to(torch.float32)
    # transformers initialises the wrapped timm tower with its own small normal init, which after the tower's depth
    # leaves features of ~1e-14 for every image (the images would not matter); timm's init keeps them alive
    tower = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    model.model.vision_tower.timm_model.load_state_dict(tower.state_dict())
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_convert_rgb=True)
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=32,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


COLOURS = {"red": (210, 40, 40), "green": (40, 190, 40), "blue": (40, 40, 210), "yellow": (230, 220, 40)}


def write_questions(folder: Path, n: int = 24, seed: int = 0, name: str = "train.csv", answers: bool = True) -> Path:
    """folder/images/N.png (a solid colour with noise) and a CSV id,image,question,a,b,c,d,answer asking its colour."""
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = sorted(COLOURS)
    lines = ["id,image,question,a,b,c,d" + (",answer" if answers else "")]
    for index in range(n):
        colour = names[index % len(names)]
        pixels = np.clip(np.array(COLOURS[colour]) + noise.integers(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
        image = f"images/{name.split('.')[0]}-{index}.png"
        Image.fromarray(pixels).save(folder / image)
        choices = names[:]
        rng.shuffle(choices)
        row = [f"q{index}", image, "what color is the picture?", *choices]
        if answers:
            row.append("abcd"[choices.index(colour)])
        lines.append(",".join(row))
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_config(folder: Path, model_dir: Path, name: str = "run", **sections: dict) -> Path:
    """A tiny mcqa config: 4 optimizer steps, batch 4, eval and save every 2 steps, into folder/NAME."""
    import yaml

    config: dict = {
        "task": "mcqa",
        "model": {"name": str(model_dir)},
        "method": {"kind": "lora", "r": 4, "alpha": 8},
        "data": {"train": str(folder / "train.csv"), "valid_split": 0.25},
        "train": {"max_steps": 4, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "eval_every": 2, "save_every": 2},
        "eval": {"batch_size": 8},
        "output": {"dir": str(folder / name)},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def read_json(path: Path) -> dict:
    """A JSON file as a dict."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
