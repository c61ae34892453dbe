"""mcqa's pieces on tiny random Qwen2-VL and LLaVA-style models: the answer mask, constrained scoring, permutation
TTA, choice shuffling, letter label smoothing, parts and learning-rate groups."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from vlm_fixtures import write_questions

from tunelab.config import RunConfig
from tunelab.evaluate.choices import LETTERS, cyclic_orders, letter_probabilities, smoothed_letter_targets, to_original
from tunelab.models import vlm
from tunelab.tasks import mcqa
from tunelab.tasks.mcqa_data import QuestionDataset, answer_tokens, collate, read_questions
from tunelab.train.optim import create_optimizer


def setup(model_dir: Path, folder: Path, n: int = 8, **method: object) -> tuple:
    """(config, processor, answer tokens, model with parts applied, questions)."""
    config = RunConfig(task="mcqa", model={"name": str(model_dir)}, method={"r": 4, "alpha": 8, **method})
    processor = vlm.load_processor(config.model)
    model = vlm.load_vlm(config.model, config.method.kind, torch.device("cpu"))
    model, _ = vlm.apply_parts(model, config.method, False)
    questions = read_questions(str(write_questions(folder, n)), config, True, "train")
    return config, processor, answer_tokens(processor), model, questions


def test_answer_mask_covers_exactly_the_answer_tokens(vlm_dir: Path, tmp_path: Path) -> None:
    config, processor, answers, model, questions = setup(vlm_dir, tmp_path)
    tokenizer = processor.tokenizer
    dataset = QuestionDataset(questions, processor, answers, config, with_answer=True)
    prompt_only = QuestionDataset(questions, processor, answers, config, with_answer=False)
    for index in range(3):
        full, prompt = dataset[index]["input_ids"][0].tolist(), prompt_only[index]["input_ids"][0].tolist()
        target = full[len(prompt) :]
        assert full[: len(prompt)] == prompt  # the prompt is untouched, the targets follow it
        assert tokenizer.decode(target) == LETTERS[questions[index].answer] + tokenizer.eos_token
        assert len(target) == answers.length == 2  # the letter and the end-of-turn token, nothing else
    # the loss reads exactly those positions: changing any prompt token's label cannot change it, changing the
    # answer letter does
    batch = collate([dataset[i] for i in range(4)], tokenizer.pad_token_id)
    loss = mcqa.loss_sum(model, batch, answers, 0.0)
    logits = model(**{k: v for k, v in batch.items() if k not in ("answer", "n_choices", "row")}).logits.float()
    targets = batch["input_ids"][:, -2:]
    manual = torch.nn.functional.cross_entropy(logits[:, -3:-1].flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(loss, manual, rtol=1e-4, atol=1e-4)


def test_constrained_scoring_is_the_argmax_of_the_letters(vlm_dir: Path, tmp_path: Path) -> None:
    config, processor, answers, model, questions = setup(vlm_dir, tmp_path)
    model.eval()
    dataset = QuestionDataset(questions, processor, answers, config, with_answer=False)
    probabilities, _ = mcqa.score(model, dataset, answers, 3, processor.tokenizer.pad_token_id)
    for index in range(len(questions)):
        item = collate([dataset[index]], processor.tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(**{k: v for k, v in item.items() if k not in ("answer", "n_choices", "row")}).logits[0, -1]
        letter_logits = logits[answers.letter_ids[:4]]
        assert int(probabilities[index].argmax()) == int(letter_logits.argmax())
        expected = torch.softmax(letter_logits.float(), 0)
        torch.testing.assert_close(probabilities[index, :4], expected, rtol=1e-4, atol=1e-5)
        assert float(probabilities[index, 4:].sum()) == 0.0  # letters beyond the row's choices get nothing


def test_letter_probabilities_restricted_per_row() -> None:
    logits = torch.randn(3, 50)
    letter_ids = torch.arange(10, 18)
    n_choices = torch.tensor([2, 4, 8])
    probabilities = letter_probabilities(logits, letter_ids, n_choices)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(3))
    for row, n in enumerate(n_choices.tolist()):
        assert int(probabilities[row].argmax()) == int(logits[row, 10 : 10 + n].argmax())
        assert float(probabilities[row, n:].sum()) == 0.0


def test_permutation_tta_maps_back_to_the_original_choices(vlm_dir: Path, tmp_path: Path) -> None:
    orders = cyclic_orders(4)
    assert orders == [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]]
    shown = torch.tensor([0.1, 0.2, 0.3, 0.4])  # position 0 shows original choice 1 under the second order
    torch.testing.assert_close(to_original(shown, orders[1]), torch.tensor([0.4, 0.1, 0.2, 0.3]))
    # on a model: the TTA average equals the mean of the single-order scores mapped back by hand
    config, processor, answers, model, questions = setup(vlm_dir, tmp_path, n=5)
    model.eval()
    scorer = mcqa.Scorer(processor, answers, config)
    averaged = scorer.probabilities(model, questions, permute=True)
    by_hand = torch.zeros(len(questions), 8)
    for order in orders:
        dataset = scorer.dataset(questions, with_answer=False)
        dataset.orders = [order] * len(questions)
        shown_probs, _ = mcqa.score(model, dataset, answers, 2, processor.tokenizer.pad_token_id)
        for i in range(len(questions)):
            by_hand[i, order] += shown_probs[i, :4]
    torch.testing.assert_close(averaged, by_hand / 4, rtol=1e-4, atol=1e-5)
    # the shown texts really are rotated: the first choice shown under order 1 is the original second choice
    dataset = scorer.dataset(questions, with_answer=False)
    dataset.orders = [orders[1]] * len(questions)
    text = processor.tokenizer.decode(dataset[0]["input_ids"][0])
    assert f"(a) {questions[0].choices[1]}" in text


def test_shuffled_training_examples_carry_the_remapped_answer(vlm_dir: Path, tmp_path: Path) -> None:
    config, processor, answers, _, questions = setup(vlm_dir, tmp_path, n=12)
    dataset = QuestionDataset(questions, processor, answers, config, with_answer=True, shuffle=True)
    moved = 0
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index, question in enumerate(questions):
            item = dataset[index]
            text = processor.tokenizer.decode(item["input_ids"][0])
            letter = LETTERS[int(item["answer"])]
            correct = question.choices[question.answer]
            assert re.search(rf"\({letter}\) {correct}(\n|<)", text)  # the answer letter names the right choice
            assert text.rstrip().endswith(letter + processor.tokenizer.eos_token)  # and is the target token
            moved += letter != LETTERS[question.answer]
    assert moved > 0
    # the same (seed, epoch, row) gives the same order: a resumed run sees what the first one would have
    dataset.set_epoch(1)
    first = dataset[3]["input_ids"]
    dataset.set_epoch(2)
    dataset.set_epoch(1)
    assert torch.equal(dataset[3]["input_ids"], first)


def test_label_smoothing_spreads_over_the_choice_letters_only() -> None:
    targets = smoothed_letter_targets(torch.tensor([1, 0]), torch.tensor([4, 2]), 0.2)
    torch.testing.assert_close(targets[0, :4], torch.tensor([0.05, 0.85, 0.05, 0.05]))
    torch.testing.assert_close(targets[1, :2], torch.tensor([0.9, 0.1]))
    assert float(targets[0, 4:].sum()) == 0.0 and float(targets[1, 2:].sum()) == 0.0


def test_parts_and_learning_rate_groups(vlm_dir: Path, tmp_path: Path) -> None:
    config, _, _, model, _ = setup(
        vlm_dir, tmp_path, train_parts={"vision": True, "projector": True, "vision_lr": 0.1, "projector_lr": 2.0}
    )
    trained = {vlm.part_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"vision", "projector", "language"}
    language = [n for n, p in model.named_parameters() if p.requires_grad and vlm.part_of(n) == "language"]
    assert language and all("lora_" in n for n in language)  # the language model trains through LoRA only
    optimizer = create_optimizer(model, config.train.model_copy(update={"lr": 1e-3}))
    rates = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            rates.setdefault(vlm.part_of(names[id(parameter)]), set()).add(round(group["lr"], 8))
    assert rates == {"vision": {1e-4}, "projector": {2e-3}, "language": {1e-3}}
    rows = {row["part"]: row for row in vlm.parameter_groups_table(model, config.method.train_parts, 1e-3)}
    assert rows["vision"]["trainable"] > 0 and rows["projector"]["lr"] == pytest.approx(2e-3)


def test_frozen_vision_by_default(vlm_dir: Path, tmp_path: Path) -> None:
    _, _, _, model, _ = setup(vlm_dir, tmp_path)
    assert not any(p.requires_grad for n, p in model.named_parameters() if vlm.part_of(n) == "vision")
    assert any(p.requires_grad for n, p in model.named_parameters() if vlm.part_of(n) == "projector")


def test_checkpointing_backpropagates_through_the_language_model_only(vlm_dir: Path, tmp_path: Path) -> None:
    """With gradient checkpointing the text embeddings' output must carry grad (checkpointed blocks need it), but a
    frozen vision encoder must not: transformers' enable_input_require_grads hooks its patch embedding too, and its
    whole backward pass then ran for nothing."""
    config = RunConfig(task="mcqa", model={"name": str(vlm_dir)}, method={"r": 4, "alpha": 8})
    processor = vlm.load_processor(config.model)
    model = vlm.load_vlm(config.model, config.method.kind, torch.device("cpu"))
    model, _ = vlm.apply_parts(model, config.method, True)
    questions = read_questions(str(write_questions(tmp_path, 2)), config, True, "train")
    dataset = QuestionDataset(questions, processor, answer_tokens(processor), config, with_answer=True)
    outputs: dict[str, list[bool]] = {"vision": [], "language": []}
    hooks = []
    for name, module in model.named_modules():
        part = vlm.part_of(name) if name else "language"
        if part in outputs and not list(module.children()):  # leaf modules
            hooks.append(
                module.register_forward_hook(
                    lambda _m, _i, out, part=part: outputs[part].append(
                        isinstance(out, torch.Tensor) and out.requires_grad
                    )
                )
            )
    model.train()
    mcqa.loss_sum(model, collate([dataset[0], dataset[1]], processor.tokenizer.pad_token_id), dataset.answers, 0.0)
    for hook in hooks:
        hook.remove()
    assert outputs["vision"] and not any(outputs["vision"])
    assert any(outputs["language"])


def test_image_size_sets_min_and_max_pixels(vlm_dirs: dict[str, Path]) -> None:
    config = RunConfig(task="mcqa", model={"name": str(vlm_dirs["qwen2_vl"]), "image_size": 112})
    processor = vlm.load_processor(config.model)
    grid = processor(text=["<|image_pad|>"], images=[torch.zeros(3, 300, 300)], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 6, 6]]  # smart_resize: the largest multiple of 28 px within 112 x 112 pixels: 84


def test_system_prompt_default_custom_and_none(vlm_dirs: dict[str, Path], tmp_path: Path) -> None:
    from tunelab.tasks.mcqa_data import DEFAULT_SYSTEM_PROMPT, messages

    config, processor, _, _, questions = setup(vlm_dirs["llava"], tmp_path, n=2)
    render = lambda prompt: processor.apply_chat_template(  # noqa: E731
        messages(questions[0], [0, 1, 2, 3], prompt), add_generation_prompt=True, tokenize=False
    )
    assert DEFAULT_SYSTEM_PROMPT in render(None)
    assert "Pick one." in render("Pick one.")
    assert "system" not in render("")  # no system message at all: the shortest prompt


def test_quantization_skips_the_vision_encoder_and_projector_by_transformers_rule(vlm_dir: Path) -> None:
    # transformers decides what bitsandbytes quantizes with should_convert_module: the skip list must name the
    # roots as it matches them (bare 'visual' matched nothing, so QLoRA quantized the vision tower)
    from transformers import AutoModelForImageTextToText
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = RunConfig(task="mcqa", model={"name": str(vlm_dir)})
    skip = [*vlm._unquantized_roots(str(vlm_dir), config.model), "lm_head"]
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir)
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    converted = {name: should_convert_module(name, skip) for name in linears}
    assert all(converted[n] == (vlm.part_of(n) == "language" and not n.endswith("lm_head")) for n in linears), converted
    assert any(converted.values()) and not all(converted.values())


def test_rope_positions_computed_on_the_cpu_equal_the_models_own(vlm_dir: Path, tmp_path: Path) -> None:
    config, processor, answers, model, questions = setup(vlm_dir, tmp_path)
    model.eval()
    # rows of different lengths, left-padded: the padding must get the positions the model gives it
    questions[1] = dataclasses.replace(questions[1], question=questions[1].question + " in the picture, please")
    dataset = QuestionDataset(questions, processor, answers, config, with_answer=True)
    items = [dataset[i] for i in range(4)]
    batch = collate(items, processor.tokenizer.pad_token_id)
    assert len({int(m.sum()) for m in batch["attention_mask"]}) > 1, "the rows should differ in length"
    positions = vlm.rope_positions(model, batch)
    inputs = {k: v for k, v in batch.items() if k not in ("answer", "n_choices", "row")}
    with torch.no_grad():
        expected = model(**inputs).logits
        if "qwen" not in vlm_dir.name:
            assert positions is None  # LLaVA-style models have plain 1-D positions
            return
        assert positions.shape == (3, *batch["input_ids"].shape)
        actual = model(**inputs, position_ids=positions).logits
        # the reference the model computes itself, for the positions and for the output
        owner = next(m for m in model.modules() if hasattr(m, "get_rope_index"))
        own, _ = owner.get_rope_index(
            batch["input_ids"],
            batch["mm_token_type_ids"],
            batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
    assert torch.equal(positions, own)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    # a batch that lacks the image grid gets none (the model would not build 3-D positions either)
    assert vlm.rope_positions(model, {k: v for k, v in batch.items() if k != "image_grid_thw"}) is None


def test_half_autocast_follows_the_frozen_floating_weights() -> None:
    model = torch.nn.Module()
    # a 4-bit layer's storage comes first (uint8, frozen), then the frozen bf16 weights, then a trained fp32 adapter
    model.packed = torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False)
    model.frozen = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16), requires_grad=False)
    model.adapter = torch.nn.Parameter(torch.zeros(4))
    context = mcqa.half_autocast(model, torch.device("cpu"))
    assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16
    model.frozen.data = model.frozen.data.float()  # fp32 frozen weights: no autocast at all
    assert not isinstance(mcqa.half_autocast(model, torch.device("cpu")), torch.autocast)


def test_scoring_in_chunks_from_workers_equals_scoring_one_by_one(vlm_dir: Path, tmp_path: Path) -> None:
    config, processor, answers, model, questions = setup(vlm_dir, tmp_path, n=10)
    model.eval()
    pad_id = processor.tokenizer.pad_token_id
    order = list(reversed(range(len(questions))))
    alone = QuestionDataset(questions, processor, answers, config, with_answer=True)
    expected, expected_loss = mcqa.score(model, alone, answers, 1, pad_id, order)
    # two workers handing over chunks of 2 (batch 6 = 3 chunks; the last batch is 4 rows = 2 chunks)
    with_workers = config.model_copy(update={"data": config.data.model_copy(update={"num_workers": 2})})
    chunked = QuestionDataset(questions, processor, answers, with_workers, with_answer=True)
    actual, actual_loss = mcqa.score(model, chunked, answers, 6, pad_id, order)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert abs(actual_loss - expected_loss) < 1e-3 * abs(expected_loss)


def test_the_image_changes_the_answer_logits(vlm_dir: Path, tmp_path: Path) -> None:
    """Both tiny families really read the image: the same question over two different images scores differently
    (a tower whose features vanish would make every image-dependent test vacuous)."""
    config, processor, answers, model, questions = setup(vlm_dir, tmp_path)
    model.eval()
    other = next(q for q in questions[1:] if q.image != questions[0].image)
    swapped = [questions[0], dataclasses.replace(questions[0], image=other.image)]
    dataset = QuestionDataset(swapped, processor, answers, config, with_answer=False)
    batch = collate([dataset[0], dataset[1]], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k not in ("answer", "n_choices", "row")}).logits[:, -1]
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])  # the text is the same
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_scoring_lets_lora_inputs_through_uncast_with_the_same_numbers(
    vlm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contextlib import nullcontext

    from peft.tuners.lora import LoraLayer

    config, processor, answers, _, questions = setup(vlm_dir, tmp_path)
    config = config.model_copy(update={"model": config.model.model_copy(update={"dtype": "bf16"})})
    model = vlm.load_vlm(config.model, "lora", torch.device("cpu"))
    model, _ = vlm.apply_parts(model, config.method, False)  # bf16 frozen weights, fp32 adapters
    model.eval()
    lora = next(m for m in model.modules() if isinstance(m, LoraLayer))
    seen: list[bool] = []
    lora.register_forward_pre_hook(lambda module, args: seen.append(module.cast_input_dtype_enabled))
    dataset = QuestionDataset(questions, processor, answers, config, with_answer=True)
    pad_id = processor.tokenizer.pad_token_id
    uncast, uncast_loss = mcqa.score(model, dataset, answers, 4, pad_id)
    assert seen and not any(seen) and lora.cast_input_dtype_enabled  # off while scoring, back on after
    monkeypatch.setattr(mcqa, "lora_inputs_uncast", lambda model, active: nullcontext())
    seen.clear()
    cast, cast_loss = mcqa.score(model, dataset, answers, 4, pad_id)
    assert seen and all(seen)
    assert torch.equal(uncast, cast) and uncast_loss == cast_loss  # bf16 -> fp32 -> bf16 is exact


def test_merge_lora_for_scoring_follows_the_setting_and_never_merges_qlora() -> None:
    def config(kind: str, merge: object) -> RunConfig:
        return RunConfig(task="mcqa", method={"kind": kind}, eval={"merge_lora": merge})

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert mcqa.merge_for_scoring(config("lora", "auto"), cuda)
    assert not mcqa.merge_for_scoring(config("lora", "auto"), cpu)  # the CPU scores as validation did
    assert not mcqa.merge_for_scoring(config("qlora", "auto"), cuda)  # a 4-bit base cannot take the adapter
    assert not mcqa.merge_for_scoring(config("qlora", True), cuda)
    assert mcqa.merge_for_scoring(config("lora", True), cpu)
    assert not mcqa.merge_for_scoring(config("lora", False), cuda)
    assert not mcqa.merge_for_scoring(config("full", "auto"), cuda)
