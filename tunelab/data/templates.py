"""Rows to conversations, and conversations to prompt text with the character spans the loss is taken on.

Two row shapes: alpaca (instruction / input / output) and chat (`messages`: a list of {role, content}).
Two ways to render: the tokenizer's own chat template, or a named plain template for base models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tunelab.config import DataConfig
from tunelab.errors import UserError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
# ShareGPT-style files name roles differently; these are unambiguous synonyms, mapped silently.
ROLE_SYNONYMS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}

PLAIN_TEMPLATES = {
    # Stanford Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), turned multi-turn.
    "alpaca": {
        "system": "{content}\n\n",
        "user": "### Instruction:\n{content}\n\n",
        "header": "### Response:\n",
        "end": "\n\n",
    },
    "plain": {"system": "{content}\n", "user": "{content}\n", "header": "", "end": "\n"},
}


@dataclass
class Rendered:
    """A conversation as text, with what the loss covers and what truncation must keep.

    text: the full training text. assistant_spans: character spans of every assistant answer, end-of-turn
    token included. keep_head: characters [0, keep_head) (the system prompt) are never truncated.
    answer_start: characters [answer_start, end) (the final assistant header and answer) are never truncated.
    """

    text: str
    assistant_spans: list[tuple[int, int]]
    keep_head: int
    answer_start: int


# ----------------------------------------------------------------------------------------------- rows


def detect_format(rows: list[dict[str, Any]], data: DataConfig, path: str) -> str:
    """Pick alpaca or chat from the configured format or the columns present."""
    columns = rows[0].keys()
    if data.format == "chat" and data.columns.messages not in columns:
        raise UserError(
            f"Data file {path} has no column '{data.columns.messages}' (data.format is chat). Columns found: "
            f"{', '.join(columns)}. Set data.columns.messages to the column holding the messages, or "
            "data.format: auto."
        )
    if data.format != "auto":
        return data.format
    if data.columns.messages in columns:
        return "chat"
    if data.columns.instruction in columns or data.columns.output in columns:
        return "alpaca"
    raise UserError(
        f"Data file {path}: cannot tell the row shape. Columns found: {', '.join(columns)}. Expected "
        f"'{data.columns.messages}' (chat) or '{data.columns.instruction}' / '{data.columns.output}' "
        "(alpaca); map yours with data.columns.messages or data.columns.instruction / output."
    )


def row_to_messages(row: dict[str, Any], shape: str, data: DataConfig, where: str, need_answer: bool) -> list[Message]:
    """One data row as a message list, validated. `where` names file and row for error messages."""
    cols = data.columns
    if shape == "alpaca":
        instruction = _text(row.get(cols.instruction))
        extra = _text(row.get(cols.input))
        user = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
        if not user:
            raise UserError(f"{where}: empty '{cols.instruction}' and '{cols.input}'. Every row needs a prompt.")
        messages: list[Message] = []
        system = _text(row.get(cols.system)) or data.system_prompt
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": user})
        answer = _text(row.get(cols.output))
        if answer or need_answer:
            messages.append({"role": "assistant", "content": answer})
        return messages
    raw = row.get(cols.messages)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise UserError(f"{where}: column '{cols.messages}' is not a JSON list of messages.") from None
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where}: column '{cols.messages}' must be a non-empty list of {{role, content}} objects.")
    messages = [_message(item, where, index) for index, item in enumerate(raw)]
    if messages[0]["role"] != "system" and data.system_prompt:
        messages.insert(0, {"role": "system", "content": data.system_prompt})
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise UserError(
            f"{where}: the conversation has no assistant turn, so there is nothing to learn. Add the "
            "answer as a message with role 'assistant'."
        )
    return messages


def _message(item: Any, where: str, index: int) -> Message:
    number = index + 1  # people count messages from 1, as they count rows and lines
    if not isinstance(item, dict):
        raise UserError(f"{where}: message {number} is not an object with role and content.")
    raw_role = item.get("role", item.get("from"))
    role = str(raw_role if raw_role is not None else "").strip().lower()
    role = ROLE_SYNONYMS.get(role, role)
    if role not in ROLES:
        found = f"unknown role '{raw_role}'" if role else "no 'role'"
        raise UserError(
            f"{where}: message {number} has {found}. Allowed roles: {', '.join(ROLES)} (also read: "
            f"{', '.join(ROLE_SYNONYMS)}). Fix the role or remove the row."
        )
    if "content" not in item and "value" not in item:  # the text is under another key: say which keys there are
        raise UserError(
            f"{where}: message {number} has no 'content' (keys found: {', '.join(map(str, item))}). Put the "
            "message text under 'content'."
        )
    content = item.get("content", item.get("value"))
    if isinstance(content, list):  # OpenAI / HF multimodal shape: [{"type": "text", "text": ...}, ...]
        content = _text_parts(content, where, number)
    return {"role": role, "content": _text(content)}


def _text_parts(parts: list[Any], where: str, number: int) -> str:
    """The text of a content list, parts joined by newlines. Any other part (an image, audio) is an error: sft
    trains on text, and dropping the part silently would train on a question about a picture it never saw."""
    texts = []
    for part in parts:
        kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text", ""), str):
            raise UserError(
                f"{where}: message {number} has a content part of type '{kind}'; sft reads text only. Give "
                'the content as a string, or a list of {"type": "text", "text": ...} parts.'
            )
        texts.append(part.get("text", ""))
    return "\n".join(texts)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas
        return ""
    return str(value).strip()


def answer_is_empty(messages: list[Message]) -> bool:
    """True when the last assistant turn is empty (such rows are dropped and counted)."""
    answers = [m for m in messages if m["role"] == "assistant"]
    return not answers or not answers[-1]["content"]


# ----------------------------------------------------------------------------------------------- rendering


def resolve_template(template: str, tokenizer: Any) -> str:
    """'auto' becomes 'chat' when the tokenizer has a chat template, else 'alpaca'."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "data.template is 'chat' but the tokenizer has no chat template. Use a base-model template: "
            f"data.template: {' | '.join(PLAIN_TEMPLATES)}."
        )
    if template != "chat" and template not in PLAIN_TEMPLATES:
        raise UserError(
            f"data.template '{template}' is unknown. Use auto, chat, or one of: {', '.join(PLAIN_TEMPLATES)}."
        )
    return template


