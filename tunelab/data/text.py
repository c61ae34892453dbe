"""Text examples: tokenize with an assistant-only label mask, truncate from the left, pack, batch.

An example is a dict with `input_ids` and `labels` (lists of ints; -100 where no loss is taken). Labels are
aligned with input_ids (not shifted): the loss for position t is taken on the logits of position t - 1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.data.templates import Rendered

IGNORE = -100  # the ignore_index of torch.nn.functional.cross_entropy and of transformers' losses


@dataclass
class TokenStats:
    """What tokenization did to a split: counts and token-length percentiles (before truncation)."""

    examples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_empty_answer: int = 0
    no_target: int = 0
    lengths: list[int] = field(default_factory=list)

    def percentiles(self) -> dict[str, int]:
        """Token-length percentiles 50 / 90 / 95 / 99 / max of the untruncated examples."""
        if not self.lengths:
            return {}
        ordered = sorted(self.lengths)

        def pick(q: float) -> int:
            return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

        return {"p50": pick(0.5), "p90": pick(0.9), "p95": pick(0.95), "p99": pick(0.99), "max": ordered[-1]}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (lengths replaced by their percentiles)."""
        return {
            "examples": self.examples,
            "truncated": self.truncated,
            "dropped_too_long": self.dropped_too_long,
            "dropped_empty_answer": self.dropped_empty_answer,
            "no_target": self.no_target,
            "length_percentiles": self.percentiles(),
        }


def tokenize_rendered(
    rendered: Rendered, tokenizer: Any, add_special_tokens: bool
) -> tuple[list[int], list[int], int, int]:
    """Token ids and aligned labels for a rendered conversation.

    Returns (input_ids, labels, head_tokens, tail_start): tokens [0, head_tokens) hold the system prompt and
    tokens [tail_start, end) the final assistant header and answer, the parts truncation never cuts. A token is
    a target when it overlaps an assistant span (so a token merged across the header boundary still counts).
    """
    encoded = tokenizer(rendered.text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in encoded["offset_mapping"]]
    labels = [IGNORE] * len(ids)
    spans = rendered.assistant_spans
    span_index = 0
    for position, (start, end) in enumerate(offsets):
        if end <= start:  # special tokens added by the tokenizer (bos) have empty offsets
            continue
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index < len(spans) and start < spans[span_index][1] and end > spans[span_index][0]:
            labels[position] = ids[position]
    head_tokens = 0
    for start, end in offsets:  # leading tokens inside the protected head (a tokenizer-added bos included)
        if end > rendered.keep_head and end > start:
            break
        head_tokens += 1
    tail_start = next((i for i, (s, e) in enumerate(offsets) if e > rendered.answer_start and e > s), len(ids))
    return ids, labels, min(head_tokens, tail_start), tail_start


def truncate_left(
    ids: list[int], labels: list[int], head: int, tail_start: int, max_length: int
) -> tuple[list[int], list[int]] | None:
    """Cut the history from the left so the example fits, keeping head and tail; None when it cannot fit."""
    if len(ids) <= max_length:
        return ids, labels
    keep_middle = max_length - head - (len(ids) - tail_start)
    if keep_middle < 0:
        return None
    middle_start = tail_start - keep_middle
    return ids[:head] + ids[middle_start:], labels[:head] + labels[middle_start:]


# ----------------------------------------------------------------------------------------------- packing


def pack_examples(examples: list[dict[str, list[int]]], max_length: int, seed: int) -> list[dict[str, list[int]]]:
    """Pack examples into rows of at most max_length tokens (first-fit decreasing, deterministic).

    Each row carries `position_ids` that restart at 0 for every example; with no 2-D attention mask, the model
    then attends only within each example (transformers builds a block-diagonal mask from the restarts; flash
    attention uses them as varlen boundaries). The first label of every example is ignored so no example is
    trained to predict its neighbour's first token; that token is never a target unpacked either.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        size = len(examples[index]["input_ids"])
        for row, free in enumerate(room):
            if size <= free:
                rows[row].append(index)
                room[row] -= size
                break
        else:
            rows.append([index])
            room.append(max_length - size)
    random.Random(seed).shuffle(rows)
    packed = []
    for row in rows:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for index in row:
            example = examples[index]
            ids += example["input_ids"]
            labels += [IGNORE] + example["labels"][1:]
            positions += list(range(len(example["input_ids"])))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


# ----------------------------------------------------------------------------------------------- batching


def collate(examples: list[dict[str, list[int]]], pad_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded batch tensors. Packed rows (with position_ids) get no attention mask: their padding is a
    separate block of restarted positions, which the per-example mask keeps apart."""
    longest = max(len(e["input_ids"]) for e in examples)
    longest = -(-longest // pad_to_multiple) * pad_to_multiple
    packed = "position_ids" in examples[0]
    batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    if packed:
        batch["position_ids"] = []
    else:
        batch["attention_mask"] = []
    for example in examples:
        pad = longest - len(example["input_ids"])
        batch["input_ids"].append(example["input_ids"] + [pad_id] * pad)
        batch["labels"].append(example["labels"] + [IGNORE] * pad)
        if packed:
            batch["position_ids"].append(example["position_ids"] + list(range(pad)))
        else:
            batch["attention_mask"].append([1] * len(example["input_ids"]) + [0] * pad)
    tensors = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
    tensors["real_tokens"] = torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.long)
    return tensors


NOT_MODEL_INPUTS = ("labels", "real_tokens")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without the keys the model must not see (labels, token counts)."""
    return {key: value for key, value in batch.items() if key not in NOT_MODEL_INPUTS}


def count_targets(labels: torch.Tensor) -> int:
    """Number of positions the loss is taken on (labels shifted by one, as in causal-LM training)."""
    return int((labels[..., 1:] != IGNORE).sum())
