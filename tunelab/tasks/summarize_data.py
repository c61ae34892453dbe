"""summarize, the data half: rows -> token examples for either model kind, the truncation report, output cleaning.

A row is {id, dialogue, summaries}. For a decoder LLM (causal) it becomes a chat / instruction conversation
(system prompt, the instruction and the dialogue as the user turn, the summary as the answer) rendered and masked
by sft's machinery: loss on the answer tokens only, and left truncation that cuts the oldest dialogue turns but never
the instruction, the answer header or the answer. For an encoder-decoder (seq2seq) the dialogue is the encoder
input (oldest turns cut first, the tokenizer's own special tokens kept) and the summary the decoder labels.

data.max_length limits the prompt side (encoder input, or the prompt up to and including the answer header);
data.max_target_length the summary side (labels, end-of-sequence token included) for both kinds.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any

import torch

from tunelab.config import RunConfig
from tunelab.data import text as textdata
from tunelab.data.cache import cache_root, cached, content_key, tokenizer_fingerprint
from tunelab.data.readers import read_table, require_columns
from tunelab.data.templates import Rendered, render, render_prompt, resolve_template
from tunelab.errors import UserError

DEFAULT_INSTRUCTION = "Summarize the following dialogue."
IGNORE = textdata.IGNORE

# ----------------------------------------------------------------------------------------------- rows


def summary_columns(config: RunConfig) -> list[str]:
    """The configured reference column(s), as a list."""
    columns = config.data.columns.summary
    return [columns] if isinstance(columns, str) else list(columns)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return ""
    return str(value).strip()


def _references(row: dict[str, Any], columns: list[str]) -> list[str]:
    refs: list[str] = []
    for column in columns:
        value = row.get(column)
        values = value if isinstance(value, list) else [value]  # JSONL may hold a list of references
        refs += [text for text in map(_cell, values) if text]
    return refs


def read_dialogues(path: str, config: RunConfig, need_summary: bool = True) -> list[dict[str, Any]]:
    """Rows of a data file as {"id", "dialogue", "summaries"}. A missing column or an empty dialogue is a UserError
    naming the file, the rows and the fix; rows without a summary are dropped and counted (an error if all are)."""
    rows = read_table(path)
    cols = config.data.columns
    require_columns(path, rows, [cols.dialogue], "data.columns.dialogue")
    columns = summary_columns(config)
    if need_summary:
        require_columns(path, rows, [columns[0]], "data.columns.summary")
    empty = [number for number, row in enumerate(rows, start=1) if not _cell(row.get(cols.dialogue))]
    if empty:
        raise UserError(
            f"Data file {path}: {len(empty)} of {len(rows)} rows have an empty '{cols.dialogue}' (rows "
            f"{_rows(empty)}; row 1 is the first data row). Fill them in or remove them: there is nothing to "
            "summarize."
        )
    out, no_summary = [], []
    for number, row in enumerate(rows, start=1):
        refs = _references(row, columns)
        if need_summary and not refs:
            no_summary.append(number)
            continue
        row_id = _cell(row.get(cols.id)) or str(number - 1)
        out.append({"id": row_id, "dialogue": _cell(row[cols.dialogue]), "summaries": refs})
    if need_summary and not out:
        raise UserError(f"Data file {path}: all {len(rows)} rows have an empty '{columns[0]}'; nothing to learn.")
    if no_summary:
        from tunelab.tasks.sft import _warn

        _warn(
            f"{path}: dropped {len(no_summary)} of {len(rows)} rows with an empty summary (rows {_rows(no_summary)})."
        )
    return out


def _rows(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else "")


def instruction_for(config: RunConfig, index: int | None) -> str:
    """The instruction of a training example (`index`: drawn from data.instructions with an RNG seeded by the
    run seed and the index, so a rerun or a resume gets the same), or of evaluation / test rows (None: the first)."""
    choices = config.data.instructions or [DEFAULT_INSTRUCTION]
    if index is None or len(choices) == 1:
        return choices[0]
    return random.Random(config.train.seed * 1_000_003 + index).choice(choices)


def messages_for(dialogue: str, summary: str | None, instruction: str, config: RunConfig) -> list[dict[str, str]]:
    """The conversation a decoder model learns from: [system], user = instruction + dialogue, [assistant = summary]."""
    messages = [{"role": "system", "content": config.data.system_prompt}] if config.data.system_prompt else []
    messages.append({"role": "user", "content": f"{instruction}\n\n{dialogue}"})
    if summary is not None:
        messages.append({"role": "assistant", "content": summary})
    return messages


# ----------------------------------------------------------------------------------------------- decoder examples


def _protect_instruction(rendered: Rendered, dialogue: str) -> Rendered:
    """Widen the never-cut head to everything before the dialogue (system prompt, user header, instruction), so
    truncation cuts only dialogue turns."""
    start = rendered.text.find(dialogue, rendered.keep_head)
    if 0 <= start <= rendered.answer_start:
        return dataclasses.replace(rendered, keep_head=start)
    return rendered


def causal_example(
    row: dict[str, Any], instruction: str, tokenizer: Any, template: str, config: RunConfig
) -> dict[str, Any]:
    """One decoder example: {"input_ids", "labels", "prompt_len", "target_len"} (lengths before any cut), or with
    "input_ids" None when it cannot fit (its head and answer alone exceed the limits) or its summary is too long
    under long_targets: stop."""
    messages = messages_for(row["dialogue"], row["summaries"][0], instruction, config)
    rendered = _protect_instruction(render(messages, template, tokenizer), row["dialogue"])
    ids, labels, head, tail = textdata.tokenize_rendered(rendered, tokenizer, template != "chat")
    targets = [i for i, label in enumerate(labels) if label != IGNORE]
    first = targets[0] if targets else len(ids)
    result: dict[str, Any] = {"input_ids": None, "labels": None, "prompt_len": first, "target_len": len(targets)}
    limit = config.data.max_target_length
    if len(targets) > limit:
        if config.data.long_targets == "stop":
            return result
        keep = targets[: limit - 1] + targets[-1:]  # the last target token is the end-of-turn token: keep it
        ids, labels = ids[:first] + [ids[i] for i in keep], labels[:first] + [labels[i] for i in keep]
    cut = textdata.truncate_left(ids, labels, min(head, tail), tail, config.data.max_length + len(ids) - first)
    if cut is not None:
        result["input_ids"], result["labels"] = cut
    return result


def causal_prompt(row: dict[str, Any], tokenizer: Any, template: str, config: RunConfig) -> tuple[list[int], int]:
    """Token ids a decoder model continues to write the summary (instruction and answer header never cut, the
    oldest dialogue turns cut to fit data.max_length), and the prompt length before the cut."""
    text = render_prompt(
        messages_for(row["dialogue"], None, instruction_for(config, None), config), template, tokenizer
    )
    start = text.rfind(row["dialogue"])
    rendered = Rendered(
        text=text, assistant_spans=[], keep_head=max(start, 0), answer_start=start + len(row["dialogue"])
    )
    ids, labels, head, tail = textdata.tokenize_rendered(rendered, tokenizer, template != "chat")
    cut = textdata.truncate_left(ids, labels, min(head, tail), tail, config.data.max_length)
    return (cut[0] if cut is not None else ids[-config.data.max_length :]), len(ids)


# ----------------------------------------------------------------------------------------------- seq2seq examples


def encode_source(dialogue: str, tokenizer: Any, max_length: int) -> tuple[list[int], int]:
    """Encoder input ids with the tokenizer's special tokens, the oldest turns cut to max_length; and the length
    before the cut."""
    full = tokenizer(dialogue)["input_ids"]
    if len(full) <= max_length:
        return list(full), len(full)
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # keep the end of the dialogue; the tokenizer keeps its bos / eos
    try:
        cut = tokenizer(dialogue, truncation=True, max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = side
    return list(cut), len(full)


def encode_target(summary: str, tokenizer: Any) -> list[int]:
    """Decoder labels: the tokenizer's target encoding, ending with eos (appended when the tokenizer adds none, as a
    plain tokenizer would, so the model learns to stop)."""
    ids = list(tokenizer(text_target=summary)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def seq2seq_example(row: dict[str, Any], tokenizer: Any, config: RunConfig) -> dict[str, Any]:
    """One encoder-decoder example: {"input_ids", "labels", "prompt_len", "target_len"} ("input_ids" None when the
    summary is too long under long_targets: stop)."""
    source, source_len = encode_source(row["dialogue"], tokenizer, config.data.max_length)
    labels = encode_target(row["summaries"][0], tokenizer)
    result: dict[str, Any] = {
        "input_ids": source,
        "labels": labels,
        "prompt_len": source_len,
        "target_len": len(labels),
    }
    limit = config.data.max_target_length
    if len(labels) > limit:
        if config.data.long_targets == "stop":
            result["input_ids"] = result["labels"] = None
        else:
            result["labels"] = labels[: limit - 1] + labels[-1:]
    return result


def collate_seq2seq(examples: list[dict[str, list[int]]], pad_id: int, start_id: int) -> dict[str, torch.Tensor]:
    """Right-padded encoder inputs, labels (-100 on padding) and decoder inputs = labels shifted right behind the
    decoder start token (what BART / T5 build from labels), with their attention masks."""
    source_len = max(len(e["input_ids"]) for e in examples)
    target_len = max(len(e["labels"]) for e in examples)
    batch: dict[str, list[list[int]]] = {
        k: [] for k in ("input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_attention_mask")
    }
    for example in examples:
        source, labels = example["input_ids"], example["labels"]
        batch["input_ids"].append(source + [pad_id] * (source_len - len(source)))
        batch["attention_mask"].append([1] * len(source) + [0] * (source_len - len(source)))
        pad = target_len - len(labels)
        batch["labels"].append(labels + [IGNORE] * pad)
        batch["decoder_input_ids"].append([start_id] + labels[:-1] + [pad_id] * pad)
        batch["decoder_attention_mask"].append([1] * len(labels) + [0] * pad)
    tensors = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
    tensors["real_tokens"] = torch.tensor([len(e["input_ids"]) + len(e["labels"]) for e in examples])
    return tensors


# ----------------------------------------------------------------------------------------------- building


def build_split(
    rows: list[dict[str, Any]], tokenizer: Any, kind: str, config: RunConfig, training: bool
) -> tuple[list[dict[str, list[int]]], dict[str, Any], bool]:
    """Examples of one split from the content-hash cache, with what the report needs: per-row prompt and target
    lengths, and counts of rows dropped. Training rows draw their instruction (augmentation); others use the first."""
    template = resolve_template(config.data.template, tokenizer) if kind == "causal" else None
    instructions = [instruction_for(config, i if training else None) for i in range(len(rows))]
    data = config.data
    key = content_key(
        "summarize", kind, [(r["dialogue"], r["summaries"][0]) for r in rows], instructions, template,
        tokenizer_fingerprint(tokenizer), data.max_length, data.max_target_length, data.long_targets,
        data.system_prompt,
    )  # fmt: skip

    def build() -> dict[str, Any]:
        examples, prompt_lengths, target_lengths, dropped = [], [], [], 0
        for row, instruction in zip(rows, instructions, strict=True):
            if kind == "causal":
                item = causal_example(row, instruction, tokenizer, template, config)
            else:
                item = seq2seq_example(row, tokenizer, config)
            prompt_lengths.append(item["prompt_len"])
            target_lengths.append(item["target_len"])
            if item["input_ids"] is None:
                dropped += 1
                continue
            examples.append({"input_ids": item["input_ids"], "labels": item["labels"]})
        stats = {"rows": len(rows), "dropped": dropped, "prompt_lengths": prompt_lengths}
        return {"examples": examples, "stats": {**stats, "target_lengths": target_lengths}}

    value, hit = cached(key, build, cache_root(data.cache_dir))
    return value["examples"], value["stats"], hit


# ----------------------------------------------------------------------------------------------- truncation report


def report_lengths(limit: int) -> list[int]:
    """The configured limit and the next two powers of two above it (512 -> 512, 1024, 2048; 300 -> 300, 512, 1024)."""
    first = 1 << limit.bit_length()
    return [limit, first, first * 2]


def truncation_report(prompt_lengths: list[int], target_lengths: list[int], config: RunConfig) -> dict[str, Any]:
    """Share of prompts cut at data.max_length and the next two powers of two, and of targets at
    data.max_target_length and its next two; counts are direct (length > limit)."""
    n = max(len(prompt_lengths), 1)
    prompts = {str(L): sum(x > L for x in prompt_lengths) / n for L in report_lengths(config.data.max_length)}
    targets = {str(L): sum(x > L for x in target_lengths) / n for L in report_lengths(config.data.max_target_length)}
    return {
        "rows": len(prompt_lengths),
        "prompts_cut": prompts,
        "targets_over": targets,
        "longest_prompt": max(prompt_lengths, default=0),
        "longest_target": max(target_lengths, default=0),
        "targets_over_limit": sum(x > config.data.max_target_length for x in target_lengths),
    }


def show_truncation_report(split: str, report: dict[str, Any], hit: bool) -> None:
    """One table per split: the share of prompts and of targets cut at each length."""
    from tunelab.track.progress import console

    prompts = "  ".join(f"{length}: {share:.2%}" for length, share in report["prompts_cut"].items())
    targets = "  ".join(f"{length}: {share:.2%}" for length, share in report["targets_over"].items())
    console.print(
        f"[bold]{split}[/]: {report['rows']} dialogues{' (cached)' if hit else ''}; prompts cut at max_length "
        f"{prompts} (longest {report['longest_prompt']}); summaries over max_target_length {targets} (longest "
        f"{report['longest_target']})"
    )


def check_report(report: dict[str, Any], config: RunConfig, split: str) -> None:
    """Stop before training, with advice, when too many prompts would be cut or summaries are over the limit
    under long_targets: stop."""
    data = config.data
    share = report["prompts_cut"][str(data.max_length)]
    if share > data.max_truncated:
        better = [int(L) for L, s in report["prompts_cut"].items() if s <= data.max_truncated]
        advice = f"data.max_length={better[0]} cuts {report['prompts_cut'][str(better[0])]:.2%}" if better else (
            f"the longest prompt has {report['longest_prompt']} tokens"
        )  # fmt: skip
        raise UserError(
            f"{split}: {share:.2%} of the prompts would be cut at data.max_length={data.max_length} (allowed: "
            f"data.max_truncated={data.max_truncated:g}). Cut dialogues lose facts the summary states, which cost "
            f"seed 001's team 20-30 ROUGE points. Raise data.max_length ({advice}), or allow more with "
            "data.max_truncated."
        )
    over = report["targets_over_limit"]
    if over and data.long_targets == "stop":
        raise UserError(
            f"{split}: {over} of {report['rows']} summaries are longer than data.max_target_length="
            f"{data.max_target_length} tokens (the longest has {report['longest_target']}). Raise "
            f"data.max_target_length to {report['longest_target']}, or set data.long_targets=truncate to cut them "
            "(the end-of-sequence token is kept)."
        )


# ----------------------------------------------------------------------------------------------- output cleaning


def clean_summary(text: str, remove: list[str]) -> str:
    """A generated summary without the model's structural special tokens (`remove`: bos / eos / pad / chat-turn
    tokens; registered speaker tags stay, they are words of the summary) and without speaker-tag debris: a dialogue
    turn the model started ("#Person1#: ..."), a turn marker in front, a tag cut off at the end ("#Pers")."""
    for token in sorted(remove, key=len, reverse=True):
        text = text.replace(token, " ")
    text = re.split(r"\n\s*#[^#\s]{1,30}#\s*:", text)[0]  # a new dialogue turn: the summary ended before it
    text = re.sub(r"^\s*#[^#\s]{1,30}#\s*:\s*", "", text)  # a turn marker copied in front
    text = re.sub(r"\s#[^#\s]{0,30}$", "", text)  # an unclosed tag at the end (generation ran out of tokens)
    return " ".join(text.split())


def structural_tokens(tokenizer: Any, keep: list[str]) -> list[str]:
    """The tokenizer's special tokens other than the registered ones (`keep`)."""
    return [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t not in set(keep)]
