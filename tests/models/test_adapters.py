"""Method invariants (the peft test suite's, on our wiring): B = 0 gives the base output, merged equals unmerged,
only adapter parameters get gradients, save / load round trip; every method kind trains a step."""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures import make_tiny_llama, make_tokenizer
from peft import PeftModel

from tunelab.config import MethodConfig
from tunelab.data import text as textdata
from tunelab.models.adapters import apply_method, trainable_summary
from tunelab.tasks import sft


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer("chatml")


@pytest.fixture
def base(tokenizer):
    return make_tiny_llama(tokenizer, seed=1).eval()


@pytest.fixture
def batch(tokenizer):
    conversations = [
        {
            "messages": [
                {"role": "user", "content": f"count to {i}"},
                {"role": "assistant", "content": " ".join(str(k) for k in range(i))},
            ]
        }
        for i in range(2, 6)
    ]
    examples, _ = sft.tokenize_conversations(conversations, tokenizer, "chat", 128)
    return textdata.collate(examples, tokenizer.pad_token_id)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**textdata.model_inputs(batch), use_cache=False).logits


def lora(base, kind="lora"):
    return apply_method(copy.deepcopy(base), MethodConfig(kind=kind, r=4, alpha=8, dropout=0.0), False).eval()


def randomize_b(model) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)


def test_b_zero_gives_base_output(base, batch) -> None:
    model = lora(base)
    assert torch.equal(logits(model, batch), logits(base, batch))  # peft initialises B = 0
    randomize_b(model)
    assert not torch.allclose(logits(model, batch), logits(base, batch))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
    assert torch.allclose(logits(model, batch), logits(base, batch), atol=1e-6)


def test_disabled_adapter_gives_base(base, batch) -> None:
    model = lora(base)
    randomize_b(model)
    with model.disable_adapter():
        assert torch.allclose(logits(model, batch), logits(base, batch), atol=1e-6)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_equals_unmerged(base, batch, kind) -> None:
    model = lora(base, kind)
    randomize_b(model)
    unmerged = logits(model, batch)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert torch.allclose(logits(merged, batch), unmerged, atol=1e-5)


def test_all_linear_targets_every_projection_but_the_head(base) -> None:
    model = lora(base)
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head.lora" in name for name, _ in model.named_parameters())


def test_only_adapter_parameters_get_gradients(base, batch) -> None:
    model = lora(base).train()
    sft.lm_loss_sum(model, batch).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name for name in with_grad)
    assert with_grad == {name for name, p in model.named_parameters() if p.requires_grad}


def test_save_load_round_trip(base, batch, tmp_path) -> None:
    model = lora(base)
    randomize_b(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(logits(loaded, batch), logits(model, batch))


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "prefix", "prompt", "full", "freeze"])
def test_every_method_trains_only_its_parameters(base, batch, kind) -> None:
    method = MethodConfig(kind=kind, r=4, alpha=8, dropout=0.0, num_virtual_tokens=4, freeze_keep_last=1)
    model = apply_method(copy.deepcopy(base), method, gradient_checkpointing=kind == "lora").train()
    trainable, total = trainable_summary(model)
    assert 0 < trainable <= total
    if kind not in ("full",):
        assert trainable < total
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = sft.lm_loss_sum(model, batch) / textdata.count_targets(batch["labels"])
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n], before[n]) for n in before)
    assert all(torch.equal(params[n], frozen[n]) for n in frozen)


def test_freeze_trains_last_blocks_and_head(base) -> None:
    model = apply_method(copy.deepcopy(base), MethodConfig(kind="freeze", freeze_keep_last=1), False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.layers.1.") for n in trainable)
    assert not any(n.startswith("model.layers.0.") for n in trainable)
    assert "lm_head.weight" in trainable and "model.norm.weight" in trainable
