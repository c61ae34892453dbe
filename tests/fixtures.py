"""Tiny offline tokenizers, models and datasets for tests.

Nothing here touches the network: each tokenizer is a small byte-level BPE trained in-process on a built-in
English + Korean sample, carrying the real special tokens and the real Jinja chat template of its model family.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

FAMILIES: tuple[str, ...] = ("llama3", "chatml", "gemma")
"""The main families; ``gemma2`` is extra: the Gemma-2 template, which raises on a system message."""
ALL_FAMILIES: tuple[str, ...] = (*FAMILIES, "gemma2")
VOCAB_SIZE = 640

# Meta-Llama-3-8B-Instruct.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5-Instruct, verbatim including the tools branches.
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501
# Gemma-3-it (text part): a system message is folded into the first user turn.
GEMMA3_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
# Gemma-2-it: raises on a system message.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


class _Spec(NamedTuple):
    """How one family's tokenizer is built."""

    tokens: dict[str, str]  # the named bos/eos/pad/unk tokens
    template: str  # the Jinja chat template
    first: tuple[str, ...] = ()  # special tokens placed at ids 0.. (as in Gemma)
    last: tuple[str, ...] = ()  # special tokens appended after the BPE vocabulary (as in Llama-3 and Qwen)
    plain: tuple[str, ...] = ()  # added tokens that are not special (as Qwen2.5's <tool_call>)


_LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_LLAMA3_SPECIALS += ("<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>")
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")
_GEMMA_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
_SPECS: dict[str, _Spec] = {
    "llama3": _Spec(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, LLAMA3_TEMPLATE, last=_LLAMA3_SPECIALS
    ),
    "chatml": _Spec(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        QWEN25_TEMPLATE,
        last=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        plain=("<tool_call>", "</tool_call>"),
    ),
    "gemma": _Spec(_GEMMA_TOKENS, GEMMA3_TEMPLATE, first=_GEMMA_SPECIALS),
    "gemma2": _Spec(_GEMMA_TOKENS, GEMMA2_TEMPLATE, first=_GEMMA_SPECIALS),
}

SAMPLE_TEXT = """\
The quick brown fox jumps over the lazy dog. The sky is blue and the grass is green.
What color is the banana? The banana is yellow. What color is the snow? The snow is white.
Reverse these words. Write this in capital letters. Translate the number to Korean.
You are a helpful assistant. You are a concise assistant. Answer with one short sentence.
system user assistant model tool Hello! How are you today? I am fine, thank you.
one two three four five six seven eight nine ten red blue green yellow white black orange
apple banana grape cherry lemon melon river mountain ocean forest city train book music
Fine-tuning a small language model needs data, a tokenizer, a chat template and patience.
안녕하세요. 오늘 날씨가 좋네요. 하늘은 파란색입니다. 풀은 초록색입니다. 눈은 하얀색입니다.
다음 단어들의 순서를 거꾸로 하세요. 사과 바나나 포도 체리 레몬 수박 강 산 바다 숲 도시 기차 책 음악
하나 둘 셋 넷 다섯 여섯 일곱 여덟 아홉 열. 당신은 친절한 도우미입니다. 짧게 대답하세요.
한국어와 영어를 함께 배우는 작은 모델입니다. 감사합니다! 무슨 색인가요? 질문에 답하세요.
"""

_CACHE: dict[str, str] = {}


def _train_backend(family: str) -> Tokenizer:
    """Train the byte-level BPE for ``family`` and add its special tokens (uncached)."""
    spec = _SPECS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in spec.first],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.last])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.plain])
    byte_level = processors.ByteLevel(trim_offsets=False)
    bos = spec.tokens.get("bos_token")
    if bos:  # Llama-3 and Gemma prepend their BOS through the tokenizer.json post-processor; Qwen adds nothing
        template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    return tok


