"""Fixtures of the mcqa tests: the tiny Qwen2-VL and LLaVA-style model folders (built once per session) and a
workspace with tiny image questions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # vlm_fixtures beside this file

from vlm_fixtures import save_tiny_llava, save_tiny_qwen2_vl, write_questions  # noqa: E402

FAMILIES = ("qwen2_vl", "llava")


@pytest.fixture(scope="session")
def vlm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{'qwen2_vl': folder, 'llava': folder}: tiny random models with their processors (read only)."""
    root = tmp_path_factory.mktemp("tiny-vlms")
    return {"qwen2_vl": save_tiny_qwen2_vl(root / "qwen2_vl"), "llava": save_tiny_llava(root / "llava")}


@pytest.fixture(params=FAMILIES)
def vlm_dir(request: pytest.FixtureRequest, vlm_dirs: dict[str, Path]) -> Path:
    """Each tiny VLM family in turn."""
    return vlm_dirs[request.param]


@pytest.fixture
def qa_ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace (the current folder) with train.csv (24 colour questions) and test.csv (6, no answers)."""
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    write_questions(tmp_path, 24, seed=0)
    write_questions(tmp_path, 6, seed=1, name="test.csv", answers=False)
    return tmp_path
