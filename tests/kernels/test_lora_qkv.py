"""LoraQKV (kernels/lora_qkv.py) on the CPU: the three projections as one function equal the plain formula in fp32
(relative error < 1e-5) for the outputs and every gradient, and stay within bf16 rounding under bf16; a model
whose attention blocks are grouped trains like peft's (loss and gradients < 1e-5 in fp32), with the key and value
handed from the query call; calls the group cannot serve go through each layer's own forward."""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures import make_tiny_llama, make_tokenizer
from peft import LoraConfig, get_peft_model

from tunelab.kernels import lora_qkv
from tunelab.kernels.lora_projection import install_lora_projections
from tunelab.kernels.lora_qkv import LoraQKV, install_qkv_groups, lora_qkv_reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


class _Base(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


def _operands(hidden: int = 32, outs: tuple[int, ...] = (32, 8, 8), ranks: tuple[int, ...] = (4, 8, 6)):  # noqa: ANN202
    torch.manual_seed(0)
    weights = tuple(torch.randn(out, hidden) / hidden**0.5 for out in outs)
    adapters = []
    for out, rank in zip(outs, ranks, strict=True):
        adapters += [
            (torch.randn(rank, hidden) / hidden**0.5).requires_grad_(),
            (torch.randn(out, rank) / 3).requires_grad_(),
        ]
    x = torch.randn(3, 7, hidden, requires_grad=True)
    grads = [torch.randn(3, 7, out) for out in outs]
    return x, weights, adapters, grads


def _run(fn, leaves: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:  # noqa: ANN001
    for leaf in leaves:
        leaf.grad = None
    outputs = fn(*leaves)
    torch.autograd.backward(outputs, [g.to(o.dtype) for o, g in zip(outputs, grads, strict=True)])
    return [o.detach().float() for o in outputs] + [leaf.grad.float().clone() for leaf in leaves]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_function_equals_reference(dtype: torch.dtype, tolerance: float) -> None:
    x, weights, adapters, grads = _operands()
    scalings = (2.0, 0.5, 1.5)
    bases = tuple(_Base(w.to(dtype)) for w in weights)
    leaves = [x, *adapters]

    def fused(x, *ad):  # noqa: ANN001, ANN202
        return LoraQKV.apply(x.to(dtype), bases, scalings, *ad)

    def reference(x, *ad):  # noqa: ANN001, ANN202
        return lora_qkv_reference(x, weights, tuple(zip(ad[0::2], ad[1::2], strict=True)), scalings)

    got, want = _run(fused, leaves, grads), _run(reference, leaves, grads)
    assert len(got) == len(want) == 3 + 7
    for index, (mine, theirs) in enumerate(zip(got, want, strict=True)):
        assert mine.shape == theirs.shape, index
        assert rel_err(mine, theirs) < tolerance, (index, rel_err(mine, theirs))


def peft_llama(tokenizer, target="all-linear", bias=False):  # noqa: ANN001, ANN201
    base = make_tiny_llama(tokenizer, seed=0)
    if bias:  # Qwen2-style attention biases on q, k and v
        for layer in base.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                linear = getattr(layer.self_attn, name)
                linear.bias = torch.nn.Parameter(torch.randn(linear.out_features) / 10)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target))
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():  # non-zero B, so the low-rank path counts
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return model.train()


