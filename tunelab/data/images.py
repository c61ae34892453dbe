"""Images as training data, read safely: class folders or a table of (path, label) with an image root.

Safe means: no path in a table resolves outside its image root (symlinks followed); files larger than the
decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS, or data.max_image_pixels) are refused before decoding;
every image is decoded once before training, and the unreadable ones (empty, truncated, corrupt) are listed
(or skipped with data.skip_bad_images); grayscale, RGBA, palette, CMYK and 16-bit images become 8-bit RGB.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tunelab.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SHOWN = 20  # problems listed by name before "... and N more"
# open_rgb checks the pixel count itself and raises a UserError; PIL's warning for the same files is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageSample:
    """One image: its file, its class name (None when unlabeled) and an id for predictions."""

    path: Path
    label: str | None
    id: str


class ImageTooLarge(UserError):
    """An image over the decompression-bomb limit (never skipped: it is refused)."""


# ----------------------------------------------------------------------------------------------- reading


def read_image_folder(folder: Path, key: str) -> list[ImageSample]:
    """Images under `folder/<class>/...` (one subfolder per class, searched recursively), sorted by path."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(
            f"{key} is the folder {folder}, which has no class subfolders. Put each class's images in its own "
            f"subfolder ({folder}/cat/1.jpg, {folder}/dog/2.jpg), or give a CSV with image and label columns."
        )
    samples, empty = [], []
    root = folder.resolve()
    for class_dir in classes:
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            empty.append(class_dir.name)
        for path in files:
            resolved = path.resolve()
            if not resolved.is_relative_to(root):
                raise UserError(f"{path} links outside {folder} (to {resolved}). Copy the file into the folder.")
            samples.append(ImageSample(resolved, class_dir.name, str(path.relative_to(folder))))
    if empty:
        raise UserError(
            f"{key}: class folder(s) {', '.join(empty)} in {folder} hold no images ({', '.join(IMAGE_SUFFIXES)}). "
            "Add images or remove the empty folder(s)."
        )
    return samples


def read_image_table(
    path: Path, image_column: str, label_column: str, image_root: Path, need_label: bool, id_column: str = "id"
) -> list[ImageSample]:
    """Rows of a CSV / JSONL / Parquet file as samples; image paths resolved inside `image_root`."""
    from tunelab.data.readers import read_table, require_columns

    rows = read_table(path)
    needed = [image_column] + ([label_column] if need_label else [])
    keys = ["data.columns.image"] + (["data.columns.label"] if need_label else [])
    for column, key in zip(needed, keys, strict=True):
        require_columns(path, rows, [column], key)
    root = image_root.resolve()
    samples, outside, missing_label = [], [], []
    for number, row in enumerate(rows, start=1):
        raw = str(row.get(image_column) or "").strip()
        resolved = (root / raw).resolve() if raw else root
        if not raw or not resolved.is_relative_to(root) or resolved == root:
            outside.append(f"row {number}: {raw!r}")
            continue
        label = row.get(label_column)
        label = None if label is None or str(label).strip() == "" else str(label).strip()
        if need_label and label is None:
            missing_label.append(str(number))
        row_id = row.get(id_column)
        samples.append(ImageSample(resolved, label, str(row_id) if row_id not in (None, "") else str(number - 1)))
    if outside:
        raise UserError(
            f"{path}: {len(outside)} image path(s) are empty or resolve outside the image root {root} "
            f"({_first(outside)}). Paths must be relative to data.image_root (or absolute inside it); "
            "set data.image_root to the folder that holds the images."
        )
    if missing_label:
        raise UserError(f"{path}: rows {_first(missing_label)} have no label in column '{label_column}'.")
    return samples


