"""Plots of a run: loss curves and learning rate (curves.png), confusion matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(records: list[dict[str, Any]], out: Path) -> Path | None:
    """Train and validation loss against steps, and the learning rate, into one PNG. None when nothing to plot."""
    train = [r for r in records if r.get("event") == "train" and r.get("loss") is not None]
    valid = [r for r in records if r.get("event") == "eval" and r.get("loss") is not None]
    if not train and not valid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, lr_axis) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    if train:
        loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.8)
    if valid:
        loss_axis.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="valid loss")
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    loss_axis.grid(alpha=0.3)
    lr_points = [r for r in train if r.get("lr") is not None]
    lr_axis.plot([r["step"] for r in lr_points], [r["lr"] for r in lr_points], color="tab:green")
    lr_axis.set_ylabel("lr")
    lr_axis.set_xlabel("optimizer step")
    lr_axis.grid(alpha=0.3)
    figure.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(out)
    return out


def plot_confusion_matrix(matrix: list[list[int]], class_names: list[str], out: Path, title: str = "") -> Path:
    """Rows: true class, columns: predicted; cells show counts, colour the share of the true class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(matrix, dtype=np.int64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(max(4.0, 0.45 * len(class_names) + 2.5), 24.0)
    figure, axis = plt.subplots(figsize=(size, size * 0.9))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=90 if len(class_names) > 8 else 0)
    axis.set_yticks(ticks, class_names)
    if len(class_names) <= 30:  # beyond that the numbers are unreadable; the colours still show the pattern
        for row in ticks:
            for column in ticks:
                colour = "white" if shares[row, column] > 0.5 else "black"
                axis.text(column, row, str(counts[row, column]), ha="center", va="center", color=colour, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="share of the true class")
    figure.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(out)
    return out