def render(messages: list[Message], template: str, tokenizer: Any) -> Rendered:
    """Render a conversation for training; messages after the last assistant turn are dropped."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]
    if template == "chat":
        return _render_chat(messages, tokenizer)
    return _render_plain(messages, PLAIN_TEMPLATES[template], tokenizer.eos_token or "")


def render_prompt(messages: list[Message], template: str, tokenizer: Any) -> str:
    """The text a model continues to answer: the conversation up to the final answer, header included."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if template == "chat":
        return _chat(tokenizer, messages, add_generation_prompt=True)
    parts = PLAIN_TEMPLATES[template]
    return "".join(_plain_turn(m, parts, "") for m in messages) + parts["header"]


def _chat(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja raises TemplateError (and others) for conversations a template refuses
        raise UserError(
            f"The tokenizer's chat template refused a conversation: {error}. Check the roles' order "
            "(some templates require user / assistant alternation or no system role)."
        ) from None


def _render_chat(messages: list[Message], tokenizer: Any) -> Rendered:
    text = _chat(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    answer_start = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat(tokenizer, messages[:index], add_generation_prompt=False) if index else ""
        with_header = _chat(tokenizer, messages[:index], add_generation_prompt=True) if index else ""
        through = _chat(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if text.startswith(through) and through.startswith(with_header) and with_header.startswith(before):
            start, end = len(with_header), len(through)
            answer_start = len(before)
        else:  # a template that renders earlier turns differently once more follow: find the answer text itself
            start = text.find(message["content"], cursor)
            if start < 0:
                raise UserError("The chat template drops or rewrites assistant answers; set data.template: alpaca.")
            end = start + len(message["content"])
            answer_start = text.rfind("\n", cursor, start) + 1 if "\n" in text[cursor:start] else cursor
        end = _include_end_of_turn(text, start, end, tokenizer)
        spans.append((start, end))
        cursor = end
    keep_head = _system_end(messages, text, tokenizer)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):  # never cut the template's own begin-of-text token
        keep_head = max(keep_head, len(bos))
    return Rendered(text=text, assistant_spans=spans, keep_head=min(keep_head, answer_start), answer_start=answer_start)


def _include_end_of_turn(text: str, start: int, end: int, tokenizer: Any) -> int:
    """Trim trailing whitespace after the end-of-turn token, and make sure that token is inside the span."""
    segment = text[start:end]
    trimmed = segment.rstrip()
    end = start + len(trimmed)
    for token in sorted(_special_strings(tokenizer), key=len, reverse=True):
        if trimmed.endswith(token):
            return end
    for token in sorted(_special_strings(tokenizer), key=len, reverse=True):
        if text.startswith(token, end):
            return end + len(token)
    return end


def _special_strings(tokenizer: Any) -> list[str]:
    return [t for t in getattr(tokenizer, "all_special_tokens", []) if t]


def _system_end(messages: list[Message], text: str, tokenizer: Any) -> int:
    if not messages or messages[0]["role"] != "system":
        return 0
    try:
        head = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=False)
    except Exception:  # templates that refuse a lone system message (e.g. Gemma) fall back to the content
        head = None
    if head and text.startswith(head) and messages[0]["content"] in head:  # Gemma folds it into the user turn
        return len(head)
    found = text.find(messages[0]["content"])
    return found + len(messages[0]["content"]) if found >= 0 else 0


def _plain_turn(message: Message, parts: dict[str, str], eos: str) -> str:
    if message["role"] == "assistant":
        return parts["header"] + message["content"] + eos + parts["end"]
    return parts[message["role"]].format(content=message["content"])


def _render_plain(messages: list[Message], parts: dict[str, str], eos: str) -> Rendered:
    text = ""
    spans: list[tuple[int, int]] = []
    keep_head = 0
    answer_start = 0
    for message in messages:
        if message["role"] == "assistant":
            answer_start = len(text)
            start = len(text) + len(parts["header"])
            text += _plain_turn(message, parts, eos)
            spans.append((start, start + len(message["content"]) + len(eos)))
        else:
            text += _plain_turn(message, parts, eos)
            if message["role"] == "system" and not keep_head:
                keep_head = len(text)
    return Rendered(
        text=text.rstrip("\n") if not eos else text[: spans[-1][1]],
        assistant_spans=spans,
        keep_head=keep_head,
        answer_start=answer_start,
    )
