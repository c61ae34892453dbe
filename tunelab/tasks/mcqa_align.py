"""Projector alignment: a short contrastive warm-up of an untrained projector before mcqa training.

A projector that starts from random weights (tunelab's embedded LLaVA-style assemblies) gives image tokens the
language model cannot read, and one answer letter per example is too little signal to teach it within a short
run: the demo stayed at chance after 1,200 examples. LLaVA's answer is a first stage that trains the projector
alone on captions. mcqa data has no captions but it has the next best thing: the text of the right choice. This
stage trains only the projector so that, in the language model's own input-embedding space, the right choice's
text has an image token nearer to it than any other choice has (ColBERT's MaxSim over the image tokens, a CLIP-style
cross-entropy over each row's choices), and that nearest token sits on the choice's embedding, size included. The
image then reads like words ("red", "circle" in two of its tokens), which the language model can compare with the
choices from its first step. It needs no language-model forward pass: the frozen vision features are computed once,
so it takes seconds on a CPU.

Measured on the demo (easy-VQA, CPU, 150 steps of batch 8): without it, valid accuracy stayed at chance (0.35); with
a mean-pooled cosine alignment, still at chance (its tokens grew to 5x a word's norm); with this one, 0.72 and
rising.

Only rows whose answer describes the image take part (`describing_rows`): a yes / no answer depends on the question,
and aligning to it made the demo's yes / no questions stay at chance (test 0.52) while colours and shapes were
learned; without those rows the demo reaches valid 0.958, test yes / no 0.951 (README).

It runs when method.train_parts.align_steps asks (by default only for a projector that starts untrained), on the
training rows only, and never on resume (the checkpoint holds the projector it led to).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.config import RunConfig
from tunelab.data.images import open_rgb
from tunelab.errors import UserError
from tunelab.models import vlm
from tunelab.tasks.mcqa_data import Question

ALIGN_BATCH = 64  # rows per alignment step
ALIGN_LR = 1e-3  # AdamW on the projector alone; its own rate (the run's lr is chosen for LoRA)
TEMPERATURE = 0.05  # cosine similarities / this = logits over a row's choices (CLIP's learned value is ~0.01-0.07)
MAX_ROWS = 4096  # rows whose image features are cached for the warm-up (enough for any number of steps here)
CONTRADICTED_SHARE = 0.05  # describing_rows: colours and shapes are never contradicted, easy-VQA's yes / no on ~20%


def align_steps(config: RunConfig, model_path: str) -> int:
    """The steps of projector alignment this run takes: method.train_parts.align_steps, or by default 300 when the
    projector starts untrained (an embedded assembly) and is trained, else 0."""
    parts = config.method.train_parts
    if parts.align_steps is not None:
        return parts.align_steps if parts.projector else 0
    return 300 if parts.projector and vlm.projector_starts_untrained(model_path) else 0


def describing_rows(rows: list[Question]) -> list[Question]:
    """The rows whose right answer describes the image rather than the question. An answer text that is right in
    one row of an image and a wrong choice in another row of the same image ("yes" to "is there a red shape?" and
    not to "is there a blue one?") depends on the question: aligning image tokens to it pulls them toward "yes" or
    "no" at random, and the demo's yes / no questions then stayed at chance. A text that does so on more than
    CONTRADICTED_SHARE of the images it is right for (and on at least 3) is left out of the alignment."""
    right: dict[str, set[str]] = {}
    wrong: dict[str, set[str]] = {}
    for q in rows:
        for k, text in enumerate(q.choices):
            (right if k == q.answer else wrong).setdefault(text, set()).add(q.image)
    dropped = set()
    for text, images in right.items():
        contradicted = len(images & wrong.get(text, set()))
        if contradicted >= 3 and contradicted > CONTRADICTED_SHARE * len(images):
            dropped.add(text)
    return [q for q in rows if q.choices[q.answer] not in dropped]


def _projector(model: torch.nn.Module) -> torch.nn.Module:
    roots = vlm.part_roots(model)["projector"]
    if len(roots) != 1:
        raise UserError(
            f"Projector alignment needs exactly one projector module; this model has {len(roots) or 'none'}. "
            "Set method.train_parts.align_steps: 0."
        )
    return model.get_submodule(roots[0])


@torch.no_grad()
def _projector_inputs(model: torch.nn.Module, processor: Any, images: list[Any], device: torch.device) -> torch.Tensor:
    """What the projector receives for these images, [images, tokens, features], captured by a hook while the
    model computes its image features (the frozen vision encoder runs once per image)."""
    projector, captured = _projector(model), []

    def keep_input(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0])

    encoded = processor.image_processor(images=images, return_tensors="pt")
    inputs = {key: value.to(device) for key, value in encoded.items() if isinstance(value, torch.Tensor)}
    inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    from tunelab.tasks.mcqa import half_autocast  # (mcqa imports this module)

    handle = projector.register_forward_pre_hook(keep_input)
    try:
        with half_autocast(model, device):
            getattr(model, "get_base_model", lambda: model)().get_image_features(**inputs)
    finally:
        handle.remove()
    features = captured[0] if captured else None
    if features is None or features.dim() != 3 or features.shape[0] != len(images):
        shape = None if features is None else tuple(features.shape)
        raise UserError(
            f"Projector alignment needs the projector to see [images, tokens, features]; this model gives {shape}. "
            "Set method.train_parts.align_steps: 0."
        )
    return features.float()


@torch.no_grad()
def _choice_embeddings(model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """The mean input embedding of each choice text's tokens, as it appears after its letter ("(a) red")."""
    embedding = model.get_input_embeddings()
    rows = []
    for text in texts:
        ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        weight_device = embedding.weight.device
        rows.append(embedding(torch.tensor(ids, device=weight_device)).float().mean(0))
    return torch.stack(rows)