def _first(items: Sequence[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f", ... and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


# ----------------------------------------------------------------------------------------------- decoding


def open_rgb(path: Path, max_pixels: int | None = None) -> Image.Image:
    """Decode an image as 8-bit RGB. Raises ImageTooLarge over the pixel limit, OSError when unreadable."""
    limit = max_pixels or Image.MAX_IMAGE_PIXELS
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:  # PIL itself refuses above twice its limit
        raise ImageTooLarge(_too_large(path, str(error), limit)) from None
    with image:
        if limit and image.width * image.height > limit:
            raise ImageTooLarge(_too_large(path, f"{image.width}x{image.height} pixels", limit))
        image.load()
        return to_rgb(image)


def _too_large(path: Path, what: str, limit: int | None) -> str:
    return (
        f"Image {path} is too large to decode safely ({what}; the limit is {limit:,} pixels): it may be a "
        "decompression bomb. Remove it, or raise data.max_image_pixels if the file is trusted."
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; 16-bit and float images are scaled to 0..255 rather than clipped."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = values.max(initial=0.0)
        if image.mode == "F":  # float images: 0..1 when they fit, else taken as 0..255
            divisor = 1 / 255 if top <= 1.0 else 1.0
        elif image.mode.startswith("I;16") or top > 255:  # 16-bit data: 0..65535 -> 0..255 (65535 / 257 = 255)
            divisor = 257.0 if top <= 65535 else top / 255
        else:  # 32-bit integer mode holding 8-bit values
            divisor = 1.0
        gray = np.clip(values / divisor, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # palette transparency must go through RGBA (PIL warns otherwise)
    return image.convert("RGB") if image.mode != "RGB" else image


def image_problem(path: Path, max_pixels: int | None) -> str | None:
    """Why an image cannot be used ('empty file', 'truncated or corrupt: ...'), or None when it decodes.
    Raises ImageTooLarge for a decompression bomb."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        open_rgb(path, max_pixels)
    except ImageTooLarge:
        raise
    except FileNotFoundError:
        return "file not found"
    except UnidentifiedImageError:
        return "not an image file (unrecognised or corrupt header)"
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports truncation and bad streams as these
        return f"truncated or corrupt: {error}"
    return None


def check_images(samples: list[ImageSample], skip_bad: bool, max_pixels: int | None, what: str) -> list[ImageSample]:
    """Decode every image once (threads: PIL releases the GIL while decoding). Unreadable images stop the run
    with their list, or with `skip_bad` are dropped and reported; decompression bombs always stop it."""
    workers = min(16, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(lambda s: image_problem(s.path, max_pixels), samples))
    bad = [f"{s.path} ({p})" for s, p in zip(samples, problems, strict=True) if p is not None]
    if not bad:
        return samples
    if not skip_bad:
        raise UserError(
            f"{what}: {len(bad)} of {len(samples)} images cannot be read: {_first(bad)}. Fix or remove them, "
            "or set data.skip_bad_images=true to train without them."
        )
    from tunelab.track.progress import console

    console.print(f"[yellow]warning:[/] {what}: skipped {len(bad)} of {len(samples)} unreadable images: {_first(bad)}")
    return [s for s, p in zip(samples, problems, strict=True) if p is None]


# ----------------------------------------------------------------------------------------------- datasets


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Python, NumPy and torch CPU random streams seeded for one image's augmentation, restored afterwards, so an
    augmentation depends on (seed, epoch, image) alone: the same with 0 or N loader workers and after a resume."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.random.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)  # CPU only: CUDA streams (drop path, erasing) are untouched
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.random.default_generator.set_state(torch_state)


class ImageDataset(torch.utils.data.Dataset):
    """(uint8 CHW array, class index) per sample through a timm transform; training items seeded per epoch."""

    def __init__(
        self,
        samples: Sequence[ImageSample],
        class_index: dict[str, int],
        transform: Callable[[Image.Image], Any],
        seed: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.samples, self.class_index, self.transform = list(samples), class_index, transform
        self.seed, self.max_pixels, self.epoch = seed, max_pixels, 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentations the next items get (called by the training loop)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        sample = self.samples[index]
        try:
            image = open_rgb(sample.path, self.max_pixels)
        except (OSError, SyntaxError, ValueError) as error:  # changed on disk after the check
            raise UserError(f"Image {sample.path} cannot be read any more: {error}") from None
        label = self.class_index.get(sample.label, -1) if sample.label is not None else -1
        if self.seed is None:
            return np.asarray(self.transform(image)), label
        # distinct, fixed streams per (seed, epoch, image); the constants are arbitrary large primes
        seed = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**63
        for attempt in range(8):
            with seeded_rngs(seed + attempt):
                try:
                    return np.asarray(self.transform(image)), label
                except ValueError as error:
                    # timm's PosterizeIncreasing asks for 0 bits at magnitude 10 (m9 + mstd0.5 reaches it); older
                    # Pillow returned a black image, Pillow >= 13 refuses: draw that image's augmentation again
                    if "bits must be between" not in str(error):
                        raise
        return np.asarray(self.transform(image)), label


def collate_images(items: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
    """A batch: uint8 pixels [B, 3, H, W] (normalized on the device, as timm's prefetcher does) and labels."""
    pixels = torch.from_numpy(np.stack([item[0] for item in items]))
    return {"pixels": pixels, "labels": torch.tensor([item[1] for item in items], dtype=torch.long)}
