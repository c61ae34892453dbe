"""The rules table (complete, sourced, valid keys), how changes are computed from a run's config, and patches."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.advise.findings import SEVERITIES
from tunelab.advise.patch import deep_merge, is_patch_argument, merge_patches, read_patch
from tunelab.advise.rules import RULES, Change, Rule, get_key, resolve_changes, rule_for
from tunelab.config import RunConfig, validate_config
from tunelab.errors import UserError

CONFIG = RunConfig().model_dump(mode="json")
DETECTED_KINDS = (
    *("nonfinite", "lr_too_high", "loss_spikes", "grad_explosion", "lr_too_low", "underfitting", "overfitting"),
    *("plateau", "early_stopped", "loss_metric_mismatch", "truncation", "masking", "data"),
)


def test_every_rule_is_complete_and_sourced() -> None:
    ids = [rule.id for rule in RULES]
    assert len(ids) == len(set(ids))
    for rule in RULES:
        assert rule.family in ("llm", "vision", "any") and rule.severity in SEVERITIES
        assert rule.headline and rule.source and ("seed" in rule.source or "et al." in rule.source), rule.id


@pytest.mark.parametrize("kind", DETECTED_KINDS)
@pytest.mark.parametrize("family", ["llm", "vision"])
def test_every_detected_problem_has_a_rule_in_each_family(kind: str, family: str) -> None:
    assert rule_for(kind, family).family in (family, "any")


def test_llm_rules_only_change_keys_the_config_has() -> None:
    for rule in RULES:
        if rule.family == "vision":
            continue
        for change in rule.changes:
            for key in change.key.split("|"):
                assert get_key(CONFIG, key, "MISSING") != "MISSING", (rule.id, key)


def changes(rule_changes: tuple[Change, ...], config: dict, values: dict | None = None) -> dict:
    rule = Rule("t", "t", "any", "low", "h", "e", changes=rule_changes)
    return {c["key"]: c["to"] for c in resolve_changes(rule, config, values or {})}


def test_changes_are_relative_to_the_run_config() -> None:
    config = validate_config({"train": {"lr": 3e-4}, "method": {"dropout": 0.25, "r": 4}}).model_dump(mode="json")
    got = changes(
        (
            Change("train.lr", "mul", 1 / 3),
            Change("method.dropout", "add", 0.1, upper=0.3),
            Change("method.r", "mul", 0.5, lower=4),
            Change("train.warmup", "set", 0.1, lower=0.1),
            Change("train.max_grad_norm", "default", 1.0),
        ),
        config,
    )
    assert got == {"train.lr": 1e-4, "method.dropout": 0.3, "train.warmup": 0.1}  # r already at 4; clip already set


def test_bounds_never_turn_a_change_around() -> None:
    config = validate_config({"train": {"warmup": 0.2, "weight_decay": 0.1}, "method": {"dropout": 0.5}})
    got = changes(
        (
            Change("train.warmup", "set", 0.1, lower=0.1),  # "at least 0.1": 0.2 stays
            Change("train.weight_decay", "set", 0.05, lower=0.05),
            Change("method.dropout", "add", 0.1, upper=0.3),  # already above the cap: stays
        ),
        config.model_dump(mode="json"),
    )
    assert got == {}


def test_length_changes_follow_whichever_bounds_the_run() -> None:
    by_epochs = changes((Change("train.max_steps|train.epochs", "to_best"),), CONFIG, {"best_epoch": 1.3})
    steps_config = validate_config({"train": {"max_steps": 500}}).model_dump(mode="json")
    by_steps = changes((Change("train.max_steps|train.epochs", "to_best"),), steps_config, {"best_step": 120})
    doubled = changes((Change("train.max_steps|train.epochs", "mul", 2.0),), steps_config)
    assert by_epochs == {"train.epochs": 2} and by_steps == {"train.max_steps": 120}
    assert doubled == {"train.max_steps": 1000} and isinstance(doubled["train.max_steps"], int)


def test_method_specific_changes_skip_other_methods() -> None:
    full = validate_config({"method": {"kind": "full"}}).model_dump(mode="json")
    assert changes((Change("method.r", "mul", 2.0, only_kinds=("lora",)),), full) == {}
    assert changes((Change("model.dtype", "set", "bf16", when="fp16"),), CONFIG) == {}  # dtype is auto


def test_keys_of_other_tasks_need_a_fallback() -> None:
    config = {key: value for key, value in CONFIG.items() if key != "augment"}  # a task without that section
    assert changes((Change("augment.mixup", "set", 0.2),), config) == {}
    assert changes((Change("augment.mixup", "set", 0.2, lower=0.2, fallback=0.0),), config) == {"augment.mixup": 0.2}


def test_describe_says_the_change_in_words() -> None:
    assert Change("train.lr", "mul", 1 / 3).describe() == "train.lr / 3"
    assert Change("method.dropout", "add", 0.1, upper=0.3).describe() == "method.dropout + 0.1 (<= 0.3)"


# ----------------------------------------------------------------------------------------------- patches


def test_deep_merge_merges_mappings_and_replaces_the_rest() -> None:
    base = {"train": {"lr": 1e-4, "early_stop": {"metric": "loss"}}, "method": {"target": ["q_proj", "v_proj"]}}
    patch = {"train": {"early_stop": {"patience": 2}}, "method": {"target": ["k_proj"]}}
    merged = deep_merge(base, patch)
    assert merged == {"train": {"lr": 1e-4, "early_stop": {"metric": "loss", "patience": 2}},
                      "method": {"target": ["k_proj"]}}  # fmt: skip
    assert base["train"]["early_stop"] == {"metric": "loss"}  # the input is untouched


def test_merge_patches_in_order(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("train:\n  lr: 1.0e-4\n  epochs: 2\n")
    (tmp_path / "b.yml").write_text("# comments only are fine\ntrain:\n  lr: 5.0e-5\n")
    merged = merge_patches(CONFIG, [tmp_path / "a.yaml", tmp_path / "b.yml"])
    config = validate_config(merged)
    assert config.train.lr == 5e-5 and config.train.epochs == 2 and config.method.r == 16
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert read_patch(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize(
    ("text", "message"), [("train: [1, 2", "not valid YAML"), ("- 1\n- 2\n", "must be a YAML mapping")]
)
def test_bad_patch_files_are_user_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        merge_patches(CONFIG, [tmp_path / "bad.yaml"])
    with pytest.raises(UserError, match="does not exist"):
        merge_patches(CONFIG, [tmp_path / "missing.yaml"])


def test_patch_arguments_are_told_from_overrides() -> None:
    assert is_patch_argument("fix.yaml") and is_patch_argument("runs/a/patch.YML")
    assert not is_patch_argument("train.lr=1e-4") and not is_patch_argument("data.train=x.yaml")
