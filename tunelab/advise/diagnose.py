"""`tunelab diagnose RUN`: read a run's curves, name what went wrong, with the evidence, and prescribe changes.

Reads `metrics.jsonl` (whole lines only: a line cut off by a crash is skipped and reported), `config.yaml` (the
prescriptions are computed from it) and `inspect.json` when present. The detectors (signals.py) say what they
see; the rules table (rules.py) says what it means for the task family and what to change. Writes
`diagnosis.json` to the run folder; `write_patch` turns the prescriptions into a YAML patch that
`tunelab train CONFIG PATCH` applies.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.advise import signals
from tunelab.advise.findings import Finding, findings_table, rank
from tunelab.advise.rules import family_of, resolve_changes, rule_for
from tunelab.errors import UserError
from tunelab.track.metrics import read_metrics

# Detectors whose finding makes another one redundant (same cause, told twice): kind -> kinds it hides.
SUPERSEDES = {
    "nonfinite": ("loss_spikes", "grad_explosion", "plateau", "underfitting", "loss_metric_mismatch"),
    "lr_too_high": ("loss_spikes", "plateau", "underfitting", "loss_metric_mismatch"),
    "lr_too_low": ("underfitting", "plateau"),
    "overfitting": ("underfitting", "plateau"),
}
# inspect.json findings carried into the diagnosis: the serious ones (leakage, unreadable files ...), and truncation
# or masking trouble from medium up, which bears on the curves; the rest (duplicates ...) stay in the EDA report.
FORWARDED_INSPECT = ("fatal", "high")
FORWARDED_KINDS = ("truncated", "labels_masked")


@dataclass
class Diagnosis:
    """What diagnose found in one run: ranked findings (most severe first), notes about the evidence, a summary."""

    run_dir: str
    task: str | None
    family: str
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def problems(self) -> list[Finding]:
        """Findings that are problems (info-level records, such as an early stop, left out)."""
        return [f for f in self.findings if f.severity != "info"]

    @property
    def headline(self) -> str:
        """One sentence: the top problem, or that none was found."""
        if self.problems:
            return self.problems[0].headline
        return f"No problem found: {self.summary.get('text', 'the curves look healthy')}."

    def kinds(self) -> list[str]:
        """The problems' kinds in rank order (overfitting, lr_too_high, ...)."""
        return [f.kind for f in self.problems]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as written to diagnosis.json."""
        return {
            "run_dir": self.run_dir,
            "task": self.task,
            "family": self.family,
            "headline": self.headline,
            "healthy": not self.problems,
            "findings": [f.to_dict() for f in self.findings],
            "notes": self.notes,
            "summary": self.summary,
        }

    def to_json(self) -> str:
        """diagnosis.json's text (what `tunelab diagnose RUN --json` prints)."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=_jsonable)


def diagnose_run(run_dir: str | Path, write: bool = True) -> Diagnosis:
    """Diagnose a run folder; writes `diagnosis.json` there unless `write` is false.

    Raises UserError for a folder that does not exist or has no usable metrics.jsonl.
    """
    run_dir = Path(run_dir)
    records, notes = load_records(run_dir)
    config = load_run_config(run_dir, notes)
    start = next((r for r in records if r.get("event") == "start"), {})
    task = config.get("task") or start.get("task")
    family = family_of(task)
    diagnosis = diagnose_records(records, config, family, inspect=load_inspect(run_dir, notes))
    diagnosis.run_dir, diagnosis.task = str(run_dir), task
    diagnosis.notes = notes + diagnosis.notes
    if write:
        target = run_dir / "diagnosis.json"
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(diagnosis.to_json(), encoding="utf-8")
        tmp.replace(target)
    return diagnosis


def diagnose_records(
    records: list[dict[str, Any]], config: dict[str, Any], family: str = "llm", inspect: dict | None = None
) -> Diagnosis:
    """Diagnose metrics records directly (what diagnose_run does after reading the folder; handy in tests)."""
    curves = signals.Curves.from_records(records, config, family)
    found = run_detectors(curves)
    hidden = {kind for s in found for kind in SUPERSEDES.get(s.kind, ())}
    findings = [to_finding(s, config, family) for s in found if s.kind not in hidden]
    findings += inspect_findings(inspect or {})
    notes = evidence_notes(curves)
    return Diagnosis(run_dir="", task=config.get("task"), family=family, findings=rank(findings), notes=notes,
                     summary=summarize(curves))  # fmt: skip


def run_detectors(curves: signals.Curves) -> list[signals.Signal]:
    """Every detector's signal (at most one per detector, plus one per data problem)."""
    detectors = (
        signals.detect_nonfinite,
        signals.detect_divergence,
        signals.detect_spikes,
        signals.detect_grad_explosion,
        signals.detect_no_movement,
        signals.detect_overfitting,
        signals.detect_still_learning,
        signals.detect_plateau,
        signals.detect_early_stop,
        signals.detect_metric_mismatch,
    )
    found = [s for s in (detector(curves) for detector in detectors) if s is not None]
    kinds: set[str] = set()
    unique = []
    for signal in found:  # two detectors may name the same problem (underfitting): keep the first
        if signal.kind not in kinds:
            unique.append(signal)
            kinds.add(signal.kind)
    return unique + signals.detect_data_stats(curves)


