"""summarize on a tiny random BART and a tiny random Llama: seq2seq labels and decoder inputs / masks, decoder-model
assistant masks and truncation, the truncation report against a direct count, generation of new tokens only,
speaker tags as trained special tokens, output cleaning."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from fixtures import make_tiny_llama, make_tokenizer
from tiny import make_bart_tokenizer, make_tiny_bart

from tunelab.config import RunConfig
from tunelab.data.demo_dialogues import make_dialogues
from tunelab.data.templates import resolve_template
from tunelab.evaluate.generate import generate_texts
from tunelab.tasks import summarize
from tunelab.tasks import summarize_data as sd

TAGS = ["#Person1#", "#Person2#", "#Person3#"]


def config(**data: object) -> RunConfig:
    return RunConfig.model_validate({"task": "summarize", "data": {"special_tokens": TAGS, **data}})


def rows(n: int = 8, seed: int = 1) -> list[dict]:
    return [{"id": r["id"], "dialogue": r["dialogue"], "summaries": [r["summary"]]} for r in make_dialogues(n, seed)]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))


def test_seq2seq_labels_decoder_inputs_and_masks() -> None:
    tokenizer, cfg = make_bart_tokenizer(), config(max_length=512, max_target_length=128)
    summarize.register_special_tokens(tokenizer, TAGS)
    model = make_tiny_bart(tokenizer).eval()
    items = rows(4)
    examples = [sd.seq2seq_example(r, tokenizer, cfg) for r in items]
    for row, example in zip(items, examples, strict=True):
        expected = tokenizer(text_target=row["summaries"][0])["input_ids"]
        assert example["labels"] == expected and expected[0] == tokenizer.bos_token_id
        assert expected[-1] == tokenizer.eos_token_id  # the model learns to stop
        assert example["input_ids"] == tokenizer(row["dialogue"])["input_ids"]
        assert tokenizer.convert_tokens_to_ids("#Person1#") in example["input_ids"]  # the tag is one token
    start = model.config.decoder_start_token_id
    batch = sd.collate_seq2seq(examples, tokenizer.pad_token_id, start)
    for i, example in enumerate(examples):
        n = len(example["labels"])
        assert batch["decoder_input_ids"][i, 0] == start
        assert batch["decoder_input_ids"][i, 1:n].tolist() == example["labels"][:-1]
        assert batch["decoder_attention_mask"][i].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
        assert batch["labels"][i, n:].eq(-100).all() and batch["labels"][i, :n].tolist() == example["labels"]
        assert batch["attention_mask"][i].sum() == len(example["input_ids"])
    # our summed loss equals BART's own mean loss (it shifts the labels itself) times the target count
    with torch.no_grad():
        ours = summarize.seq2seq_loss_sum(model, batch)
        labels = batch["labels"]
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    assert summarize.targets_in("seq2seq", batch) == int((labels != -100).sum())
    assert ours.item() == pytest.approx(theirs.item() * summarize.targets_in("seq2seq", batch), rel=1e-4)


def test_seq2seq_truncation_keeps_specials_and_the_end_of_the_dialogue() -> None:
    tokenizer = make_bart_tokenizer()
    dialogue = rows(1)[0]["dialogue"]
    full = tokenizer(dialogue)["input_ids"]
    cut, length = sd.encode_source(dialogue, tokenizer, 20)
    assert length == len(full) and len(cut) == 20
    assert cut[0] == tokenizer.bos_token_id and cut[-1] == tokenizer.eos_token_id and cut[1:-1] == full[-19:-1]
    cfg = config(max_target_length=10, long_targets="truncate")
    example = sd.seq2seq_example(rows(1)[0], tokenizer, cfg)
    assert len(example["labels"]) == 10 and example["labels"][-1] == tokenizer.eos_token_id
    assert sd.seq2seq_example(rows(1)[0], tokenizer, config(max_target_length=10))["input_ids"] is None


def test_decoder_mask_is_the_summary_and_truncation_keeps_instruction_and_header() -> None:
    tokenizer = make_tokenizer("chatml")
    summarize.register_special_tokens(tokenizer, TAGS)
    template = resolve_template("auto", tokenizer)
    row = rows(1)[0]
    example = sd.causal_example(row, "Summarize the following dialogue.", tokenizer, template, config())
    targets = [t for t in example["labels"] if t != -100]
    assert tokenizer.decode(targets) == row["summaries"][0] + "<|im_end|>"
    assert example["target_len"] == len(targets) and example["prompt_len"] + len(targets) <= len(example["input_ids"])
    prompt = tokenizer.decode(example["input_ids"][: example["prompt_len"]])
    assert prompt.endswith("<|im_start|>assistant\n") and "Summarize the following dialogue." in prompt
    # a prompt limit 40 tokens short: the oldest turns go, the instruction and the answer header stay
    short = config(max_length=example["prompt_len"] - 40)
    cut = sd.causal_example(row, "Summarize the following dialogue.", tokenizer, template, short)
    first_label = next(i for i, t in enumerate(cut["labels"]) if t != -100)
    assert first_label == short.data.max_length
    kept = tokenizer.decode(cut["input_ids"][:first_label])
    assert "Summarize the following dialogue." in kept and kept.endswith("<|im_start|>assistant\n")
    assert row["dialogue"].splitlines()[0] not in kept and row["dialogue"].splitlines()[-1] in kept
    assert [t for t in cut["labels"] if t != -100] == targets
    # the generation prompt is cut the same way and ends with the header
    ids, length = sd.causal_prompt(row, tokenizer, template, short)
    assert length == example["prompt_len"] and len(ids) == short.data.max_length
    assert tokenizer.decode(ids) == kept


def test_long_summaries_truncate_keeping_the_end_of_turn() -> None:
    tokenizer = make_tokenizer("chatml")
    template = resolve_template("auto", tokenizer)
    cfg = config(max_target_length=8, long_targets="truncate")
    example = sd.causal_example(rows(1)[0], "Summarize.", tokenizer, template, cfg)
    targets = [t for t in example["labels"] if t != -100]
    assert len(targets) == 8 and targets[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert example["target_len"] > 8


@pytest.mark.parametrize(("kind", "limit"), [("seq2seq", 100), ("causal", 260)])
def test_truncation_report_equals_a_direct_count(kind: str, limit: int) -> None:
    tokenizer = make_bart_tokenizer() if kind == "seq2seq" else make_tokenizer("chatml")
    summarize.register_special_tokens(tokenizer, TAGS)
    items = rows(24, seed=5)
    cfg = config(max_length=limit, max_target_length=40, long_targets="truncate")
    _, stats, _ = sd.build_split(items, tokenizer, kind, cfg, training=False)
    report = sd.truncation_report(stats["prompt_lengths"], stats["target_lengths"], cfg)
    if kind == "seq2seq":
        prompts = [len(tokenizer(r["dialogue"])["input_ids"]) for r in items]
        targets = [len(tokenizer(text_target=r["summaries"][0])["input_ids"]) for r in items]
    else:
        template = resolve_template("auto", tokenizer)
        rendered = [sd.causal_prompt(r, tokenizer, template, cfg)[1] for r in items]
        prompts = rendered  # the prompt through the answer header, before any cut
        targets = [
            len(tokenizer(r["summaries"][0] + "<|im_end|>", add_special_tokens=False)["input_ids"]) for r in items
        ]
    assert stats["prompt_lengths"] == prompts and stats["target_lengths"] == targets
    assert list(report["prompts_cut"]) == [str(limit), *(str(n) for n in sd.report_lengths(limit)[1:])]
    assert list(report["targets_over"]) == ["40", "64", "128"]
    for length, share in report["prompts_cut"].items():
        assert share == sum(p > int(length) for p in prompts) / len(items)
    for length, share in report["targets_over"].items():
        assert share == sum(t > int(length) for t in targets) / len(items)
    assert 0 < report["prompts_cut"][str(limit)] < 1  # the data really straddles the limit


def test_generation_returns_only_new_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = make_tokenizer("chatml")
    model = make_tiny_llama(tokenizer).eval()
    new = tokenizer("the sky is blue", add_special_tokens=False)["input_ids"]
    seen = {}

    def fake_generate(input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.update(kwargs, padded=input_ids)
        return torch.cat([input_ids, torch.tensor([new] * len(input_ids))], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    prompts = ["What color is the sky? 하늘", "Hello!"]
    out = generate_texts(model, tokenizer, prompts, add_special_tokens=False, max_new_tokens=4, batch_size=2,
                         num_beams=3, length_penalty=0.8, no_repeat_ngram_size=2)  # fmt: skip
    assert out == ["the sky is blue"] * 2
    assert seen["padded"][0, 0] == tokenizer.pad_token_id  # left padding: the shorter prompt is padded in front
    assert (seen["num_beams"], seen["length_penalty"], seen["no_repeat_ngram_size"]) == (3, 0.8, 2)
    # a real greedy run: nothing of the prompt comes back
    monkeypatch.undo()
    real = generate_texts(model, tokenizer, ["What color is the sky?"], add_special_tokens=False, max_new_tokens=5,
                          batch_size=1)  # fmt: skip
    ids = tokenizer("What color is the sky?", return_tensors="pt")["input_ids"]
    full = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert real[0] == tokenizer.decode(full[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_seq2seq_generation_decodes_the_decoder_output() -> None:
    tokenizer = make_bart_tokenizer()
    model = make_tiny_bart(tokenizer).eval()
    cfg = config(max_length=128)
    cfg.eval.max_new_tokens = 6
    out = summarize.generate_summaries(model, tokenizer, rows(3), "seq2seq", cfg)
    ids = torch.tensor([sd.encode_source(rows(3)[0]["dialogue"], tokenizer, 128)[0]])
    direct = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out[0] == sd.clean_summary(tokenizer.decode(direct[0]), sd.structural_tokens(tokenizer, TAGS))
    assert len(out) == 3 and all("<s>" not in text and "</s>" not in text for text in out)


def test_speaker_tags_are_trained_saved_and_reloaded(tmp_path: Path) -> None:
    tokenizer = make_tokenizer("chatml")
    before = len(tokenizer)
    pieces = tokenizer("#Person2#", add_special_tokens=False)["input_ids"]
    ids, new_rows = summarize.register_special_tokens(tokenizer, TAGS)
    assert ids == list(range(before, before + 3)) and new_rows[ids[1]] == pieces and len(pieces) > 1
    assert len(tokenizer("#Person2#:", add_special_tokens=False)["input_ids"]) == 2  # the tag is one token now
    base = make_tiny_llama(make_tokenizer("chatml"))
    summarize.resize_embeddings(base, len(tokenizer), new_rows)
    weight = base.get_input_embeddings().weight
    assert weight.shape[0] == before + 3 and torch.allclose(weight[ids[1]], weight[pieces].mean(0))
    reference = copy.deepcopy(base)
    cfg = config()
    from tunelab.models import adapters

    model = adapters.apply_method(base, cfg.method, False, ids)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trainable and all("trainable_tokens" in n for n in trainable)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1)  # a stand-in for training
    summarize.save_weights(model, tokenizer, tmp_path / "best")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "best" / "adapter_model.safetensors")
    assert sum(v.numel() for k, v in saved.items() if "trainable_tokens" in k) == 3 * weight.shape[1]
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(reference, tmp_path / "best").eval()
    x = torch.tensor([[5, ids[0], 9, ids[2], 7]])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=x).logits, reloaded(input_ids=x).logits)


def test_clean_summary_strips_special_tokens_and_tag_debris() -> None:
    remove = ["<|im_end|>", "<|endoftext|>", "</s>", "<pad>"]
    assert sd.clean_summary("#Person1# orders pizza.<|im_end|><|endoftext|>", remove) == "#Person1# orders pizza."
    assert sd.clean_summary("#Person1#: #Person2# will call.", remove) == "#Person2# will call."
    assert sd.clean_summary("They meet at 3 pm.\n#Person1#: Great!", remove) == "They meet at 3 pm."
    assert sd.clean_summary("They meet at 3 pm. #Pers", remove) == "They meet at 3 pm."
    assert (
        sd.clean_summary("<pad></s> #Person3# brings   the slides.</s><pad>", remove) == "#Person3# brings the slides."
    )


def test_instructions_are_sampled_per_example_with_a_seed() -> None:
    cfg = config(instructions=["A", "B", "C"])
    draws = [sd.instruction_for(cfg, i) for i in range(30)]
    assert set(draws) == {"A", "B", "C"} and draws == [sd.instruction_for(cfg, i) for i in range(30)]
    assert sd.instruction_for(cfg, None) == "A"
    cfg.train.seed = 7
    assert [sd.instruction_for(cfg, i) for i in range(30)] != draws
    assert sd.instruction_for(config(), 3) == sd.DEFAULT_INSTRUCTION


def test_several_references_from_columns_or_a_jsonl_list(tmp_path: Path) -> None:
    import json

    path = tmp_path / "multi.jsonl"
    lines = [{"id": "a", "dialogue": "#Person1#: Hi.", "summary": ["One greets.", "A greeting."]}]
    lines.append({"id": "b", "dialogue": "#Person1#: Bye.", "summary": "One leaves."})
    path.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    rows = sd.read_dialogues(str(path), config())
    assert rows[0]["summaries"] == ["One greets.", "A greeting."] and rows[1]["summaries"] == ["One leaves."]
    csv_path = tmp_path / "multi.csv"
    csv_path.write_text("id,dialogue,summary1,summary2\nx,hello there,a greeting,hello said\n", encoding="utf-8")
    cfg = config()
    cfg.data.columns.summary = ["summary1", "summary2"]
    assert sd.read_dialogues(str(csv_path), cfg)[0]["summaries"] == ["a greeting", "hello said"]
