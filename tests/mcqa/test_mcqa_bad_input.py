"""mcqa bad input through the command line: each case exits 2 with a message naming the file, rows or key and the
fix, prints no traceback and creates no run folder; odd image modes are converted and train."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from vlm_fixtures import write_config, write_questions

from tunelab.cli import main


def refused(capsys: pytest.CaptureFixture, args: list[object], *expected: str) -> str:
    """Run the CLI, expect exit code 2 and a message holding every `expected` piece, without a traceback."""
    assert main([str(a) for a in args]) == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message and "error:" in message, message
    flat = " ".join(message.split())
    for piece in expected:
        assert piece in flat, (piece, flat)
    return flat


def train_refused(capsys: pytest.CaptureFixture, config: Path, *expected: str, overrides: tuple = ()) -> str:
    """`tunelab train` refuses with the pieces in its message and leaves no output folder."""
    out = Path(yaml.safe_load(config.read_text())["output"]["dir"])
    flat = refused(capsys, ["train", config, *overrides], *expected)
    assert not out.exists(), f"{out} was created by a failed run"
    return flat


def edit_csv(path: Path, row: int, column: str, value: str) -> None:
    """Set one cell of a CSV (row 1 = the first data row)."""
    import pandas as pd

    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.loc[row - 1, column] = value
    table.to_csv(path, index=False)


@pytest.fixture
def llava(vlm_dirs: dict[str, Path]) -> Path:
    """The tiny LLaVA-style model (the checks do not depend on the family)."""
    return vlm_dirs["llava"]


def test_missing_columns(qa_ws: Path, llava: Path, capsys: pytest.CaptureFixture) -> None:
    import pandas as pd

    table = pd.read_csv(qa_ws / "train.csv", dtype=str)
    table.drop(columns=["image"]).to_csv(qa_ws / "train.csv", index=False)
    train_refused(capsys, write_config(qa_ws, llava), "train.csv", "'image'", "data.columns.image")
    table.drop(columns=["c", "d", "b"]).to_csv(qa_ws / "train.csv", index=False)
    train_refused(capsys, write_config(qa_ws, llava), "choice column", "data.columns.choices")


def test_missing_and_unreadable_images_are_listed_or_skipped(
    qa_ws: Path, llava: Path, capsys: pytest.CaptureFixture
) -> None:
    images = qa_ws / "images"
    (images / "train-0.png").unlink()  # missing
    (images / "train-1.png").write_bytes(b"")  # zero bytes
    data = (images / "train-2.png").read_bytes()
    (images / "train-2.png").write_bytes(data[: len(data) // 2])  # truncated
    (images / "train-3.png").write_bytes(b"not an image at all")  # unreadable
    config = write_config(qa_ws, llava)
    flat = train_refused(capsys, config, "4 of 24 images cannot be read", "train-0.png (file not found)")
    assert "empty file" in flat and "truncated or corrupt" in flat and "data.skip_bad_images=true" in flat
    assert main(["train", str(config), "data.skip_bad_images=true"]) == 0
    assert "skipped 4 of 24 unreadable images" in " ".join(capsys.readouterr().err.split())


def test_image_path_outside_the_root(qa_ws: Path, llava: Path, capsys: pytest.CaptureFixture) -> None:
    edit_csv(qa_ws / "train.csv", 3, "image", "../../etc/passwd")
    train_refused(capsys, write_config(qa_ws, llava), "row 3: '../../etc/passwd'", "outside the image root")


def test_decompression_bomb_is_refused(qa_ws: Path, llava: Path, capsys: pytest.CaptureFixture) -> None:
    # a valid PNG header announcing 20000 x 20000 pixels (a few hundred bytes): refused before decoding, never hangs
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    (qa_ws / "images" / "bomb.png").write_bytes(png + chunk(b"IEND", b""))
    edit_csv(qa_ws / "train.csv", 5, "image", "images/bomb.png")
    config = write_config(qa_ws, llava)
    train_refused(capsys, config, "bomb.png", "decompression bomb", "data.max_image_pixels")
    train_refused(capsys, config, "decompression bomb", overrides=("data.skip_bad_images=true",))


def test_answer_not_a_letter_and_empty_choice(qa_ws: Path, llava: Path, capsys: pytest.CaptureFixture) -> None:
    edit_csv(qa_ws / "train.csv", 2, "answer", "e")
    edit_csv(qa_ws / "train.csv", 7, "answer", "blue")
    train_refused(capsys, write_config(qa_ws, llava), "row 2: 'e' (letters a-d)", "row 7: 'blue'", "'answer'")
    write_questions(qa_ws, 24, seed=0)
    edit_csv(qa_ws / "train.csv", 4, "c", "")
    train_refused(capsys, write_config(qa_ws, llava), "row 4", "empty choice", "JSONL")


def test_test_file_without_ids_or_with_duplicate_ids(qa_ws: Path, llava: Path, capsys: pytest.CaptureFixture) -> None:
    import pandas as pd

    config = write_config(qa_ws, llava, train={"max_steps": 2, "eval_every": 2, "save_every": 2})
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    run, out = qa_ws / "run", qa_ws / "submission.csv"
    test = pd.read_csv(qa_ws / "test.csv", dtype=str)
    test.drop(columns=["id"]).to_csv(qa_ws / "no_id.csv", index=False)
    refused(capsys, ["predict", run, "--data", qa_ws / "no_id.csv", "--out", out], "no_id.csv", "'id'")
    test.loc[3, "id"] = test.loc[1, "id"]
    test.to_csv(qa_ws / "dup.csv", index=False)
    refused(capsys, ["predict", run, "--data", qa_ws / "dup.csv", "--out", out], "dup.csv", "'q1' (2 rows)")
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_grayscale_rgba_palette_and_16_bit_images_train(
    qa_ws: Path, llava: Path, mode: str, capsys: pytest.CaptureFixture
) -> None:
    for index in range(0, 24, 3):
        path = qa_ws / "images" / f"train-{index}.png"
        image = Image.open(path)
        if mode == "I;16":
            image = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
        else:
            image = image.convert(mode)
        image.save(path)
    config = write_config(qa_ws, llava, train={"max_steps": 2, "eval_every": 2, "save_every": 2})
    assert main(["train", str(config)]) == 0, capsys.readouterr().err
    summary = json.loads((qa_ws / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"


def test_a_text_only_model_is_refused(qa_ws: Path, capsys: pytest.CaptureFixture) -> None:
    from fixtures import save_tiny_model_dir

    text_only = save_tiny_model_dir(qa_ws / "llama")
    train_refused(capsys, write_config(qa_ws, text_only), "not a vision-language processor", "Qwen2.5-VL")