def to_finding(signal: signals.Signal, config: dict[str, Any], family: str) -> Finding:
    """A detector's signal dressed by its rule: headline, evidence, concrete changes, actions, source."""
    rule = rule_for(signal.kind, family)
    values = signal.values
    return Finding(
        id=rule.id,
        severity=rule.severity,
        headline=_format(rule.headline, values),
        evidence=_format(rule.evidence, values),
        changes=resolve_changes(rule, config, values),
        actions=[_format(a, values) for a in rule.actions],
        source=rule.source,
        score=float(signal.score),
        values=values,
    )


def inspect_findings(inspect: dict[str, Any]) -> list[Finding]:
    """The serious findings of a run's inspect.json, carried into the diagnosis as data findings."""
    found = []
    rule = rule_for("data", "any")
    for item in inspect.get("findings", []):
        severity = item.get("severity")
        serious = severity in FORWARDED_INSPECT or (item.get("id") in FORWARDED_KINDS and severity == "medium")
        if not serious:
            continue
        values = {k: item.get(k, "") for k in ("headline", "evidence", "fix")}
        found.append(
            Finding(
                id=f"data.{item.get('id', 'inspect')}",
                severity=item["severity"],
                headline=_format(rule.headline, values),
                evidence=_format(rule.evidence, values),
                actions=[item.get("fix", "")] if item.get("fix") else [],
                source=rule.source,
                score=float(item.get("score", 0.0)),
                values=item.get("values", {}),
            )
        )
    return found


def _format(template: str, values: dict[str, Any]) -> str:
    """Fill a rule's template; a value the template cannot format shows as it is rather than failing."""
    try:
        return template.format(**values)
    except (KeyError, ValueError, TypeError, IndexError):
        safe = {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else str(v)) for k, v in values.items()}
        try:
            return template.format(**safe)
        except (KeyError, ValueError, TypeError, IndexError):
            return template


# ----------------------------------------------------------------------------------------------- reading


