"""Packed rows through variable-length flash attention (kernels/varlen_attention.py) on CUDA: the loss and the
gradients of a packed batch equal those of each example run alone, and those of SDPA over the block-diagonal
mask (bf16: relative error < 1e-2), and the variable-length kernel is the one that ran.

    python3 -m pytest tests/gpu/test_varlen_attention_gpu.py -m gpu -p no:cacheprovider -o addopts="" -s
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from tunelab.data import text as textdata
from tunelab.kernels import varlen_attention
from tunelab.tasks.sft import lm_loss_sum

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not varlen_attention.varlen_available(), reason="needs CUDA and torch's varlen_attn"),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    batch = {k: v.cuda() for k, v in batch.items()}
    loss = lm_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def test_packed_varlen_equals_each_example_alone_and_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=1000, max_position_embeddings=1024, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).train()
    generator = torch.Generator().manual_seed(1)
    examples = []
    for length in (300, 57, 511, 128, 2, 260):
        ids = torch.randint(0, 1000, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids[:]})
    packed = textdata.pack_examples(examples, 600, seed=0)
    batch = textdata.collate(packed, pad_id=0)
    del batch["real_tokens"]

    calls = []
    original = torch.nn.attention.varlen.varlen_attn

    @functools.wraps(original)
    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", counting)
    varlen_attention._varlen_function.cache_clear()
    sdpa_loss, sdpa = loss_and_grads(model, batch)
    assert varlen_attention.use_varlen_attention(model)
    calls.clear()  # the switch's self-check ran the kernel once
    loss, grads = loss_and_grads(model, batch)
    assert len(calls) == config.num_hidden_layers  # the packed batch went through the variable-length kernel
    model.config._attn_implementation = "sdpa"  # the reference: SDPA's own causal kernel, one example at a time,
    # in fp32 (the same bf16-rounded weights): bf16 gradients of two different attention kernels differ by ~1e-2
    # from each other, so each is measured against this
    reference = copy.deepcopy(model).float()
    reference.config._attn_implementation = "sdpa"
    alone_loss, alone = 0.0, {}
    for example in examples:  # each example alone (its first label ignored, as packing does)
        single = textdata.collate([{**example, "labels": [textdata.IGNORE] + example["labels"][1:]}], pad_id=0)
        del single["real_tokens"]
        part_loss, part = loss_and_grads(reference, single)
        alone_loss += part_loss
        for name, grad in part.items():
            alone[name] = alone.get(name, 0) + grad
    varlen_attention._varlen_function.cache_clear()
    print(f"\npacked loss sum: varlen {loss:.3f}, sdpa mask {sdpa_loss:.3f}, fp32 examples alone {alone_loss:.3f}")
    assert abs(loss - alone_loss) / abs(alone_loss) < 1e-2
    assert abs(loss - sdpa_loss) / abs(sdpa_loss) < 1e-2
    worst_varlen = max(rel_err(grads[name], alone[name]) for name in alone)
    worst_sdpa = max(rel_err(sdpa[name], alone[name]) for name in alone)
    print(f"worst gradient difference from the fp32 reference: varlen {worst_varlen:.2e}, sdpa mask {worst_sdpa:.2e}")
    assert worst_varlen < 1e-2 or worst_varlen <= 1.25 * worst_sdpa  # bf16: as close as PyTorch's own kernel
