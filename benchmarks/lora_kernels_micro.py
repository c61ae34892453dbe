"""Micro-benchmark of the LoRA fast path's pieces on the shapes of the issue-7 rows (CUDA only).

For each shape (Llama-3.2-1B at 8,192 tokens a step, Llama-3.1-8B at 4,096) it times forward + backward of:
- one MLP block (gate / up / down with LoRA r 16): per projection (LoraProjection x 3 + liger's SwiGLU) with the
  thin low-rank term added after the base GEMM (the 2026-12-07 path) or before it (beta-1 accumulation), and the
  fused LoraMLP (low-rank terms inside the SwiGLU kernels);
- one square attention projection (q / o), both orders;
- the NF4 dequantization of one MLP weight: bitsandbytes' own function against tunelab's direct kernel launch,
  GPU time and the CPU time a call costs (what made the 1B QLoRA step wait on the CPU).

    python3 benchmarks/lora_kernels_micro.py [--out DIR]     # prints a table, writes lora_kernels_micro.json

Times are medians of CUDA-event timings over 20 repetitions after 5 warm-ups, on whatever GPU runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tunelab  # noqa: E402,F401  (before transformers / peft: tunelab's compatibility shims)
from tunelab.kernels import fast_blocks, lora_projection  # noqa: E402
from tunelab.kernels.lora_mlp import LoraMLP  # noqa: E402
from tunelab.kernels.lora_projection import LoraProjection  # noqa: E402

SHAPES = {"1b": (8192, 2048, 8192), "8b": (4096, 4096, 14336)}  # tokens, hidden, intermediate
RANK, SCALING = 16, 2.0


def cuda_ms(fn, repeats: int = 20, warmup: int = 5) -> float:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_us(fn, repeats: int = 200) -> float:  # noqa: ANN001
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    spent = time.perf_counter() - begin
    torch.cuda.synchronize()
    return spent / repeats * 1e6


class _Base(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


def adapters(features_in: int, features_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = (torch.randn(RANK, features_in, device="cuda") / features_in**0.5).requires_grad_()
    b = (torch.randn(features_out, RANK, device="cuda") / 4).requires_grad_()
    return a, b


def mlp_rows(tokens: int, hidden: int, inner: int) -> dict[str, float]:
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    bases = (
        _Base(torch.randn(inner, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5),
        _Base(torch.randn(inner, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5),
        _Base(torch.randn(hidden, inner, device="cuda", dtype=torch.bfloat16) / inner**0.5),
    )
    (ag, bg), (au, bu), (ad, bd) = adapters(hidden, inner), adapters(hidden, inner), adapters(inner, hidden)

    def per_projection() -> None:
        gate = LoraProjection.apply(x, bases[0], ag, bg, SCALING, None)
        up = LoraProjection.apply(x, bases[1], au, bu, SCALING, None)
        LoraProjection.apply(fast_blocks.fast_swiglu(gate, up), bases[2], ad, bd, SCALING, None).backward(grad)

    def fused() -> None:
        LoraMLP.apply(x, bases, (SCALING,) * 3, ag, bg, au, bu, ad, bd).backward(grad)

    rows = {}
    for thin_first in (False, True):
        lora_projection.THIN_TERM_FIRST = thin_first
        rows[f"mlp per projection, thin term {'first' if thin_first else 'after'}"] = cuda_ms(per_projection)
    rows["mlp fused (LoraMLP)"] = cuda_ms(fused)
    square = _Base(torch.randn(hidden, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5)
    aq, bq = adapters(hidden, hidden)
    for thin_first in (False, True):
        lora_projection.THIN_TERM_FIRST = thin_first
        rows[f"square projection, thin term {'first' if thin_first else 'after'}"] = cuda_ms(
            lambda: LoraProjection.apply(x, square, aq, bq, SCALING, None).backward(grad)
        )
    lora_projection.THIN_TERM_FIRST = True
    return rows


def dequant_rows(hidden: int, inner: int) -> dict[str, float]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    weight = torch.randn(inner, hidden, dtype=torch.bfloat16)
    base = bnb.nn.Linear4bit(hidden, inner, bias=False, compute_dtype=torch.bfloat16)
    base.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    base = base.cuda()
    packed, state = base.weight.data, base.weight.quant_state
    assert lora_projection._bnb_library() is not None
    assert torch.equal(lora_projection.dequantize_nf4(packed, state), bnb_functional.dequantize_4bit(packed, state))
    return {
        "nf4 dequant, bitsandbytes function: GPU ms": cuda_ms(lambda: bnb_functional.dequantize_4bit(packed, state)),
        "nf4 dequant, direct launch: GPU ms": cuda_ms(lambda: lora_projection.dequantize_nf4(packed, state)),
        "nf4 dequant, bitsandbytes function: CPU us a call": cpu_us(
            lambda: bnb_functional.dequantize_4bit(packed, state)
        ),
        "nf4 dequant, direct launch: CPU us a call": cpu_us(lambda: lora_projection.dequantize_nf4(packed, state)),
    }


TILE_CHOICES = [(64, 64, 4), (32, 128, 4), (64, 128, 4), (64, 128, 8), (128, 64, 8), (32, 256, 8), (128, 128, 8)]


def tile_rows(tokens: int, inner: int) -> dict[str, float]:
    """The SwiGLU-with-low-rank kernels alone for each tile choice (GPU ms), and the CPU cost of one launch of
    ours and of liger's SwiGLU (tiny tensors, so the launch path is all there is)."""
    from liger_kernel.ops import LigerSiLUMulFunction

    from tunelab.kernels import lora_swiglu_triton as kernels

    def make(rows: int, cols: int):  # noqa: ANN202
        gate = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        up = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        t = torch.randn(rows, 2 * RANK, device="cuda", dtype=torch.bfloat16)
        b_gate = torch.randn(cols, RANK, device="cuda", dtype=torch.bfloat16) / 4
        b_up = torch.randn(cols, RANK, device="cuda", dtype=torch.bfloat16) / 4
        grad = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        u_down = torch.randn(rows, RANK, device="cuda", dtype=torch.bfloat16)
        a_down = torch.randn(RANK, cols, device="cuda", dtype=torch.bfloat16) / 4
        return gate, up, t[:, :RANK], t[:, RANK:], b_gate, b_up, grad, u_down, a_down

    gate, up, t_gate, t_up, b_gate, b_up, grad, u_down, a_down = make(tokens, inner)
    rows = {}
    default = dict(kernels.TILES)
    for tile in TILE_CHOICES:
        kernels.TILES.update(forward=tile, backward=tile)
        rows[f"swiglu kernel forward, tile {tile}"] = cuda_ms(
            lambda: kernels.swiglu_lowrank_forward(gate, up, t_gate, t_up, b_gate, b_up)
        )
        rows[f"swiglu kernel backward, tile {tile}"] = cuda_ms(
            lambda: kernels.swiglu_lowrank_backward(grad, u_down, a_down, gate, up, t_gate, t_up, b_gate, b_up)
        )
    kernels.TILES.update(default)
    # the layer graphs' recompute skips the forward kernel; the backward kernel then also writes h
    rows["swiglu kernel backward writing h (store_h), default tile"] = cuda_ms(
        lambda: kernels.swiglu_lowrank_backward(
            grad, u_down, a_down, gate, up, t_gate, t_up, b_gate, b_up, store_h=True
        )
    )
    rows["liger swiglu forward (no low rank)"] = cuda_ms(lambda: LigerSiLUMulFunction.apply(gate, up, 1.0, 1.0))
    small = make(64, 256)
    with torch.no_grad():
        rows["launch CPU us: ours forward"] = cpu_us(lambda: kernels.swiglu_lowrank_forward(*small[:6]))
        rows["launch CPU us: ours backward"] = cpu_us(
            lambda: kernels.swiglu_lowrank_backward(small[6], small[7], small[8], *small[:6])
        )
        rows["launch CPU us: liger swiglu forward"] = cpu_us(
            lambda: LigerSiLUMulFunction.apply(small[0], small[1], 1.0, 1.0)
        )
        rows["launch CPU us: torch.mm (reference op)"] = cpu_us(lambda: small[0] @ small[4])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict[str, dict[str, float]] = {"device": torch.cuda.get_device_name()}  # type: ignore[dict-item]
    for name, (tokens, hidden, inner) in SHAPES.items():
        rows = mlp_rows(tokens, hidden, inner)
        rows.update(tile_rows(tokens, inner))
        try:
            rows.update(dequant_rows(hidden, inner))
        except ImportError:
            pass
        results[name] = rows
        print(f"\n{name}: {tokens} tokens, hidden {hidden}, intermediate {inner}, r {RANK}")
        for key, value in rows.items():
            print(f"  {key:60s} {value:9.3f}")
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_kernels_micro.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
