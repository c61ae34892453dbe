"""Projector alignment (tunelab/tasks/mcqa_align.py) on the tiny LLaVA-style model: it trains the projector alone,
brings the image tokens nearer the right choice's text, runs by default only for an untrained projector, is skipped
on resume, and a model it cannot handle is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from vlm_fixtures import write_config, write_questions

from tunelab.cli import main
from tunelab.config import RunConfig
from tunelab.models import vlm
from tunelab.models.embedded_vlm import MARKER_FILE
from tunelab.tasks import mcqa_align
from tunelab.tasks.mcqa_data import Question, read_questions


def _say(_: str) -> None:
    pass


def run_cli(*argv: object) -> int:
    return main([str(a) for a in argv])


def test_alignment_trains_the_projector_alone_towards_the_right_choice(
    vlm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    config = RunConfig(task="mcqa", model={"name": str(vlm_dirs["llava"])}, method={"r": 4, "alpha": 8})
    processor = vlm.load_processor(config.model)
    model = vlm.load_vlm(config.model, config.method.kind, torch.device("cpu"))
    # the fixture's saved tower gives the same features for every image (transformers' init of the timm wrapper);
    # timm's own random init gives features that differ by colour, as a pretrained tower's do
    torch.manual_seed(0)
    model.model.vision_tower.timm_model.load_state_dict(
        timm.create_model("test_efficientnet", num_classes=0).state_dict()
    )
    model, _ = vlm.apply_parts(model, config.method, False)
    questions = read_questions(str(write_questions(tmp_path, 32)), config, True, "train")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    done = mcqa_align.align_projector(model, processor, questions, config, 80, torch.device("cpu"), _say)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(
        vlm.part_of(name) == "projector" and p.requires_grad for name, p in model.named_parameters() if name in changed
    )
    # solid-colour images, four colour words: the right colour becomes the nearest choice for nearly every row
    assert done["match_after"] >= 0.9 > done["match_before"]


def test_alignment_runs_by_default_only_for_an_untrained_projector(vlm_dirs: dict[str, Path], tmp_path: Path) -> None:
    def steps(folder: Path, **parts: object) -> int:
        config = RunConfig(task="mcqa", model={"name": str(folder)}, method={"train_parts": parts})
        return mcqa_align.align_steps(config, str(folder))

    assert steps(vlm_dirs["llava"]) == 0  # a model folder of its own: its projector counts as trained
    embedded = tmp_path / "assembled"
    embedded.mkdir()
    (embedded / MARKER_FILE).write_text("{}")
    assert steps(embedded) == 300  # tunelab's embedded assembly: a random projector
    assert steps(embedded, align_steps=0) == 0
    assert steps(vlm_dirs["llava"], align_steps=7) == 7
    assert steps(embedded, projector=False) == 0


def test_alignment_is_logged_once_and_skipped_on_resume(vlm_dirs: dict[str, Path], qa_ws: Path) -> None:
    import shutil

    extra = {"method": {"train_parts": {"align_steps": 5}}, "output": {"keep_last": 3}}
    assert run_cli("train", write_config(qa_ws, vlm_dirs["llava"], name="full", **extra)) == 0
    shutil.copytree(qa_ws / "full", qa_ws / "cut")
    shutil.rmtree(qa_ws / "cut" / "checkpoints" / "step-000004")
    assert run_cli("train", write_config(qa_ws, vlm_dirs["llava"], name="cut", **extra), "--resume") == 0
    for name in ("full", "cut"):
        records = [json.loads(line) for line in (qa_ws / name / "metrics.jsonl").read_text().splitlines()]
        aligned = [r for r in records if r["event"] == "align"]
        assert len(aligned) == 1 and aligned[0]["steps"] == 5  # the resumed run did not align again
    losses = [
        [
            (r["step"], round(r["loss"], 5))
            for r in map(json.loads, (qa_ws / n / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "train"
        ]
        for n in ("full", "cut")
    ]
    assert losses[0] == losses[1]


def test_a_model_the_alignment_cannot_handle_is_refused_before_writing(
    vlm_dirs: dict[str, Path], qa_ws: Path, capsys: pytest.CaptureFixture
) -> None:
    # Qwen2-VL's merger sees [all patches, features] with no image axis: the alignment cannot pool per image
    config = write_config(qa_ws, vlm_dirs["qwen2_vl"], method={"train_parts": {"align_steps": 5}})
    assert run_cli("train", config) == 2
    assert "align_steps: 0" in capsys.readouterr().err
    assert not (qa_ws / "run").exists()


def test_align_steps_without_a_trained_projector_is_a_config_error(
    vlm_dirs: dict[str, Path], qa_ws: Path, capsys: pytest.CaptureFixture
) -> None:
    parts = {"train_parts": {"align_steps": 5, "projector": False}}
    assert run_cli("train", write_config(qa_ws, vlm_dirs["llava"], method=parts)) == 2
    assert "align_steps" in capsys.readouterr().err
    assert not (qa_ws / "run").exists()


def test_rows_whose_answer_depends_on_the_question_are_not_aligned() -> None:
    # per image: a colour question (the colour is never wrong for it) and two yes / no questions about other
    # colours whose answers differ, so "yes" and "no" are each right and wrong for the same image
    rows, colours = [], ["red", "blue", "green", "teal"]
    for n in range(8):
        image, colour = Path(f"img{n}.png"), colours[n % 4]
        others = [c for c in colours if c != colour]
        rows.append(Question(f"c{n}", image, "what colour?", (colour, *others[:3]), 0))
        rows.append(Question(f"y{n}", image, f"is there a {colour} shape?", ("no", "yes"), 1))
        rows.append(Question(f"n{n}", image, f"is there a {others[0]} shape?", ("no", "yes"), 0))
    kept = mcqa_align.describing_rows(rows)
    assert [q.id for q in kept] == [f"c{n}" for n in range(8)]
    # below the evidence threshold (fewer than 3 contradicting images) nothing is dropped
    assert len(mcqa_align.describing_rows(rows[:6])) == 6
