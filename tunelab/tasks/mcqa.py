"""mcqa: vision-language multiple-choice QA (image + question + 2-8 choices -> one letter), top to bottom.

Rows (tasks/mcqa_data.py) become chat prompts: a system instruction, the image, the question and the lettered
choices; the target is the answer letter plus the end-of-turn token and nothing else carries loss. Training shows
the choices in a new order each epoch (the answer letter follows), and label smoothing spreads over the choice
letters only. The model is any AutoModelForImageTextToText (Qwen2-VL / Qwen2.5-VL, LLaVA-style, the embedded
assembly) with its parts trained as method.train_parts says: vision encoder frozen, projector trained, LoRA on
the language model, a learning-rate multiplier per part. Evaluation and prediction never generate: one forward
pass reads the next-token logits at the answer position and keeps the choice letters' probabilities
(evaluate/choices.py), batched by length; eval.tta permute averages them over cyclic choice orders.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.config import RunConfig
from tunelab.data.splits import stratified_split
from tunelab.errors import UserError
from tunelab.evaluate.choices import LETTERS, cyclic_orders, letter_probabilities, smoothed_letter_targets, to_original
from tunelab.models import vlm
from tunelab.models.adapters import lora_inputs_uncast
from tunelab.tasks import mcqa_align
from tunelab.tasks.mcqa_data import (
    AnswerTokens,
    Chunks,
    Question,
    QuestionDataset,
    answer_tokens,
    check_question_images,
    collate,
    length_order,
    model_inputs,
    read_questions,
)
from tunelab.track.progress import work_bar
from tunelab.train.loop import TrainingJob

META_FILE = "tunelab_mcqa.json"

# ----------------------------------------------------------------------------------------------- data


def load_questions(config: RunConfig) -> tuple[list[Question], list[Question]]:
    """Train and validation questions: data.valid when given, else a valid_split of train stratified by answer
    letter (seed 002's second fix). Every image is checked before the split."""
    train = read_questions(str(config.data.train), config, True, "data.train")
    if config.data.limit:
        train = train[: config.data.limit]
    train = check_question_images(train, config, "data.train")
    if config.data.valid:
        valid = check_question_images(
            read_questions(config.data.valid, config, True, "data.valid"), config, "data.valid"
        )
    elif config.data.valid_split > 0:
        train_ids, valid_ids = stratified_split([q.answer for q in train], config.data.valid_split, config.train.seed)
        train, valid = [train[i] for i in train_ids], [train[i] for i in valid_ids]
    else:
        valid = []
    return train, valid[: config.data.valid_limit] if config.data.valid_limit else valid


# ----------------------------------------------------------------------------------------------- loss and scoring


def half_autocast(model: torch.nn.Module, device: torch.device) -> Any:
    """With bf16 / fp16 frozen weights and fp32 trained ones (LoRA, projector), autocast keeps each matmul in the
    frozen weights' dtype. Training runs under the accelerator's autocast already (nesting it changes nothing);
    scoring after training (evaluate, predict) has no accelerator, and without this would run every LoRA path in
    fp32, slower and not the numbers validation saw during training."""
    # floating weights only: a QLoRA model's 4-bit weights are stored as uint8
    dtype = next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()), torch.float32)
    if device.type not in ("cpu", "cuda") or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def answer_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Logits [B, keep, V] of the last `keep` positions (rows are left-padded, so they end together); the output
    head runs on those positions only."""
    device = next(model.parameters()).device
    autocast = half_autocast(model, device)
    # scoring only: under gradient checkpointing a block's recomputed forward runs outside this context, and must
    # record the same tensors as the first one did
    uncast = isinstance(autocast, torch.autocast) and not torch.is_grad_enabled()
    with autocast, lora_inputs_uncast(model, active=uncast):
        return model(**model_inputs(batch), logits_to_keep=keep, use_cache=False).logits.float()


def loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], answers: AnswerTokens, smoothing: float
) -> torch.Tensor:
    """Summed cross-entropy over the target tokens only (the answer letter and the end-of-turn token); the letter's
    target is smoothed over the row's choice letters, not the whole vocabulary."""
    vlm.frozen_parts_to_eval(model)
    length = answers.length
    logits = answer_logits(model, batch, length + 1)[:, :length]  # position i predicts target token i
    targets = batch["input_ids"][:, -length:]
    log_probs = F.log_softmax(logits[:, 0], dim=-1)[:, answers.letter_ids.to(logits.device)]
    letter_targets = smoothed_letter_targets(batch["answer"], batch["n_choices"], smoothing)
    letter_loss = -(letter_targets * log_probs.masked_fill(letter_targets == 0, 0.0)).sum()
    if length == 1:
        return letter_loss
    rest = F.cross_entropy(logits[:, 1:].flatten(0, 1), targets[:, 1:].flatten(), reduction="sum")
    return letter_loss + rest


