"""The fused output head + cross-entropy alone on the GPU: liger-kernel's function against tunelab's chunked loss
with the Triton pass (kernels/cross_entropy_triton.py) and without it (PyTorch per chunk), on the head shapes of
benchmarks/llm_sft.py (vocabulary 128256, frozen bf16 head, every token a target). Prints milliseconds for forward
and backward together, the achieved TFLOP/s of the two products, and the peak memory above the inputs.

    python3 benchmarks/fused_loss_micro.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SHAPES = {"Llama-3.2-1B, 4 x 2048 tokens": (8192, 2048), "Llama-3.1-8B, 2 x 2048 tokens": (4096, 4096)}
VOCAB = 128256


def main() -> None:
    from tunelab.kernels.linear_cross_entropy import fused_linear_cross_entropy, liger_available

    impls = (["liger"] if liger_available() else []) + ["triton", "chunked"]
    print(torch.cuda.get_device_name())
    for label, (rows, hidden) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(rows, hidden, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
        w = torch.randn(VOCAB, hidden, device="cuda", generator=g, dtype=torch.bfloat16) / hidden**0.5
        t = torch.randint(0, VOCAB, (rows,), device="cuda", generator=g)
        flops = 2 * 2 * rows * hidden * VOCAB  # logits and the hidden gradient
        cells, losses = [], {}
        for impl in impls:

            def step(impl: str = impl, h: torch.Tensor = h, w: torch.Tensor = w, t: torch.Tensor = t) -> torch.Tensor:
                h.grad = None
                loss = fused_linear_cross_entropy(h, w, t, impl=impl)
                loss.backward()
                return loss

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                losses[impl] = float(step().detach())
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 10
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            cells.append(f"{impl} {ms:.2f} ms ({flops / ms / 1e9:.0f} TFLOP/s, +{peak:.0f} MiB)")
        print(f"{label}: {'; '.join(cells)}; losses {losses}")


if __name__ == "__main__":
    main()
