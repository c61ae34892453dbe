"""Many GPUs (issue 8) on a 2-GPU machine: DDP scaling on a Llama-3.2-1B shape, FSDP2 and DeepSpeed ZeRO-3 memory
per GPU on a Llama-3.1-8B shape (bf16 LoRA and QLoRA at seq 4096), and 2-GPU predictions equal to 1-GPU ones.

Runs benchmarks/multi_gpu.py once (about 7 minutes; every run a fresh `python -m tunelab` process) and asserts on
its figures; skipped without 2 CUDA GPUs (the CPU suite ignores tests/gpu). DeepSpeed comes from the `deepspeed`
extra; on the device machine its wheel is carried in .whl (see BENCHMARKS.md for the command):

    TUNELAB_BENCH_OUT=$OUT python3 -m pytest tests/gpu/test_multi_gpu.py -m gpu -p no:cacheprovider -o addopts="" -s

The report (multi_gpu.json, multi_gpu.md) goes to TUNELAB_BENCH_OUT when set, else to pytest's tmp_path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (run on nvidia-h200-x2)"),
]

_spec = importlib.util.spec_from_file_location(
    "multi_gpu", Path(__file__).resolve().parents[2] / "benchmarks" / "multi_gpu.py"
)
bench = importlib.util.module_from_spec(_spec)
sys.modules["multi_gpu"] = bench  # its dataclasses look their module up there
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = Path(os.environ.get("TUNELAB_BENCH_OUT") or tmp_path_factory.mktemp("multi-gpu-out"))
    work = Path(os.environ.get("TUNELAB_GPU_RUNS") or tmp_path_factory.mktemp("multi-gpu-work"))
    budget = float(os.environ.get("TUNELAB_BENCH_BUDGET", "450"))
    result = bench.run_all(out, work, budget, {"ddp", "fsdp", "predict", "deepspeed"})
    print("\n" + bench.markdown(result))
    return result


def row(report: dict[str, Any], name: str) -> dict[str, Any]:
    """A run's figures; skip when the time budget left it out, fail with its log when it failed."""
    found = report["runs"][name]
    if found["status"].startswith("skipped"):
        pytest.skip(f"{name}: {found['status']}")
    assert found["status"] == "ok", f"{name} {found['status']}:\n{found.get('log_tail', '')}"
    return found


def test_ddp_on_two_gpus_scales_tokens_per_second(report: dict[str, Any]) -> None:
    one, two = row(report, "1b-lora-1gpu"), row(report, "1b-lora-ddp-2gpu")
    assert two["processes"] == 2 and two["steps"] == one["steps"]
    ratio = two["tokens_per_s"] / one["tokens_per_s"]
    assert ratio >= 1.85, (
        f"DDP 2-GPU {two['tokens_per_s']:,.0f} tokens/s vs 1-GPU {one['tokens_per_s']:,.0f}: {ratio:.2f}x"
    )


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_sharded_8b_needs_less_memory_per_gpu(report: dict[str, Any], strategy: str, method: str) -> None:
    alone, shared = row(report, f"8b-{method}-1gpu"), row(report, f"8b-{method}-{strategy}-2gpu")
    assert shared["processes"] == 2 and shared["steps"] == alone["steps"]
    assert shared["loss_last"] == pytest.approx(alone["loss_last"], abs=0.5)  # same model and data, few steps
    assert shared["peak_gib_per_gpu"] < alone["peak_gib_per_gpu"], (shared["peak_gib_per_gpu"], alone)


def test_two_gpu_predictions_equal_one_gpu(report: dict[str, Any]) -> None:
    one, two = row(report, "predict-1gpu"), row(report, "predict-2gpu")
    assert one["csv"].count("\n") == 17  # a header and 16 predictions
    assert two["csv"] == one["csv"]
