"""inspect's outputs: `inspect.json`, `inspect.html` (jinja2, matplotlib histograms as base64 PNGs, example rows)
and the terminal summary, findings first."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from tunelab.advise.findings import SEVERITY_STYLE, findings_table

HTML_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tunelab inspect: {{ report.source }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
.fatal { color: #fff; background: #b00; } .high { color: #b00; } .medium { color: #a60; }
.low { color: #06c; } .info { color: #777; } pre { white-space: pre-wrap; margin: 0; }
img { max-width: 100%; }
</style></head><body>
<h1>tunelab inspect</h1>
<p><b>{{ report.source }}</b> ({{ report.kind }})</p>
<h2>{{ report.headline }}</h2>
<h2>Findings</h2>
{% if report.findings %}<table><tr><th>severity</th><th>finding</th><th>evidence</th><th>fix</th></tr>
{% for f in report.findings %}<tr><td class="{{ f.severity }}">{{ f.severity }}</td><td>{{ f.headline }}</td>
<td>{{ f.evidence }}</td><td>{{ f.fix }}</td></tr>{% endfor %}</table>
{% else %}<p>No problem found.</p>{% endif %}
<h2>Settings</h2><pre>{{ settings }}</pre>
{% for name, stats in splits.items() %}<h2>Split: {{ name }}</h2><pre>{{ stats }}</pre>
{% for title, png in plots.get(name, []) %}<h3>{{ title }}</h3>
<img alt="{{ title }}" src="data:image/png;base64,{{ png }}">
{% endfor %}{% endfor %}
<h2>Example rows</h2>
{% if report.examples %}<table><tr>{% for key in report.examples[0] %}<th>{{ key }}</th>{% endfor %}</tr>
{% for row in report.examples %}<tr>{% for value in row.values() %}<td><pre>{{ value }}</pre></td>{% endfor %}</tr>
{% endfor %}</table>{% endif %}
{% if report.notes %}<h2>Notes</h2><ul>{% for note in report.notes %}<li>{{ note }}</li>{% endfor %}</ul>{% endif %}
</body></html>
"""


def write_outputs(report: Any, out_dir: Path, html: bool = True) -> list[Path]:
    """inspect.json (and inspect.html unless html is false) in out_dir; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_json(report, out_dir / "inspect.json")]
    if html:
        written.append(write_html(report, out_dir / "inspect.html"))
    return written


def write_json(report: Any, path: Path) -> Path:
    """The report as JSON (written to a temporary name, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(report.to_json(), encoding="utf-8")
    tmp.replace(path)
    return path


def write_html(report: Any, path: Path) -> Path:
    """The report as one self-contained HTML page (plots embedded), readable in any browser."""
    import jinja2

    environment = jinja2.Environment(autoescape=True)
    page = environment.from_string(HTML_TEMPLATE).render(
        report=report,
        settings=json.dumps(report.settings, indent=2, ensure_ascii=False, default=str),
        splits={k: json.dumps(v, indent=2, ensure_ascii=False, default=str) for k, v in report.splits.items()},
        plots=make_plots(report),
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def make_plots(report: Any) -> dict[str, list[tuple[str, str]]]:
    """Per split, (title, base64 PNG) pairs: token-length histograms, label / class counts, image sizes."""
    import matplotlib

    matplotlib.use("Agg")
    plots: dict[str, list[tuple[str, str]]] = {}
    for split, fields in report.lengths.items():
        if fields.get("total"):
            plots.setdefault(split, []).append(("token lengths", _length_figure(fields, report.settings)))
    for split, stats in report.splits.items():
        counts = (stats.get("labels") or {}).get("counts") or stats.get("classes")
        if counts:
            plots.setdefault(split, []).append(("label counts", _bar_figure(counts)))
    for split, sizes in report.images.items():
        if sizes:
            plots.setdefault(split, []).append(("image width x height", _size_figure(sizes)))
    return plots


def _png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _length_figure(fields: dict[str, list[int]], settings: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    names = [name for name in ("total", "prompt", "answer") if fields.get(name)]
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        axis.hist(fields[name], bins=40, color="tab:blue", alpha=0.8)
        axis.set_title(f"{name} tokens")
        if name == "total":
            for length in settings.get("lengths", []):
                color = "tab:red" if length == settings.get("max_length") else "tab:gray"
                axis.axvline(length, color=color, linestyle="--", linewidth=1, label=str(length))
            axis.legend(fontsize=7)
    return _png(figure)


def _bar_figure(counts: dict[str, int]) -> str:
    import matplotlib.pyplot as plt

    items = list(counts.items())[:40]  # the 40 largest classes; more bars are unreadable
    figure, axis = plt.subplots(figsize=(max(4, 0.35 * len(items)), 3))
    axis.bar([str(k)[:12] for k, _ in items], [v for _, v in items], color="tab:green")
    axis.tick_params(axis="x", rotation=60, labelsize=7)
    return _png(figure)


def _size_figure(sizes: list[tuple[int, int]]) -> str:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4, 4))
    axis.scatter([w for w, _ in sizes], [h for _, h in sizes], s=6, alpha=0.5)
    axis.set_xlabel("width")
    axis.set_ylabel("height")
    return _png(figure)


def print_report(report: Any, console: Any = None) -> None:
    """Terminal summary: the headline and the ranked findings first, then a line of statistics per split."""
    from rich.markup import escape

    if console is None:
        from tunelab.track.progress import console
    top = report.findings[0].severity if report.findings else None
    style = SEVERITY_STYLE.get(top, "bold green") if top not in (None, "info") else "bold green"
    console.print(f"[{style}]{escape(report.headline)}[/]")
    if report.findings:
        console.print(findings_table(report.findings, f"inspect: {report.source}"))
    for split, stats in report.splits.items():
        console.print(f"[bold]{split}[/]: {escape(_split_line(stats))}")
    for note in report.notes:
        console.print(f"[dim]note: {escape(note)}[/]")


def summary_line(report: Any) -> str:
    """One line for the start of `train`: how many findings of each severity and the top one ("" when clean)."""
    counts: dict[str, int] = {}
    for finding in report.findings:
        if finding.severity != "info":
            counts[finding.severity] = counts.get(finding.severity, 0) + 1
    if not counts:
        return ""
    tally = ", ".join(f"{n} {severity}" for severity, n in counts.items())
    return f"data check: {tally} finding(s); top: {report.headline} (`tunelab inspect CONFIG` for the report)"


def _split_line(stats: dict[str, Any]) -> str:
    parts = [f"{stats.get('rows', stats.get('images', 0))} rows"]
    tokens = stats.get("tokens")
    if tokens:
        total = tokens["percentiles"].get("total") or {}
        parts.append("tokens " + " ".join(f"{k} {v}" for k, v in total.items()))
        if tokens["cut"]:
            parts.append("cut " + ", ".join(f"{c['share']:.1%} at {n}" for n, c in tokens["cut"].items()))
    if "duplicates" in stats:
        parts.append(f"duplicates {stats['duplicates']}")
    if "leakage" in stats:
        parts.append(f"seen in train {stats['leakage']}")
    if "width" in stats:
        parts.append(f"width {stats['width']}, height {stats['height']}, modes {stats['modes']}")
    return "; ".join(parts)
