"""Where the peak GPU memory of loading a model for LoRA / QLoRA training arises (benchmarks/llm_sft.py counts its
peak over loading and training): max_memory_allocated after each phase of tunelab's sft.build_model (the
transformers load, the method, the fast path, the offload), after the optimizer's creation and after each of the
first training steps, on the shapes of llm_sft.py.

    python3 benchmarks/load_memory_probe.py --rows 8b-qlora,8b-lora --steps 2   # in llm_sft.py's order
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tunelab  # noqa: E402,F401  (before transformers: see llm_sft.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="8b-qlora,8b-lora")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    import llm_sft as bench
    import torch
    from layer_graphs_memory import live_tensors

    from tunelab.tasks import sft

    gib = 2**30
    rows = args.rows.split(",")
    folders = bench.build_models(bench.default_workdir(), {bench.ROWS[row][0] for row in rows})
    for row in rows:
        shape, method, micro = bench.ROWS[row]
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # what an earlier row of this process left allocated (llm_sft.py runs a framework's rows in one process)
        print(f"== {row}: allocated at the start {torch.cuda.memory_allocated() / gib:.3f} GiB")
        for (shape_, dtype, kind), count in live_tensors().most_common(6):
            print(f"  left from before: {count} x {kind} {shape_} {dtype}")
        marks = []

        def mark(phase: str) -> None:
            torch.cuda.synchronize()
            memory = (torch.cuda.memory_allocated() / gib, torch.cuda.max_memory_allocated() / gib)
            marks.append((phase, *memory))  # noqa: B023 - used within this row's iteration
            torch.cuda.reset_peak_memory_stats()

        originals = {}
        for name in ("load_causal_lm", "apply_fast_kernels", "apply_checkpoint_offload", "apply_embedding_offload"):
            originals[name] = getattr(sft, name)

            def wrapped(*a, _name=name, **k):  # noqa: ANN002, ANN003, ANN202
                result = originals[_name](*a, **k)  # noqa: B023
                mark(f"after {_name}")
                return result

            setattr(sft, name, wrapped)
        original_method = sft.adapters.apply_method

        def method_wrapped(*a, **k):  # noqa: ANN002, ANN003, ANN202
            result = original_method(*a, **k)  # noqa: B023
            mark("after adapters.apply_method")
            return result

        sft.adapters.apply_method = method_wrapped
        try:
            model, optimizer, loss_fn = bench.load_tunelab(Path(folders[shape]), method, micro, fast=True, offload=True)
        finally:
            for name, function in originals.items():
                setattr(sft, name, function)
            sft.adapters.apply_method = original_method
        mark("after load_tunelab (optimizer made)")
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        for step, ids in enumerate(bench.batches(micro, args.steps, 128256)):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model, ids.cuda())
            mark(f"step {step + 1} forward")
            loss.backward()
            mark(f"step {step + 1} backward")
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
            mark(f"step {step + 1} optimizer")
        for phase, allocated, peak in marks:
            print(f"  {phase:>36}: allocated {allocated:.3f} GiB, peak within the phase {peak:.3f}")
        del model, optimizer, trainable, loss_fn


if __name__ == "__main__":
    main()
