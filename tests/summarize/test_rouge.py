"""ROUGE: equal to rouge-score's own numbers, the Korean morpheme tokenizer, multiple references, a clear error
without kiwipiepy."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
from rouge_score import rouge_scorer

from tunelab.errors import UserError
from tunelab.evaluate import rouge


def test_equals_rouge_score_on_fixed_strings() -> None:
    pairs = [
        ("the cat sat on the mat", "the cat is on the mat"),
        ("a quick brown fox jumps", "the quick brown fox jumped over the lazy dog"),
        ("nothing in common here", "completely different words"),
    ]
    # lowercase words without punctuation: rouge-score's default tokenizer and whitespace split agree
    reference = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for prediction, target in pairs:
        ours = rouge.rouge([prediction], [target])
        theirs = reference.score(target, prediction)
        for kind in ("rouge1", "rouge2", "rougeL"):
            assert ours[kind] == pytest.approx(100 * theirs[kind].fmeasure, abs=1e-9)
        assert ours["rouge_sum"] == pytest.approx(sum(100 * theirs[k].fmeasure for k in theirs), abs=1e-9)
    # and by hand: 5 of 6 unigrams, 3 of 5 bigrams, an LCS of 5 words
    first = rouge.rouge([pairs[0][0]], [pairs[0][1]])
    assert first["rouge1"] == pytest.approx(100 * 5 / 6)
    assert first["rouge2"] == pytest.approx(60.0)
    assert first["rougeL"] == pytest.approx(100 * 5 / 6)


def test_corpus_score_is_the_mean_and_references_combine() -> None:
    predictions = ["the cat sat on the mat", "a dog"]
    refs = [["the cat is on the mat", "the cat sat on the mat"], ["a dog barked"]]
    best = rouge.rouge(predictions, refs, combine="max")
    average = rouge.rouge(predictions, refs, combine="avg")
    assert best["rouge1"] == pytest.approx((100.0 + 100 * 0.8) / 2)  # perfect match; 2/2 vs 2/3 -> F1 0.8
    assert average["rouge1"] == pytest.approx(((100 * 5 / 6 + 100.0) / 2 + 80.0) / 2)
    assert best["rouge_sum"] > average["rouge_sum"]
    mixed = rouge.rouge(["a dog"], ["a dog barked"])  # a plain string is one reference
    assert mixed["rouge1"] == pytest.approx(80.0)


def test_korean_morphemes_split_particles_and_change_the_score() -> None:
    pytest.importorskip("kiwipiepy")
    morphs = rouge.get_tokenizer("ko-morph")
    assert morphs.tokenize("학교에서")[:2] == ["학교", "에서"]
    target, prediction = "나는 학교에서 친구를 만났다", "학교에 친구가 왔다"
    # as eojeol (whitespace) nothing matches: every word carries a different particle
    assert rouge.rouge([prediction], [target], tokenizer="whitespace")["rouge1"] == 0.0
    # as morphemes 학교 and 친구 (and the ending) match; the value equals a direct unigram F1 count
    ours = rouge.rouge([prediction], [target], tokenizer="ko-morph")
    pred_tokens, ref_tokens = morphs.tokenize(prediction), morphs.tokenize(target)
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    precision, recall = overlap / len(pred_tokens), overlap / len(ref_tokens)
    assert overlap >= 2 and ours["rouge1"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))
    assert ours["rouge1"] > 30


def test_ko_morph_without_kiwipiepy_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kiwipiepy", None)  # import kiwipiepy now raises ImportError
    rouge.get_tokenizer.cache_clear()
    try:
        with pytest.raises(UserError, match="pip install kiwipiepy"):
            rouge.rouge(["학교"], ["학교"], tokenizer="ko-morph")
    finally:
        rouge.get_tokenizer.cache_clear()
