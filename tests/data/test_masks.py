"""Assistant-only masks, left truncation and packing layout, on the Llama-3, ChatML (Qwen2.5) and Gemma templates."""

from __future__ import annotations

import pytest
from fixtures import make_tokenizer

from tunelab.data import text as textdata
from tunelab.data.templates import PLAIN_TEMPLATES, render, render_prompt

END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "gemma": "<end_of_turn>"}

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is the sky? 하늘은?"},
    {"role": "assistant", "content": "Blue. 파란색."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green, mostly."},
]


def labelled_groups(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Runs of consecutive target positions."""
    groups: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels, strict=True):
        if label != textdata.IGNORE:
            if not previous:
                groups.append([])
            groups[-1].append(token)
        previous = label != textdata.IGNORE
    return groups


def tokenize(messages, tokenizer, template="chat"):
    rendered = render(messages, template, tokenizer)
    return rendered, *textdata.tokenize_rendered(rendered, tokenizer, add_special_tokens=template != "chat")


@pytest.mark.parametrize("family", ["llama3", "chatml", "gemma"])
def test_mask_covers_exactly_every_assistant_turn_with_end_of_turn(family: str) -> None:
    tokenizer = make_tokenizer(family)
    _, ids, labels, _, _ = tokenize(MULTI_TURN, tokenizer)
    groups = labelled_groups(ids, labels)
    answers = [m["content"] for m in MULTI_TURN if m["role"] == "assistant"]
    assert [tokenizer.decode(g) for g in groups] == [a + END_OF_TURN[family] for a in answers]
    # labels equal the ids where they are set: the model learns the real tokens
    assert all(label in (textdata.IGNORE, token) for token, label in zip(ids, labels, strict=True))


@pytest.mark.parametrize("family", ["llama3", "chatml", "gemma"])
def test_rendered_text_matches_template_and_prompt_ends_with_header(family: str) -> None:
    tokenizer = make_tokenizer(family)
    rendered = render(MULTI_TURN, "chat", tokenizer)
    assert rendered.text == tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)
    prompt = render_prompt(MULTI_TURN, "chat", tokenizer)
    assert rendered.text.startswith(prompt)
    assert rendered.text[len(prompt) :].startswith("Green, mostly.")


def test_plain_template_masks_answer_and_eos() -> None:
    tokenizer = make_tokenizer("llama3")
    messages = [{"role": "user", "content": "Reverse: a b"}, {"role": "assistant", "content": "b a"}]
    rendered, ids, labels, _, _ = tokenize(messages, tokenizer, "alpaca")
    assert rendered.text.startswith("### Instruction:\nReverse: a b")
    assert PLAIN_TEMPLATES["alpaca"]["header"] in rendered.text
    assert [tokenizer.decode(g) for g in labelled_groups(ids, labels)] == ["b a" + tokenizer.eos_token]


@pytest.mark.parametrize("family", ["llama3", "chatml", "gemma"])
def test_left_truncation_keeps_system_prompt_and_final_answer(family: str) -> None:
    tokenizer = make_tokenizer(family)
    long_history = [{"role": "system", "content": "SYSTEM RULES"}]
    for i in range(6):
        long_history += [
            {"role": "user", "content": f"question number {i} " * 5},
            {"role": "assistant", "content": f"answer number {i} " * 5},
        ]
    long_history += [{"role": "user", "content": "final question"}, {"role": "assistant", "content": "FINAL ANSWER"}]
    rendered, ids, labels, head, tail = tokenize(long_history, tokenizer)
    max_length = (len(ids) - tail) + head + 20
    cut_ids, cut_labels = textdata.truncate_left(ids, labels, head, tail, max_length)
    assert len(cut_ids) == max_length
    text = tokenizer.decode(cut_ids)
    assert "SYSTEM RULES" in text
    assert (
        text.endswith("FINAL ANSWER" + END_OF_TURN[family] + ("\n" if family != "llama3" else ""))
        or "FINAL ANSWER" + END_OF_TURN[family] in text
    )
    assert "question number 0" not in text  # the oldest history went first
    assert tokenizer.decode(labelled_groups(cut_ids, cut_labels)[-1]) == "FINAL ANSWER" + END_OF_TURN[family]
    header = {
        "llama3": "<|start_header_id|>assistant<|end_header_id|>",
        "chatml": "<|im_start|>assistant",
        "gemma": "<start_of_turn>model",
    }[family]
    assert header + "\n" in text.split("final question")[-1] or header in text.split("final question")[-1]
    if family in ("llama3", "gemma"):
        assert cut_ids[0] == tokenizer.bos_token_id  # the begin-of-text token is never cut


def test_example_whose_answer_alone_does_not_fit_is_dropped() -> None:
    tokenizer = make_tokenizer("chatml")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "long answer " * 40}]
    _, ids, labels, head, tail = tokenize(messages, tokenizer)
    assert textdata.truncate_left(ids, labels, head, tail, (len(ids) - tail) - 1) is None
    assert textdata.truncate_left(ids, labels, head, tail, len(ids)) == (ids, labels)


def test_packing_restarts_positions_and_ignores_first_label() -> None:
    examples = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5], "labels": [4, 5]},
        {"input_ids": [6, 7, 8, 9], "labels": [-100, -100, 8, 9]},
    ]
    rows = textdata.pack_examples(examples, max_length=6, seed=0)
    assert sorted(len(r["input_ids"]) for r in rows) == [3, 6]  # first-fit decreasing: 4+2, 3
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for start in starts:
            assert row["labels"][start] == textdata.IGNORE
    all_tokens = sorted(t for r in rows for t in r["input_ids"])
    assert all_tokens == list(range(1, 10))
    batch = textdata.collate(rows, pad_id=0)
    assert "attention_mask" not in batch
    assert batch["real_tokens"].tolist() == [len(r["input_ids"]) for r in rows]