def load_records(run_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The whole records of the run's metrics.jsonl and notes about what could not be read."""
    if not run_dir.exists():
        raise UserError(f"Run folder {run_dir} does not exist. Pass the output.dir of a run.")
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise UserError(
            f"{run_dir} has no metrics.jsonl, so there are no curves to read. Pass the output.dir of a run "
            "that `tunelab train` has started (it writes metrics.jsonl from the first step)."
        )
    records, broken = read_metrics(path)
    notes = []
    if broken:
        notes.append(
            f"{path}: {broken} line(s) could not be read (cut off by a crash?); diagnosed the {len(records)} "
            "whole record(s)."
        )
    if not any(r.get("event") in ("train", "eval", "stopped") for r in records):
        raise UserError(
            f"{path} holds no training step yet ({len(records)} record(s), {broken} unreadable). Diagnose the "
            "run once it has logged steps."
        )
    return records, notes


def load_run_config(run_dir: Path, notes: list[str]) -> dict[str, Any]:
    """The run's resolved config.yaml as a dict; the defaults (and a note) when it is missing or unreadable."""
    path = run_dir / "config.yaml"
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
    except yaml.YAMLError:
        loaded = None
    if isinstance(loaded, dict):
        return loaded
    from tunelab.config import RunConfig

    notes.append(f"{path} is missing or unreadable: prescriptions are computed from the default config.")
    return RunConfig().model_dump(mode="json")


def load_inspect(run_dir: Path, notes: list[str]) -> dict[str, Any]:
    """inspect.json of the run folder when present (an unreadable one is noted and skipped)."""
    path = run_dir / "inspect.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        notes.append(f"{path} could not be read; data findings left out.")
        return {}


def evidence_notes(curves: signals.Curves) -> list[str]:
    """What limits the diagnosis: too few steps or evaluations to judge some problems."""
    notes = []
    if len(curves.loss) < signals.MIN_TRAIN_POINTS:
        notes.append(
            f"only {len(curves.loss)} train record(s): trends (divergence, plateau, underfitting) need at least "
            f"{signals.MIN_TRAIN_POINTS}; lower train.log_every or train longer."
        )
    if len(curves.valid_losses()[1]) < 3:
        notes.append(
            f"{len(curves.valid_losses()[1])} evaluation(s): overfitting needs at least 3; set train.eval_every to "
            "a number of steps (and keep a validation split)."
        )
    return notes


def summarize(curves: signals.Curves) -> dict[str, Any]:
    """Steps, evaluations, first / last train and valid loss, best evaluation, and a one-line text."""
    finite = curves.loss[[math.isfinite(v) for v in curves.loss]] if len(curves.loss) else curves.loss
    steps, valid = curves.valid_losses()
    out: dict[str, Any] = {
        "steps": int(curves.steps[-1]) if len(curves.steps) else 0,
        "evaluations": len(valid),
        "train_loss_first": float(finite[0]) if len(finite) else None,
        "train_loss_last": float(finite[-1]) if len(finite) else None,
        "valid_loss_first": float(valid[0]) if len(valid) else None,
        "valid_loss_last": float(valid[-1]) if len(valid) else None,
    }
    parts = []
    if len(finite):
        parts.append(f"train loss {finite[0]:.3f} -> {finite[-1]:.3f}")
    if len(valid):
        best = int(valid.argmin())
        out.update(valid_loss_best=float(valid[best]), best_step=int(steps[best]))
        parts.append(
            f"valid loss {valid[0]:.3f} -> {valid[-1]:.3f} (best {valid[best]:.3f} at step {int(steps[best])})"
        )
    out["text"] = ", ".join(parts) or "no losses logged"
    return out


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ----------------------------------------------------------------------------------------------- output


def render_text(diagnosis: Diagnosis) -> str:
    """The diagnosis as plain ranked text: the headline first, then each finding with evidence and changes."""
    lines = [diagnosis.headline, ""]
    for number, finding in enumerate(diagnosis.findings, start=1):
        lines.append(f"{number}. [{finding.severity}] {finding.headline}")
        if finding.evidence:
            lines.append(f"   evidence: {finding.evidence}")
        for change in finding.changes:
            lines.append(f"   change: {change['key']}: {change['from']} -> {change['to']}  ({change['why']})")
        lines += [f"   action: {action}" for action in finding.actions]
        if finding.source:
            lines.append(f"   source: {finding.source}")
    lines += [f"note: {note}" for note in diagnosis.notes]
    return "\n".join(lines).rstrip() + "\n"


def print_diagnosis(diagnosis: Diagnosis, console: Any = None) -> None:
    """Rich terminal output: the headline, then the ranked findings table, then the notes."""
    from rich.markup import escape

    if console is None:
        from tunelab.track.progress import console
    style = "bold red" if diagnosis.problems else "bold green"
    console.print(f"[{style}]{escape(diagnosis.headline)}[/]")
    if diagnosis.findings:
        console.print(findings_table(diagnosis.findings, f"diagnosis of {diagnosis.run_dir}"))
        for finding in diagnosis.findings:
            for action in finding.actions:
                console.print(f"[dim]{escape(finding.id)}:[/] {escape(action)}")
    for note in diagnosis.notes:
        console.print(f"[dim]note: {escape(note)}[/]")


def patch_dict(diagnosis: Diagnosis) -> dict[str, Any]:
    """The prescriptions as a nested config patch; where two findings change one key, the higher-ranked wins."""
    patch: dict[str, Any] = {}
    taken: set[str] = set()
    for finding in diagnosis.findings:
        for change in finding.changes:
            if change["key"] in taken:
                continue
            taken.add(change["key"])
            node = patch
            *parents, leaf = change["key"].split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = change["to"]
    return patch


def write_patch(diagnosis: Diagnosis, path: str | Path) -> Path:
    """Write the prescriptions as a YAML config patch (a comment per change says why and which finding).

    Apply it with `tunelab train CONFIG PATCH`. A diagnosis without changes writes a patch with only comments.
    """
    path = Path(path)
    patch = patch_dict(diagnosis)
    header = [f"# tunelab diagnose {diagnosis.run_dir}", f"# {diagnosis.headline}"]
    seen: set[str] = set()
    for finding in diagnosis.findings:
        for change in finding.changes:
            if change["key"] not in seen:
                seen.add(change["key"])
                header.append(f"# {change['key']}: {change['from']} -> {change['to']}  [{finding.id}] {change['why']}")
    if not patch:
        header.append("# no config change prescribed")
    body = yaml.safe_dump(patch, sort_keys=False, allow_unicode=True) if patch else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header) + "\n" + body, encoding="utf-8")
    return path


def diagnose_after_training(run_dir: str | Path, console: Any = None) -> Diagnosis | None:
    """What `train` runs at the end (also after a run stopped on NaN): diagnose, write diagnosis.json, print the
    headline. A diagnosis that fails must not fail a finished run: it prints a warning and returns None."""
    if console is None:
        from tunelab.track.progress import console
    try:
        diagnosis = diagnose_run(run_dir)
    except Exception as error:  # the run's own result matters more than its diagnosis
        console.print(f"[yellow]warning:[/] diagnosis skipped: {error}", highlight=False)
        return None
    style = "bold red" if diagnosis.problems else "bold green"
    from rich.markup import escape

    console.print(f"[{style}]diagnosis:[/] {escape(diagnosis.headline)}", highlight=False)
    if diagnosis.problems:
        console.print(f"`tunelab diagnose {run_dir}` shows the evidence and the prescribed changes.", markup=False)
    return diagnosis
