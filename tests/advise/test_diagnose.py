"""Every diagnosis rule on curated curves: a positive and a negative case each, and no false alarm on a healthy
run; the run-folder reader's bad inputs; diagnosis.json, the text rendering and the patch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from tunelab.advise.diagnose import diagnose_records, diagnose_run, render_text, write_patch
from tunelab.advise.patch import merge_patches
from tunelab.config import RunConfig, validate_config
from tunelab.errors import UserError

STEPS = 200
CONFIG = RunConfig().model_dump(mode="json")  # lora, lr 2e-4, epochs 3, dropout 0.05, r 16


def cosine_lr(step: int, peak: float = 2e-4, total: int = STEPS) -> float:
    return peak * 0.5 * (1 + math.cos(math.pi * step / total))


def make_records(
    train: list[float] | np.ndarray,
    valid: dict[int, float] | None = None,
    lr: float | list[float] = 2e-4,
    grad: list[float] | None = None,
    metrics: dict[int, dict[str, float]] | None = None,
    events: list[dict] = (),
    start: dict | None = None,
) -> list[dict]:
    """metrics.jsonl records: a train record per step (cosine lr unless a list or constant given), evals."""
    records = [{"event": "start", "step": 0, "task": "sft", **({"data": start} if start else {})}]
    for step, loss in enumerate(train, start=1):
        rate = lr[step - 1] if isinstance(lr, list) else cosine_lr(step, lr)
        norm = grad[step - 1] if grad else 1.0
        records.append({"event": "train", "step": step, "epoch": step / 50, "split": "train",
                        "loss": None if loss is None or not math.isfinite(loss) else float(loss), "lr": rate,
                        "grad_norm": norm, "tokens_per_s": 1000.0})  # fmt: skip
        if valid and step in valid:
            extra = (metrics or {}).get(step, {})
            records.append({"event": "eval", "step": step, "epoch": step / 50, "split": "valid",
                            "loss": valid[step], **extra, "best": False})  # fmt: skip
    return records + list(events)


def noisy(values: np.ndarray, scale: float = 0.02, seed: int = 0) -> np.ndarray:
    return values * (1 + np.random.default_rng(seed).normal(0, scale, len(values)))


def healthy_train(n: int = STEPS) -> np.ndarray:
    t = np.arange(n) / n
    return noisy(0.8 + 1.6 * np.exp(-t / 0.2))


def healthy_valid(every: int = 20, n: int = STEPS) -> dict[int, float]:
    return {s: 0.9 + 1.5 * math.exp(-(s / n) / 0.2) for s in range(every, n + 1, every)}


def config_with(**train: object) -> dict:
    return {**CONFIG, "train": {**CONFIG["train"], **train}}


def kinds(records: list[dict], config: dict | None = None, family: str = "llm") -> list[str]:
    return diagnose_records(records, config or CONFIG, family).kinds()


# ----------------------------------------------------------------------------------------------- healthy


def test_healthy_run_raises_no_alarm() -> None:
    diagnosis = diagnose_records(make_records(healthy_train(), healthy_valid()), CONFIG)
    assert diagnosis.kinds() == [] and diagnosis.headline.startswith("No problem found")
    assert "valid loss" in diagnosis.headline


@pytest.mark.parametrize("seed", range(5))
def test_healthy_runs_with_other_noise_raise_no_alarm(seed: int) -> None:
    train = noisy(0.8 + 1.6 * np.exp(-(np.arange(STEPS) / STEPS) / 0.2), scale=0.05, seed=seed)
    assert kinds(make_records(train, healthy_valid(10))) == []


# ----------------------------------------------------------------------------------------------- overfitting


def overfit_valid() -> dict[int, float]:
    # best at step 80, then up by ~25% while train keeps falling
    return {s: 1.6 - 0.6 * min(s, 80) / 80 + 0.004 * max(0, s - 80) for s in range(20, STEPS + 1, 20)}


def test_overfitting_valid_turns_up_while_train_falls() -> None:
    train = noisy(2.0 * np.exp(-np.arange(STEPS) / 50) + 0.02)
    diagnosis = diagnose_records(make_records(train, overfit_valid()), CONFIG)
    assert diagnosis.kinds()[0] == "overfitting"
    finding = diagnosis.problems[0]
    assert finding.values["best_step"] == 80 and finding.values["last_step"] == 200
    assert "step 80" in finding.headline and "valid loss best 1.0000 at step 80" in finding.evidence
    changes = {c["key"]: c["to"] for c in finding.changes}
    assert changes["method.dropout"] == 0.15 and changes["method.r"] == 8  # seed 000 §1: dropout up, rank down
    assert changes["train.epochs"] == 2 and changes["train.early_stop.patience"] == 2  # best at epoch 1.6


def test_small_bump_in_valid_loss_is_not_overfitting() -> None:
    valid = {s: 1.6 - 0.6 * min(s, 160) / 160 for s in range(20, STEPS + 1, 20)}
    valid[200] = valid[180] * 1.005  # +0.5%: evaluation noise, not a turn
    train = noisy(2.0 * np.exp(-np.arange(STEPS) / 80) + 0.5)
    assert "overfitting" not in kinds(make_records(train, valid))


def test_widening_gap_with_stalled_valid_is_overfitting() -> None:
    valid = {s: max(1.2, 2.0 - 0.01 * s) for s in range(20, STEPS + 1, 20)}  # flat at 1.2 from step 80
    train = noisy(2.0 * np.exp(-np.arange(STEPS) / 40) + 0.05)
    diagnosis = diagnose_records(make_records(train, valid), CONFIG)
    assert diagnosis.kinds()[0] == "overfitting" and "gap" in diagnosis.problems[0].headline


def test_overfitting_prescription_for_vision_uses_the_vision_rules() -> None:
    train = noisy(2.0 * np.exp(-np.arange(STEPS) / 50) + 0.02)
    config = {"task": "image_cls", "train": {"epochs": 30, "early_stop": {"patience": None}}}
    finding = diagnose_records(make_records(train, overfit_valid()), config, "vision").problems[0]
    assert finding.id == "overfitting.vision"
    keys = {c["key"] for c in finding.changes}
    assert {"augment.mixup", "augment.cutmix", "train.label_smoothing", "model.drop_path"} <= keys


# ----------------------------------------------------------------------------------------------- underfitting


def test_still_falling_at_the_end_is_underfitting() -> None:
    train = noisy(np.linspace(2.4, 1.4, STEPS))
    valid = {s: 2.4 - 1.0 * s / STEPS + 0.05 for s in range(20, STEPS + 1, 20)}
    diagnosis = diagnose_records(make_records(train, valid, lr=[2e-4] * STEPS), CONFIG)
    assert diagnosis.kinds() == ["underfitting"]
    changes = {c["key"]: c["to"] for c in diagnosis.problems[0].changes}
    assert changes["method.r"] == 32 and changes["train.epochs"] == 6 and changes["data.packing"] is True


def test_flat_loss_at_a_usual_lr_is_underfitting() -> None:
    flat = noisy(np.full(STEPS, 2.0), 0.01)
    diagnosis = diagnose_records(make_records(flat, {s: 2.01 for s in range(20, STEPS + 1, 20)}), CONFIG)
    assert diagnosis.kinds() == ["underfitting"] and "barely moved" in diagnosis.headline


def test_memorising_run_with_valid_still_improving_is_not_underfitting() -> None:
    train = noisy(2.4 * np.exp(-np.arange(STEPS) / 30) + 0.1)  # train falls to 0.1, valid only to ~1.6
    valid = {s: 2.4 - 0.8 * s / STEPS for s in range(20, STEPS + 1, 20)}
    assert "underfitting" not in kinds(make_records(train, valid, lr=[2e-4] * STEPS))


def test_converged_run_is_not_underfitting() -> None:
    assert "underfitting" not in kinds(make_records(healthy_train(), healthy_valid()))


# ----------------------------------------------------------------------------------------------- learning rate


def test_flat_loss_at_a_tiny_lr_is_lr_too_low() -> None:
    flat = noisy(np.full(STEPS, 2.0), 0.01)
    records = make_records(flat, {s: 2.0 for s in range(20, STEPS + 1, 20)}, lr=1e-7)
    diagnosis = diagnose_records(records, config_with(lr=1e-7))
    assert diagnosis.kinds() == ["lr_too_low"]
    change = diagnosis.problems[0].changes[0]
    assert (change["key"], change["from"], change["to"]) == ("train.lr", 1e-7, 2e-4)  # the usual LoRA lr


def test_tiny_lr_that_still_learns_is_not_lr_too_low() -> None:
    assert "lr_too_low" not in kinds(make_records(healthy_train(), healthy_valid(), lr=1e-7))


def test_divergence_is_lr_too_high() -> None:
    t = np.arange(STEPS)
    train = noisy(np.where(t < 60, 2.0 - t / 60, 1.0 + 0.8 * np.minimum(1, (t - 60) / 40)))  # 2 -> 1 -> 1.8
    diagnosis = diagnose_records(make_records(train, lr=5e-3), config_with(lr=5e-3))
    assert diagnosis.kinds()[0] == "lr_too_high" and "diverged" in diagnosis.headline
    lr_change = next(c for c in diagnosis.problems[0].changes if c["key"] == "train.lr")
    assert lr_change["to"] == pytest.approx(2e-4)  # 5e-3 / 10 = 5e-4, capped at the usual LoRA lr


def test_blow_up_and_recovery_is_lr_too_high() -> None:
    t = np.arange(STEPS)
    train = noisy(np.where((t > 10) & (t < 60), 8.0, 2.0 - t / STEPS))
    diagnosis = diagnose_records(make_records(train), CONFIG)
    assert diagnosis.kinds()[0] == "lr_too_high" and "shot up" in diagnosis.headline


def test_collapse_at_a_huge_lr_is_lr_too_high() -> None:
    flat = noisy(np.full(STEPS, 6.3), 0.01)
    records = make_records(flat, {s: 6.27 for s in range(20, STEPS + 1, 20)}, lr=5e-2)
    diagnosis = diagnose_records(records, config_with(lr=5e-2))
    assert diagnosis.kinds() == ["lr_too_high"] and "collapsed" in diagnosis.headline


def test_steady_fall_is_not_lr_too_high() -> None:
    assert "lr_too_high" not in kinds(make_records(healthy_train(), lr=5e-3))


# ----------------------------------------------------------------------------------------------- instability


def test_loss_spikes_are_instability() -> None:
    train = healthy_train()
    train[[70, 140]] *= 3.0
    diagnosis = diagnose_records(make_records(train, healthy_valid()), CONFIG)
    assert diagnosis.kinds() == ["loss_spikes"]
    assert diagnosis.problems[0].values["count"] == 2 and diagnosis.problems[0].values["step"] in (71, 141)


def test_noise_is_not_a_spike() -> None:
    assert "loss_spikes" not in kinds(make_records(noisy(healthy_train(), 0.08, seed=3), healthy_valid()))


def test_exploding_gradient_norms() -> None:
    grad = list(noisy(np.full(STEPS, 1.0), 0.1))
    for step in (50, 90, 120, 150):
        grad[step] = 60.0
    diagnosis = diagnose_records(make_records(healthy_train(), healthy_valid(), grad=grad), CONFIG)
    assert diagnosis.kinds() == ["grad_explosion"] and diagnosis.problems[0].values["count"] == 4


def test_one_large_gradient_norm_is_not_an_explosion() -> None:
    grad = list(noisy(np.full(STEPS, 1.0), 0.1))
    grad[100] = 9.0
    assert kinds(make_records(healthy_train(), healthy_valid(), grad=grad)) == []


def test_stopped_event_is_nonfinite() -> None:
    stopped = {"event": "stopped", "step": 41, "reason": "non-finite loss", "value": float("nan")}
    diagnosis = diagnose_records(
        make_records(healthy_train(40), events=[stopped], lr=[1e-2] * 40), config_with(lr=1e-2)
    )
    assert diagnosis.kinds()[0] == "nonfinite" and diagnosis.problems[0].severity == "fatal"
    assert "step 41" in diagnosis.headline
    assert {c["key"] for c in diagnosis.problems[0].changes} >= {"train.lr", "train.warmup"}


def test_null_train_loss_is_nonfinite() -> None:
    train = list(healthy_train())
    train[30] = float("nan")
    assert kinds(make_records(train))[0] == "nonfinite"


# ----------------------------------------------------------------------------------------------- plateau, early stop


def test_plateau_at_high_lr() -> None:
    t = np.arange(STEPS)
    train = noisy(np.where(t < 30, 2.0 - 0.8 * t / 30, np.where(t < 140, 1.2, 1.2 - 0.3 * (t - 140) / 60)), 0.005)
    diagnosis = diagnose_records(make_records(train, lr=[2e-4] * STEPS), CONFIG)
    assert diagnosis.kinds() == ["plateau"] and diagnosis.problems[0].values["span_pct"] >= 0.3


def test_cosine_tail_flattening_is_not_a_plateau() -> None:
    assert "plateau" not in kinds(make_records(healthy_train(), healthy_valid()))


def test_early_stop_is_recorded_not_a_problem() -> None:
    event = {"event": "early_stop", "step": 120, "metric": "loss", "best": 1.05, "best_step": 80}
    diagnosis = diagnose_records(make_records(healthy_train(120), healthy_valid(20, 120), events=[event]), CONFIG)
    assert diagnosis.findings[0].kind == "early_stopped" and diagnosis.findings[0].severity == "info"
    assert diagnosis.kinds() == [] and "step 80" in diagnosis.findings[0].headline


def test_no_early_stop_event_no_early_stop_finding() -> None:
    diagnosis = diagnose_records(make_records(healthy_train(), healthy_valid()), CONFIG)
    assert not [f for f in diagnosis.findings if f.kind == "early_stopped"]


# ----------------------------------------------------------------------------------------------- loss vs metric


def test_low_loss_with_lower_accuracy_disagrees() -> None:
    # the seeds' case: valid loss 0.0706 promised ~0.93 accuracy, the score was 0.86
    valid = {s: 0.3 - 0.23 * s / STEPS for s in range(40, STEPS + 1, 40)}
    metrics = {s: {"accuracy": 0.80 + 0.06 * s / STEPS} for s in valid}
    diagnosis = diagnose_records(make_records(healthy_train(), valid, metrics=metrics), CONFIG)
    finding = next(f for f in diagnosis.problems if f.kind == "loss_metric_mismatch")
    assert "implies about 0.93" in finding.evidence and "0.86" in finding.evidence
    assert finding.changes[0]["key"] == "train.early_stop.metric" and finding.changes[0]["to"] == "accuracy"


def test_best_loss_and_best_metric_at_different_steps_disagree() -> None:
    valid = healthy_valid(40)
    metrics = {40: {"accuracy": 0.6}, 80: {"accuracy": 0.85}, 120: {"accuracy": 0.8}, 160: {"accuracy": 0.8},
               200: {"accuracy": 0.78}}  # fmt: skip
    diagnosis = diagnose_records(make_records(healthy_train(), valid, metrics=metrics), CONFIG)
    assert diagnosis.kinds() == ["loss_metric_mismatch"] and "gives up 0.070 accuracy" in diagnosis.headline


def test_loss_and_metric_that_agree_raise_nothing() -> None:
    valid = healthy_valid(40)
    metrics = {s: {"accuracy": 0.99 - 0.5 * v / 2.4} for s, v in valid.items()}
    assert kinds(make_records(healthy_train(), valid, metrics=metrics)) == []


# ----------------------------------------------------------------------------------------------- data


def test_truncation_and_masking_from_the_start_record() -> None:
    stats = {"train": {"examples": 200, "truncated": 6, "dropped_too_long": 2, "no_target": 3,
                       "length_percentiles": {"p50": 300, "p95": 900, "p99": 1500, "max": 2100}}}  # fmt: skip
    diagnosis = diagnose_records(make_records(healthy_train(), healthy_valid(), start=stats), CONFIG)
    assert set(diagnosis.kinds()) == {"truncation", "masking"}
    truncation = next(f for f in diagnosis.findings if f.kind == "truncation")
    assert truncation.changes == [{**truncation.changes[0], "key": "data.max_length", "from": 1024, "to": 1536}]


def test_clean_data_stats_raise_nothing() -> None:
    stats = {"train": {"examples": 200, "truncated": 1, "dropped_too_long": 0, "no_target": 0}}
    assert kinds(make_records(healthy_train(), healthy_valid(), start=stats)) == []


# ----------------------------------------------------------------------------------------------- run folders


def write_run(folder: Path, records: list[dict], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.yaml").write_text(yaml.safe_dump(config or CONFIG))
    return folder


def test_run_folder_diagnosis_writes_json_and_text(tmp_path: Path) -> None:
    train = noisy(2.0 * np.exp(-np.arange(STEPS) / 50) + 0.02)
    run = write_run(tmp_path / "run", make_records(train, overfit_valid()))
    diagnosis = diagnose_run(run)
    saved = json.loads((run / "diagnosis.json").read_text())
    assert saved["headline"] == diagnosis.headline and saved["findings"][0]["kind"] == "overfitting"
    assert not saved["healthy"]
    text = render_text(diagnosis)
    assert text.startswith("Overfitting") and "change: method.dropout: 0.05 -> 0.15" in text and "source:" in text


def test_write_patch_applies_to_the_config(tmp_path: Path) -> None:
    train = noisy(2.0 * np.exp(-np.arange(STEPS) / 50) + 0.02)
    diagnosis = diagnose_run(write_run(tmp_path / "run", make_records(train, overfit_valid())))
    patch = write_patch(diagnosis, tmp_path / "fix.yaml")
    assert patch.read_text().startswith("# tunelab diagnose")
    merged = validate_config(merge_patches(CONFIG, [patch]))
    assert merged.method.dropout == 0.15 and merged.method.r == 8 and merged.train.early_stop.patience == 2


def test_healthy_patch_has_no_changes(tmp_path: Path) -> None:
    diagnosis = diagnose_run(write_run(tmp_path / "run", make_records(healthy_train(), healthy_valid())))
    patch = write_patch(diagnosis, tmp_path / "fix.yaml")
    assert merge_patches(CONFIG, [patch]) == CONFIG and "no config change" in patch.read_text()


def test_metrics_cut_off_mid_line_are_read_up_to_the_cut(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_records(healthy_train(), healthy_valid()))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"event": "train", "step": 201, "lo')  # a crash mid-write
    diagnosis = diagnose_run(run)
    assert diagnosis.kinds() == [] and any("1 line(s) could not be read" in note for note in diagnosis.notes)


def test_folder_without_metrics_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        diagnose_run(tmp_path / "run")
    with pytest.raises(UserError, match="does not exist"):
        diagnose_run(tmp_path / "missing")


def test_metrics_without_steps_is_a_user_error(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [{"event": "start", "step": 0}])
    with pytest.raises(UserError, match="no training step"):
        diagnose_run(run)


def test_inspect_findings_are_carried_into_the_diagnosis(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_records(healthy_train(), healthy_valid()))
    leak = {"id": "leakage_valid", "severity": "high", "headline": "valid: 12 prompts also appear in train.",
            "evidence": "valid 3 = train 9", "fix": "Remove them from train."}  # fmt: skip
    cut = {"id": "truncated", "severity": "medium", "headline": "train: 3.0% of examples are cut.", "evidence": ""}
    low = {"id": "tiny_images", "severity": "low", "headline": "x", "evidence": "", "fix": ""}
    duplicates = {"id": "duplicates_train", "severity": "medium", "headline": "y", "evidence": "", "fix": ""}
    (run / "inspect.json").write_text(json.dumps({"findings": [leak, cut, low, duplicates]}))
    diagnosis = diagnose_run(run)
    assert [f.id for f in diagnosis.problems] == ["data.leakage_valid", "data.truncated"]
    assert diagnosis.headline == "valid: 12 prompts also appear in train."


def test_missing_config_falls_back_to_defaults(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_records(noisy(np.full(STEPS, 2.0), 0.01), lr=1e-7))
    (run / "config.yaml").unlink()
    diagnosis = diagnose_run(run)
    assert diagnosis.kinds() == ["lr_too_low"] and any("default config" in n for n in diagnosis.notes)


def test_few_evaluations_are_noted() -> None:
    diagnosis = diagnose_records(make_records(healthy_train(), {200: 1.0}), CONFIG)
    assert any("overfitting needs at least 3" in note for note in diagnosis.notes)
