"""What the advisers report: a finding with a severity, a plain-words headline, its evidence and its fix.

`inspect` (data) and `diagnose` (curves) both produce findings; both rank them the same way, most severe first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Most severe first. fatal: training cannot give a useful model (inspect stops `train` on these);
# high: the run is wrong or wasted; medium: it costs quality; low: worth a look; info: for the record.
SEVERITIES = ("fatal", "high", "medium", "low", "info")
SEVERITY_STYLE = {"fatal": "bold red", "high": "red", "medium": "yellow", "low": "cyan", "info": "dim"}


@dataclass
class Finding:
    """One problem found in the data or in the curves.

    id: stable name (e.g. "overfitting.llm", "leakage_test"); severity: one of SEVERITIES; headline: one
    sentence in plain words; evidence: the numbers behind it (steps, values, rows); fix: what to do, in words;
    changes: config changes ({"key", "from", "to", "why"}) that a patch file applies; actions: steps that are
    not config changes; source: where the rule comes from; score: strength of the signal, 0..1, to rank
    findings of equal severity; values: the raw numbers, for JSON readers and tests.
    """

    id: str
    severity: str
    headline: str
    evidence: str = ""
    fix: str = ""
    changes: list[dict[str, Any]] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    source: str = ""
    score: float = 0.0
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def fatal(self) -> bool:
        """True when training should not start (or go on) with this finding."""
        return self.severity == "fatal"

    @property
    def kind(self) -> str:
        """The problem without its task family: "overfitting.llm" -> "overfitting"."""
        return self.id.split(".")[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (with `fatal` and `kind` spelled out)."""
        return {**asdict(self), "fatal": self.fatal, "kind": self.kind}


def rank(findings: list[Finding]) -> list[Finding]:
    """Most severe first; within a severity, the strongest signal first (stable otherwise)."""
    return sorted(findings, key=lambda f: (SEVERITIES.index(f.severity), -f.score))


def findings_table(findings: list[Finding], title: str) -> Any:
    """A rich Table of findings: severity, what, evidence and fix (the terminal summaries start with it)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, show_lines=True, title_justify="left", expand=False)
    table.add_column("severity", no_wrap=True)
    table.add_column("finding", ratio=2)
    table.add_column("fix", ratio=2)
    for finding in findings:
        style = SEVERITY_STYLE.get(finding.severity, "")
        what = f"[bold]{escape(finding.headline)}[/]" + (f"\n{escape(finding.evidence)}" if finding.evidence else "")
        fix = finding.fix
        if finding.changes:
            fix += ("\n" if fix else "") + "\n".join(f"{c['key']}: {c['from']} -> {c['to']}" for c in finding.changes)
        table.add_row(f"[{style}]{finding.severity}[/]", what, escape(fix))
    return table
