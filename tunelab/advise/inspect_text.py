"""Text EDA pieces: lenient row parsing with chat-format faults, token lengths and truncation, duplicates and
leakage, empty fields, script mix, and label statistics.

Training refuses a malformed row with the first error it meets; inspect instead reads every row, counts each
kind of fault and keeps example row numbers, so one report shows all that is wrong.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from tunelab.config import DataConfig
from tunelab.data import text as textdata
from tunelab.data.templates import ROLE_SYNONYMS, ROLES, render, render_prompt
from tunelab.errors import UserError

# Extra lengths every report shows truncation at, besides data.max_length: the two usual settings
# (seed 000 §7: seq_len 1024 on a T4; 512 the common smaller choice).
REFERENCE_LENGTHS = (512, 1024)
PERCENTILES = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
EXAMPLES_KEPT = 5  # example rows kept per finding (the report shows them; more adds nothing)


@dataclass
class TextRow:
    """One data row, read without raising: its messages, prompt and answer text, raw fields and faults."""

    number: int  # 1-based row number in the file (data line for JSONL, row after the header for CSV)
    messages: list[dict[str, str]]
    prompt: str
    answer: str
    raw: dict[str, Any] = field(default_factory=dict)  # field name -> raw value (for empty / whitespace checks)
    faults: list[str] = field(default_factory=list)


def parse_rows(rows: list[dict[str, Any]], shape: str, data: DataConfig) -> list[TextRow]:
    """Rows as TextRows; faults (unknown_role, no_assistant, user_twice, ...) are recorded, never raised."""
    parse = _parse_alpaca if shape == "alpaca" else _parse_chat
    return [parse(row, number, data) for number, row in enumerate(rows, start=1)]


def _clean(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or pandas NaN
        return ""
    return str(value).strip()


def _parse_alpaca(row: dict[str, Any], number: int, data: DataConfig) -> TextRow:
    cols = data.columns
    raw = {name: row.get(getattr(cols, name)) for name in ("instruction", "input", "output")}
    instruction, extra = _clean(raw["instruction"]), _clean(raw["input"])
    prompt = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    messages = [{"role": "system", "content": s} for s in [_clean(row.get(cols.system)) or data.system_prompt] if s]
    messages.append({"role": "user", "content": prompt})
    answer = _clean(raw["output"])
    if answer:
        messages.append({"role": "assistant", "content": answer})
    faults = [] if prompt else ["empty_prompt"]
    return TextRow(number, messages, prompt, answer, raw, faults)


def _parse_chat(row: dict[str, Any], number: int, data: DataConfig) -> TextRow:
    value = row.get(data.columns.messages)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        return TextRow(number, [], "", "", {}, ["bad_messages"])
    messages, faults = [], []
    for item in value:
        role = str(item.get("role", item.get("from", ""))).strip().lower()
        role = ROLE_SYNONYMS.get(role, role)
        if role not in ROLES:
            faults.append("unknown_role")
        messages.append({"role": role, "content": _clean(item.get("content", item.get("value")))})
    faults += _order_faults([m["role"] for m in messages])
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    last = answers[-1] if answers else len(messages)
    prompt = "\n".join(m["content"] for m in messages[:last] if m["role"] != "assistant")
    answer = messages[last]["content"] if answers else ""
    raw = {
        f"{m['role']}[{i}]": v.get("content", v.get("value"))
        for i, (m, v) in enumerate(zip(messages, value, strict=True))
    }
    return TextRow(number, messages, prompt, answer, raw, sorted(set(faults)))


def _order_faults(roles: list[str]) -> list[str]:
    faults = []
    if "assistant" not in roles:
        faults.append("no_assistant")
    if "system" in roles[1:]:
        faults.append("system_not_first")
    for before, after in zip(roles, roles[1:], strict=False):
        if before == after == "user":
            faults.append("user_twice")
        if before == after == "assistant":
            faults.append("assistant_twice")
    return faults


# ----------------------------------------------------------------------------------------------- tokens


@dataclass
class TokenReport:
    """Token lengths of a split (per field and in total) and what each max length would cut."""

    total: list[int] = field(default_factory=list)  # rendered example, template and special tokens included
    prompt: list[int] = field(default_factory=list)
    answer: list[int] = field(default_factory=list)
    cut: dict[int, dict[str, int]] = field(default_factory=dict)  # length -> truncated / dropped / no_target
    refused: list[int] = field(default_factory=list)  # rows the chat template refused
    rows: int = 0  # rows measured (a sample in fast mode)
    sampled: bool = False  # True when only a sample of the split was measured


def measure_tokens(rows: list[TextRow], tokenizer: Any, template: str, lengths: list[int], train: bool) -> TokenReport:
    """Token lengths and, for training splits, truncation at each length exactly as training would do it."""
    report = TokenReport(cut={n: {"truncated": 0, "dropped": 0, "no_target": 0} for n in lengths})
    usable = [r for r in rows if r.messages and not {"bad_messages", "unknown_role"} & set(r.faults)]
    if train:
        usable = [r for r in usable if r.answer and "no_assistant" not in r.faults]
    report.rows = len(usable)
    add_special = template != "chat"
    for field_name in ("prompt", "answer"):
        texts = [getattr(r, field_name) for r in usable]
        # verbose=False: lengths beyond the tokenizer's model_max_length are what is being measured, not an error
        encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
        setattr(report, field_name, [len(ids) for ids in encoded])
    for row in usable:
        try:
            if train:
                rendered = render(row.messages, template, tokenizer)
                ids, labels, head, tail = textdata.tokenize_rendered(rendered, tokenizer, add_special)
            else:
                ids = tokenizer(render_prompt(row.messages, template, tokenizer), add_special_tokens=add_special)
                ids, labels = ids["input_ids"], []
        except UserError:
            report.refused.append(row.number)
            continue
        report.total.append(len(ids))
        for n in lengths if train else ():
            _count_cut(report.cut[n], ids, labels, head, tail, n)
    return report


def _count_cut(counts: dict[str, int], ids: list[int], labels: list[int], head: int, tail: int, n: int) -> None:
    kept = textdata.truncate_left(ids, labels, head, tail, n)
    if kept is None:
        counts["dropped"] += 1
        return
    if len(kept[0]) < len(ids):
        counts["truncated"] += 1
    if all(label == textdata.IGNORE for label in kept[1][1:]):
        counts["no_target"] += 1


def percentiles(values: list[int] | list[float]) -> dict[str, float]:
    """p50 / p90 / p95 / p99 / max by nearest rank (the same convention as TokenStats.percentiles)."""
    if not values:
        return {}
    ordered = sorted(values)
    picked = {
        name: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] for name, q in PERCENTILES.items()
    }
    return {**picked, "max": ordered[-1]}


# ----------------------------------------------------------------------------------------------- duplicates


_PUNCTUATION = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """Case, width, punctuation and spacing folded away: 'Hello,  World!' and 'hello world' compare equal."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCTUATION.sub(" ", folded).split())


