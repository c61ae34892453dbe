"""Demo image data: scikit-learn's handwritten digits (UCI optdigits, 1,797 images of 8x8 pixels, 10 classes),
written as PNG files in a class-folder layout (`train/<digit>/NNNN.png`) and a test table (`test.csv`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tunelab.errors import UserError

TEST_EVERY = 10  # every 10th image goes to test.csv (not trained on), the rest to train/ (valid is split from it)
DONE = "digits.json"


def write_digits(folder: Path) -> dict[str, Path]:
    """Write the digits once (kept for later runs); returns {"train": folder tree, "test": CSV}."""
    folder = Path(folder)
    marker = folder / DONE
    paths = {"train": folder / "train", "test": folder / "test.csv"}
    if marker.exists():
        return paths
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("The image demo data needs scikit-learn: pip install 'tunelab[demo]'.") from None
    from PIL import Image

    digits = load_digits()
    # 0..16 ink intensity -> dark ink on a light background, like the photos the pretrained models saw
    pixels = (255 - digits.images * (255 / 16)).round().astype(np.uint8)
    rows = ["id,image,label"]
    for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        if index % TEST_EVERY == 0:
            relative = Path("test") / f"{index:04d}.png"
            rows.append(f"{index:04d},{relative.as_posix()},{label}")
        else:
            relative = Path("train") / str(label) / f"{index:04d}.png"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / relative)
    paths["test"].write_text("\n".join(rows) + "\n", encoding="utf-8")
    marker.write_text(json.dumps({"images": len(pixels), "source": "sklearn.datasets.load_digits"}))
    return paths
