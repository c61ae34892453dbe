"""The diagnosis rules, as data: one table of what each curve problem means and what to change, with sources.

A rule is picked by the problem a detector found (`kind`, e.g. "overfitting") and the task family of the run
(llm / vision; "any" fits both). Its prescriptions are config changes computed from the run's own config
(`train.lr / 3`, `method.dropout + 0.1 up to 0.3`, epochs down to where the best evaluation was ...), plus
actions that no config key expresses (clean the data, unify the template). Every rule names its source: a
seed document and section (`../shared/seeds/`, the team's notes this tool encodes) or a paper.

Vision keys (augment.*, model.drop_path, train.label_smoothing, data.image_size) belong to the image task's
config; a rule only writes keys that exist in the run's config or that the change gives a default for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

SEED_000 = "seed 000"  # ../shared/seeds/000_*.txt: the LLM + vision fine-tuning cheat sheet
SEED_002 = "seed 002"  # ../shared/seeds/002_*.txt: the VLM multiple-choice competition log (5e-3 -> 0.24)

TASK_FAMILY = {"sft": "llm", "summarize": "llm", "mcqa": "llm", "image_cls": "vision"}
LORA_KINDS = ("lora", "qlora", "dora")

# Typical peak learning rates per method, the yardstick for "too low" / "too high".
# LoRA 2e-4: seed 000 §1 (1e-4 -> 2e-4) and seed 002 ("소규모 LoRA는 대체로 1e-4 ~ 2e-4가 가장 안전").
# Full fine-tuning 2e-5: Stanford Alpaca's recipe (tatsu-lab/stanford_alpaca README). Prompt tuning 3e-2 and
# prefix 1e-2: the peft task guides; IA3 3e-3: Liu et al. 2022 (T-Few). Vision 5e-4: seed 000 §3 / §7.
TYPICAL_LR = {
    "lora": 2e-4,
    "qlora": 2e-4,
    "dora": 2e-4,
    "full": 2e-5,
    "freeze": 2e-5,
    "prefix": 1e-2,
    "prompt": 3e-2,
    "ia3": 3e-3,
    "vision": 5e-4,
}

Op = Literal["set", "mul", "add", "default", "value_of", "to_best"]


@dataclass(frozen=True)
class Change:
    """One config change, computed relative to the run's config.

    key: dotted config key; "a|b" means the first of a, b that is set in the run's config (so
    "train.max_steps|train.epochs" shortens whichever bounds the run). op: set (to value), mul (by value),
    add (value), default (set only when unset), value_of (the detector's values[value]), to_best (max_steps to
    the best step, or epochs to the best epoch rounded up). lower / upper: clamps. only_kinds: apply only for
    these method kinds. when: apply only when the current value equals this. fallback: the current value when
    the key is absent from the config (keys of other tasks' sections).
    """

    key: str
    op: Op
    value: Any = None
    why: str = ""
    lower: float | None = None
    upper: float | None = None
    only_kinds: tuple[str, ...] = ()
    when: Any = None
    fallback: Any = None

    def describe(self) -> str:
        """The change in words, independent of any run: 'train.lr / 3', 'method.dropout + 0.1 (<= 0.3)'."""
        key = self.key.split("|")[-1] if self.op == "to_best" else self.key.replace("|", " or ")
        if self.op == "mul":
            text = f"{key} / {1 / self.value:g}" if self.value < 1 else f"{key} x {self.value:g}"
        elif self.op == "add":
            text = f"{key} + {self.value:g}"
        elif self.op == "default":
            text = f"{key} = {self.value!r} when unset"
        elif self.op == "value_of":
            text = f"{key} = the measured {self.value}"
        elif self.op == "to_best":
            text = f"{key} = where the best evaluation was"
        else:
            text = f"{key} = {self.value!r}"
        bounds = [f">= {self.lower:g}" if self.lower is not None else "", f"<= {self.upper:g}" if self.upper else ""]
        bounds_text = ", ".join(b for b in bounds if b)
        return f"{text} ({bounds_text})" if bounds_text else text


@dataclass(frozen=True)
class Rule:
    """A problem, for one task family: what to call it, how to show the evidence, and what to change."""

    id: str
    kind: str
    family: Literal["llm", "vision", "any"]
    severity: str
    headline: str  # plain words, formatted with the detector's values
    evidence: str  # template over the detector's values
    changes: tuple[Change, ...] = ()
    actions: tuple[str, ...] = ()
    source: str = ""
    notes: dict[str, str] = field(default_factory=dict)


_LEN = "train.max_steps|train.epochs"

RULES: tuple[Rule, ...] = (
    Rule(
        id="nonfinite",
        kind="nonfinite",
        family="any",
        severity="fatal",
        headline="Training blew up: the {what} became {value} at step {step} and the run stopped.",
        evidence="stopped at optimizer step {step} ({reason}); last finite train loss {last_loss}; lr {lr_at_stop}",
        changes=(
            Change("train.lr", "mul", 0.1, "a NaN / inf loss almost always means steps that are too large"),
            Change("train.max_grad_norm", "default", 1.0, "clip the gradient norm (seed 000 §4: clip 1.0)"),
            Change("train.warmup", "set", 0.1, "a longer warmup eases the first large steps", lower=0.1),
            Change("model.dtype", "set", "bf16", "fp16 overflows where bf16 does not", when="fp16"),
        ),
        actions=("Look at the rows of the batch where it stopped: empty or huge examples can also cause it.",),
        source=f"{SEED_000} §9.2 (LR 10배 스윕 또는 warmup 증가); Pascanu et al. 2013 (gradient clipping)",
    ),
    Rule(
        id="lr_too_high",
        kind="lr_too_high",
        family="any",
        severity="high",
        headline="The learning rate is too high: {summary}",
        evidence=(
            "train loss {start:.3f} at the start, lowest {low:.3f} at step {low_step}, {end:.3f} at the end "
            "(step {last_step}); peak lr {peak_lr:.1e}, usual for method {method}: {typical:.0e}"
        ),
        changes=(
            Change("train.lr", "value_of", "lr_down", "10x smaller, at most the usual lr (seed 000 §9.2)"),
            Change("train.warmup", "set", 0.1, "a longer warmup (seed 002: warmup 0.08 -> 0.10)", lower=0.1),
            Change("train.max_grad_norm", "default", 1.0, "clip the gradient norm (seed 000 §4: clip 1.0)"),
        ),
        actions=("Re-run with the lower learning rate; if it still climbs, lower it another 10x.",),
        source=f"{SEED_002} (lr 5e-3: accuracy 0.24, chance level; 2e-4: 0.86); {SEED_000} §9.2",
    ),
    Rule(
        id="loss_spikes",
        kind="loss_spikes",
        family="any",
        severity="medium",
        headline="Training is unstable: the loss spiked {count} time(s), up to {peak_ratio:.1f}x its running level.",
        evidence="largest spike at step {step}: loss {peak:.3f} against a running median of {base:.3f}",
        changes=(
            Change("train.lr", "mul", 1 / 3, "smaller steps make spikes rarer"),
            Change("train.max_grad_norm", "default", 1.0, "clip the gradient norm (seed 000 §4: clip 1.0)"),
            Change("train.warmup", "set", 0.1, "a longer warmup (seed 002: 0.08 -> 0.10)", lower=0.1),
        ),
        actions=("Check the examples of the spiking steps for broken rows (very long, empty or mislabelled).",),
        source="Chowdhery et al. 2022 (PaLM: loss spikes, lower lr / skip bad batches); " + f"{SEED_000} §9.2",
    ),
    Rule(
        id="grad_explosion",
        kind="grad_explosion",
        family="any",
        severity="medium",
        headline="Gradients are exploding: the gradient norm reached {peak:.3g}, {ratio:.0f}x its median.",
        evidence="gradient norm median {median:.3g}, {count} step(s) above {threshold:.3g}; worst at step {step}",
        changes=(
            Change("train.max_grad_norm", "default", 1.0, "clip the gradient norm (seed 000 §4: clip 1.0)"),
            Change("train.lr", "mul", 1 / 3, "smaller steps keep the norm down"),
        ),
        source="Pascanu et al. 2013 (exploding gradients, clipping); " + f"{SEED_000} §4",
    ),
    Rule(
        id="lr_too_low",
        kind="lr_too_low",
        family="any",
        severity="high",
        headline="The learning rate is too low: the loss barely moved ({drop_pct:.1%} in {steps} steps, lr {lr:.1e}).",
        evidence=(
            "train loss {start:.4f} -> {end:.4f}; valid loss {valid_start} -> {valid_end}; lr {lr:.1e} is "
            "{factor:.0f}x below the usual {typical:.0e} for method {method}"
        ),
        changes=(Change("train.lr", "value_of", "lr_up", "the method's usual lr (seed 002: LoRA 1e-4 ~ 2e-4)"),),
        source=f"{SEED_000} §9.2 (학습 곡선 비정상 → LR 10배 스윕); {SEED_002} (LoRA 1e-4 ~ 2e-4)",
    ),
    Rule(
        id="underfitting.llm",
        kind="underfitting",
        family="llm",
        severity="medium",
        headline="Underfitting: {summary}",
        evidence="train loss {start:.3f} -> {end:.3f}; valid loss {valid_start} -> {valid_end}; {detail}",
        changes=(
            Change(
                "method.r",
                "mul",
                2.0,
                "more adapter capacity (seed 000 §1: rank 8 -> 16/32)",
                upper=64,
                only_kinds=LORA_KINDS,
            ),
            Change(
                "method.target", "set", "all-linear", "adapt k/o/up/down/gate too (seed 000 §1)", only_kinds=LORA_KINDS
            ),
            Change(
                "train.lr",
                "mul",
                2.0,
                "slightly larger steps (seed 000 §1: 1e-4 -> 2e-4)",
                upper=2e-4,
                only_kinds=LORA_KINDS,
            ),
            Change(_LEN, "mul", 2.0, "train longer (seed 000 §1: max_steps up; seed 002: epochs 1 -> 5)"),
            Change("data.packing", "set", True, "packing gives more examples per step (seed 000 §1)"),
        ),
        actions=("More or cleaner training data helps more than any knob (seed 000 §1, §10).",),
        source=f"{SEED_000} §1 (처방 LLM: 언더피팅), §10",
    ),
    Rule(
        id="underfitting.vision",
        kind="underfitting",
        family="vision",
        severity="medium",
        headline="Underfitting: {summary}",
        evidence="train loss {start:.3f} -> {end:.3f}; valid loss {valid_start} -> {valid_end}; {detail}",
        changes=(
            Change(
                "data.image_size",
                "set",
                320,
                "higher resolution (seed 000 §1: 224 -> 320/384)",
                lower=320,
                fallback=224,
            ),
            Change(_LEN, "mul", 2.0, "train longer (seed 000 §1: epochs 30 -> 100)"),
            Change("augment.mixup", "mul", 0.5, "weaker Mixup (seed 000 §1)", fallback=0.2),
            Change("augment.cutmix", "mul", 0.5, "weaker CutMix (seed 000 §1)", fallback=1.0),
            Change("train.weight_decay", "set", 0.02, "milder weight decay (seed 000 §1: 0.05 -> 0.02)", upper=0.02),
        ),
        actions=("A larger model (S -> B) if the GPU allows (seed 000 §1).",),
        source=f"{SEED_000} §1 (처방 Vision: 언더피팅)",
    ),
    Rule(
        id="overfitting.llm",
        kind="overfitting",
        family="llm",
        severity="high",
        headline="Overfitting: {summary}",
        evidence=(
            "valid loss best {best:.4f} at step {best_step} (epoch {best_epoch:.2f}), {last:.4f} at step "
            "{last_step}; train loss {train_at_best:.4f} -> {train_last:.4f}; gap {gap_best:+.4f} -> {gap_last:+.4f}"
        ),
        changes=(
            Change(
                "method.dropout",
                "add",
                0.1,
                "more adapter dropout (seed 000 §1: 0.2 -> 0.3)",
                upper=0.3,
                only_kinds=LORA_KINDS,
            ),
            Change(
                "method.r",
                "mul",
                0.5,
                "less adapter capacity (seed 000 §1: rank 16 -> 8)",
                lower=4,
                only_kinds=LORA_KINDS,
            ),
            Change(_LEN, "to_best", None, "stop where validation was best (seed 000 §1: steps / epochs down)"),
            Change("train.weight_decay", "set", 0.05, "a little weight decay (seed 002: wd 0.01 -> 0.05)", lower=0.05),
            Change("train.early_stop.patience", "default", 2, "stop on its own next time (seed 000 §8: 2~3)"),
        ),
        actions=(
            "Deduplicate the training set and keep one prompt template for every row (seed 000 §1).",
            "More training data, if there is any, is the surest cure.",
        ),
        source=f"{SEED_000} §1 (처방 LLM: 오버피팅), §8; {SEED_002} (LoRA 표준 튠)",
    ),
    Rule(
        id="overfitting.vision",
        kind="overfitting",
        family="vision",
        severity="high",
        headline="Overfitting: {summary}",
        evidence=(
            "valid loss best {best:.4f} at step {best_step} (epoch {best_epoch:.2f}), {last:.4f} at step "
            "{last_step}; train loss {train_at_best:.4f} -> {train_last:.4f}; gap {gap_best:+.4f} -> {gap_last:+.4f}"
        ),
        changes=(
            Change("augment.mixup", "set", 0.2, "Mixup 0.2~0.4 (seed 000 §1)", lower=0.2, fallback=0.0),
            Change("augment.cutmix", "set", 1.0, "CutMix 1.0 (seed 000 §1)", lower=1.0, fallback=0.0),
            Change("train.label_smoothing", "set", 0.1, "label smoothing 0.1 (seed 000 §1)", lower=0.1, fallback=0.0),
            Change("model.drop_path", "set", 0.1, "stochastic depth 0.1~0.2 (seed 000 §1)", lower=0.1, fallback=0.0),
            Change(
                "augment.magnitude", "add", 2, "stronger RandAugment (seed 000 §1: Aug 강도↑)", upper=15, fallback=9
            ),
            Change("train.early_stop.patience", "default", 2, "early stopping (seed 000 §1, §8)"),
        ),
        source=f"{SEED_000} §1 (처방 Vision: 오버피팅), §4; Zhang et al. 2018 (mixup); Yun et al. 2019 (CutMix)",
    ),
    Rule(
        id="plateau",
        kind="plateau",
        family="any",
        severity="low",
        headline="The loss plateaued for {span_pct:.0%} of the run while the learning rate was still high.",
        evidence="train loss stayed within {band:.1%} of {level:.3f} from step {from_step} to {to_step} "
        "(lr {lr_from:.1e} -> {lr_to:.1e})",
        changes=(
            Change("method.r", "mul", 2.0, "more capacity (seed 000 §9.4: rank↑)", upper=64, only_kinds=LORA_KINDS),
        ),
        actions=(
            "Clean the data and re-check hard / noisy labels (seed 000 §9.4).",
            "Use one prompt template for every example (seed 000 §9.4).",
        ),
        source=f"{SEED_000} §9.4 (성능 정체 → 데이터 클린업, 템플릿 일관화, rank↑)",
    ),
    Rule(
        id="early_stopped",
        kind="early_stopped",
        family="any",
        severity="info",
        headline="Early stopping ended the run at step {step}; best/ holds step {best_step} ({metric} {best:.4g}).",
        evidence="no better {metric} in {patience} evaluation(s) after step {best_step}",
        actions=("Nothing to change: best/ holds the best weights. Fewer epochs would reach them sooner.",),
        source=f"{SEED_000} §8 (EarlyStopping patience 2~3); {SEED_002} (Early Stopping + Best Checkpoint)",
    ),
    Rule(
        id="loss_metric_mismatch",
        kind="loss_metric_mismatch",
        family="any",
        severity="medium",
        headline="Loss and {metric} disagree: {summary}",
        evidence="{detail}",
        changes=(
            Change("train.early_stop.metric", "value_of", "metric", "pick best/ by the task metric (seed 002 §6)"),
        ),
        actions=(
            "Trust the task metric, not the loss, to pick checkpoints; check how answers are extracted and "
            "scored (seed 002: loss 0.0706 promised ~0.93, the score was 0.86).",
        ),
        source=f"{SEED_002} §6 (검증 정확도 함께 모니터: 손실만 보는 오류 방지), 개인 회고 (loss 0.0706 vs 0.86)",
    ),
    Rule(
        id="truncation",
        kind="truncation",
        family="any",
        severity="medium",
        headline="{share:.1%} of the {split} examples were cut or dropped at data.max_length {max_length}.",
        evidence="{truncated} truncated, {dropped} dropped of {examples}; token length p95 {p95}, p99 {p99}, max {max}",
        changes=(Change("data.max_length", "value_of", "suggested_max_length", "fit p99 of the examples"),),
        actions=("Or shorten the longest examples (seed 000 §6: 극단치 잘라내기).",),
        source=f"{SEED_000} §6 (길이: 토큰 길이 분포, 극단치 잘라내기 or truncation)",
    ),
    Rule(
        id="masking",
        kind="masking",
        family="any",
        severity="high",
        headline="{no_target} {split} example(s) had no answer token to learn from (every label masked).",
        evidence="{no_target} of {examples} examples with all labels -100 at data.max_length {max_length}",
        actions=(
            "Check the chat template and the answer column: the assistant turn must survive rendering and "
            "truncation (seed 002 §4: 라벨 마스킹).",
        ),
        source=f"{SEED_002} §4 (라벨 마스킹: assistant 정답만 학습)",
    ),
    Rule(
        id="data",
        kind="data",
        family="any",
        severity="medium",
        headline="{headline}",
        evidence="{evidence} (from inspect.json)",
        actions=("{fix}",),
        source=f"tunelab inspect; {SEED_000} §6 (EDA: 중복/누수, 레이블 품질)",
    ),
)


def rule_for(kind: str, family: str) -> Rule:
    """The rule for a problem in a task family: the family's own first, else the one for any family."""
    for candidate in (family, "any", "llm"):
        for rule in RULES:
            if rule.kind == kind and rule.family == candidate:
                return rule
    raise KeyError(f"no diagnosis rule for {kind!r}")


def family_of(task: str | None) -> str:
    """llm or vision for a task name (unknown tasks count as llm, the only family with tasks today)."""
    return TASK_FAMILY.get(task or "", "llm")


def typical_lr(config: dict[str, Any], family: str) -> float:
    """The usual peak learning rate for the run's method (the yardstick for too low / too high)."""
    if family == "vision":
        return TYPICAL_LR["vision"]
    return TYPICAL_LR.get(str(get_key(config, "method.kind") or "lora"), TYPICAL_LR["lora"])


# ----------------------------------------------------------------------------------------------- changes

_MISSING = object()


def get_key(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """The value at a dotted key of a nested dict, or `default` when any part is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def resolve_changes(rule: Rule, config: dict[str, Any], values: dict[str, Any]) -> list[dict[str, Any]]:
    """The rule's changes as concrete {"key", "from", "to", "why", "rule"} for this run; no-ops are left out."""
    kind = get_key(config, "method.kind")
    resolved = []
    for change in rule.changes:
        if change.only_kinds and kind not in change.only_kinds:
            continue
        key = _pick_key(change, config)
        current = get_key(config, key, _MISSING)
        exists = current is not _MISSING
        current = change.fallback if not exists else current
        if not exists and change.fallback is None and change.op != "default":
            continue  # a key this task's config does not have: nothing to change relative to
        if change.when is not None and current != change.when:
            continue
        target = _target(change, key, current, values)
        if target is None or target == current or (isinstance(target, float) and not math.isfinite(target)):
            continue
        resolved.append({"key": key, "from": current, "to": target, "why": change.why, "rule": change.describe()})
    return resolved


def _pick_key(change: Change, config: dict[str, Any]) -> str:
    options = change.key.split("|")
    return next((k for k in options if get_key(config, k) is not None), options[-1])


def _target(change: Change, key: str, current: Any, values: dict[str, Any]) -> Any:
    op, value = change.op, change.value
    if op == "set":
        target = value
    elif op == "default":
        return value if current is None else None
    elif op == "value_of":
        target = values.get(value)
    elif op == "to_best":
        if key.endswith("max_steps"):
            target = values.get("best_step")
        else:
            best_epoch = values.get("best_epoch")
            target = max(1, math.ceil(best_epoch)) if best_epoch else None
    elif not isinstance(current, (int, float)) or isinstance(current, bool):
        return None
    else:
        target = current * value if op == "mul" else current + value
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        target = _clamp(change, target, current)
        target = int(round(target)) if isinstance(current, int) and not isinstance(current, bool) else target
        target = float(f"{target:.3g}") if isinstance(target, float) else target
    return target


def _clamp(change: Change, target: float, current: Any) -> float:
    """Bounds that never turn a change around: "set ... lower=x" means at least x (a larger value stays),
    "set ... upper=x" at most x; a multiplied or added value stops at the bound, or stays where it is when it is
    already past it."""
    numeric = isinstance(current, (int, float)) and not isinstance(current, bool)
    if change.op == "set" and numeric:
        if change.lower is not None and current >= change.lower:
            return current
        if change.upper is not None and current <= change.upper:
            return current
        return target
    if change.upper is not None and target > change.upper:
        target = max(change.upper, current) if numeric else change.upper
    if change.lower is not None and target < change.lower:
        target = min(change.lower, current) if numeric else change.lower
    return target