@torch.no_grad()
def score(
    model: torch.nn.Module,
    dataset: QuestionDataset,
    answers: AnswerTokens,
    batch_size: int,
    pad_id: int,
    order: list[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, float]:
    """Letter probabilities [N, 8] by shown position for every row of the dataset (one forward pass each, batches
    in `order`, results in row order), and the summed target-token loss when the dataset carries answers.
    `progress(n)` is told of every batch queued (a bar outside training)."""
    device = next(model.parameters()).device
    order = order if order is not None else list(range(len(dataset)))
    keep = answers.length + 1 if dataset.with_answer else 1
    if device.type == "cuda":  # half the bytes to copy; an fp32 / CPU run keeps the processor's float32
        dataset.pixel_dtype = vlm.vision_dtype(model)
    # on CUDA, worker processes decode images and run the processor while the GPU scores. They hand over chunks of
    # a few examples, batched here: a worker given whole batches prepares a batch alone (a test set of two batches
    # kept two of eight workers busy: 2.9x the seeds' per-sample generate instead of the 10x wanted), and single
    # examples made the main process spend ~3.5 ms receiving each one (measured on an H200)
    workers = loader_workers(dataset.config, device)
    chunk = next(size for size in (4, 2, 1) if batch_size % size == 0) if workers else 1
    pieces = [order[i : i + chunk] for i in range(0, len(order), chunk)]
    loader = torch.utils.data.DataLoader(
        Chunks(dataset, pieces, pad_id),
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",  # page-locked: the copy to the GPU runs while the CPU goes on
        prefetch_factor=max(2, -(-2 * batch_size // (chunk * workers))) if workers else None,  # two batches ahead
    )
    received = iter(loader)
    # results stay on the device until the end: reading each batch back would make the CPU wait for the GPU
    # instead of preparing the next batch while the GPU works
    rows, shown, total = [], [], torch.zeros((), device=device)
    letter_ids = answers.letter_ids.to(device)
    for _ in range(0, len(order), batch_size):
        group = list(itertools.islice(received, batch_size // chunk))
        batch = collate(group, pad_id, skip=("pixel_values",))  # token tensors and row facts: small, on the CPU
        rows.append(batch["row"])
        positions = vlm.rope_positions(model, batch)
        if positions is not None:
            batch["position_ids"] = positions
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        if "pixel_values" in group[0]:  # the large image tensor: copied chunk by chunk, joined on the device
            batch["pixel_values"] = torch.cat([c["pixel_values"].to(device, non_blocking=True) for c in group])
        logits = answer_logits(model, batch, keep)
        shown.append(letter_probabilities(logits[:, 0], letter_ids, batch["n_choices"]))
        if progress is not None:
            progress(len(rows[-1]))
        if dataset.with_answer:
            length = answers.length
            targets = batch["input_ids"][:, -length:]
            total += F.cross_entropy(logits[:, :length].flatten(0, 1), targets.flatten(), reduction="sum")
    probabilities = torch.zeros(len(dataset), len(LETTERS))
    if rows:
        probabilities[torch.cat(rows)] = torch.cat(shown).float().cpu()
    return probabilities, float(total)


def loader_workers(config: RunConfig, device: torch.device) -> int:
    """Processes that prepare examples ahead of the model: data.num_workers, or min(8, CPUs - 1) on CUDA and 0 on
    a CPU (whose cores run the model). Results do not depend on it (choice orders are seeded per row)."""
    if config.data.num_workers is not None:
        return config.data.num_workers
    return min(8, max((os.cpu_count() or 1) - 1, 0)) if device.type == "cuda" else 0


@dataclass
class Scorer:
    """What scoring a list of questions needs: processor, answer tokens, the run's settings."""

    processor: Any
    answers: AnswerTokens
    config: RunConfig

    def dataset(self, questions: list[Question], with_answer: bool) -> QuestionDataset:
        """In-order, unshuffled examples."""
        return QuestionDataset(questions, self.processor, self.answers, self.config, with_answer)

    def evaluate(self, model: torch.nn.Module, questions: list[Question]) -> dict[str, float]:
        """Valid loss (mean over target tokens) and accuracy, from one forward pass per question."""
        dataset = self.dataset(questions, with_answer=True)
        pad_id = self.processor.tokenizer.pad_token_id
        probabilities, total = score(
            model, dataset, self.answers, self.config.eval.batch_size, pad_id, length_order(questions, self.processor)
        )
        truth = torch.tensor([q.answer for q in questions])
        accuracy = float((probabilities.argmax(dim=1) == truth).float().mean())
        return {"loss": total / max(len(questions) * self.answers.length, 1), "accuracy": accuracy}

    def rounds(self, questions: list[Question], permute: bool) -> int:
        """Forward passes per question: 1, or the cyclic choice orders permutation TTA scores."""
        if not permute or not questions:
            return 1
        rounds = max(len(q.choices) for q in questions)
        return min(rounds, self.config.eval.tta_permutations or rounds)

    def probabilities(
        self,
        model: torch.nn.Module,
        questions: list[Question],
        permute: bool,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """[N, 8] probabilities of each original choice; with `permute`, averaged over cyclic choice orders.
        `progress(n)` counts forward passes (rows x rounds)."""
        dataset = self.dataset(questions, with_answer=False)
        pad_id, batch = self.processor.tokenizer.pad_token_id, self.config.eval.batch_size
        order = length_order(questions, self.processor)
        if not permute:
            return score(model, dataset, self.answers, batch, pad_id, order, progress)[0]
        # every (row, cyclic order) pair in one pass: one set of loader workers, and batches of similar length
        # across orders (all orders of a row have the same length)
        rounds = self.rounds(questions, permute)
        views = [
            (i, cyclic_orders(len(q.choices))[shift])
            for shift in range(rounds)
            for i, q in enumerate(questions)
            if shift < len(q.choices)  # a row with fewer choices than rounds has seen all its orders
        ]
        dataset.views = views
        rank = {row: position for position, row in enumerate(order)}
        view_order = sorted(range(len(views)), key=lambda k: (rank[views[k][0]], k))
        shown = score(model, dataset, self.answers, batch, pad_id, view_order, progress)[0]
        total, counts = torch.zeros(len(questions), len(LETTERS)), torch.zeros(len(questions), 1)
        for k, (row, row_order) in enumerate(views):
            total[row] += to_original(shown[k], row_order)
            counts[row] += 1
        return total / counts


# ----------------------------------------------------------------------------------------------- model


def build_model(config: RunConfig, device: torch.device) -> torch.nn.Module:
    """The VLM with its parts set to train or not (method.train_parts, method.kind)."""
    from tunelab.models.load import use_gradient_checkpointing

    model = vlm.load_vlm(config.model, config.method.kind, device)
    model, _ = vlm.apply_parts(model, config.method, use_gradient_checkpointing(config.model, device))
    return model


def show_parts(model: torch.nn.Module, config: RunConfig) -> list[dict[str, Any]]:
    """Print the parameter groups (part, trained tensors and parameters, frozen parameters, learning rate)."""
    from tunelab.track.progress import console

    rows = vlm.parameter_groups_table(model, config.method.train_parts, config.train.lr)
    console.print("[bold]parameter groups[/]:")
    for row in rows:
        state = f"lr {row['lr']:.2e}" if row["trainable"] else "frozen"
        console.print(
            f"  {row['part']:<9} {row['tensors']:>4} tensors, {row['trainable'] / 1e6:9.3f}M trained, "
            f"{row['frozen'] / 1e6:9.3f}M frozen, {state}"
        )
    return rows


def save_weights(model: torch.nn.Module, processor: Any, folder: Path) -> None:
    """The adapter (with trained projector / vision weights as modules_to_save) or the full model, the processor
    (with its image size), and the letters the run answers with."""
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    (folder / META_FILE).write_text(json.dumps({"letters": LETTERS}, indent=2), encoding="utf-8")


def use_accuracy_by_default(config: RunConfig) -> RunConfig:
    """mcqa keeps the best valid accuracy unless train.early_stop.metric was set."""
    if "metric" not in config.train.early_stop.model_fields_set:
        config.train.early_stop.metric = "accuracy"
    return config


# ----------------------------------------------------------------------------------------------- verbs


def preflight(config: RunConfig, resume: bool) -> None:
    """Checks that cost nothing and must fail before any work."""
    from tunelab.train.run import preflight as common_preflight

    common_preflight(config, resume)
    if config.method.kind not in vlm.VLM_METHODS:
        raise UserError(
            f"method.kind {config.method.kind} is not available for mcqa. Use one of: {', '.join(vlm.VLM_METHODS)}."
        )
    parts = config.method.train_parts
    if parts.align_steps and not parts.projector:
        raise UserError(
            "method.train_parts.align_steps > 0 needs a trained projector: set method.train_parts.projector: true, "
            "or align_steps: 0."
        )
    if config.data.image_root and not Path(config.data.image_root).is_dir():
        raise UserError(f"data.image_root {config.data.image_root} is not a folder. Point it at the images' folder.")


def train(config: RunConfig, resume: bool = False, show_before: bool = False) -> Path:
    """Train a run end to end and return its folder. Data and model problems surface before the folder is made."""
    from accelerate.utils import set_seed

    from tunelab.models.load import resolve_dtype
    from tunelab.track.progress import TrainProgress, console
    from tunelab.train.loop import train_loop
    from tunelab.train.run import finish_run, make_accelerator, open_run

    started = time.time()
    config = use_accuracy_by_default(config)
    preflight(config, resume)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    accelerator = make_accelerator(resolve_dtype(config.model.dtype, device))
    set_seed(config.train.seed)
    path = vlm.resolve_vlm_path(config.model.name, log=console.print)
    processor = vlm.load_processor(config.model, path)
    answers = answer_tokens(processor)
    train_questions, valid_questions = load_questions(config)
    console.print(
        f"[bold]data[/]: {len(train_questions)} train / {len(valid_questions)} valid questions, "
        f"choices {_choice_counts(train_questions)}, answers {_answer_counts(train_questions)}"
    )
    model = build_model(config, accelerator.device).to(accelerator.device)
    groups = show_parts(model, config)
    scorer = Scorer(processor, answers, config)
    before = scorer.evaluate(model, valid_questions) if show_before and valid_questions else None
    if before is not None:
        console.print(f"before training: valid accuracy {before['accuracy']:.4f}, loss {before['loss']:.4f}")
    # before the run folder is written, so a model the alignment cannot handle leaves nothing behind; never when
    # a checkpoint will be resumed (it holds the projector the alignment led to)
    steps = 0 if _will_resume(config, resume) else mcqa_align.align_steps(config, path)
    aligned = None
    if steps:
        aligned = mcqa_align.align_projector(
            model, processor, train_questions, config, steps, accelerator.device, console.print
        )
    run_dir, resume_from, log = open_run(config, resume, accelerator)
    if resume_from is None:
        log.write({"event": "start", "step": 0, "task": "mcqa", "model": config.model.name, "parameter_groups": groups})
        if before is not None:
            log.write({"event": "eval", "step": 0, "epoch": 0.0, "split": "valid", **before})
        if aligned is not None:
            log.write({"event": "align", "step": 0, **aligned})
    else:
        console.print(f"resuming from {resume_from}")
    job = make_job(config, model, scorer, train_questions, valid_questions)
    try:
        summary = train_loop(job, config, run_dir, accelerator, log, TrainProgress, resume_from)
    finally:
        log.close()
    if not accelerator.is_main_process:
        return run_dir
    status = "early_stopped" if summary["stopped_early"] else "completed"
    extra = {"valid_before": before} if before is not None else {}
    finish_run(run_dir, {"task": "mcqa", "status": status, **summary}, started, extra)
    return run_dir


def _will_resume(config: RunConfig, resume: bool) -> bool:
    from tunelab.train import checkpoint as ckpt

    return resume and bool(ckpt.list_checkpoints(Path(config.output.dir)))


def make_job(
    config: RunConfig, model: torch.nn.Module, scorer: Scorer, train_questions: list[Question], valid: list[Question]
) -> TrainingJob:
    """The TrainingJob for mcqa: shuffled choices per epoch, target-only loss, accuracy evaluation, per-part lr."""
    answers, pad_id = scorer.answers, scorer.processor.tokenizer.pad_token_id
    dataset = QuestionDataset(
        train_questions, scorer.processor, answers, config, with_answer=True, shuffle=config.augment.shuffle_choices
    )
    smoothing = config.augment.label_smoothing
    return TrainingJob(
        model=model,
        train_data=dataset,
        collate=functools.partial(collate, pad_id=pad_id),
        targets_in=lambda batch: int(batch["input_ids"].shape[0]) * answers.length,
        loss_sum=lambda m, batch: loss_sum(m, batch, answers, smoothing),
        evaluate=(lambda m: scorer.evaluate(m, valid)) if valid else None,
        save_weights=lambda m, folder: save_weights(m, scorer.processor, folder),
        units_in=lambda batch: int(batch["input_ids"].shape[0]),
        unit="samples",
        num_workers=loader_workers(config, next(model.parameters()).device),
    )


def _choice_counts(questions: list[Question]) -> str:
    from collections import Counter

    counts = Counter(len(q.choices) for q in questions)
    return ", ".join(f"{n}: {counts[n]}" for n in sorted(counts))


def _answer_counts(questions: list[Question]) -> str:
    from collections import Counter

    counts = Counter(LETTERS[q.answer] for q in questions if q.answer is not None)
    return " ".join(f"{letter}:{counts[letter]}" for letter in sorted(counts))


@dataclass
class TrainedRun:
    """A finished run's best weights, ready for scoring on this machine."""

    config: RunConfig
    model: torch.nn.Module
    scorer: Scorer


def merge_for_scoring(config: RunConfig, device: torch.device) -> bool:
    """Whether eval / predict fold the LoRA adapter into the weights (eval.merge_lora)."""
    if config.eval.merge_lora == "auto":
        return device.type == "cuda" and config.method.kind == "lora"
    return bool(config.eval.merge_lora) and config.method.kind == "lora"


def load_trained(run_dir: Path, merge: bool | None = None) -> TrainedRun:
    """The run's best/ weights (base model + adapter, or the full model) and its saved processor, in eval mode.
    `merge`: fold a LoRA adapter in (None: as eval.merge_lora says)."""
    from tunelab.config import load_config
    from tunelab.models.adapters import is_peft

    run_dir, best = Path(run_dir), Path(run_dir) / "best"
    if not (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir} is not a tunelab run folder (no config.yaml). Pass the output.dir of a run.")
    if not (best / META_FILE).exists():
        raise UserError(f"{run_dir} has no best/ weights yet (no evaluation finished). Resume it with --resume.")
    config = load_config(run_dir / "config.yaml")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if merge is None:
        merge = merge_for_scoring(config, device)
    processor = vlm.load_processor(config.model, str(best), apply_size=False)
    if is_peft(config.method.kind):
        from peft import PeftModel

        base = vlm.load_vlm(config.model, "lora" if merge else config.method.kind, device)
        model = PeftModel.from_pretrained(base, best)
        if merge:
            model = model.merge_and_unload()
    else:
        model = vlm.load_vlm(config.model, config.method.kind, device, str(best))
    model = model.to(device).eval()
    return TrainedRun(config, model, Scorer(processor, answer_tokens(processor), config))


def evaluate_run(run_dir: Path, data_file: str | None = None) -> dict[str, Any]:
    """Accuracy (with permutation TTA when eval.tta is 'permute') of the best weights on the validation split or
    a labeled file, the predicted-letter counts (position bias shows there) and the mean letter NLL."""
    trained = load_trained(run_dir)
    config = trained.config
    if data_file:
        questions = read_questions(data_file, config, True, "--data")
        questions = check_question_images(questions, config, data_file, skip_bad=False)
    else:
        questions = load_questions(config)[1]
        if not questions:
            raise UserError(f"{run_dir} has no validation split (data.valid_split is 0). Pass --data FILE.")
    permute = config.eval.tta == "permute"
    with work_bar("eval", len(questions) * trained.scorer.rounds(questions, permute), "passes") as advance:
        probabilities = trained.scorer.probabilities(trained.model, questions, permute, advance)
    truth = torch.tensor([q.answer for q in questions])
    predicted = probabilities.argmax(dim=1)
    chosen = probabilities[torch.arange(len(truth)), truth].clamp(min=1e-12)
    return {
        "accuracy": float((predicted == truth).float().mean()),
        "letter_nll": float(-chosen.log().mean()),
        "questions": len(questions),
        "tta": "permute" if permute else "none",
        "predicted_letters": {LETTERS[k]: int((predicted == k).sum()) for k in range(int(predicted.max()) + 1)},
        "true_letters": {LETTERS[k]: int((truth == k).sum()) for k in range(int(truth.max()) + 1)},
    }


def predict_run(run_dir: Path, data_file: str, out: Path) -> Path:
    """Write `id,answer` for every row of `data_file` in its order (the submission), and probs.csv beside it with
    each choice's probability (for ensembling). Both written atomically."""
    import pandas as pd

    from tunelab.track.progress import console

    trained = load_trained(run_dir)
    config = trained.config
    questions = read_questions(data_file, config, False, "--data")
    if not questions:
        raise UserError(f"--data {data_file} holds no rows to predict.")
    check_question_images(questions, config, data_file, skip_bad=False)  # a submission needs every row
    permute = config.eval.tta == "permute"
    console.print(
        f"scoring {len(questions)} questions (batch {config.eval.batch_size}, tta {'permute' if permute else 'none'})"
    )
    with work_bar("predict", len(questions) * trained.scorer.rounds(questions, permute), "passes") as advance:
        probabilities = trained.scorer.probabilities(trained.model, questions, permute, advance)
    width = max(len(q.choices) for q in questions)
    submission = pd.DataFrame(
        {"id": [q.id for q in questions], "answer": [LETTERS[int(k)] for k in probabilities.argmax(dim=1)]}
    )
    probs = pd.DataFrame({"id": [q.id for q in questions]})
    for k in range(width):
        probs[f"prob_{LETTERS[k]}"] = [
            round(float(probabilities[i, k]), 6) if k < len(q.choices) else None for i, q in enumerate(questions)
        ]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    probs_file = out.with_name("probs.csv")
    for table, target in ((probs, probs_file), (submission, out)):
        tmp = target.with_name(target.name + ".tmp")
        table.to_csv(tmp, index=False)
        tmp.replace(target)
    console.print(f"per-choice probabilities: {probs_file}")
    return out


def export_run(run_dir: Path, out: Path, merge: bool = False) -> Path:
    """The adapter (with trained parts) or, with merge, a standalone model, with the processor: standard HF layout,
    loadable with AutoModelForImageTextToText / AutoProcessor."""
    from tunelab.train.checkpoint import replace_folder

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"Export folder {out} exists and is not empty. Choose a new folder or remove it.")
    trained = load_trained(run_dir, merge=merge)

    def write(folder: Path) -> None:
        trained.model.save_pretrained(folder, safe_serialization=True)
        trained.scorer.processor.save_pretrained(folder)

    if out.exists():
        out.rmdir()
    replace_folder(out, write)
    return out
