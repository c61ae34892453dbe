"""NF4 dequantization speed on the GPU: bitsandbytes' function, tunelab's direct launch of bitsandbytes' kernels
(three launches with double quantization) and tunelab's one-launch Triton kernel (kernels/nf4_triton.py), on the
Llama-3.1-8B projection shapes, double-quantized as QLoRA does. Prints microseconds per call and GB/s (packed
bytes read + output written); `--rows` sweeps the Triton kernel's blocks per program.

    python3 benchmarks/nf4_dequant_micro.py --rows 16,32,64,128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SHAPES = {"q/o 4096x4096": (4096, 4096), "k/v 1024x4096": (1024, 4096), "gate/up 14336x4096": (14336, 4096),
          "down 4096x14336": (4096, 14336)}  # fmt: skip


def time_us(fn, repeats: int = 50) -> float:  # noqa: ANN001
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="64", help="Triton blocks per program to try, comma-separated")
    args = parser.parse_args()
    import bitsandbytes as bnb

    from tunelab.kernels import lora_projection, nf4_triton

    print(f"{torch.cuda.get_device_name()}, bitsandbytes {bnb.__version__}")
    for label, (rows, columns) in SHAPES.items():
        weight = bnb.nn.Params4bit(
            torch.randn(rows, columns, dtype=torch.bfloat16) / 50, requires_grad=False, quant_type="nf4",
            compress_statistics=True,
        ).cuda()  # fmt: skip
        packed, state = weight.data, weight.quant_state
        moved = packed.numel() + rows * columns * 2
        calls = {
            "bitsandbytes": lambda p=packed, s=state: bnb.functional.dequantize_4bit(p, s),
            "direct launch": lambda p=packed, s=state: lora_projection.dequantize_nf4(p, s),
        }
        results = {}
        for name, call in calls.items():
            lora_projection.TRITON_DEQUANT["on"] = False  # the direct launch of bitsandbytes' kernels
            results[name] = time_us(call)
        lora_projection.TRITON_DEQUANT["on"] = True
        for block_rows in (int(r) for r in args.rows.split(",")):
            nf4_triton.ROWS_PER_PROGRAM = block_rows
            results[f"triton rows {block_rows}"] = time_us(lambda p=packed, s=state: nf4_triton.dequantize(p, s))
        cells = ", ".join(f"{name} {us:.1f} us ({moved / us / 1e3:.0f} GB/s)" for name, us in results.items())
        print(f"{label}: {cells}")


if __name__ == "__main__":
    main()
