"""Constrained multiple-choice scoring: the next-token distribution at the answer position, restricted to the
choice letters (nothing else can come out, by construction), and permutation test-time augmentation.

Scoring reads one position of one forward pass, instead of generating and parsing text (the seeds'
generate(max_new_tokens=1) + extract_choice, which falls back to 'a' whenever the output is not a letter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LETTERS = "abcdefgh"  # 2 to 8 choices, lettered as the seeds' competition (lowercase)
MAX_CHOICES = len(LETTERS)


def letter_probabilities(logits: torch.Tensor, letter_ids: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
    """[B, 8] probabilities of the choice letters from next-token logits [B, V]: a softmax over the logits of each
    row's first n_choices letters only (the others get 0). Its argmax is the argmax of the full logits restricted to
    those letters."""
    scores = logits.float()[:, letter_ids]  # [B, 8]
    valid = torch.arange(len(letter_ids), device=logits.device)[None, :] < n_choices.to(logits.device)[:, None]
    scores = scores.masked_fill(~valid, float("-inf"))
    return torch.softmax(scores, dim=-1)


def cyclic_orders(n_choices: int, count: int | None = None) -> list[list[int]]:
    """`count` (default n_choices, at most n_choices) cyclic orders of the choices: order[j] is the original choice
    shown at position j. Each original choice appears once at every position over n_choices orders."""
    count = n_choices if count is None else min(count, n_choices)
    return [[(j + shift) % n_choices for j in range(n_choices)] for shift in range(count)]


def to_original(probabilities: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """Probabilities by shown position [.., n] -> by original choice: original choice order[j] gets position j's."""
    back = torch.zeros_like(probabilities)
    back[..., list(order)] = probabilities[..., : len(order)]
    return back


def smoothed_letter_targets(answer: torch.Tensor, n_choices: torch.Tensor, smoothing: float) -> torch.Tensor:
    """[B, 8] target distribution over the letters: 1 - smoothing on the answer, smoothing spread evenly over the
    row's n_choices letters (answer included, as in the usual label smoothing), none on other letters."""
    positions = torch.arange(MAX_CHOICES, device=answer.device)[None, :]
    spread = (positions < n_choices[:, None]).float() * (smoothing / n_choices[:, None].float())
    return spread + torch.nn.functional.one_hot(answer, MAX_CHOICES).float() * (1.0 - smoothing)
