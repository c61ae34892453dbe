"""Tiny image data and configs for the image_cls tests (plain helpers; conftest.py wraps them): a few
solid-colour-plus-noise images per class, timm's tiny test models with random weights (pretrained=False)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def write_class_folders(root: Path, per_class: int = 6, size: tuple[int, int] = (20, 24), seed: int = 0) -> Path:
    """root/<colour>/<n>.png: an easy three-class problem."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            noise = rng.integers(0, 50, (size[0], size[1], 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def write_config(folder: Path, name: str = "cfg", **sections: dict[str, Any]) -> Path:
    """A YAML config for a run of a few optimizer steps on the tiny data (sections merged over the defaults)."""
    config: dict[str, Any] = {
        "task": "image_cls",
        "model": {"name": "test_efficientnet", "weights": "none", "image_size": 32, "drop_path": 0.0},
        "data": {"train": str(folder / "images"), "valid_split": 0.34},
        "train": {
            "max_steps": 4,
            "batch_size": 4,
            "grad_accum": 1,
            "lr": 1e-3,
            "eval_every": 2,
            "save_every": 2,
            "early_stop": {"metric": "accuracy"},
        },
        "augment": {"ema": 0.9, "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25},
        "eval": {"batch_size": 8},
        "output": {"dir": str(folder / name)},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