def duplicates(keys: list[str]) -> list[tuple[int, int]]:
    """(index, index of its first occurrence) for every repeat of a key (empty keys are not duplicates)."""
    first: dict[str, int] = {}
    repeats = []
    for index, key in enumerate(keys):
        if not key:
            continue
        if key in first:
            repeats.append((index, first[key]))
        else:
            first[key] = index
    return repeats


def overlap(keys: list[str], reference: list[str]) -> list[tuple[int, int]]:
    """(index in keys, index in reference) for keys that also occur in the reference (train)."""
    where: dict[str, int] = {}
    for index, key in enumerate(reference):
        if key:
            where.setdefault(key, index)
    return [(index, where[key]) for index, key in enumerate(keys) if key and key in where]


def conflicts(inputs: list[str], labels: list[str]) -> list[list[int]]:
    """Groups of indices with the same normalised input but different normalised labels (answers)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, text in enumerate(inputs):
        if text:
            groups[normalise(text)].append(index)
    return [idx for idx in groups.values() if len({normalise(labels[i]) for i in idx}) > 1]


# ----------------------------------------------------------------------------------------------- scripts

SCRIPTS = ("hangul", "latin", "cjk", "other")


def script_of(char: str) -> str | None:
    """hangul / latin / cjk / other for a letter; None for digits, punctuation, spaces and symbols."""
    code = ord(char)
    if 0xAC00 <= code <= 0xD7A3 or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
        return "hangul"
    if char.isascii():
        return "latin" if char.isalpha() else None
    if 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x3040 <= code <= 0x30FF or 0xF900 <= code <= 0xFAFF:
        return "cjk"
    if not char.isalpha():
        return None
    return "latin" if 0x00C0 <= code <= 0x024F or 0x1E00 <= code <= 0x1EFF else "other"


def script_mix(texts: list[str]) -> dict[str, Any]:
    """Share of letters per script and the count of texts by their dominant script ('none' without letters)."""
    letters: Counter[str] = Counter()
    dominant: Counter[str] = Counter()
    for text in texts:
        counts = Counter(s for s in map(script_of, text) if s)
        letters.update(counts)
        dominant[counts.most_common(1)[0][0] if counts else "none"] += 1
    total = sum(letters.values()) or 1
    return {
        "letters": {s: round(letters[s] / total, 4) for s in SCRIPTS},
        "rows_by_dominant": {s: dominant[s] for s in (*SCRIPTS, "none")},
    }


# ----------------------------------------------------------------------------------------------- labels


def label_stats(inputs: list[str], labels: list[str]) -> dict[str, Any]:
    """Label counts, imbalance ratio (largest / smallest class) and inputs that carry conflicting labels."""
    counts = Counter(labels)
    groups = conflicts(inputs, labels)
    return {
        "classes": len(counts),
        "counts": dict(counts.most_common()),
        "imbalance": (max(counts.values()) / min(counts.values())) if counts else None,
        "conflicting_groups": len(groups),
        "conflicting_rows": sum(len(g) for g in groups),
        "conflict_examples": groups[:EXAMPLES_KEPT],
    }


def answers_look_like_labels(answers: list[str]) -> bool:
    """True when an SFT answer column is really a label column: few distinct answers, each repeated.

    20 classes or fewer and an average of at least 3 rows per class: a multiple-choice letter, a sentiment.
    """
    distinct = len(set(answers))
    return 0 < distinct <= 20 and len(answers) >= 3 * distinct


def empty_fields(rows: list[TextRow]) -> dict[str, dict[str, int]]:
    """Per raw field (chat: per role): rows where it is missing / empty and where it is only whitespace."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"empty": 0, "whitespace": 0})
    for row in rows:
        for name, value in row.raw.items():
            key = re.sub(r"\[\d+\]$", "", name)  # chat: count per role, not per position
            if value is None or (isinstance(value, float) and value != value) or value == "":
                counts[key]["empty"] += 1
            elif isinstance(value, str) and not value.strip():
                counts[key]["whitespace"] += 1
    return dict(counts)
