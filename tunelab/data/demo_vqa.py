"""Demo multiple-choice VQA data from easy-VQA (`easy-vqa==1.0` on PyPI, MIT; Victor Zhou's published VQA set of
64 x 64 images of one coloured shape: 4,000 train / 1,000 test images, 38,575 / 9,673 questions, 13 answers).

Each question becomes a multiple-choice row: distractors are drawn from answers of the same kind (a colour question
gets 4 choices out of the 8 colours, a shape question the 3 shapes, yes / no its 2), in a seeded random order. The
demo's valid and test rows take an equal share of each kind, so the 4-choice colour questions are a third of them
rather than 7% (most of easy-VQA's questions are yes / no); its training rows are half yes / no (TRAIN_SHARES).
Images stay in the installed package: data.image_root points at its data folder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunelab.errors import UserError

COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
DONE = "easy_vqa.json"


def kind_of(answer: str) -> tuple[str, tuple[str, ...]]:
    """(kind, the answers of that kind) for an easy-VQA answer."""
    if answer in COLOURS:
        return "colour", COLOURS
    if answer in SHAPES:
        return "shape", SHAPES
    return "yes/no", YES_NO


def as_choices(answer: str, rng: random.Random) -> tuple[list[str], str]:
    """Up to 4 choices of the answer's kind in a random order, and the answer's letter."""
    _, pool = kind_of(answer)
    choices = [answer] + rng.sample([a for a in pool if a != answer], min(3, len(pool) - 1))
    rng.shuffle(choices)
    return choices, "abcd"[choices.index(answer)]


def easy_vqa_root() -> Path:
    """The installed easy_vqa package's data folder (found, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("easy_vqa")
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders or not (Path(folders[0]) / "data" / "train" / "questions.json").is_file():
        raise UserError(
            "The mcqa demo data comes from the PyPI package easy-vqa, which is not installed: "
            "pip install --no-deps easy-vqa==1.0 (or bash scripts/install.sh)."
        )
    return Path(folders[0]) / "data"


def balanced_rows(split: str, n: int, seed: int, shares: dict[str, float] | None = None) -> list[dict[str, object]]:
    """`n` rows of one easy-VQA split, seeded: an equal share of colour, shape and yes / no questions, or the
    given share of each kind."""
    root = easy_vqa_root()
    questions = json.loads((root / split / "questions.json").read_text(encoding="utf-8"))
    rng = random.Random(seed)
    by_kind: dict[str, list[list]] = {}
    for item in questions:
        by_kind.setdefault(kind_of(item[1])[0], []).append(item)
    picked = []
    for kind in sorted(by_kind):
        wanted = round(n * shares[kind]) if shares else n // len(by_kind)
        picked += rng.sample(by_kind[kind], min(len(by_kind[kind]), wanted))
    rng.shuffle(picked)
    rows = []
    for number, (question, answer, image) in enumerate(picked):
        choices, letter = as_choices(answer, rng)
        rows.append(
            {
                "id": f"{split}-{number:05d}",
                "image": f"{split}/images/{image}.png",
                "question": question,
                "choices": choices,
                "answer": letter,
                "kind": kind_of(answer)[0],
            }
        )
    return rows


# training rows by kind: half yes / no, the kind that needs the most examples (negation: "does the image not contain
# a red shape?"); valid and test keep an equal share of each kind
TRAIN_SHARES = {"colour": 0.25, "shape": 0.25, "yes/no": 0.5}


def write_demo_vqa(folder: Path, n_train: int = 4000, n_valid: int = 240, n_test: int = 240) -> dict[str, Path]:
    """train.jsonl (TRAIN_SHARES of each kind) and valid.jsonl (easy-VQA train and test images), test.jsonl without
    answers and its truth (test_answers.csv), written once; returns their paths and the image root."""
    folder = Path(folder)
    paths = {
        "train": folder / "train.jsonl",
        "valid": folder / "valid.jsonl",
        "test": folder / "test.jsonl",
        "truth": folder / "test_answers.csv",
        "image_root": easy_vqa_root(),
    }
    marker = folder / DONE
    done = json.loads(marker.read_text()) if marker.exists() else {}
    if done.get("sizes") == [n_train, n_valid, n_test] and done.get("train_shares") == TRAIN_SHARES:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    held_out = balanced_rows("test", n_valid + n_test, seed=1)  # easy-VQA's test images: never trained on
    splits = {
        "train": balanced_rows("train", n_train, seed=0, shares=TRAIN_SHARES),
        "valid": held_out[:n_valid],
        "test": held_out[n_valid:],
    }
    for name, rows in splits.items():
        shown = [{k: v for k, v in row.items() if name != "test" or k != "answer"} for row in rows]
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in shown), encoding="utf-8")
    truth = ["id,answer,kind"] + [f"{row['id']},{row['answer']},{row['kind']}" for row in splits["test"]]
    paths["truth"].write_text("\n".join(truth) + "\n", encoding="utf-8")
    marker.write_text(
        json.dumps({"source": "easy-vqa==1.0", "sizes": [n_train, n_valid, n_test], "train_shares": TRAIN_SHARES})
    )
    return paths
