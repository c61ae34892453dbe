"""mcqa data: rows of (id, image, question, 2-8 choices, answer letter) read and checked, prompts rendered with the
processor's chat template, examples encoded with the answer letter + end of turn as the only targets, and batches
padded on the left so every row ends at its answer position.

Checks (each a UserError naming the file, the rows and the fix): missing columns; image paths outside
data.image_root; missing / unreadable images (listed, or skipped with data.skip_bad_images); decompression bombs;
empty choices; answers that are not one of the row's letters; test files without ids or with duplicate ids.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.config import RunConfig
from tunelab.data.images import ImageSample, check_images, open_rgb, read_image_table
from tunelab.data.readers import read_table, require_columns
from tunelab.errors import UserError
from tunelab.evaluate.choices import LETTERS, MAX_CHOICES

SHOWN = 20  # rows named in an error before "... and N more"
DEFAULT_SYSTEM_PROMPT = "Answer with the letter of the correct choice only."
# Keys of a processor's output that hold one value per token (padded with the row); the rest are image tensors.
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
META_KEYS = ("answer", "n_choices", "row")


@dataclass(frozen=True)
class Question:
    """One row: its id, image file, question, choices in letter order and answer (choice index; None in a test)."""

    id: str
    image: Path
    question: str
    choices: tuple[str, ...]
    answer: int | None


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f", ... and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def choice_columns(path: str, rows: list[dict[str, Any]], config: RunConfig) -> list[str] | str:
    """The configured choice columns, one list column (JSONL), or the a, b, c ... (or A, B, C ...) columns found."""
    wanted = config.data.columns.choices
    present = list(rows[0]) if rows else []
    if isinstance(wanted, str):
        require_columns(path, rows, [wanted], "data.columns.choices")
        return wanted
    if wanted:
        require_columns(path, rows, list(wanted), "data.columns.choices")
        columns = list(wanted)
    else:
        columns = []
        for letters in (LETTERS, LETTERS.upper()):
            found = [c for c in letters if c in present]
            if len(found) >= 2 and found == list(letters[: len(found)]):
                columns = found
                break
    if not 2 <= len(columns) <= MAX_CHOICES:
        raise UserError(
            f"{path}: found {len(columns)} choice column(s) ({', '.join(columns) or 'none'}); mcqa needs 2 to "
            f"{MAX_CHOICES}. The file's columns: {', '.join(present)}. Name them a, b, c, d (the letters), or set "
            "data.columns.choices to the columns in order (or to one column holding a list, in JSONL)."
        )
    return columns


def read_questions(path: str, config: RunConfig, need_answer: bool, key: str) -> list[Question]:
    """Rows of a CSV / JSONL / Parquet file as Questions, in file order, every problem reported at once."""
    columns = config.data.columns
    rows = read_table(path)
    require_columns(path, rows, [columns.image], "data.columns.image")
    require_columns(path, rows, [columns.question], "data.columns.question")
    if need_answer:
        require_columns(path, rows, [columns.answer], "data.columns.answer")
    else:
        require_columns(path, rows, [columns.id], "data.columns.id")
    choice_cols = choice_columns(path, rows, config)
    root = Path(config.data.image_root) if config.data.image_root else Path(path).parent
    if not root.is_dir():
        raise UserError(f"data.image_root {root} is not a folder. Point it at the folder that holds the images.")
    # paths resolved and confined to the image root by the same code as image_cls (an escape is an error)
    samples: list[ImageSample] = read_image_table(Path(path), columns.image, columns.answer, root, False, columns.id)
    questions, empty, bad_answer, no_question = [], [], [], []
    for number, (row, sample) in enumerate(zip(rows, samples, strict=True), start=1):
        choices = _row_choices(row, choice_cols)
        if choices is None or len(choices) < 2 or any(c == "" for c in choices):
            empty.append(f"row {number}")
            continue
        text = str(row.get(columns.question) or "").strip()
        if not text:
            no_question.append(f"row {number}")
        answer = None
        raw = row.get(columns.answer)
        if need_answer or (raw is not None and str(raw).strip() != ""):
            letter = str(raw or "").strip().lower().strip("()")
            answer = LETTERS.find(letter) if len(letter) == 1 else -1
            if not 0 <= answer < len(choices):
                bad_answer.append(f"row {number}: {raw!r} (letters {LETTERS[0]}-{LETTERS[len(choices) - 1]})")
        questions.append(Question(sample.id, sample.path, text, tuple(choices), answer))
    if empty:
        raise UserError(
            f"{path}: {len(empty)} row(s) have an empty choice or fewer than 2 choices ({_first(empty)}). Every "
            f"choice column ({_columns_text(choice_cols)}) needs text in every row; a varying number of choices goes "
            "in one list column of a JSONL file (data.columns.choices)."
        )
    if no_question:
        raise UserError(f"{path}: {len(no_question)} row(s) have an empty question ({_first(no_question)}).")
    if bad_answer:
        raise UserError(
            f"{path}: {len(bad_answer)} answer(s) in column '{columns.answer}' are not one of the row's choice "
            f"letters: {_first(bad_answer)}. Answers are the letter of the correct choice (a, b, ...)."
        )
    if not need_answer:
        require_unique_ids(path, questions, columns.id)
    return questions


def _row_choices(row: dict[str, Any], columns: list[str] | str) -> list[str] | None:
    if isinstance(columns, str):
        value = row.get(columns)
        if isinstance(value, str):  # a list written as JSON text in a CSV cell
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return None
        if not isinstance(value, list | tuple):
            return None
        return [str(v).strip() if v is not None else "" for v in value]
    return [str(row.get(c)).strip() if row.get(c) is not None else "" for c in columns]


def _columns_text(columns: list[str] | str) -> str:
    return columns if isinstance(columns, str) else ", ".join(columns)


def require_unique_ids(path: str, questions: list[Question], id_column: str) -> None:
    """Submission rows are matched by id: a test file's ids must be unique."""
    repeated = [f"'{i}' ({n} rows)" for i, n in Counter(q.id for q in questions).items() if n > 1]
    if repeated:
        raise UserError(
            f"{path}: {len(repeated)} id(s) in column '{id_column}' occur more than once: {_first(repeated)}. "
            "A submission needs one row per id; fix the ids."
        )