def _count_fused(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = LoraQKV.apply

    def counting(*args):  # noqa: ANN002, ANN202
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(LoraQKV, "apply", counting)
    return calls


def _loss_and_grads(model, ids):  # noqa: ANN001, ANN202
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_model_equals_peft(monkeypatch: pytest.MonkeyPatch, bias: bool) -> None:
    tokenizer = make_tokenizer("llama3")
    plain = peft_llama(tokenizer, bias=bias)  # bias: Qwen2's q / k / v biases (frozen, as peft leaves them)
    fast = copy.deepcopy(plain)
    install_lora_projections(fast)
    assert install_qkv_groups(fast) == 2  # both attention blocks
    assert install_qkv_groups(fast) == 0  # not grouped twice
    calls = _count_fused(monkeypatch)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    want_loss, want = _loss_and_grads(plain, ids)
    got_loss, got = _loss_and_grads(fast, ids)
    assert len(calls) == 2
    for layer in fast.get_base_model().model.layers:  # every key and value was taken by its call
        assert layer.self_attn.q_proj._tunelab_qkv_group.waiting is None
    assert rel_err(got_loss, want_loss) < 1e-5
    assert want.keys() == got.keys()
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name
    lora_qkv.FUSED_QKV_ENABLED["on"] = False
    try:
        off_loss, _ = _loss_and_grads(fast, ids)
    finally:
        lora_qkv.FUSED_QKV_ENABLED["on"] = True
    assert len(calls) == 2 and rel_err(off_loss, want_loss) < 1e-5


def test_calls_on_another_input_take_their_own_path() -> None:
    tokenizer = make_tokenizer("llama3")
    model = peft_llama(tokenizer)
    install_lora_projections(model)
    install_qkv_groups(model)
    attention = model.get_base_model().model.layers[0].self_attn
    x = torch.randn(2, 5, 64)
    query = attention.q_proj(x)
    other = x.clone()
    # k_proj on a different tensor (equal values): computed by its own forward, the waiting key stays
    torch.testing.assert_close(attention.k_proj(other), type(attention.k_proj).forward(attention.k_proj, other))
    assert set(attention.q_proj._tunelab_qkv_group.waiting[2]) == {"k_proj", "v_proj"}
    torch.testing.assert_close(query, type(attention.q_proj).forward(attention.q_proj, x))
    x.add_(1.0)  # an in-place write: the waiting value is no longer x's
    value = attention.v_proj(x)
    torch.testing.assert_close(value, type(attention.v_proj).forward(attention.v_proj, x))


@pytest.mark.parametrize("case", ["attention not all LoRA", "trained bias", "dropout"])
def test_blocks_it_cannot_serve_keep_the_per_projection_path(case: str) -> None:
    tokenizer = make_tokenizer("llama3")
    if case == "attention not all LoRA":
        model = peft_llama(tokenizer, target=["q_proj", "v_proj"])
        install_lora_projections(model)
        assert install_qkv_groups(model) == 0
        return
    model = peft_llama(tokenizer, bias=case == "trained bias")
    attention = model.get_base_model().model.layers[0].self_attn
    if case == "trained bias":  # peft's bias="all": the per-projection path trains it
        attention.k_proj.get_base_layer().bias.requires_grad_(True)
    if case == "dropout":
        attention.v_proj.lora_dropout["default"] = torch.nn.Dropout(0.1)
    install_lora_projections(model)
    assert install_qkv_groups(model) == 2
    layers = (attention.q_proj, attention.k_proj, attention.v_proj)
    x = torch.randn(2, 5, 64)
    assert lora_qkv.fused_lora_qkv(layers, x) is None
    model.eval()  # dropout off: every path computes the same function
    torch.testing.assert_close(attention.k_proj(x), type(attention.k_proj).forward(attention.k_proj, x))


def test_encoder_decoders_are_not_grouped() -> None:
    """BART's cross-attention reads the encoder's states for its key and value: grouping would compute them from
    the decoder's states for nothing, so encoder-decoders keep the per-projection path."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
    )  # fmt: skip
    model = get_peft_model(
        BartForConditionalGeneration(config), LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"])
    )
    install_lora_projections(model)
    assert install_qkv_groups(model) == 0


def test_a_copy_of_a_grouped_model_has_groups_of_its_own() -> None:
    """copy.deepcopy (EMA weights, tests) after grouping: the copy's group holds the copy's layers, and both models
    compute the same loss."""
    tokenizer = make_tokenizer("llama3")
    model = peft_llama(tokenizer)
    install_lora_projections(model)
    install_qkv_groups(model)
    twin = copy.deepcopy(model)
    attention = twin.get_base_model().model.layers[0].self_attn
    group = attention.q_proj._tunelab_qkv_group
    assert group.layers == (attention.q_proj, attention.k_proj, attention.v_proj)
    assert group.previous["k_proj"].__self__ is attention.k_proj
    ids = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float(twin(input_ids=ids, labels=ids).loss) == float(model(input_ids=ids, labels=ids).loss)
