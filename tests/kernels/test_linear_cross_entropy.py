"""The fused / chunked linear cross-entropy equals the plain path (full logits, F.cross_entropy in fp32), forward
and backward, on random inputs; the sft loss through it equals today's path on a tiny Llama, plain and LoRA, and
the methods it cannot serve fall back to the plain path."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from fixtures import make_tiny_llama, make_tokenizer

from tunelab.config import MethodConfig, RunConfig
from tunelab.data import text as textdata
from tunelab.kernels import causal_lm_loss
from tunelab.kernels.linear_cross_entropy import (
    chunked_linear_cross_entropy,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from tunelab.models import adapters
from tunelab.tasks import sft

TOL = 1e-5  # fp32: the bound for relative error against the reference


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Variable-length chat examples, some multi-turn (so prompts and padding leave masked positions)."""
    rng = random.Random(seed)
    words = ["sky", "blue", "하늘", "grass", "green", "train", "lemon", "city", "바다", "music"]
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "Answer briefly."}] if i % 2 else []
        for _ in range(1 + i % 3):
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 12)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 9)))})
        out.append({"id": str(i), "messages": messages})
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def random_problem(seed: int, rows: int, hidden: int, vocab: int, bias: bool) -> tuple:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g) * 2.0
    w = torch.randn(vocab, hidden, generator=g) / hidden**0.5
    b = torch.randn(vocab, generator=g) if bias else None
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[torch.rand(rows, generator=g) < 0.3] = -100  # some ignored rows, as masked prompts give
    return h, w, b, t


def grads(fn, h, w, b, t) -> tuple:
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    loss = fn(h, w, t, b)
    (loss * 0.37).backward()  # a non-unit incoming gradient, as the loop's division by the window's targets
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("seed,rows,chunk,bias", [(0, 37, 8, False), (1, 64, 64, True), (2, 5, 1, True)])
def test_chunked_equals_reference_forward_and_backward(seed: int, rows: int, chunk: int, bias: bool) -> None:
    h, w, b, t = random_problem(seed, rows, hidden=24, vocab=97, bias=bias)
    ref = grads(linear_cross_entropy_reference, h, w, b, t)
    ours = grads(lambda *a: chunked_linear_cross_entropy(*a, chunk_rows=chunk), h, w, b, t)
    for mine, theirs in zip(ours, ref, strict=True):
        if theirs is None:
            assert mine is None
            continue
        assert torch.isfinite(mine).all()
        assert rel_err(mine, theirs) < TOL


_KERNEL_SCRIPT = """
import torch
from tunelab.kernels import cross_entropy_triton
from tunelab.kernels.linear_cross_entropy import chunked_linear_cross_entropy, linear_cross_entropy_reference

cross_entropy_triton.BLOCK = 64  # several blocks per row: the online max / sum across blocks is exercised

def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())

def run(fn, h, w, b, t):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    loss = fn(h, w, t, b)
    (loss * 0.37).backward()
    return [loss.detach(), h.grad, w.grad] + ([b.grad] if b is not None else [])

g = torch.Generator().manual_seed(0)
for rows, vocab, chunk, bias in [(37, 201, 8, False), (20, 64, 7, True), (5, 130, None, False)]:
    h = torch.randn(rows, 24, generator=g) * 2
    w = torch.randn(vocab, 24, generator=g) / 5
    b = torch.randn(vocab, generator=g) if bias else None
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[::3] = -100
    want = run(linear_cross_entropy_reference, h, w, b, t)
    got = run(lambda *a: chunked_linear_cross_entropy(*a, chunk_rows=chunk, kernel=True), h, w, b, t)
    for index, (mine, theirs) in enumerate(zip(got, want)):
        assert rel(mine, theirs) < 1e-5, (rows, vocab, index, rel(mine, theirs))
print("kernel ok")
"""


