"""The demo dialogues: deterministic, both languages, several speakers, and every fact of the summary said in the
dialogue (the last value when a fact changes midway)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from tunelab.data.demo_dialogues import make_dialogues, write_demo_summarize_data


def test_deterministic_bilingual_multi_speaker() -> None:
    rows = make_dialogues(30, seed=1)
    assert rows == make_dialogues(30, seed=1) and rows != make_dialogues(30, seed=2)
    assert {r["id"].split("-")[0] for r in rows} == {"en", "ko"}
    assert any(re.search("[가-힣]", r["summary"]) for r in rows)
    for row in rows:
        speakers = set(re.findall(r"^(#Person\d#):", row["dialogue"], flags=re.M))
        assert len(speakers) >= 2 and len(row["dialogue"].splitlines()) >= 6


def test_summary_facts_come_from_the_dialogue() -> None:
    for row in make_dialogues(60, seed=4, languages=("en",)):
        facts = re.findall(
            r"\b(\d{1,2}(?::\d\d)? [ap]m|\d+ (?:dollars|minutes)|Monday|Tuesday|Thursday|Friday)", row["summary"]
        )
        assert facts, row["summary"]
        for fact in facts:
            assert fact.split()[0] in row["dialogue"], (fact, row["dialogue"])
    changed = [r for r in make_dialogues(60, seed=4, languages=("en",)) if "Can we make it" in r["dialogue"]]
    assert changed  # some dialogues change the time; the summary states the new one
    for row in changed:
        new_time = re.search(r"Can we make it (.+)\?", row["dialogue"]).group(1)
        assert f"at {new_time} at" in row["summary"]


def test_written_splits(tmp_path: Path) -> None:
    files = write_demo_summarize_data(tmp_path, 10, 4, 3)
    with files["test"].open(encoding="utf-8") as handle:
        test = list(csv.DictReader(handle))
    assert len(test) == 3 and set(test[0]) == {"id", "dialogue"}
    with files["train"].open(encoding="utf-8") as handle:
        assert set(next(csv.DictReader(handle))) == {"id", "dialogue", "summary"}
