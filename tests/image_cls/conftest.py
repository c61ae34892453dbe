"""Fixtures of the image_cls tests (helpers in image_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from image_fixtures import write_class_folders


@pytest.fixture
def image_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path with images/<class>/*.png, as the current folder, with its own cache."""
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    write_class_folders(tmp_path / "images")
    return tmp_path