def align_projector(
    model: torch.nn.Module,
    processor: Any,
    questions: list[Question],
    config: RunConfig,
    steps: int,
    device: torch.device,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Train the projector alone for `steps` steps on the contrastive choice-text loss; returns what it did (rows,
    seconds, the share of rows whose right choice is the nearest before and after)."""
    started = time.perf_counter()
    rng = random.Random(config.train.seed)
    rows = describing_rows([q for q in questions if q.answer is not None])
    if not rows:
        say("projector alignment: skipped, no answer in the training rows describes its image (see describing_rows)")
        return {"steps": 0, "rows": 0, "seconds": 0.0}
    rows = rng.sample(rows, min(len(rows), MAX_ROWS))
    images = sorted({q.image for q in rows})
    index = {path: i for i, path in enumerate(images)}
    pixels = config.data.max_image_pixels
    features = torch.cat(
        [
            _projector_inputs(model, processor, [open_rgb(p, pixels) for p in images[i : i + 64]], device)
            for i in range(0, len(images), 64)
        ]
    )
    texts = sorted({c for q in rows for c in q.choices})
    text_index = {t: i for i, t in enumerate(texts)}
    embeddings = _choice_embeddings(model, processor.tokenizer, texts)
    projector = _projector(model)
    trained = [p for p in projector.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=ALIGN_LR, weight_decay=0.0)

    def loss_and_hits(batch: list[Question]) -> tuple[torch.Tensor, int]:
        tokens = projector(features[[index[q.image] for q in batch]].to(device)).float()  # [rows, tokens, width]
        width = max(len(q.choices) for q in batch)
        choice_ids = torch.tensor([[text_index[c] for c in q.choices] + [0] * (width - len(q.choices)) for q in batch])
        real = torch.tensor([[k < len(q.choices) for k in range(width)] for q in batch], device=device)
        answer = torch.tensor([q.answer for q in batch], device=device)
        choices = embeddings[choice_ids.to(device)]  # [rows, choices, width]
        similarity = torch.einsum("bnd,bkd->bnk", F.normalize(tokens, dim=-1), F.normalize(choices, dim=-1))
        best, where = similarity.max(1)  # [rows, choices]: each choice's nearest image token (ColBERT's MaxSim)
        logits = (best / TEMPERATURE).masked_fill(~real, float("-inf"))
        ranking = F.cross_entropy(logits, answer)
        rows = torch.arange(len(batch), device=device)
        nearest = tokens[rows, where[rows, answer]]  # the image token nearest the right choice
        right = choices[rows, answer]
        closeness = (nearest - right).pow(2).sum(-1).mean() / right.pow(2).sum(-1).mean()
        hits = int((logits.argmax(-1) == answer).sum().item())
        return ranking + closeness, hits

    def match_rate() -> float:
        with torch.no_grad():
            return sum(loss_and_hits(rows[i : i + 256])[1] for i in range(0, len(rows), 256)) / len(rows)

    before = match_rate()
    for _ in range(steps):
        batch = rng.sample(rows, min(ALIGN_BATCH, len(rows)))
        loss, _ = loss_and_hits(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = match_rate()
    seconds = time.perf_counter() - started
    say(
        f"projector alignment: {steps} steps on {len(rows)} rows ({len(images)} images), right choice nearest to the "
        f"image tokens {before:.3f} -> {after:.3f}, {seconds:.0f} s"
    )
    return {"steps": steps, "rows": len(rows), "match_before": before, "match_after": after, "seconds": seconds}
