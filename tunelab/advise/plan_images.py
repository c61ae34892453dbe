"""mcqa's image size for `tunelab plan` when `model.image_size` is null.

Then a Qwen2-VL-style processor keeps each image near its own size, within its pixel budget (min / max pixels), in
steps of patch x merge pixels; the language model sees one token per merged patch. So the memory an mcqa run needs
depends on the data's images, not on a fixed resolution: the plan reads the sizes of the first training images
(headers only, nothing is decoded) and sizes the run for the largest one after the processor's resize.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tunelab.config import RunConfig

SAMPLE = 200  # images whose sizes are read (headers only)
# the published Qwen2-VL / Qwen2.5-VL processors' budget (preprocessor_config.json): 56 x 56 to 3584 x 3584 pixels
PUBLISHED_BUDGET = (56 * 56, 12_845_056)


def resized_pixels(height: int, width: int, factor: int, budget: tuple[int, int]) -> int:
    """Pixels of an image after a Qwen2-VL-style resize: each side rounded to a multiple of `factor`, the area
    brought within (min, max) pixels keeping the aspect ratio (transformers' smart_resize)."""
    low, high = budget
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > high:
        beta = math.sqrt(height * width / high)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < low:
        beta = math.sqrt(low / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h * w


def pixel_budget(model_name: str) -> tuple[int, int]:
    """(min, max) pixels from the model folder's preprocessor_config.json, else the published processors'."""
    path = Path(model_name).expanduser() / "preprocessor_config.json"
    if not path.is_file():
        return PUBLISHED_BUDGET
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return PUBLISHED_BUDGET
    size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
    low = raw.get("min_pixels") or size.get("shortest_edge") or PUBLISHED_BUDGET[0]
    high = raw.get("max_pixels") or size.get("longest_edge") or PUBLISHED_BUDGET[1]
    return int(low), int(high)


def image_side_from_data(config: RunConfig, patch: int, merge: int) -> tuple[int, int] | None:
    """(side, images read): the side of a square, in multiples of patch x merge pixels, holding at least as many
    pixels as the largest of the first SAMPLE training images after the processor's resize; None when no image
    could be read (a missing file, a data problem that training itself reports, or no training file)."""
    from PIL import Image

    from tunelab.errors import UserError
    from tunelab.tasks.mcqa_data import read_questions

    if not config.data.train:
        return None
    try:
        questions = read_questions(config.data.train, config, False, "train")[:SAMPLE]
    except UserError:
        return None
    factor, budget = patch * max(merge, 1), pixel_budget(config.model.name)
    largest, read = 0, 0
    for question in questions:
        try:
            with Image.open(question.image) as image:  # reads the header only
                width, height = image.size
        except (OSError, ValueError):
            continue
        largest, read = max(largest, resized_pixels(height, width, factor, budget)), read + 1
    if not read:
        return None
    return math.ceil(math.sqrt(largest) / factor) * factor, read
