"""ROUGE-1 / 2 / L F1 and their sum, computed by `rouge-score` with a tokenizer chosen for the language.

rouge-score's own tokenizer lowercases and keeps only [a-z0-9], so Korean text scores 0 against anything; the
tokenizers here replace it:

- whitespace: the text split on whitespace, as it is (the usual choice for mixed or pre-tokenized text);
- ko-morph: Korean morphemes from kiwipiepy ("학교에서" -> 학교 / 에서), the way Korean leaderboards score, so a
  summary is not punished for a particle attached differently.

Scores are reported in percent (0-100), and `rouge_sum` = ROUGE-1 + ROUGE-2 + ROUGE-L, the competition score of
seed 001. With several references per example, each reference is scored and the F1 values are averaged ("avg") or
the best one per ROUGE type is kept ("max", rouge-score's `score_multi`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from tunelab.errors import UserError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
KO_INSTALL_HINT = "pip install kiwipiepy  (or: pip install 'tunelab[ko]')"


class WhitespaceTokenizer:
    """Tokens are the whitespace-separated pieces of the text, unchanged (no lowercasing, no punctuation split)."""

    def tokenize(self, text: str) -> list[str]:
        """The text split on whitespace."""
        return text.split()


class KoreanMorphTokenizer:
    """Korean morphemes (surface forms) from kiwipiepy; other scripts pass through as kiwipiepy splits them."""

    def __init__(self) -> None:
        kiwi_class = require_kiwi()
        self._kiwi = kiwi_class()

    def tokenize(self, text: str) -> list[str]:
        """The morphemes of `text`, in order."""
        return [token.form for token in self._kiwi.tokenize(text)]


def require_kiwi() -> Any:
    """The kiwipiepy Kiwi class, or a UserError that says how to install it."""
    try:
        from kiwipiepy import Kiwi
    except ImportError:
        raise UserError(
            "eval.rouge_tokenizer is 'ko-morph', which needs the kiwipiepy package (Korean morphemes), and it is "
            f"not installed. Install it: {KO_INSTALL_HINT}; or set eval.rouge_tokenizer: whitespace."
        ) from None
    return Kiwi


class _Memo:
    """Caches a tokenizer's output: each prediction is scored against several references (morpheme analysis is the
    expensive part of scoring)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._cache: dict[str, list[str]] = {}

    def tokenize(self, text: str) -> list[str]:
        """The inner tokenizer's tokens for `text`, computed once."""
        if text not in self._cache:
            if len(self._cache) > 100_000:  # bounded: an eval set of summaries is far smaller
                self._cache.clear()
            self._cache[text] = self._inner.tokenize(text)
        return self._cache[text]


@lru_cache(maxsize=4)
def get_tokenizer(name: str) -> Any:
    """The tokenizer for `eval.rouge_tokenizer` (created once per process; Kiwi loads its model in ~1 s)."""
    if name == "whitespace":
        return WhitespaceTokenizer()
    if name == "ko-morph":
        return KoreanMorphTokenizer()
    raise UserError(f"eval.rouge_tokenizer '{name}' is unknown. Use whitespace or ko-morph.")


def _scorer(tokenizer_name: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=_Memo(get_tokenizer(tokenizer_name)))


def score_examples(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenizer: str = "whitespace",
    combine: str = "avg",
) -> list[dict[str, float]]:
    """Per-example ROUGE F1 in percent ({rouge1, rouge2, rougeL, rouge_sum}), each prediction against its
    references combined by `combine` ("avg" or "max")."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if combine not in ("avg", "max"):
        raise UserError(f"eval.rouge_references '{combine}' is unknown. Use avg or max.")
    scorer = _scorer(tokenizer)
    rows = []
    for prediction, refs in zip(predictions, references, strict=True):
        refs = [r for r in refs if r and r.strip()] or [""]
        per_ref = [scorer.score(ref, prediction) for ref in refs]
        row = {}
        for kind in ROUGE_TYPES:
            values = [scores[kind].fmeasure for scores in per_ref]
            row[kind] = 100.0 * (max(values) if combine == "max" else sum(values) / len(values))
        row["rouge_sum"] = sum(row[kind] for kind in ROUGE_TYPES)
        rows.append(row)
    return rows


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The corpus score: the mean of the per-example scores (0 for every type when there are none)."""
    keys = (*ROUGE_TYPES, "rouge_sum")
    if not rows:
        return dict.fromkeys(keys, 0.0)
    return {key: sum(row[key] for row in rows) / len(rows) for key in keys}


def rouge(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]] | Sequence[str],
    tokenizer: str = "whitespace",
    combine: str = "avg",
) -> dict[str, float]:
    """Corpus ROUGE-1 / 2 / L F1 and their sum, in percent. `references` holds one string or a list per example."""
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    return mean_scores(score_examples(predictions, refs, tokenizer, combine))