def make_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """Return a fresh tiny fast tokenizer for ``family`` ("llama3", "chatml", "gemma" or "gemma2").

    Training is cached per family; every call returns a new, independent object, so tests may mutate it.
    llama3 and gemma prepend their BOS when ``add_special_tokens=True``; chatml adds nothing. llama3 has no pad token.
    """
    if family not in _SPECS:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {ALL_FAMILIES}")
    if family not in _CACHE:
        _CACHE[family] = _train_backend(family).to_str()
    spec = _SPECS[family]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_CACHE[family]),
        chat_template=spec.template,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
        **spec.tokens,
    )
    others = [t for t in (*spec.first, *spec.last) if t not in spec.tokens.values()]
    tokenizer.add_special_tokens({"additional_special_tokens": others})
    return tokenizer


def make_tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """Return a randomly initialised 2-layer fp32 Llama sized to ``tokenizer`` (train mode left as created)."""
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    return model


def save_tiny_model_dir(path: str | Path, family: str = "chatml", seed: int = 0) -> Path:
    """Write a tokenizer + tiny Llama (safetensors) to ``path``, loadable by the ``Auto*.from_pretrained`` classes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(family)
    tokenizer.save_pretrained(path)
    make_tiny_llama(tokenizer, seed=seed).save_pretrained(path, safe_serialization=True)
    return path


_COLORS = {"sky": "blue", "grass": "green", "banana": "yellow", "snow": "white", "coal": "black", "tomato": "red"}
_COLORS_KO = {"하늘은": "파란색", "풀은": "초록색", "바나나는": "노란색"}
_COLORS_KO |= {"눈은": "하얀색", "석탄은": "검은색", "토마토는": "빨간색"}
_WORDS = ["apple", "river", "music", "train", "book", "lemon", "ocean", "city", "forest", "grape"]
_WORDS_KO = ["사과", "강", "음악", "기차", "책", "레몬", "바다", "도시", "숲", "포도"]
_NUMBERS_KO = {"one": "하나", "two": "둘", "three": "셋", "four": "넷", "five": "다섯", "six": "여섯"}


def _example(rng: random.Random) -> tuple[str, str, str]:
    """One learnable (instruction, input, output) triple; a fixed answer per question, or a simple rule."""
    kind = rng.randrange(6)
    if kind == 0:
        thing = rng.choice(sorted(_COLORS))
        return f"What color is the {thing}?", "", f"The {thing} is {_COLORS[thing]}."
    if kind == 1:
        thing = rng.choice(sorted(_COLORS_KO))
        return f"{thing} 무슨 색인가요?", "", f"{thing} {_COLORS_KO[thing]}입니다."
    if kind == 2:
        words = rng.sample(_WORDS, 3)
        return "Reverse these words.", " ".join(words), " ".join(reversed(words))
    if kind == 3:
        words = rng.sample(_WORDS_KO, 3)
        return "다음 단어들의 순서를 거꾸로 하세요.", " ".join(words), " ".join(reversed(words))
    if kind == 4:
        words = rng.sample(_WORDS, 2)
        return "Write this in capital letters.", " ".join(words), " ".join(words).upper()
    number = rng.choice(sorted(_NUMBERS_KO))
    return "Translate the number to Korean.", number, _NUMBERS_KO[number]


def write_alpaca_data(path: str | Path, n: int = 64, seed: int = 0) -> Path:
    """Write ``n`` deterministic rows to a UTF-8 CSV with columns instruction,input,output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "input", "output"])
        for _ in range(n):
            writer.writerow(_example(rng))
    return path


def _user_text(instruction: str, text: str) -> str:
    return f"{instruction}\n{text}" if text else instruction


def write_chat_data(path: str | Path, n: int = 64, seed: int = 0) -> Path:
    """Write ``n`` deterministic conversations to JSONL, one ``{"messages": [...]}`` per line.

    Half start with a system message, a third have two user/assistant exchanges (so a sixth are multi-turn with a
    system message); roles always alternate user/assistant after the optional leading system message, which every
    family's template accepts (except gemma2, which rejects any system message).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    systems = ["You are a concise assistant.", "당신은 친절한 도우미입니다."]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            messages: list[dict[str, str]] = []
            if i % 2 == 1:
                messages.append({"role": "system", "content": systems[i // 2 % 2]})
            for _ in range(2 if i % 3 == 2 else 1):
                instruction, text, answer = _example(rng)
                messages.append({"role": "user", "content": _user_text(instruction, text)})
                messages.append({"role": "assistant", "content": answer})
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path