def check_question_images(
    questions: list[Question], config: RunConfig, what: str, skip_bad: bool | None = None
) -> list[Question]:
    """Decode every image once: unreadable ones are listed (or skipped with data.skip_bad_images, never when
    `skip_bad` is False: a submission needs every row); decompression bombs are refused."""
    samples = [ImageSample(q.image, None, str(i)) for i, q in enumerate(questions)]
    skip = config.data.skip_bad_images if skip_bad is None else skip_bad
    kept = check_images(samples, skip, config.data.max_image_pixels, what)
    return [questions[int(s.id)] for s in kept]


# ----------------------------------------------------------------------------------------------- prompts


def messages(question: Question, order: list[int], system_prompt: str | None) -> list[dict[str, Any]]:
    """System instruction, then the image, the question and the lettered choices in `order` (seed 002's prompt).
    system_prompt None: the default instruction; "": no system message (shorter prompts; the template may add
    its own default)."""
    lines = [question.question] + [f"({LETTERS[j]}) {question.choices[k]}" for j, k in enumerate(order)]
    instruction = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    conversation = [{"role": "system", "content": [{"type": "text", "text": instruction}]}] if instruction else []
    content = [{"type": "image"}, {"type": "text", "text": "\n".join(lines)}]
    return conversation + [{"role": "user", "content": content}]


@dataclass
class AnswerTokens:
    """Token ids of each letter's assistant turn (the letter, then the end-of-turn token), as the chat template
    renders it; letter_ids[k] is the first of them (the token scored at the answer position)."""

    by_letter: list[list[int]]
    letter_ids: torch.Tensor

    @property
    def length(self) -> int:
        """Target tokens per example."""
        return len(self.by_letter[0])


def answer_tokens(processor: Any) -> AnswerTokens:
    """Render a one-letter assistant turn for every letter and keep its tokens up to the end-of-turn token.

    UserError when a letter is not a single token of its own (scoring reads one position)."""
    tokenizer = processor.tokenizer
    probe = Question("0", Path("x"), "q", ("x", "y"), 0)
    prompt = processor.apply_chat_template(messages(probe, [0, 1], None), add_generation_prompt=True, tokenize=False)
    specials = set(tokenizer.all_special_ids)
    by_letter = []
    for letter in LETTERS:
        turn = messages(probe, [0, 1], None) + [{"role": "assistant", "content": [{"type": "text", "text": letter}]}]
        full = processor.apply_chat_template(turn, tokenize=False)
        if not full.startswith(prompt):
            raise UserError(
                f"The chat template of this processor renders the assistant turn in a way mcqa cannot split from the "
                f"prompt (the prompt with add_generation_prompt is not a prefix of the conversation). Letter {letter}."
            )
        ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        end = next((i for i, t in enumerate(ids) if t in specials and i > 0), len(ids) - 1)
        by_letter.append(ids[: end + 1])
    firsts = [ids[0] for ids in by_letter]
    decoded = [tokenizer.decode([t]).strip().lower() for t in firsts]
    if len(set(firsts)) != len(firsts) or decoded != list(LETTERS) or len({len(t) for t in by_letter}) != 1:
        raise UserError(
            f"This tokenizer does not give each choice letter a token of its own at the answer position ({decoded}); "
            "mcqa scores the letter at one position. Use a model whose tokenizer has single-letter tokens."
        )
    return AnswerTokens(by_letter, torch.tensor(firsts))


# ----------------------------------------------------------------------------------------------- encoding


