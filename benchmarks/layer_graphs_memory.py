"""Where the GPU memory of tunelab's LoRA training goes step by step, with and without train.cuda_graphs.

For each setting: allocated memory after every step, the peak within it, reserved memory, the memory at each phase
of the first and the last layer's recording (warm-up, forward graph, backward graph), and at the end the live CUDA
tensors of 1 MiB or more grouped by shape (what outlives a step). A diagnostic for the layer graphs'
memory (kernels/graphed_layers.py); runs on the 1B (micro-batch 4) or 8B (micro-batch 2) shape of
benchmarks/llm_sft.py.

    python3 benchmarks/layer_graphs_memory.py --method qlora --steps 4
    python3 benchmarks/layer_graphs_memory.py --method lora --shape 8b --steps 3 --graphs-only
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tunelab  # noqa: E402,F401  (before transformers: see llm_sft.py)


def live_tensors(min_bytes: int = 1 << 20) -> Counter:
    import torch

    seen: Counter = Counter()
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda and obj.untyped_storage().nbytes() >= min_bytes:
                seen[(tuple(obj.shape), str(obj.dtype), type(obj).__name__)] += 1
        except Exception:  # noqa: BLE001, S112 - objects that fail isinstance or storage access
            continue
    return seen


def run(method: str, steps: int, graphs: bool, folder: Path, micro: int) -> None:
    import llm_sft as bench
    import torch

    from tunelab.kernels import graphed_layers

    graphed_layers.ENABLED["on"] = graphs
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, optimizer, loss_fn = bench.load_tunelab(folder, method, micro, fast=True, offload=True)
    model.train()
    recorder = getattr(model, "_tunelab_layer_recorder", None)
    if recorder is not None:
        recorder.trace = []  # allocated / peak / reserved at each phase of every layer's recording
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"\n== {method}, cuda_graphs {graphs}: after loading {torch.cuda.memory_allocated() / 2**30:.3f} GiB")
    for step, ids in enumerate(bench.batches(micro, steps, 128256)):
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, ids.cuda())
        after_forward = torch.cuda.memory_allocated() / 2**30
        forward_peak = torch.cuda.max_memory_allocated() / 2**30
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        print(
            f"step {step + 1}: after forward {after_forward:.3f} GiB (its peak {forward_peak:.3f}), after step "
            f"{torch.cuda.memory_allocated() / 2**30:.3f}, peak {torch.cuda.max_memory_allocated() / 2**30:.3f}, "
            f"reserved {torch.cuda.memory_reserved() / 2**30:.3f}"
        )
    print("recorder:", recorder.counts if recorder is not None else None, recorder.reasons if recorder else "")
    if recorder is not None and recorder.trace:
        gib = 2**30
        layers = recorder.layers
        shown = recorder.trace[:4] + recorder.trace[-4:] if len(recorder.trace) > 8 else recorder.trace
        for phase, allocated, peak, reserved in shown:
            memory = f"allocated {allocated / gib:.3f}, peak {peak / gib:.3f}, reserved {reserved / gib:.3f}"
            print(f"  {phase:>26}: {memory}")
        print(f"  ({len(recorder.trace)} marks over {layers} layers: the first and the last recording shown)")
    for (shape, dtype, kind), count in live_tensors().most_common(12):
        print(f"  live {count} x {kind} {shape} {dtype}")
    del model, optimizer, trainable, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="qlora", choices=["lora", "qlora"])
    parser.add_argument("--shape", default="1b", choices=["1b", "8b"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--graphs-only", action="store_true", help="skip the run without graphs")
    args = parser.parse_args()
    import llm_sft as bench

    folder = bench.build_models(bench.default_workdir(), {args.shape})[args.shape]
    micro = bench.ROWS[f"{args.shape}-{args.method}"][2]
    for graphs in (True,) if args.graphs_only else (False, True):
        run(args.method, args.steps, graphs, folder, micro)


if __name__ == "__main__":
    main()
