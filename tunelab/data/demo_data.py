"""Demo chat data for fine-tuning, built from the ``chatterbot-corpus`` PyPI package (BSD-3-Clause).

The corpus holds YAML files ``chatterbot_corpus/data/<language>/*.yml`` with a ``conversations:`` list; each
conversation is a list of statements ``[q, a, q2, a2, ...]`` that alternate user and assistant turns.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import UserError

INSTALL_HINT = "pip install --no-deps chatterbot-corpus==1.3.3"
TEST_PROMPTS_PER_LANGUAGE = 5


@dataclass(frozen=True)
class Conversation:
    """One cleaned conversation: alternating user / assistant turns, always ending with an assistant turn."""

    id: str
    language: str
    turns: tuple[str, ...]

    def messages(self, system_prompt: str | None = None, drop_last_answer: bool = False) -> list[dict[str, str]]:
        """The conversation in chat shape; with ``drop_last_answer`` it ends on the last user turn (a prompt)."""
        turns = self.turns[:-1] if drop_last_answer else self.turns
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        return msgs


def corpus_dir() -> Path:
    """The ``data`` folder of the installed ``chatterbot_corpus`` package (found, not imported)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "data").is_dir():
            return Path(folder) / "data"
    raise UserError(f"The demo data needs the PyPI package 'chatterbot-corpus', which is not installed: {INSTALL_HINT}")


def _clean(raw: Any) -> tuple[str, ...] | None:
    """Strip turns, drop a trailing unanswered user turn; None if the entry is not a usable conversation."""
    if not isinstance(raw, list) or any(t is None or isinstance(t, (list, dict)) for t in raw):
        return None
    turns = [str(t).strip() for t in raw]
    if len(turns) % 2:
        turns = turns[:-1]
    if len(turns) < 2 or not all(turns):
        return None
    return tuple(turns)


def load_conversations(language: str) -> tuple[list[Conversation], dict[str, int]]:
    """Read, clean and de-duplicate one language's conversations, in file order; also return counts.

    YAML is read with ``BaseLoader`` so every scalar stays the text written (``yes`` stays ``yes``, not ``True``).
    """
    import yaml

    folder = corpus_dir() / language
    files = sorted(folder.glob("*.yml"))
    if not files:
        available = sorted(p.name for p in corpus_dir().iterdir() if p.is_dir())
        raise UserError(f"chatterbot-corpus has no language {language!r}; available: {', '.join(available)}")
    counts = {"files": len(files), "raw": 0, "skipped": 0, "duplicates": 0}
    seen: set[tuple[str, ...]] = set()
    out: list[Conversation] = []
    for path in files:
        with path.open(encoding="utf-8") as fh:
            doc = yaml.load(fh, Loader=yaml.BaseLoader) or {}
        entries = (doc.get("conversations") or []) if isinstance(doc, dict) else []
        for index, raw in enumerate(entries):
            counts["raw"] += 1
            turns = _clean(raw)
            if turns is None:
                counts["skipped"] += 1
            elif turns in seen:
                counts["duplicates"] += 1
            else:
                seen.add(turns)
                out.append(Conversation(f"{language}-{path.stem}-{index:04d}", language, turns))
    counts["conversations"] = len(out)
    counts["turns"] = sum(len(c.turns) for c in out)
    counts["multi_turn"] = sum(len(c.turns) > 2 for c in out)
    return out, counts


def _split(
    conversations: Sequence[Conversation], valid_fraction: float, n_test: int, rng: random.Random
) -> tuple[list[Conversation], list[Conversation], list[Conversation]]:
    """Shuffle and split by groups of conversations that share their first user turn (no prompt in two splits)."""
    groups: dict[str, list[Conversation]] = {}
    for conv in conversations:
        groups.setdefault(conv.turns[0].casefold(), []).append(conv)
    order = list(groups.values())
    rng.shuffle(order)
    n_test = min(n_test, max(len(order) - 2, 0))
    test, rest = order[:n_test], order[n_test:]
    n_valid = min(max(round(valid_fraction * len(rest)), 1 if valid_fraction > 0 else 0), max(len(rest) - 1, 0))
    return _flat(rest[n_valid:]), _flat(rest[:n_valid]), [g[0] for g in test]


def _flat(groups: Iterable[list[Conversation]]) -> list[Conversation]:
    return [conv for group in groups for conv in group]


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_demo_sft_data(
    out_dir: str | Path,
    languages: Sequence[str] = ("english", "korean"),
    valid_fraction: float = 0.1,
    seed: int = 0,
    system_prompt: str | None = None,
    test_prompts_per_language: int = TEST_PROMPTS_PER_LANGUAGE,
) -> dict[str, Any]:
    """Write ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` chat data under ``out_dir``.

    Each line is ``{"id": ..., "messages": [{"role": "system"?, ...}, {"role": "user", ...}, ...]}``; train and
    valid lines end with an assistant turn, test lines are prompts that end with the user turn (no answer). The
    shuffle is seeded and done per language, so every split holds every language and equal inputs give equal files.

    Returns ``{"train": Path, "valid": Path, "test": Path, "counts": {split: n}, "languages": {language: counts}}``.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise UserError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[Conversation]] = {"train": [], "valid": [], "test": []}
    per_language: dict[str, dict[str, int]] = {}
    for language in languages:
        conversations, counts = load_conversations(language)
        rng = random.Random(f"{seed}-{language}")
        train, valid, test = _split(conversations, valid_fraction, test_prompts_per_language, rng)
        splits["train"] += train
        splits["valid"] += valid
        splits["test"] += test
        per_language[language] = {**counts, "train": len(train), "valid": len(valid), "test": len(test)}
    random.Random(seed).shuffle(splits["train"])  # interleave languages

    result: dict[str, Any] = {"counts": {}, "languages": per_language}
    for split, convs in splits.items():
        rows = ({"id": c.id, "messages": c.messages(system_prompt, drop_last_answer=split == "test")} for c in convs)
        path = out / f"{split}.jsonl"
        result["counts"][split] = _write_jsonl(path, rows)
        result[split] = path
    return result