def test_triton_cross_entropy_pass_equals_reference_in_the_interpreter() -> None:
    """The chunked loss with its per-chunk work in the Triton kernel (kernels/cross_entropy_triton.py), run by
    Triton's interpreter on the CPU: loss, hidden, weight and bias gradients equal the plain path in fp32."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _KERNEL_SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernel ok" in result.stdout


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_runs() -> None:
    h, w, _, t = random_problem(3, 20, hidden=16, vocab=50, bias=False)
    h = h.requires_grad_()
    loss = chunked_linear_cross_entropy(h, w, t, chunk_rows=6)
    loss.backward()
    assert w.grad is None and h.grad is not None
    with torch.no_grad():
        assert (
            rel_err(chunked_linear_cross_entropy(h, w, t, chunk_rows=6), linear_cross_entropy_reference(h, w, t)) < TOL
        )


def test_autocast_follows_the_plain_path() -> None:
    """Under CPU bf16 autocast both project in bf16 and take the softmax in fp32: the same loss to bf16 rounding."""
    h, w, _, t = random_problem(4, 32, hidden=32, vocab=64, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = linear_cross_entropy_reference(h, w, t)
        ours = fused_linear_cross_entropy(h, w, t, impl="chunked")
    assert ours.dtype == torch.float32
    assert abs(float(ours) - float(ref)) / abs(float(ref)) < 1e-3


@pytest.fixture(scope="module")
def setup() -> tuple:
    tokenizer = make_tokenizer("chatml")
    examples, _ = sft.tokenize_conversations(conversations(12), tokenizer, "chat", max_length=512)
    batch = textdata.collate(examples[:5], tokenizer.pad_token_id)
    packed = textdata.collate(textdata.pack_examples(examples, 256, seed=0)[:2], tokenizer.pad_token_id)
    return tokenizer, batch, packed


def loss_and_grads(model: torch.nn.Module, batch: dict, fused: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = sft.lm_loss_sum(model, batch, fused=fused)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.parametrize("kind,packed", [("full", False), ("lora", False), ("lora", True)])
def test_sft_loss_fused_equals_plain_on_tiny_llama(setup: tuple, kind: str, packed: bool) -> None:
    tokenizer, batch, packed_batch = setup
    batch = packed_batch if packed else batch
    assert ("position_ids" in batch) == packed
    model = make_tiny_llama(tokenizer, seed=0)
    if kind == "lora":
        model = adapters.apply_method(model, MethodConfig(kind="lora", r=4, alpha=8, dropout=0.0), False)
    model.train()
    assert causal_lm_loss.decoder_and_head(model) is not None
    plain_loss, plain_grads = loss_and_grads(model, batch, fused=False)
    fused_loss, fused_grads = loss_and_grads(model, batch, fused=True)
    assert abs(fused_loss - plain_loss) / plain_loss < TOL
    assert plain_grads.keys() == fused_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert rel_err(fused_grads[name], grad) < TOL, name


def test_one_training_step_matches(setup: tuple) -> None:
    """An AdamW step from each path lands on the same LoRA weights and the next loss agrees."""
    tokenizer, batch, _ = setup
    base = adapters.apply_method(
        make_tiny_llama(tokenizer, seed=1), MethodConfig(kind="lora", r=4, alpha=8, dropout=0.0), False
    )
    after = []
    for fused in (False, True):
        model = copy.deepcopy(base).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        sft.lm_loss_sum(model, batch, fused=fused).backward()
        optimizer.step()
        with torch.no_grad():
            after.append(float(sft.lm_loss_sum(model, batch, fused=False)))
    assert abs(after[0] - after[1]) / after[0] < 1e-5


def test_methods_without_a_plain_head_fall_back(setup: tuple) -> None:
    tokenizer, batch, _ = setup
    prompt = adapters.apply_method(
        make_tiny_llama(tokenizer, seed=0), MethodConfig(kind="prompt", num_virtual_tokens=4), False
    )
    assert causal_lm_loss.decoder_and_head(prompt) is None
    with torch.no_grad():
        assert float(sft.lm_loss_sum(prompt, batch, fused=True)) == float(sft.lm_loss_sum(prompt, batch))
    capped = make_tiny_llama(tokenizer, seed=0)
    capped.config.logit_scale = 0.5  # as Cohere's config would set it
    assert causal_lm_loss.decoder_and_head(capped) is None


def test_fused_loss_setting() -> None:
    assert RunConfig().train.fused_loss == "auto"
    assert causal_lm_loss.fused_loss_enabled("auto", torch.device("cuda"))
    assert not causal_lm_loss.fused_loss_enabled("auto", torch.device("cpu"))
    assert causal_lm_loss.fused_loss_enabled(True, torch.device("cpu"))
    assert not causal_lm_loss.fused_loss_enabled(False, torch.device("cuda"))


def test_auto_picks_the_implementation_by_the_size_of_liger_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: liger where its chunks have at least 256 rows (Llama-3.2-1B's head at 8k tokens), the Triton pass
    where they would be smaller (Llama-3.1-8B's at 4k tokens: 128 rows), PyTorch chunks on a CPU."""
    from tunelab.kernels import linear_cross_entropy as lce

    assert lce.liger_chunk_rows(4094, 4096, 128256) == 128
    assert lce.liger_chunk_rows(8188, 2048, 128256) == 256
    assert lce.liger_chunk_rows(1, 4096, 128256) == 1
    cuda = torch.device("cuda")
    assert lce.resolve_impl("auto", torch.device("cpu"), 4094, 4096, 128256) == "chunked"
    assert lce.resolve_impl("liger", cuda, 4094, 4096, 128256) == "liger"  # an explicit choice is kept
    for liger, triton, shape, expected in [
        (True, True, (4094, 4096), "triton"),
        (True, True, (8188, 2048), "liger"),
        (True, False, (4094, 4096), "liger"),
        (False, True, (8188, 2048), "triton"),
        (False, False, (8188, 2048), "chunked"),
    ]:
        monkeypatch.setattr(lce, "liger_available", lambda liger=liger: liger)
        monkeypatch.setattr(lce, "triton_available", lambda triton=triton: triton)
        assert lce.resolve_impl("auto", cuda, *shape, 128256) == expected, (liger, triton, shape)
