"""Curve detectors: each reads a run's logged curves and returns the problem it sees, with the numbers.

A detector returns `Signal(kind, score, values)` or None; `kind` picks the rule in `rules.py` and `values` fill
its headline and evidence. Thresholds are relative (to the starting loss, the loss reached, the improvement
made), so they hold for a 0.07-loss classifier and a 6.4-loss random model alike; each names where it comes
from. They were checked on curated curves (tests/advise/test_diagnose.py) and on real tiny-model runs
(tests/advise/test_diagnose_runs.py), where a healthy run raises nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tunelab.advise.rules import get_key, typical_lr

# A curve needs this many train records before trends mean anything (fewer: only NaN / early stop are read).
MIN_TRAIN_POINTS = 8
# Divergence: the loss climbed back by more than this share of the improvement it had made ...
DIVERGE_SHARE_OF_GAIN = 0.25
# ... or by more than this share of the lowest loss (a run that never improved) ...
DIVERGE_SHARE_OF_LOW = 0.5
# ... and by more than these floors, above batch-to-batch noise (measured on tiny runs: the median-smoothed
# train loss of a healthy run wanders < 2% of its start and < 10% of its level).
NOISE_SHARE_OF_START = 0.02
NOISE_SHARE_OF_LEVEL = 0.1
# Blow-up: the smoothed train loss reached this multiple of the untrained model's loss (weights pushed somewhere
# worse than random; batch noise on tiny runs stays within 10%).
BLOWUP_RATIO = 1.5
# Spike: one step's loss this many times its running median, and higher by this share of the starting loss.
SPIKE_RATIO = 1.5
SPIKE_SHARE_OF_START = 0.1
# ... and this many robust standard deviations of the loss's own step-to-step spread over at least SPIKE_WINDOW
# steps (SmolLM2-135M, LoRA, batches of 2 packed rows: per-step losses swing 1.2-3.7 with no instability).
SPIKE_SIGMAS = 6.0
SPIKE_WINDOW = 10
MAD_TO_SIGMA = 1.4826  # median absolute deviation -> standard deviation for normal noise
# Exploding gradients: norms this many times their median (pre-clip norms; clipping hides single outliers,
# so it takes several such steps, or a median that grew this much from the first to the last quarter).
GRAD_RATIO = 10.0
GRAD_MIN_STEPS = 3
# No movement: the loss fell less than this share of its start (train and valid alike). Measured on 5 seeds:
# healthy tiny runs fall 35-50%, LoRA at the usual lr on a random base (which barely learns) 1.5-3.5%, LoRA at
# 5e-3 (slow but learning) 7-10%.
FLAT_DROP = 0.05
# ... and "too low" when the lr was also this many times below the method's usual lr (seed 000 §9.2: 10x sweeps).
LR_LOW_FACTOR = 10.0
# Slow learning at a tiny lr: below this drop, with the lr that far below usual, the lr is the cause; with the lr
# that far above usual and no gain in the last two thirds (< STALL_GAIN), the model collapsed to a constant guess
# (a random model's first step is the unigram distribution: only ~4% below its start on the tiny runs). Measured on
# 5 seeds each: collapsed LoRA runs (lr 5e-2) gained 0.0-0.2% after their first third, slowly learning ones
# (lr 5e-3) 1.1-2.5%; 0.5% sits between.
SLOW_DROP = 0.10
STALL_GAIN = 0.005
# Still learning at the end: the last quarter of the run brought this share of the whole improvement.
LATE_SHARE = 0.25
LATE_MIN_REL = 0.02
# ... unless the train-valid gap exceeds this share of the train improvement: underfitting means both losses high
# and close (healthy tiny runs: 0.1-0.2; a memorising run 0.75).
MAX_GAP_SHARE = 0.5
# Overfitting: valid loss rose this much above its best with >= 2 evaluations after it (1 eval: OVERFIT_RISE_ONE),
# while the train loss kept falling by TRAIN_STILL_FALLING. Valid loss is computed on a fixed set without
# dropout, so its eval-to-eval noise is small (< 1% on tiny runs); 3% is a real turn (Prechelt 1998, "GL" ratio).
OVERFIT_RISE = 0.03
OVERFIT_RISE_ONE = 0.10
TRAIN_STILL_FALLING = 0.02
# Gap widening with a stalled valid loss: the gap grew by this share of the valid loss.
GAP_GROWTH = 0.10
# Plateau: flat within this band for this share of the run, while lr >= PLATEAU_LR of its peak.
PLATEAU_BAND = 0.01
PLATEAU_SPAN = 0.3
PLATEAU_LR = 0.5
# Loss vs metric: picking by loss lost this much of the metric (above the eval-to-eval jitter of token accuracy on
# small validation sets: +-0.03 on the tiny runs' ~170 target tokens), or exp(-loss) promised this much more
# accuracy than measured (seed 002: loss 0.0706 -> ~0.93 promised, 0.86 got).
METRIC_GAP = 0.05
CALIBRATION_GAP = 0.05
# Truncation worth a finding: above 1% of examples, the p99 length is being cut.
TRUNCATION_SHARE = 0.01

NOT_METRICS = {"step", "epoch", "loss", "perplexity", "best"}
LOWER_IS_BETTER = ("loss", "perplexity", "error", "wer", "cer")


@dataclass
class Signal:
    """What a detector saw: the problem (a rule kind), how strong (0..1) and the numbers."""

    kind: str
    score: float
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Curves:
    """A run's curves as arrays: train loss / lr / grad norm per logged step, and the evaluations."""

    steps: np.ndarray
    loss: np.ndarray  # NaN where the loss was not finite (logged as null)
    lr: np.ndarray
    grad_norm: np.ndarray
    epochs: np.ndarray
    evals: list[dict[str, Any]]
    events: dict[str, dict[str, Any]]  # start / early_stop / stopped, the last of each
    config: dict[str, Any]
    family: str

    @classmethod
    def from_records(cls, records: list[dict[str, Any]], config: dict[str, Any], family: str) -> Curves:
        """Curves from metrics.jsonl records (in file order; a resumed run's log is already cut to its checkpoint)."""
        train = sorted((r for r in records if r.get("event") == "train"), key=lambda r: r.get("step", 0))

        def column(name: str) -> np.ndarray:
            return np.array([_number(r.get(name)) for r in train], dtype=float)

        evals = sorted((r for r in records if r.get("event") == "eval"), key=lambda r: r.get("step", 0))
        events = {r["event"]: r for r in records if r.get("event") in ("start", "early_stop", "stopped")}
        return cls(column("step"), column("loss"), column("lr"), column("grad_norm"), column("epoch"), evals, events,
                   config, family)  # fmt: skip

    @property
    def window(self) -> int:
        """Smoothing window: a tenth of the run, 3 to 50 steps."""
        return int(min(50, max(3, len(self.loss) // 10)))

    def smoothed(self) -> np.ndarray:
        """Centered rolling median of the train loss (robust to single spikes)."""
        return pd.Series(self.loss).rolling(self.window, center=True, min_periods=1).median().to_numpy()

    def levels(self) -> tuple[float, float, int, float]:
        """(start, lowest smoothed, index of the lowest, end) train loss.

        start is the first logged loss: at step 1 it is the untrained model's, computed before any update (a
        median over the first steps would mix in a blow-up that starts at step 2).
        """
        finite = self.loss[np.isfinite(self.loss)]
        smooth = self.smoothed()
        low_index = int(np.nanargmin(smooth))
        return (
            float(finite[0]),
            float(smooth[low_index]),
            low_index,
            float(np.median(finite[-self.window :])),
        )

    def valid_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, losses) of the evaluations that logged a loss."""
        rows = [(e["step"], e["loss"]) for e in self.evals if math.isfinite(_number(e.get("loss")))]
        return np.array([s for s, _ in rows], dtype=float), np.array([v for _, v in rows], dtype=float)

    def train_at(self, step: float) -> float:
        """The smoothed train loss at the last logged step <= `step` (the first one before any)."""
        index = max(0, int(np.searchsorted(self.steps, step, side="right")) - 1)
        return float(self.smoothed()[index])


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


# ----------------------------------------------------------------------------------------------- blow-ups


def detect_nonfinite(curves: Curves) -> Signal | None:
    """A 'stopped' event (NaN / inf loss or gradient norm) or a null train loss."""
    stopped = curves.events.get("stopped")
    nan_steps = curves.steps[~np.isfinite(curves.loss)]
    if stopped is None and not len(nan_steps):
        return None
    finite = curves.loss[np.isfinite(curves.loss)]
    reason = stopped.get("reason", "non-finite loss") if stopped else "non-finite loss"
    values = {
        "step": int(stopped["step"]) if stopped else int(nan_steps[0]),
        "reason": reason,
        "what": reason.replace("non-finite ", ""),
        # metrics.jsonl writes non-finite numbers as null
        "value": stopped.get("value") if stopped and stopped.get("value") is not None else "NaN / inf",
        "last_loss": _fmt(float(finite[-1]) if len(finite) else None),
        "lr_at_stop": f"{curves.lr[np.isfinite(curves.lr)][-1]:.2e}" if np.isfinite(curves.lr).any() else "n/a",
    }
    return Signal("nonfinite", 1.0, values)


def detect_divergence(curves: Curves) -> Signal | None:
    """The train loss shot far above where it started, or climbed back well above the lowest level it reached
    and stayed there: the steps are too large (lr too high)."""
    if np.isfinite(curves.loss).sum() < MIN_TRAIN_POINTS:
        return None
    start, low, low_index, end = curves.levels()
    values = {**lr_values(curves), **_level_values(curves, start, low, low_index, end)}
    smooth = curves.smoothed()
    peak_index = int(np.nanargmax(smooth))
    peak = float(smooth[peak_index])
    if peak >= BLOWUP_RATIO * start and peak - start > NOISE_SHARE_OF_LEVEL * abs(start):
        back = "and stayed there." if end >= BLOWUP_RATIO * start else f"before coming back to {end:.3f}."
        values["summary"] = (
            f"the training loss shot up from {start:.3f} to {peak:.3f} at step {int(curves.steps[peak_index])} {back}"
        )
        return Signal("lr_too_high", min(1.0, peak / start - 1), values)
    rise, gain = end - low, max(start - low, 0.0)
    if low_index >= len(curves.loss) - curves.window:  # the lowest point is at the end: no climb back
        return None
    floor = max(NOISE_SHARE_OF_START * start, NOISE_SHARE_OF_LEVEL * low)
    if rise <= floor or not (rise > DIVERGE_SHARE_OF_GAIN * gain or rise > DIVERGE_SHARE_OF_LOW * low):
        return None
    values["summary"] = f"the training loss diverged from {low:.3f} back up to {end:.3f}."
    return Signal("lr_too_high", min(1.0, rise / max(gain, low, 1e-8)), values)


def detect_spikes(curves: Curves) -> Signal | None:
    """Single steps whose loss jumps far above the running median of the steps before (then comes back)."""
    loss = pd.Series(curves.loss)
    if loss.notna().sum() < MIN_TRAIN_POINTS:
        return None
    start = curves.levels()[0]
    window = max(curves.window, SPIKE_WINDOW)
    base = loss.rolling(window, min_periods=window).median().shift(1)
    # the batch-to-batch spread of the steps before: small batches of mixed data swing 2x on their own
    spread = (loss - base).abs().rolling(window, min_periods=window).median().shift(1) * MAD_TO_SIGMA
    ratio = loss / base
    jump = loss - base
    is_spike = (ratio > SPIKE_RATIO) & (jump > SPIKE_SHARE_OF_START * start) & (jump > SPIKE_SIGMAS * spread)
    if not is_spike.any():
        return None
    events = int((is_spike & ~is_spike.shift(1, fill_value=False)).sum())  # consecutive spike steps: one spike
    worst = int(ratio.where(is_spike).idxmax())
    values = {
        "count": events,
        "step": int(curves.steps[worst]),
        "peak": float(loss[worst]),
        "base": float(base[worst]),
        "peak_ratio": float(ratio[worst]),
    }
    return Signal("loss_spikes", min(1.0, (float(ratio[worst]) - 1) / 4), values)


def detect_grad_explosion(curves: Curves) -> Signal | None:
    """Gradient norms many times their median on several steps, or growing tenfold over the run."""
    finite = np.isfinite(curves.grad_norm)
    norms, steps = curves.grad_norm[finite], curves.steps[finite]
    if len(norms) < MIN_TRAIN_POINTS:
        return None
    quarter = max(1, len(norms) // 4)
    # the larger of the overall and the first quarter's median: a run whose norms collapsed (a dead model)
    # would otherwise make its normal early norms look like an explosion
    median = max(float(np.median(norms)), float(np.median(norms[:quarter])))
    threshold = GRAD_RATIO * median
    above = norms > threshold
    growth = float(np.median(norms[-quarter:]) / max(np.median(norms[:quarter]), 1e-12))
    if above.sum() < GRAD_MIN_STEPS and growth < GRAD_RATIO:
        return None
    worst = int(np.argmax(norms))
    values = {
        "peak": float(norms[worst]),
        "ratio": float(norms[worst] / max(median, 1e-12)),
        "median": median,
        "count": int(above.sum()),
        "threshold": threshold,
        "step": int(steps[worst]),
        "growth": growth,
    }
    return Signal("grad_explosion", min(1.0, values["ratio"] / 100), values)


# ----------------------------------------------------------------------------------------------- too little


def detect_no_movement(curves: Curves) -> Signal | None:
    """The loss barely moved. The lr says why: far below the method's usual, too low; far above, too high (the
    model collapsed to a constant guess, seed 002's 5e-3 run at chance level); in the usual range, underfitting."""
    if np.isfinite(curves.loss).sum() < MIN_TRAIN_POINTS:
        return None
    start, low, low_index, end = curves.levels()
    drop = (start - end) / max(abs(start), 1e-8)
    _, valid = curves.valid_losses()
    valid_drop = (valid[0] - valid.min()) / max(abs(valid[0]), 1e-8) if len(valid) >= 2 else drop
    moved = max(drop, valid_drop)
    values = {**lr_values(curves), **_level_values(curves, start, low, low_index, end), "drop_pct": drop}
    values.update(valid_start=_fmt(valid[0] if len(valid) else None), valid_end=_fmt(valid[-1] if len(valid) else None))
    if values["lr"] * LR_LOW_FACTOR <= values["typical"] and moved < SLOW_DROP:
        return Signal("lr_too_low", 1.0 - max(drop, 0.0) / SLOW_DROP, values)
    stalled = late_gain(curves) < STALL_GAIN
    if values["lr"] >= LR_LOW_FACTOR * values["typical"] and moved < SLOW_DROP and stalled:
        values["summary"] = (
            f"the loss stalled at {end:.3f} ({drop:.1%} below the start) at lr {values['lr']:.1e}, "
            f"{values['lr'] / values['typical']:.0f}x the usual {values['typical']:.0e}: the model collapsed instead "
            "of learning."
        )
        return Signal("lr_too_high", 0.9, values)
    if moved >= FLAT_DROP:
        return None
    values["summary"] = "the loss barely moved, although the learning rate is in the usual range."
    values["detail"] = f"a {drop:.1%} drop in {values['steps']} steps at lr {values['lr']:.1e}"
    return Signal("underfitting", 0.8, values)


def late_gain(curves: Curves) -> float:
    """Relative improvement over the last two thirds of the run (valid loss with >= 4 evaluations, else train).

    A collapsed model finds its constant guess within the first third and gains nothing after; a model that
    learns slowly keeps gaining."""
    _, valid = curves.valid_losses()
    series = valid if len(valid) >= 4 else curves.smoothed()
    third = len(series) // 3
    return (float(series[third]) - float(np.nanmin(series[third:]))) / max(abs(float(series[third])), 1e-8)


def lr_values(curves: Curves) -> dict[str, Any]:
    """The run's peak lr against the method's usual one, and the lr to try next (a 10x sweep step toward it)."""
    peak = float(np.nanmax(curves.lr)) if np.isfinite(curves.lr).any() else get_key(curves.config, "train.lr", 0.0)
    typical = typical_lr(curves.config, curves.family)
    return {
        "lr": peak,
        "peak_lr": peak,
        "typical": typical,
        "factor": typical / max(peak, 1e-20),
        "method": get_key(curves.config, "method.kind", "?"),
        "lr_down": min(peak / 10, typical),  # seed 000 §9.2: 10x steps, but never past the usual lr
        "lr_up": typical if peak * LR_LOW_FACTOR <= typical else peak * 10,
    }


def _level_values(curves: Curves, start: float, low: float, low_index: int, end: float) -> dict[str, Any]:
    return {
        "start": start,
        "low": low,
        "low_step": int(curves.steps[low_index]),
        "end": end,
        "last_step": int(curves.steps[-1]),
        "steps": int(curves.steps[-1]),
    }


def detect_still_learning(curves: Curves) -> Signal | None:
    """The (valid, else train) loss was still falling fast when the run ended: it stopped too early."""
    steps, losses = curves.valid_losses()
    if len(losses) < 3:
        if np.isfinite(curves.loss).sum() < MIN_TRAIN_POINTS:
            return None
        steps, losses = curves.steps, curves.smoothed()
    gain = float(losses[0] - np.nanmin(losses))
    if gain <= 0 or np.nanargmin(losses) < len(losses) - 1:  # best before the end: not "still falling"
        return None
    mark = int(np.searchsorted(steps, steps[0] + 0.75 * (steps[-1] - steps[0]), side="right")) - 1
    late = float(losses[mark] - losses[-1])
    if late < LATE_SHARE * gain or late < LATE_MIN_REL * abs(losses[-1]):
        return None
    start, _, _, end = curves.levels() if np.isfinite(curves.loss).sum() else (math.nan, 0, 0, math.nan)
    valid_steps, valid = curves.valid_losses()
    if len(valid) and math.isfinite(end) and valid[-1] - end > MAX_GAP_SHARE * max(start - end, 0.0):
        return None  # train far below valid: the model fits the data, it does not generalise (variance, not bias)
    values = {
        "start": start,
        "end": end,
        "valid_start": _fmt(valid[0] if len(valid) else None),
        "valid_end": _fmt(valid[-1] if len(valid) else None),
        "late_share": late / gain,
        "summary": "the loss was still falling steeply when training ended.",
        "detail": f"the last quarter of the run brought {late / gain:.0%} of the whole improvement",
    }
    return Signal("underfitting", min(1.0, late / gain), values)


# ----------------------------------------------------------------------------------------------- too much


def detect_overfitting(curves: Curves) -> Signal | None:
    """Valid loss turned up after its best while the train loss kept falling, or the gap widened a lot."""
    steps, valid = curves.valid_losses()
    if len(valid) < 3 or np.isfinite(curves.loss).sum() == 0:
        return None
    best = int(np.argmin(valid))
    after = valid[best + 1 :]
    train_best, train_last = curves.train_at(steps[best]), curves.train_at(steps[-1])
    train_fell = train_last < train_best * (1 - TRAIN_STILL_FALLING)
    rise = (valid[-1] - valid[best]) / max(abs(valid[best]), 1e-8)
    turned_up = (len(after) >= 2 and rise >= OVERFIT_RISE and np.mean(after > valid[best] * 1.01) >= 0.5) or (
        len(after) == 1 and rise >= OVERFIT_RISE_ONE
    )
    gap_best, gap_last = valid[best] - train_best, valid[-1] - train_last
    half = len(valid) // 2
    stalled = (valid[half] - valid[-1]) < 0.01 * abs(valid[half])
    widened = stalled and gap_last - gap_best >= GAP_GROWTH * abs(valid[best]) and train_fell
    if not ((turned_up and train_fell) or widened):
        return None
    epochs = [e.get("epoch") for e in curves.evals if e.get("step") == steps[best]]
    values = {
        "best": float(valid[best]),
        "best_step": int(steps[best]),
        "best_epoch": float(epochs[0]) if epochs and epochs[0] is not None else math.nan,
        "last": float(valid[-1]),
        "last_step": int(steps[-1]),
        "train_at_best": train_best,
        "train_last": train_last,
        "gap_best": gap_best,
        "gap_last": gap_last,
        "rise_pct": rise,
    }
    if turned_up:
        values["summary"] = (
            f"validation loss turned up after step {int(steps[best])} (+{rise:.0%}) while training loss kept falling."
        )
    else:
        values["summary"] = "validation loss stopped improving while the train-valid gap kept widening."
    return Signal("overfitting", min(1.0, max(rise, 0) * 5 + 0.2), values)


def detect_plateau(curves: Curves) -> Signal | None:
    """A long flat stretch of the train loss, after it had improved, while the lr was still high."""
    if np.isfinite(curves.loss).sum() < 2 * MIN_TRAIN_POINTS or not np.isfinite(curves.lr).any():
        return None
    smooth, lr = curves.smoothed(), np.nan_to_num(curves.lr)
    start, n, stride = curves.levels()[0], len(smooth), max(1, curves.window // 2)
    high = lr >= PLATEAU_LR * lr.max()
    best: tuple[int, int] | None = None
    for i in range(0, n, stride):
        if not high[i] or (start - smooth[i]) < SLOW_DROP * start:  # only after a real improvement
            continue
        j = i
        while j + 1 < n and high[j + 1] and abs(smooth[j + 1] - smooth[i]) <= PLATEAU_BAND * smooth[i]:
            j += 1
        if best is None or j - i > best[1] - best[0]:
            best = (i, j)
    if best is None or (best[1] - best[0] + 1) < PLATEAU_SPAN * n:
        return None
    i, j = best
    values = {
        "span_pct": (j - i + 1) / n,
        "band": PLATEAU_BAND,
        "level": float(smooth[i]),
        "from_step": int(curves.steps[i]),
        "to_step": int(curves.steps[j]),
        "lr_from": float(lr[i]),
        "lr_to": float(lr[j]),
    }
    return Signal("plateau", (j - i + 1) / n, values)


# ----------------------------------------------------------------------------------------------- events, metrics


def detect_early_stop(curves: Curves) -> Signal | None:
    """The loop's early_stop event: when, and where the best evaluation was."""
    event = curves.events.get("early_stop")
    if event is None:
        return None
    values = {
        "step": int(event.get("step", 0)),
        "metric": event.get("metric", "loss"),
        "best": _number(event.get("best")),
        "best_step": int(event.get("best_step") or 0),
        "patience": get_key(curves.config, "train.early_stop.patience", "?"),
    }
    return Signal("early_stopped", 0.0, values)


def detect_metric_mismatch(curves: Curves) -> Signal | None:
    """The task metric disagrees with the loss: choosing by loss loses metric, or exp(-loss) over-promises."""
    evals = [e for e in curves.evals if math.isfinite(_number(e.get("loss")))]
    names = sorted({k for e in evals for k, v in e.items() if k not in NOT_METRICS and _is_metric(k, v)})
    if not evals or not names:
        return None
    selector = str(get_key(curves.config, "train.early_stop.metric", "loss"))
    best_loss = min(range(len(evals)), key=lambda i: evals[i]["loss"])
    found: list[Signal] = []
    for name in names:
        series = [(i, _number(e.get(name))) for i, e in enumerate(evals) if math.isfinite(_number(e.get(name)))]
        if not series:
            continue
        at_best_loss = dict(series).get(best_loss)
        best_index, best_value = max(series, key=lambda item: item[1])
        loss = float(evals[best_loss]["loss"])
        if _accuracy_like(name) and at_best_loss is not None and math.exp(-loss) - at_best_loss >= CALIBRATION_GAP:
            detail = (f"valid loss {loss:.4f} at step {evals[best_loss]['step']} implies about {math.exp(-loss):.2f} "
                      f"{name}, but {name} is {at_best_loss:.4f}")  # fmt: skip
            found.append(Signal("loss_metric_mismatch", math.exp(-loss) - at_best_loss, _mismatch(name, detail)))
        lost = best_value - at_best_loss if at_best_loss is not None else 0.0
        if not _lower_better(selector) or len(evals) < 3 or lost < METRIC_GAP:
            continue
        detail = (f"best valid loss at step {evals[best_loss]['step']} ({loss:.4f}) has {name} {at_best_loss:.4f}; "
                  f"the best {name} is {best_value:.4f} at step {evals[best_index]['step']}")  # fmt: skip
        found.append(Signal("loss_metric_mismatch", lost, _mismatch(name, detail, lost)))
    return max(found, key=lambda s: s.score) if found else None


def _mismatch(name: str, detail: str, lost: float | None = None) -> dict[str, Any]:
    summary = f"picking best/ by loss gives up {lost:.3f} {name}." if lost is not None else "the loss promises more."
    return {"metric": name, "summary": summary, "detail": detail}


def _is_metric(name: str, value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not _lower_better(name)


def _lower_better(name: str) -> bool:
    return any(word in name.lower() for word in LOWER_IS_BETTER)


def _accuracy_like(name: str) -> bool:
    lowered = name.lower()
    return "acc" in lowered or lowered in ("exact_match", "em")


# ----------------------------------------------------------------------------------------------- data


def detect_data_stats(curves: Curves) -> list[Signal]:
    """Truncation and fully masked examples, from the data statistics the task logged at the start."""
    data = (curves.events.get("start") or {}).get("data") or {}
    max_length = get_key(curves.config, "data.max_length")
    signals = []
    for split, stats in data.items():
        if not isinstance(stats, dict) or not stats.get("examples"):
            continue
        examples = stats["examples"]
        cut, dropped = stats.get("truncated", 0), stats.get("dropped_too_long", 0)
        pct = stats.get("length_percentiles") or {}
        share = (cut + dropped) / examples
        if share >= TRUNCATION_SHARE:
            p99 = pct.get("p99") or max_length or 0
            values = {"split": split, "share": share, "truncated": cut, "dropped": dropped, "examples": examples,
                      "max_length": max_length, "p95": pct.get("p95"), "p99": p99, "max": pct.get("max"),
                      "suggested_max_length": int(math.ceil(p99 / 64) * 64)}  # fmt: skip
            signals.append(Signal("truncation", share, values))
        if stats.get("no_target"):
            values = {"split": split, "no_target": stats["no_target"], "examples": examples, "max_length": max_length}
            signals.append(Signal("masking", stats["no_target"] / examples, values))
    return signals
