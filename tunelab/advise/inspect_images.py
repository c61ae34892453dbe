"""Image EDA: class counts and imbalance, width / height / aspect percentiles, colour modes, unreadable or
truncated files, and exact duplicates by content hash inside a split and across splits (leakage).

Functions work on lists of paths and labels, so the image task and `inspect FILE` feed them the same way.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.advise.findings import Finding, rank
from tunelab.advise.inspect_text import EXAMPLES_KEPT, percentiles

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SEED_IMAGES = "seed 000 §6 (이미지 EDA: 클래스 불균형, 해상도/종횡비, 손상 샘플)"
# Largest / smallest class at which imbalance matters (seed 000 §6: WeightedSampler / pos_weight).
IMBALANCE_HIGH, IMBALANCE_LOW = 10.0, 3.0
TINY_SIDE = 32  # px: below this a 224 px model sees mostly upsampling blur
EXTREME_ASPECT = 4.0  # width / height beyond 4:1 (or 1:4): a square resize squashes the content
# Decoding releases the GIL in Pillow, so threads overlap file reads and decoding.
WORKERS = 8

Split = tuple[list[Path], list[str] | None]


@dataclass
class ImageInfo:
    """What reading one image found: size, mode and content hash, or the error that stopped it."""

    path: str
    ok: bool
    error: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    sha256: str = ""


def read_image_info(path: Path) -> ImageInfo:
    """Open, fully decode (a truncated file fails only when decoded) and hash one image file."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
    except OSError as error:
        return ImageInfo(str(path), False, f"cannot read: {error.strerror or error}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(path) as image:
            size, mode = image.size, image.mode
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:  # Pillow's errors for bad files
        return ImageInfo(str(path), False, f"{type(error).__name__}: {error}", sha256=digest)
    return ImageInfo(str(path), True, width=size[0], height=size[1], mode=mode, sha256=digest)


def scan_images(paths: list[Path]) -> list[ImageInfo]:
    """read_image_info for every path, in order, with a few threads."""
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return list(pool.map(read_image_info, paths))


def image_folder(root: Path) -> dict[str, Split]:
    """Splits of an image folder: root/<split>/<class>/*.jpg when train/ is there, else root/<class>/*.jpg.

    Files directly under a split folder (no class folder) count as unlabelled.
    """
    split_dirs = {name: root / name for name in ("train", "valid", "val", "test") if (root / name).is_dir()}
    if not split_dirs:
        split_dirs = {"train": root}
    splits: dict[str, Split] = {}
    for name, folder in split_dirs.items():
        paths, labels = [], []
        for file in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            paths.append(file)
            labels.append(file.parent.name if file.parent != folder else "")
        splits["valid" if name == "val" else name] = (paths, labels if any(labels) else None)
    return splits


def guess_image_column(rows: list[dict[str, Any]]) -> str | None:
    """The column whose values look like image file names (a known suffix in most of the first rows)."""
    sample = rows[:50]
    for column in rows[0]:
        values = [str(r.get(column, "")) for r in sample]
        if values and sum(Path(v).suffix.lower() in IMAGE_SUFFIXES for v in values) >= 0.8 * len(values):
            return column
    return None


def size_stats(infos: list[ImageInfo]) -> dict[str, Any]:
    """Width / height / aspect percentiles and colour-mode counts of the readable images."""
    good = [i for i in infos if i.ok]
    return {
        "width": percentiles([i.width for i in good]),
        "height": percentiles([i.height for i in good]),
        "aspect": {k: round(v, 3) for k, v in percentiles([i.width / max(i.height, 1) for i in good]).items()},
        "modes": dict(Counter(i.mode for i in good).most_common()),
    }


def _finding(finding_id: str, severity: str, headline: str, evidence: str, fix: str, share: float = 0.0) -> Finding:
    return Finding(finding_id, severity, headline, evidence, fix, source=SEED_IMAGES, score=share)


def inspect_image_splits(splits: dict[str, Split], source: str) -> Any:
    """Inspect image splits ({"train": (paths, labels or None), ...}) into an inspect Report."""
    from tunelab.advise.inspect import Report

    report = Report(source=source, kind="images")
    infos: dict[str, list[ImageInfo]] = {}
    for split, (paths, labels) in splits.items():
        infos[split] = scan_images(paths)
        stats: dict[str, Any] = {"images": len(paths), **size_stats(infos[split])}
        if labels is not None:
            stats["classes"] = dict(Counter(labels).most_common())
        report.splits[split] = stats
        report.images[split] = [(i.width, i.height) for i in infos[split] if i.ok]
        report.findings += unreadable_findings(split, infos[split]) + size_findings(split, infos[split])
        if labels is not None:
            report.findings += class_findings(split, stats["classes"])
    report.findings += duplicate_findings(splits, infos)
    report.examples = [{"split": s, "path": i.path, "size": f"{i.width}x{i.height}", "mode": i.mode}
                       for s, items in infos.items() for i in items[:3]]  # fmt: skip
    report.findings = rank(report.findings)
    return report


def unreadable_findings(split: str, infos: list[ImageInfo]) -> list[Finding]:
    """Files that cannot be opened or decoded (missing, corrupt, truncated)."""
    bad = [i for i in infos if not i.ok]
    if not bad:
        return []
    truncated = sum("truncated" in i.error for i in bad)
    sample = "; ".join(f"{Path(i.path).name}: {i.error}" for i in bad[:EXAMPLES_KEPT])
    headline = f"{split}: {len(bad)} image(s) cannot be read ({truncated} truncated)."
    fix = "Re-download or remove them; training skips nothing silently and would fail on them."
    severity = "fatal" if len(bad) == len(infos) else "high"
    return [_finding("unreadable_images", severity, headline, sample, fix, len(bad) / len(infos))]


def size_findings(split: str, infos: list[ImageInfo]) -> list[Finding]:
    """Tiny images, extreme aspect ratios, and colour modes other than RGB."""
    good = [i for i in infos if i.ok]
    found = []
    tiny = [i for i in good if min(i.width, i.height) < TINY_SIDE]
    if tiny:
        headline = f"{split}: {len(tiny)} image(s) are smaller than {TINY_SIDE} px on a side."
        sample = ", ".join(f"{Path(i.path).name} {i.width}x{i.height}" for i in tiny[:EXAMPLES_KEPT])
        found.append(_finding("tiny_images", "low", headline, sample, "Check them; they upsample to blur."))
    extreme = [i for i in good if max(i.width / max(i.height, 1), i.height / max(i.width, 1)) > EXTREME_ASPECT]
    if extreme:
        headline = f"{split}: {len(extreme)} image(s) have an aspect ratio beyond {EXTREME_ASPECT:g}:1."
        sample = ", ".join(f"{Path(i.path).name} {i.width}x{i.height}" for i in extreme[:EXAMPLES_KEPT])
        fix = "Pad to square (or crop) instead of a plain resize, which squashes them (seed 000 §6: Resize 전략)."
        found.append(_finding("extreme_aspect", "low", headline, sample, fix))
    modes = Counter(i.mode for i in good)
    if set(modes) - {"RGB"}:
        headline = f"{split}: colour modes other than RGB: {dict(modes)}."
        fix = "They are converted to RGB when loaded; check that grey / RGBA / CMYK images are meant to be there."
        found.append(_finding("colour_modes", "info", headline, "", fix))
    return found


def class_findings(split: str, counts: dict[str, int]) -> list[Finding]:
    """Imbalance between the largest and the smallest class."""
    if len(counts) < 2:
        return []
    ratio = max(counts.values()) / max(min(counts.values()), 1)
    if ratio < IMBALANCE_LOW:
        return []
    most, least = max(counts, key=counts.get), min(counts, key=counts.get)
    headline = f"{split}: classes are imbalanced, {ratio:.1f}:1 ('{most}' {counts[most]}, '{least}' {counts[least]})."
    fix = "Oversample rare classes (WeightedRandomSampler) or weight the loss (seed 000 §6); report macro-F1."
    severity = "medium" if ratio >= IMBALANCE_HIGH else "low"
    return [_finding("class_imbalance", severity, headline, f"{len(counts)} classes", fix, min(1.0, ratio / 100))]


def duplicate_findings(splits: dict[str, Split], infos: dict[str, list[ImageInfo]]) -> list[Finding]:
    """Identical files (same content hash) within a split, across splits, and duplicates with different labels."""
    where: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for split, items in infos.items():
        for index, info in enumerate(items):
            if info.sha256:
                where[info.sha256].append((split, index))
    found = []
    groups = [g for g in where.values() if len(g) > 1]
    inside = [g for g in groups if len({s for s, _ in g}) == 1]
    across = [g for g in groups if len({s for s, _ in g}) > 1]
    name = lambda s, i: f"{s}:{Path(infos[s][i].path).name}"  # noqa: E731 - local formatting helper
    if inside:
        extra = sum(len(g) - 1 for g in inside)
        sample = "; ".join(" = ".join(name(s, i) for s, i in g) for g in inside[:EXAMPLES_KEPT])
        headline = f"{extra} duplicate image(s) (identical files) inside a split."
        found.append(_finding("duplicate_images", "medium", headline, sample, "Keep one copy of each image."))
    if across:
        sample = "; ".join(" = ".join(name(s, i) for s, i in g) for g in across[:EXAMPLES_KEPT])
        headline = f"{len(across)} image(s) appear in more than one split: leakage."
        fix = "Remove them from train: scores on images seen in training are optimistic."
        found.append(_finding("image_leakage", "high", headline, sample, fix))
    conflicting = [g for g in groups if len({_label(splits, s, i) for s, i in g} - {None}) > 1]
    if conflicting:
        sample = "; ".join(", ".join(f"{name(s, i)} ({_label(splits, s, i)})" for s, i in g) for g in conflicting[:3])
        headline = f"{len(conflicting)} identical image(s) carry different labels."
        found.append(_finding("conflicting_labels", "medium", headline, sample, "Re-check and fix those labels."))
    return found


def _label(splits: dict[str, Split], split: str, index: int) -> str | None:
    labels = splits[split][1]
    return labels[index] if labels else None
