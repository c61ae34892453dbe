"""Test-time augmentation for classification: average the class probabilities of several views of each image
(the image, its horizontal flip, other input sizes). Views are computed batch by batch and accumulated by the
images' positions, so each average belongs to the image it came from whatever the view order."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

Predict = Callable[[torch.Tensor], torch.Tensor]  # a batch of pixels -> logits


def view_probabilities(predict: Predict, pixels: torch.Tensor, flip: bool) -> list[torch.Tensor]:
    """Softmax probabilities of one batch, and of its horizontal flip when `flip` (a flipped image of a
    left-right symmetric class keeps its label, so the predictions need no mapping back)."""
    views = [pixels, pixels.flip(-1)] if flip else [pixels]
    return [torch.softmax(predict(view).float(), dim=-1) for view in views]


def tta_probabilities(
    predict: Predict, passes: Iterable[Iterable[tuple[torch.Tensor, torch.Tensor]]], n_images: int, flip: bool
) -> torch.Tensor:
    """Mean probabilities [n_images, C] over every pass (one per input size) and, with `flip`, both flips.

    Each pass yields (positions, pixels) batches: `positions` are the images' indices in 0..n_images-1."""
    total: torch.Tensor | None = None
    counts = torch.zeros(n_images, dtype=torch.float64)
    for batches in passes:
        for positions, pixels in batches:
            for probabilities in view_probabilities(predict, pixels, flip):
                probabilities = probabilities.double().cpu()
                if total is None:
                    total = torch.zeros(n_images, probabilities.shape[1], dtype=torch.float64)
                total.index_add_(0, positions.cpu(), probabilities)
                counts.index_add_(0, positions.cpu(), torch.ones(len(positions), dtype=torch.float64))
    if total is None:
        raise ValueError("no images to predict")
    return (total / counts.clamp(min=1)[:, None]).float()
