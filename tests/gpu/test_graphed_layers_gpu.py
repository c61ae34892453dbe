"""Checkpointed layers replayed as CUDA graphs (train.cuda_graphs, kernels/graphed_layers.py) on CUDA: training
through the graphs gives the same losses and adapters as the same fast path without them (bf16 autocast: relative
error < 1e-2 per step; fp32 with TF32 off: < 1e-5 on the first step's loss and gradients), across changing input
shapes, gradient accumulation, QLoRA and offloaded checkpoints; layers it must not record (dropout) run eagerly.

    python3 -m pytest tests/gpu/test_graphed_layers_gpu.py -m gpu -p no:cacheprovider -o addopts="" -s
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

from tunelab.kernels import graphed_layers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TINY = dict(
    vocab_size=2000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)  # fmt: skip
# (rows, length) of the micro-batches in order: 256 recorded at its 2nd sight, 128 at its 2nd, 64 seen once
SHAPES = [(2, 256), (2, 256), (2, 256), (2, 128), (2, 256), (2, 128), (2, 128), (2, 64), (2, 256), (2, 256)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    graphed_layers.ENABLED["on"] = True


def tiny_folder() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import sft_qlora_smoke as smoke

    folder = Path("/tmp/tunelab-graphs-small")
    if not (folder / "config.json").exists():
        smoke.save_model_dir(folder, TINY)
    return folder


def train(
    graphs: bool,
    method: str = "lora",
    dtype: str = "bf16",
    dropout: float = 0.0,
    accumulate: int = 2,
    shapes: list[tuple[int, int]] = SHAPES,
    keep: bool | str = "auto",
) -> dict:
    """LoRA steps through tunelab's sft.build_model (fast path, offload auto) with the graphs on or off; the
    losses of every micro-batch, the first micro-batch's gradients, the final adapters and the recorder."""
    from tunelab.config import load_config
    from tunelab.tasks import sft

    gc.collect()
    torch.cuda.empty_cache()
    graphed_layers.ENABLED["on"] = graphs
    config = load_config(
        {
            "model": {"name": str(tiny_folder()), "dtype": dtype},
            "method": {"kind": method, "r": 8, "alpha": 16, "dropout": dropout, "target": "all-linear"},
            "data": {"train": "unused.jsonl", "max_length": 512},
            "train": {"lr": 1e-3, "keep_dequantized": keep},
        }
    )
    torch.manual_seed(0)
    model = sft.build_model(config, torch.device("cuda")).train()
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B = 0 would make the first steps' adapter gradients of A vanish
            torch.nn.init.normal_(parameter, std=0.02)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    # `loss` stays referenced while the next micro-batch runs forward (as in tunelab's loop): the previous graph
    # keeps every parameter's gradient accumulator, made on the default stream, alive during the recordings
    losses, first_grads = [], None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16")
    torch.cuda.reset_peak_memory_stats()
    for index, (rows, length) in enumerate(shapes):
        ids = torch.randint(0, 2000, (rows, length), generator=generator).cuda()
        labels = ids.clone()
        labels[:, : length // 4] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        with autocast:
            loss = sft.lm_loss_sum(model, batch, fused=True) / int((labels[:, 1:] != -100).sum())
        (loss / accumulate).backward()
        losses.append(float(loss.detach()))
        if first_grads is None:
            first_grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        if (index + 1) % accumulate == 0:
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    adapters = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    recorder = getattr(model, "_tunelab_layer_recorder", None)
    counts = dict(recorder.counts) if recorder is not None else {}
    reasons = dict(recorder.reasons) if recorder is not None else {}
    result = {
        "losses": losses,
        "grads": first_grads,
        "adapters": adapters,
        "counts": counts,
        "reasons": reasons,
        "peak": torch.cuda.max_memory_allocated() / 2**30,
        "reserved": torch.cuda.max_memory_reserved() / 2**30,
    }
    del model, optimizer, trainable
    graphed_layers.ENABLED["on"] = True
    return result


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_graphed_training_equals_eager_bf16(method: str) -> None:
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    eager = train(False, method)
    graphed = train(True, method)
    worst = max(abs(a - b) / abs(b) for a, b in zip(graphed["losses"], eager["losses"], strict=True))
    adapters = max(rel_err(graphed["adapters"][n], eager["adapters"][n]) for n in eager["adapters"])
    print(
        f"\n{method} bf16: losses {eager['losses'][0]:.4f} -> {eager['losses'][-1]:.4f} (eager), worst per-step "
        f"difference {worst:.2e}, final adapters {adapters:.2e}; counts {graphed['counts']}; peak GiB "
        f"{eager['peak']:.3f} / {graphed['peak']:.3f}, reserved {eager['reserved']:.3f} / {graphed['reserved']:.3f}"
    )
    counts = graphed["counts"]
    # 4 layers: the 256 shape recorded at its 2nd sight and replayed then and at its 4 later sights, 128 at its
    # 2nd and 3rd sight, 64 (seen once) never
    assert counts["recorded"] == 8 and counts["failed"] == 0, (counts, graphed["reasons"])
    assert counts["replayed"] == 4 * 7, counts
    assert eager["counts"].get("replayed", 0) == 0
    assert worst < 1e-2
    assert adapters < 1e-2


def test_graphed_first_step_equals_eager_fp32() -> None:
    """In fp32 the graphs run the same kernels as the eager path: the loss and gradients of a recorded shape agree
    to fp32 rounding (the attention backward's atomics are the only difference run to run)."""
    shapes = [(2, 128)] * 3
    eager = train(False, dtype="fp32", accumulate=1, shapes=shapes)
    graphed = train(True, dtype="fp32", accumulate=1, shapes=shapes)
    # micro-batch 2 is the first replay; compare it and the adapters after it
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(graphed["losses"], eager["losses"], strict=True))
    adapters = max(rel_err(graphed["adapters"][n], eager["adapters"][n]) for n in eager["adapters"])
    print(f"\nfp32: worst loss difference {loss_diff:.2e}, adapters after 3 steps {adapters:.2e}; {graphed['counts']}")
    assert graphed["counts"]["replayed"] == 4 * 2
    assert loss_diff < 1e-5
    assert adapters < 1e-5


def test_layers_with_dropout_are_not_recorded() -> None:
    result = train(True, dropout=0.1, shapes=[(2, 128)] * 4)
    print(f"\ndropout: {result['counts']} {result['reasons']}")
    assert result["counts"].get("replayed", 0) == 0
    assert result["reasons"].get("dropout", 0) > 0


def test_kept_dequantized_weights_change_nothing() -> None:
    """train.keep_dequantized: QLoRA's recompute hands its dense weights to the backward; same run bit for bit."""
    pytest.importorskip("bitsandbytes")
    plain = train(True, "qlora", keep=False)
    kept = train(True, "qlora", keep=True)
    print(f"\nqlora keep_dequantized: peak GiB {plain['peak']:.3f} -> {kept['peak']:.3f}; counts {kept['counts']}")
    assert kept["counts"]["recorded"] == 8 and kept["counts"]["failed"] == 0, kept["reasons"]
    assert kept["losses"] == plain["losses"]
    assert all(torch.equal(kept["adapters"][n], plain["adapters"][n]) for n in plain["adapters"])
