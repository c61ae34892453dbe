"""`tunelab inspect CONFIG | FILE`: look at the data before training, name what is wrong, say how to fix it.

For text (sft) data, with the configured tokenizer and template: token-length percentiles per split and field,
the share truncated or dropped at data.max_length and at 512 / 1024, exact and normalised duplicates inside
train and leakage into valid / test, empty fields, script mix, chat-format faults, and label statistics where
the answers are labels. For images (inspect_images.py): class counts, sizes, colour modes, unreadable files and
duplicate content. Findings are ranked, each with its fix; fatal ones stop `train` (`check_before_training`).
Outputs: `inspect.json`, `inspect.html` and a terminal summary (inspect_report.py).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.advise import inspect_text as tx
from tunelab.advise.findings import Finding, rank
from tunelab.config import DataConfig, RunConfig
from tunelab.data.readers import read_table
from tunelab.data.templates import detect_format, resolve_template
from tunelab.errors import UserError

FAST_ROWS = 2000  # rows per split tokenized by the fast check before training: shares to within ~1 point
SEED_EDA = "seed 000 §6 (EDA: 길이, 중복/누수, 언어/포맷, 레이블 품질)"
# Severity thresholds for shares of rows (duplicates, empty answers): below 1% it is noise worth a look (low).
NOTABLE_SHARE = 0.01
IMBALANCE_HIGH, IMBALANCE_LOW = 10.0, 3.0  # largest / smallest class (seed 000 §6: WeightedSampler / pos_weight)
FAULT_TEXT = {
    "bad_messages": ("fatal", "the messages column is not a JSON list of {role, content} objects"),
    "unknown_role": ("fatal", "a message has a role other than system / user / assistant"),
    "no_assistant": ("fatal", "the conversation has no assistant turn, so nothing to learn"),
    "empty_prompt": ("fatal", "both instruction and input are empty"),
    "template_refused": ("fatal", "the tokenizer's chat template refuses the conversation"),
    "user_twice": ("medium", "two user turns in a row (some templates refuse this, others merge them)"),
    "system_not_first": ("medium", "a system message that is not the first message"),
    "assistant_twice": ("low", "two assistant turns in a row"),
}
FAULT_FIX = {
    "bad_messages": "Store each row's messages as a JSON list of {'role': ..., 'content': ...}.",
    "unknown_role": "Map the roles to system / user / assistant (human / gpt / bot / model are mapped already).",
    "no_assistant": "Add the answer as a final message with role 'assistant', or drop the rows.",
    "empty_prompt": "Fill the instruction column or drop the rows.",
    "template_refused": "Fix the roles' order, or pick a plain template with data.template: alpaca.",
    "user_twice": "Merge consecutive user turns into one message.",
    "system_not_first": "Move the system message to the start of the conversation.",
    "assistant_twice": "Merge consecutive assistant turns into one message.",
}


@dataclass
class Report:
    """What inspect found: per-split statistics, ranked findings (each with its fix), example rows, notes.

    `lengths` (split -> field -> token lengths) and `images` (split -> [(width, height)]) feed the plots and
    are left out of inspect.json, which carries their percentiles instead.
    """

    source: str
    kind: str  # text | labels | images
    settings: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lengths: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    images: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def headline(self) -> str:
        """The top finding, or that the data looks clean."""
        top = [f for f in self.findings if f.severity != "info"]
        return top[0].headline if top else f"No problem found in {self.source}."

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as written to inspect.json."""
        return {
            "source": self.source,
            "kind": self.kind,
            "headline": self.headline,
            "fatal": [f.id for f in fatal_findings(self)],
            "settings": self.settings,
            "splits": self.splits,
            "findings": [f.to_dict() for f in self.findings],
            "examples": self.examples,
            "notes": self.notes,
        }

    def to_json(self) -> str:
        """inspect.json's text (what `tunelab inspect ... --json` prints)."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str)


def fatal_findings(report: Report) -> list[Finding]:
    """The findings that must stop training (all labels masked, too much truncated, unreadable rows ...)."""
    return [f for f in report.findings if f.fatal]


def _finding(finding_id: str, severity: str, headline: str, evidence: str, fix: str, **values: Any) -> Finding:
    score = float(values.get("share", 0.0) or 0.0)
    return Finding(id=finding_id, severity=severity, headline=headline, evidence=evidence, fix=fix, source=SEED_EDA,
                   score=score, values=values)  # fmt: skip


# ----------------------------------------------------------------------------------------------- entry points


def inspect_config(
    config: RunConfig, out_dir: str | Path | None = None, fast: bool = False, tokenizer: Any = None
) -> Report:
    """Inspect the data a config trains on, with its tokenizer and template; write inspect.json / .html to out_dir.

    fast: tokenize at most FAST_ROWS rows per split and skip the HTML (what `train` runs first).
    """
    from tunelab.models.load import load_tokenizer

    if not config.data.train:
        raise UserError("data.train is not set, so there is nothing to inspect. Point it at a CSV, JSONL or Parquet.")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    tables = {
        split: (path, read_table(path))
        for split, path in (("train", config.data.train), ("valid", config.data.valid), ("test", config.data.test))
        if path
    }
    report = inspect_text_tables(
        tables, config.data, tokenizer, max_rows=FAST_ROWS if fast else None, max_truncated=config.data.max_truncated
    )
    report.source = str(config.data.train)
    report.settings["model"] = config.model.name
    if out_dir is not None:
        from tunelab.advise.inspect_report import write_outputs

        write_outputs(report, Path(out_dir), html=not fast)
    return report


def check_before_training(config: RunConfig, tokenizer: Any, console: Any = None) -> Report:
    """The fast inspect `train` runs first: UserError listing the fatal findings of the splits it trains on (test
    rows are not trained on); otherwise prints a one-line summary of what else it found and returns the report."""
    report = inspect_config(config, fast=True, tokenizer=tokenizer)
    fatal = [f for f in fatal_findings(report) if f.values.get("split") != "test"]
    if fatal:
        lines = [f"- {f.headline} {f.evidence}. Fix: {f.fix}" for f in fatal]
        raise UserError(
            "The data cannot train a useful model; stopped before training:\n" + "\n".join(lines) + "\n"
            "`tunelab inspect CONFIG` writes the full report (inspect.html)."
        )
    from tunelab.advise.inspect_report import summary_line

    line = summary_line(report)
    if line:
        if console is None:
            from tunelab.track.progress import console
        console.print(line, markup=False, highlight=False)
    return report


def inspect_file(
    path: str | Path,
    *,
    config: RunConfig | None = None,
    tokenizer: Any = None,
    label_column: str | None = None,
    image_column: str | None = None,
    image_root: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> Report:
    """Inspect a bare data file (or an image folder) without a run config.

    A folder of images (class subfolders, optionally under train/ valid/ test/) gets the image checks; a table
    with image_column gets them too, labels from label_column; a table with label_column (or a 'label' column)
    gets label statistics; otherwise the file is read as sft data (alpaca or chat), with the tokenizer of
    `config.model` (or the given tokenizer) when one can be loaded.
    """
    from tunelab.advise import inspect_images as im

    path = Path(path)
    if path.is_dir():
        report = im.inspect_image_splits(im.image_folder(path), source=str(path))
    else:
        rows = read_table(path)
        columns = list(rows[0])
        label_column = label_column or next((c for c in ("label", "labels", "class") if c in columns), None)
        image_column = image_column or im.guess_image_column(rows)
        if image_column:
            root = Path(image_root) if image_root else path.parent
            paths = [root / str(r.get(image_column, "")) for r in rows]
            labels = [str(r.get(label_column, "")) for r in rows] if label_column else None
            report = im.inspect_image_splits({"train": (paths, labels)}, source=str(path))
        elif label_column:
            report = inspect_labelled(path, rows, label_column)
        else:
            report = _inspect_text_file(path, rows, config, tokenizer)
    if out_dir is not None:
        from tunelab.advise.inspect_report import write_outputs

        write_outputs(report, Path(out_dir))
    return report


def _inspect_text_file(path: Path, rows: list[dict], config: RunConfig | None, tokenizer: Any) -> Report:
    config = config or RunConfig()
    notes = []
    if tokenizer is None:
        from tunelab.models.load import load_tokenizer

        try:
            tokenizer = load_tokenizer(config.model)
        except Exception as error:  # no hub here, no embedded package: the token checks are skipped, not fatal
            notes.append(f"no tokenizer for {config.model.name} ({error}); token lengths skipped. Pass a config.")
    report = inspect_text_tables({"train": (str(path), rows)}, config.data, tokenizer, None, config.data.max_truncated)
    report.notes += notes
    return report


# ----------------------------------------------------------------------------------------------- text


def inspect_text_tables(
    tables: dict[str, tuple[str, list[dict[str, Any]]]],
    data: DataConfig,
    tokenizer: Any,
    max_rows: int | None = None,
    max_truncated: float = 0.05,
) -> Report:
    """Inspect sft splits ({"train": (path, rows), "valid": ..., "test": ...}); tokenizer None skips tokens."""
    template = resolve_template(data.template, tokenizer) if tokenizer is not None else None
    lengths = sorted({data.max_length, *tx.REFERENCE_LENGTHS})
    settings = {"max_length": data.max_length, "max_truncated": max_truncated, "template": template,
                "lengths": lengths, "rows_tokenized_at_most": max_rows}  # fmt: skip
    report = Report(source=tables["train"][0], kind="text", settings=settings)
    parsed: dict[str, list[tx.TextRow]] = {}
    for split, (path, rows) in tables.items():
        parsed[split] = tx.parse_rows(rows, detect_format(rows, data, path), data)
        report.splits[split] = {"path": path, "rows": len(rows)}
        if tokenizer is not None:
            tokens = _measure(parsed[split], tokenizer, template, lengths, split != "test", max_rows)
            _add_token_stats(report, split, tokens, max_truncated, data.max_length)
            for number in tokens.refused:
                next(r for r in parsed[split] if r.number == number).faults.append("template_refused")
        _add_row_checks(report, split, parsed[split])
    _add_cross_checks(report, parsed)
    report.examples = [{"split": s, "row": r.number, "prompt": r.prompt[:400], "answer": r.answer[:400]}
                       for s, rows in parsed.items() for r in rows[:3]]  # fmt: skip
    report.findings = rank(report.findings)
    return report


def _measure(
    rows: list[tx.TextRow], tokenizer: Any, template: str, lengths: list[int], train: bool, max_rows: int | None
) -> tx.TokenReport:
    sampled = max_rows is not None and len(rows) > max_rows
    if sampled:
        rows = sorted(random.Random(0).sample(rows, max_rows), key=lambda r: r.number)  # seeded: reports repeat
    tokens = tx.measure_tokens(rows, tokenizer, template, lengths, train)
    tokens.sampled = sampled
    return tokens


def _add_token_stats(report: Report, split: str, tokens: tx.TokenReport, max_truncated: float, max_length: int) -> None:
    measured = max(len(tokens.total), 1)
    cut = {n: {**c, "share": round((c["truncated"] + c["dropped"]) / measured, 4)} for n, c in tokens.cut.items()}
    cut = cut if split != "test" else {}  # test rows have no answers: only their prompt lengths are measured
    report.splits[split]["tokens"] = {
        "rows_measured": tokens.rows,
        "percentiles": {name: tx.percentiles(getattr(tokens, name)) for name in ("total", "prompt", "answer")},
        "cut": {str(n): c for n, c in cut.items()},
    }
    report.lengths[split] = {"total": tokens.total, "prompt": tokens.prompt, "answer": tokens.answer}
    if not cut:
        return
    at = cut[max_length]
    pct = tx.percentiles(tokens.total)
    others = ", ".join(f"{c['share']:.1%} at {n}" for n, c in cut.items() if n != max_length)
    evidence = (
        f"{at['truncated']} truncated, {at['dropped']} dropped of {measured} measured at {max_length} ({others}); "
        f"token length p95 {pct.get('p95')}, p99 {pct.get('p99')}, max {pct.get('max')}"
    )
    # a share estimated on a sample is not proof enough to stop a run: training's own exact check decides then
    fatal = "high" if tokens.sampled else "fatal"
    if tokens.sampled:
        evidence += f" (estimated on a sample of {tokens.rows} rows)"
    share = at["share"]
    if share > max_truncated or share >= NOTABLE_SHARE:
        severity = fatal if share > max_truncated else "medium"
        fix = f"Raise data.max_length to {-(-int(pct.get('p99', max_length)) // 64) * 64} (p99) or shorten the rows"
        fix += f"; or allow more with data.max_truncated (now {max_truncated})." if severity != "medium" else "."
        headline = f"{split}: {share:.1%} of examples are cut or dropped at data.max_length {max_length}."
        report.findings.append(_finding("truncated", severity, headline, evidence, fix, split=split, share=share))
    if tokens.total and at["no_target"] + at["dropped"] >= len(tokens.total):
        headline = f"{split}: every example has all its labels masked at max_length {max_length}: nothing to learn."
        fix = "Check the answer column and the chat template; raise data.max_length if the answers are cut away."
        report.findings.append(_finding("labels_masked", fatal, headline, evidence, fix, split=split, share=1.0))
    elif at["no_target"]:
        share = at["no_target"] / measured
        headline = f"{split}: {at['no_target']} example(s) have every label masked (no answer token to learn)."
        fix = "Check those rows' answers; they are skipped in training."
        report.findings.append(_finding("labels_masked", "medium", headline, evidence, fix, split=split, share=share))


def _add_row_checks(report: Report, split: str, rows: list[tx.TextRow]) -> None:
    """Format faults, empty / whitespace fields, script mix, and labels when the answers are labels."""
    stats = report.splits[split]
    faults: dict[str, list[int]] = {}
    for row in rows:
        for fault in row.faults:
            faults.setdefault(fault, []).append(row.number)
    stats["faults"] = {k: len(v) for k, v in faults.items()}
    for fault, numbers in faults.items():
        severity, what = FAULT_TEXT[fault]
        if split == "test" and fault in ("no_assistant",):
            continue  # test rows carry no answers
        headline = f"{split}: {len(numbers)} row(s) where {what}."
        evidence = f"rows {', '.join(map(str, numbers[: tx.EXAMPLES_KEPT]))}{' ...' if len(numbers) > 5 else ''}"
        share = len(numbers) / max(len(rows), 1)
        report.findings.append(_finding(fault, severity, headline, evidence, FAULT_FIX[fault], split=split,
                                        share=share, rows=numbers[: tx.EXAMPLES_KEPT]))  # fmt: skip
    stats["empty"] = tx.empty_fields(rows)
    if split != "test":
        _add_empty_answers(report, split, rows)
    stats["scripts"] = {name: tx.script_mix([getattr(r, name) for r in rows]) for name in ("prompt", "answer")}
    answers = [r.answer for r in rows if r.answer]
    if split == "train" and tx.answers_look_like_labels(answers):
        labels = tx.label_stats([r.prompt for r in rows if r.answer], answers)
        stats["labels"] = labels
        _add_label_findings(report, split, labels)


def _add_empty_answers(report: Report, split: str, rows: list[tx.TextRow]) -> None:
    empty = [r.number for r in rows if not r.answer and "no_assistant" not in r.faults and r.messages]
    if not empty:
        return
    share = len(empty) / len(rows)
    severity = "fatal" if len(empty) == len(rows) else "medium" if share >= NOTABLE_SHARE else "low"
    headline = f"{split}: {len(empty)} row(s) have an empty or whitespace-only answer; training drops them."
    evidence = f"rows {', '.join(map(str, empty[: tx.EXAMPLES_KEPT]))} ({share:.1%})"
    fix = "Fill the answers or remove the rows."
    report.findings.append(_finding("empty_answer", severity, headline, evidence, fix, split=split, share=share))


def _add_label_findings(report: Report, split: str, labels: dict[str, Any]) -> None:
    ratio = labels["imbalance"] or 1.0
    if ratio >= IMBALANCE_LOW:
        counts = labels["counts"]
        most, least = next(iter(counts)), list(counts)[-1]
        headline = f"{split}: labels are imbalanced, {ratio:.1f}:1 between the largest and smallest class."
        evidence = f"'{most}': {counts[most]} rows, '{least}': {counts[least]} rows, {labels['classes']} classes"
        fix = "Oversample the rare classes (WeightedRandomSampler), weight the loss, or collect more of them."
        severity = "medium" if ratio >= IMBALANCE_HIGH else "low"
        report.findings.append(_finding("label_imbalance", severity, headline, evidence, fix, split=split,
                                        share=min(1.0, ratio / 100)))  # fmt: skip
    if labels["conflicting_groups"]:
        headline = f"{split}: {labels['conflicting_groups']} identical input(s) carry different labels."
        evidence = (
            f"{labels['conflicting_rows']} rows in conflict; e.g. rows (0-based) {labels['conflict_examples'][0]}"
        )
        fix = "Re-check those labels (seed 000 §6: 동일 질문 다중 정답 충돌) and keep one answer per input."
        report.findings.append(_finding("conflicting_labels", "medium", headline, evidence, fix, split=split))


def _add_cross_checks(report: Report, parsed: dict[str, list[tx.TextRow]]) -> None:
    """Duplicates inside train, conflicting answers, and leakage of train prompts into valid / test."""
    train = parsed["train"]
    exact = [f"{r.prompt}\x00{r.answer}" if r.prompt else "" for r in train]
    loose = [f"{tx.normalise(r.prompt)}\x00{tx.normalise(r.answer)}" if r.prompt else "" for r in train]
    exact_pairs, loose_pairs = tx.duplicates(exact), tx.duplicates(loose)
    report.splits["train"]["duplicates"] = {"exact": len(exact_pairs), "normalised": len(loose_pairs)}
    if loose_pairs:
        share = len(loose_pairs) / len(train)
        sample = ", ".join(f"{train[i].number}={train[j].number}" for i, j in loose_pairs[: tx.EXAMPLES_KEPT])
        more = len(loose_pairs) - len(exact_pairs)
        headline = (
            f"train: {len(loose_pairs)} duplicate row(s): {len(exact_pairs)} exact, {more} more after normalising."
        )
        fix = "Deduplicate the training set (seed 000 §1: 학습셋 중복 제거); duplicates also leak into a valid_split."
        report.findings.append(_finding("duplicates_train", "medium" if share >= NOTABLE_SHARE else "low", headline,
                                        f"rows {sample} ({share:.1%})", fix, share=share))  # fmt: skip
    groups = tx.conflicts([r.prompt for r in train], [r.answer for r in train])
    if groups and "labels" not in report.splits["train"]:
        headline = f"train: {len(groups)} identical prompt(s) have different answers."
        sample = "; ".join(",".join(str(train[i].number) for i in g) for g in groups[:3])
        fix = "Check them: one answer per prompt, unless several are truly right (seed 000 §6)."
        report.findings.append(_finding("conflicting_answers", "low", headline, f"rows {sample}", fix,
                                        share=len(groups) / len(train)))  # fmt: skip
    reference = [tx.normalise(r.prompt) for r in train]
    for split in ("valid", "test"):
        if split in parsed:
            _add_leakage(report, split, parsed[split], train, reference)


def _add_leakage(
    report: Report, split: str, rows: list[tx.TextRow], train: list[tx.TextRow], reference: list[str]
) -> None:
    exact = tx.overlap([r.prompt for r in rows], [r.prompt for r in train])
    loose = tx.overlap([tx.normalise(r.prompt) for r in rows], reference)
    report.splits[split]["leakage"] = {"exact": len(exact), "normalised": len(loose)}
    if not loose:
        return
    share = len(loose) / len(rows)
    sample = ", ".join(f"{split} {rows[i].number} = train {train[j].number}" for i, j in loose[: tx.EXAMPLES_KEPT])
    headline = f"{split}: {len(loose)} prompt(s) also appear in train ({share:.1%}; {len(exact)} exact): leakage."
    fix = (
        "Remove them from train (or from valid): validation scores on seen prompts are optimistic."
        if split == "valid"
        else "Check the split: test prompts seen in training inflate the offline score."
    )
    report.findings.append(_finding(f"leakage_{split}", "high", headline, sample, fix, split=split, share=share))


# ----------------------------------------------------------------------------------------------- labelled tables


def inspect_labelled(path: Path, rows: list[dict[str, Any]], label_column: str) -> Report:
    """A labelled table (text columns + a label): label counts, imbalance, conflicts, duplicates, empties."""
    if label_column not in rows[0]:
        raise UserError(f"Data file {path} has no column '{label_column}'. Columns: {', '.join(rows[0])}.")
    inputs_cols = [c for c in rows[0] if c not in (label_column, "id")]
    inputs = ["\x00".join(tx._clean(r.get(c)) for c in inputs_cols) for r in rows]
    labels = [tx._clean(r.get(label_column)) for r in rows]
    report = Report(source=str(path), kind="labels", settings={"label_column": label_column, "inputs": inputs_cols})
    stats = tx.label_stats(inputs, labels)
    report.splits["train"] = {"path": str(path), "rows": len(rows), "labels": stats}
    _add_label_findings(report, "train", stats)
    repeats = tx.duplicates([tx.normalise(t) for t in inputs])
    report.splits["train"]["duplicates"] = {"normalised": len(repeats)}
    if repeats:
        headline = f"train: {len(repeats)} row(s) repeat an earlier row's input."
        sample = ", ".join(f"{i + 1}={j + 1}" for i, j in repeats[: tx.EXAMPLES_KEPT])
        report.findings.append(_finding("duplicates_train", "low", headline, f"rows {sample}", "Deduplicate.",
                                        share=len(repeats) / len(rows)))  # fmt: skip
    missing = [i + 1 for i, label in enumerate(labels) if not label]
    if missing:
        headline = f"train: {len(missing)} row(s) have no label."
        report.findings.append(
            _finding("empty_label", "medium", headline, f"rows {missing[:5]}", "Label or drop them.")
        )
    report.findings = rank(report.findings)
    return report
