"""Stratified train / validation splits: every class keeps its share in both parts."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Hashable, Sequence


def stratified_split(labels: Sequence[Hashable], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, valid) with about `fraction` of every class in valid, seeded and in the input order.

    Each class gives round(fraction * count) examples, at least one when it has two or more (so every class is
    validated) and never all of them (so every class is trained on). A class with one example stays in train.
    """
    by_class: dict[Hashable, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    rng = random.Random(seed)
    valid: set[int] = set()
    for label in sorted(by_class, key=str):  # a fixed class order, so the split depends only on the seed
        members = list(by_class[label])
        rng.shuffle(members)
        if len(members) < 2 or fraction <= 0:
            continue
        take = min(max(1, round(fraction * len(members))), len(members) - 1)
        valid.update(members[:take])
    train = [i for i in range(len(labels)) if i not in valid]
    return train, sorted(valid)
