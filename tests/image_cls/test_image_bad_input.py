"""Bad image data through the command line: exit code 2, one clear message, no traceback, no run folder."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from image_fixtures import write_config
from PIL import Image

from tunelab.cli import main
from tunelab.data.images import open_rgb


def refused(capsys: pytest.CaptureFixture, args: list[str], *expected: str) -> str:
    """Run the CLI, expect exit code 2 and a message holding every `expected` piece, without a traceback."""
    assert main(args) == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message and "error:" in message
    flat = " ".join(message.split())
    for piece in expected:
        assert piece in flat, (piece, flat)
    return flat


def test_unreadable_images_are_listed_or_skipped(image_workspace: Path, capsys: pytest.CaptureFixture) -> None:
    images = image_workspace / "images"
    (images / "red" / "empty.png").write_bytes(b"")
    good = (images / "green" / "0.png").read_bytes()
    (images / "green" / "truncated.png").write_bytes(good[: len(good) // 2])
    (images / "blue" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    config = write_config(image_workspace)
    refused(
        capsys,
        ["train", str(config)],
        "3 of",
        "empty.png (empty file",
        "truncated.png",
        "corrupt.jpg",
        "data.skip_bad_images=true",
    )
    assert not (image_workspace / "cfg").exists()  # nothing half-written
    assert main(["train", str(config), "data.skip_bad_images=true", "train.max_steps=1"]) == 0
    assert "skipped 3" in " ".join(capsys.readouterr().err.split())


def test_empty_class_folder_and_single_class(image_workspace: Path, capsys: pytest.CaptureFixture) -> None:
    (image_workspace / "images" / "purple").mkdir()
    config = write_config(image_workspace)
    refused(capsys, ["train", str(config)], "purple", "hold no images")
    solo = image_workspace / "solo"
    (solo / "red").mkdir(parents=True)
    for path in (image_workspace / "images" / "red").glob("*.png"):
        (solo / "red" / path.name).write_bytes(path.read_bytes())
    refused(capsys, ["train", str(config), f"data.train={solo}"], "1 class (red)", "at least two")
    assert not (image_workspace / "cfg").exists()


def test_paths_outside_the_image_root(image_workspace: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [{"image": f"{c}/{i}.png", "label": c} for c in ("red", "green", "blue") for i in range(4)]
    rows[2]["image"] = "../../etc/passwd"
    rows[5]["image"] = "/etc/hostname"
    pd.DataFrame(rows).to_csv(image_workspace / "train.csv", index=False)
    config = write_config(image_workspace, data={"train": "train.csv", "image_root": "images"})
    refused(
        capsys,
        ["train", str(config)],
        "2 image path(s)",
        "outside the image root",
        "../../etc/passwd",
        "/etc/hostname",
        "data.image_root",
    )


def test_unknown_model_and_unfit_weights(image_workspace: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(image_workspace)
    refused(capsys, ["train", str(config), "model.name=resnet_18"], "'resnet_18' is not a timm model", "resnet18")
    import timm
    from safetensors.torch import save_file

    other = timm.create_model("test_resnet", num_classes=3).state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(image_workspace / "w.safetensors"))
    refused(
        capsys,
        ["train", str(config), "model.weights=w.safetensors"],
        "do not fit",
        "missing in the file",
        "conv_stem.weight",
    )
    assert not (image_workspace / "cfg").exists()


def test_decompression_bomb_is_refused(image_workspace: Path, capsys: pytest.CaptureFixture) -> None:
    # a valid PNG announcing 20000 x 20000 pixels (a few hundred bytes): refused from the header, never decoded
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
    (image_workspace / "images" / "red" / "bomb.png").write_bytes(png)
    config = write_config(image_workspace)
    refused(capsys, ["train", str(config)], "bomb.png", "decompression bomb", "data.max_image_pixels")
    refused(capsys, ["train", str(config), "data.skip_bad_images=true"], "decompression bomb")  # never skipped
    refused(capsys, ["train", str(config), "data.max_image_pixels=1000"], "is too large")  # 20x24 images too


def test_unseen_labels_in_a_test_file(image_workspace: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(image_workspace, train={"max_steps": 2, "eval_every": 2, "save_every": 2})
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    rows = [{"id": "a", "image": "red/0.png", "label": "red"}, {"id": "b", "image": "blue/1.png", "label": "cyan"}]
    pd.DataFrame(rows).to_csv(image_workspace / "images" / "test.csv", index=False)
    run = str(image_workspace / "cfg")
    refused(capsys, ["eval", run, "--data", "images/test.csv"], "never saw", "'cyan' (1 rows)")
    refused(capsys, ["predict", run, "--data", "images/test.csv", "--out", "p.csv"], "never saw")
    assert not (image_workspace / "p.csv").exists()


def _encoded(image: Image.Image, fmt: str) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("1", "PNG")],
)
def test_image_modes_become_rgb(tmp_path: Path, mode: str, fmt: str) -> None:
    if mode == "I;16":
        image = Image.fromarray(np.full((6, 5), 65535, dtype=np.uint16))  # full-scale 16-bit white
    else:
        image = Image.new("RGB", (5, 6), (255, 255, 255)).convert(mode)
    if mode == "P":
        image.info["transparency"] = 0
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(_encoded(image, fmt).getvalue())
    rgb = open_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (5, 6)
    assert np.asarray(rgb).min() >= 250  # white stays white (16-bit scaled, not clipped or wrapped)
