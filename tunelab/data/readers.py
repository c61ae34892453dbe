"""Readers for tabular data files (CSV, JSONL, Parquet) with errors that name the file, the line and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from tunelab.errors import UserError

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


def require_file(path: str | Path, key: str) -> None:
    """Raise UserError naming the config key (data.train, data.valid) when its file is missing or a folder."""
    path = Path(path)
    if path.is_file():
        return
    where = "" if path.is_absolute() else f" (looked for {path.absolute()})"
    problem = "is a folder, not a file" if path.is_dir() else f"does not exist{where}"
    raise UserError(
        f"{key} is {path}, which {problem}. Fix {key} in the config or with an override such as "
        f"{key}=path/to/file.jsonl (relative paths are taken from the config file's folder or the current folder)."
    )


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Read a CSV / TSV / JSONL / JSON / Parquet file into a list of row dicts.

    Raises UserError for a missing or empty file, a file that is not UTF-8, a malformed JSONL line (with its
    number) or an unknown extension.
    """
    path = Path(path)
    if not path.exists():
        # a relative path is looked up from the current folder: show where, which is what usually surprises
        where = "" if path.is_absolute() else f" (looked for {path.absolute()})"
        raise UserError(
            f"Data file {path} does not exist{where}. Check data.train / data.valid / data.test in the "
            "config (relative paths are taken from the config file's folder or the current folder)."
        )
    if path.is_dir():
        raise UserError(f"Data file {path} is a folder; point the config at a CSV, JSONL or Parquet file.")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(
            f"Data file {path} has an unknown extension '{path.suffix}'. Use one of: {', '.join(sorted(SUFFIXES))}."
        )
    if path.stat().st_size == 0:
        raise UserError(f"Data file {path} is empty. Add rows or point the config at the right file.")
    if kind == "parquet":
        rows = _read_parquet(path)
    else:
        text = _read_utf8(path)
        if kind == "jsonl":
            rows = _parse_jsonl(path, text)
        elif kind == "json":
            rows = _parse_json(path, text)
        else:
            rows = _parse_csv(path, sep="\t" if kind == "tsv" else ",")
    if not rows:
        raise UserError(f"Data file {path} has no rows (only a header or blank lines).")
    return rows


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode Text" export is UTF-16 with a BOM
            raise UserError(
                f"Data file {path} is UTF-16, not UTF-8. Re-save it as UTF-8 (in Excel: CSV UTF-8), or "
                f"`iconv -f utf-16 -t utf-8 {path.name} > {path.stem}-utf8{path.suffix}`."
            ) from None
        line = raw[: error.start].count(b"\n") + 1
        raise UserError(
            f"Data file {path} is not UTF-8 (first bad byte on line {line}, byte offset {error.start}). "
            "Re-save it as UTF-8, e.g. `iconv -f cp949 -t utf-8 in.csv > out.csv` for Korean Windows "
            "files."
        ) from None


def _parse_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(
                f"Data file {path}, line {number}: malformed JSON ({error.msg}; column {error.colno}). "
                "Each line of a JSONL file must be one complete JSON object; fix or remove that line."
            ) from None
        if not isinstance(row, dict):
            raise UserError(
                f'Data file {path}, line {number}: expected a JSON object such as {{"messages": [...]}}, '
                f"got a {type(row).__name__}."
            )
        rows.append(row)
    return rows


def _parse_json(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(
            f"Data file {path}: malformed JSON ({error.msg} at line {error.lineno}, column {error.colno})."
        ) from None
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise UserError(f"Data file {path}: a .json file must hold a list of objects; use .jsonl for one per line.")
    return data


def _parse_csv(path: Path, sep: str) -> list[dict[str, Any]]:
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.ParserError as error:
        raise UserError(
            f"Data file {path} is not a well-formed CSV: {_reason(error)}. Check quoting and the column count on "
            "that line."
        ) from None
    except pd.errors.EmptyDataError:
        raise UserError(f"Data file {path} has no columns. Add a header row.") from None
    return frame.to_dict(orient="records")


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        frame = pd.read_parquet(path)
    except Exception as error:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"Data file {path} could not be read as Parquet: {_reason(error)}.") from None
    return [{k: _from_arrow(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def _reason(error: Exception) -> str:
    """A library's error text as one clause: pandas ends some with a newline, pyarrow some with a period."""
    return " ".join(str(error).split()).rstrip(".")


def _from_arrow(value: Any) -> Any:
    """Parquet list columns come back as numpy arrays; turn them into plain lists of dicts / values."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        return [_from_arrow(v) for v in value.tolist()] if isinstance(value.tolist(), list) else value.tolist()
    if isinstance(value, dict):
        return {k: _from_arrow(v) for k, v in value.items()}
    return value


def require_columns(path: str | Path, rows: list[dict[str, Any]], needed: list[str], config_key: str) -> None:
    """Raise UserError naming the missing column, the columns found and the config key that maps it."""
    found = list(rows[0].keys()) if rows else []
    missing = [name for name in needed if name not in found]
    if missing:
        raise UserError(
            f"Data file {path} has no column '{missing[0]}'. Columns found: {', '.join(found) or 'none'}. "
            f"Rename the column or set {config_key} in the config."
        )