class QuestionDataset(torch.utils.data.Dataset):
    """Encoded examples; with `shuffle`, each epoch shows every question's choices in a new order drawn from
    (seed, epoch, row) alone (so resume is exact) and the answer letter follows its choice."""

    def __init__(
        self,
        questions: list[Question],
        processor: Any,
        answers: AnswerTokens,
        config: RunConfig,
        with_answer: bool,
        shuffle: bool = False,
    ) -> None:
        self.questions, self.processor, self.answers, self.config = questions, processor, answers, config
        self.with_answer, self.shuffle = with_answer, shuffle
        self.system_prompt, self.max_pixels = config.data.system_prompt, config.data.max_image_pixels
        self.seed, self.epoch = config.train.seed, 0
        self.orders: list[list[int]] | None = None  # fixed orders per row, else identity (or shuffled)
        # (row, choice order) per item, replacing one item per row: permutation TTA scores every row in all its
        # orders in one pass over the data (one set of loader workers, batches across orders)
        self.views: list[tuple[int, list[int]]] | None = None
        # the vision encoder's weight dtype: image tensors leave the worker in it (half the bytes to share and copy
        # to the GPU); the encoders cast their input to it first thing, so the numbers are the same
        self.pixel_dtype: torch.dtype | None = None

    def __len__(self) -> int:
        return len(self.views) if self.views is not None else len(self.questions)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose choice orders the next items get (called by the training loop)."""
        self.epoch = epoch

    def order(self, index: int) -> list[int]:
        """The original choice shown at each position for row `index` this epoch."""
        n = len(self.questions[index].choices)
        if self.orders is not None:
            return self.orders[index]
        if not self.shuffle:
            return list(range(n))
        order = list(range(n))
        # distinct fixed streams per (seed, epoch, row); the constants are arbitrary large primes
        random.Random((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index).shuffle(order)
        return order

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row, order = self.views[index] if self.views is not None else (index, self.order(index))
        question = self.questions[row]
        text = self.processor.apply_chat_template(
            messages(question, order, self.system_prompt), add_generation_prompt=True, tokenize=False
        )
        try:
            image = open_rgb(question.image, self.max_pixels)
        except (OSError, SyntaxError, ValueError) as error:  # changed on disk after the check
            raise UserError(f"Image {question.image} cannot be read any more: {error}") from None
        encoded = self.processor(text=[text], images=[image], return_tensors="pt")
        item = {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}
        if self.pixel_dtype is not None and "pixel_values" in item and item["pixel_values"].is_floating_point():
            item["pixel_values"] = item["pixel_values"].to(self.pixel_dtype)
        shown_answer = order.index(question.answer) if question.answer is not None else -1
        if self.with_answer:
            target = torch.tensor(self.answers.by_letter[shown_answer])[None, :]
            for key in TOKEN_KEYS:
                if key in item:
                    fill = (
                        target if key == "input_ids" else torch.full_like(target, 1 if key == "attention_mask" else 0)
                    )
                    item[key] = torch.cat([item[key], fill.to(item[key].dtype)], dim=1)
        item["answer"] = torch.tensor([shown_answer])
        item["n_choices"] = torch.tensor([len(question.choices)])
        item["row"] = torch.tensor([index])  # the item's index (results come back in this order)
        return item


def collate(items: list[dict[str, torch.Tensor]], pad_id: int, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Left-pad the per-token tensors (every row then ends at its answer position); concatenate image tensors
    (pixel_values, image_grid_thw, ...) and the row facts. Items are single examples or collated chunks of them.
    Keys in `skip` are left out (the caller concatenates them elsewhere, e.g. on the GPU)."""
    width = max(item["input_ids"].shape[1] for item in items)
    batch: dict[str, torch.Tensor] = {}
    for key in items[0]:
        if key in skip:
            continue
        values = [item[key] for item in items]
        if key in TOKEN_KEYS:
            fill = pad_id if key == "input_ids" else 0
            values = [torch.nn.functional.pad(v, (width - v.shape[1], 0), value=fill) for v in values]
        batch[key] = torch.cat(values, dim=0)
    return batch


class Chunks(torch.utils.data.Dataset):
    """Examples of a QuestionDataset handed over a few at a time, already collated (left-padded to the chunk's
    width). Scoring workers each prepare whole chunks: fewer, larger transfers to the main process than single
    examples (each tensor crosses processes on its own file descriptor), and still many more pieces than batches,
    so every worker stays busy on a small test set. `collate` merges chunks into a batch like single examples."""

    def __init__(self, dataset: QuestionDataset, chunks: list[list[int]], pad_id: int) -> None:
        self.dataset, self.chunks, self.pad_id = dataset, chunks, pad_id

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return collate([self.dataset[i] for i in self.chunks[index]], self.pad_id)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes (the row facts stay out)."""
    return {key: value for key, value in batch.items() if key not in META_KEYS}


def length_order(questions: list[Question], processor: Any) -> list[int]:
    """Row indices by prompt text length (batches of similar length pad little); images of one size give the same
    number of image tokens."""
    tokenizer = processor.tokenizer
    lengths = [
        len(tokenizer(q.question + " ".join(q.choices), add_special_tokens=False)["input_ids"]) for q in questions
    ]
    return sorted(range(len(questions)), key=lambda i: lengths[i])
