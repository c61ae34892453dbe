"""`tunelab plan` stays within 15% of the measured peak memory on the GPU (the table in BENCHMARKS.md).

Runs only where CUDA is visible (the device machine); the CPU suite ignores tests/gpu:

    python3 -m pytest tests/gpu/test_plan_gpu.py -m gpu -p no:cacheprovider -o addopts="" -s

TUNELAB_PLAN_CONFIGS (comma-separated names of benchmarks/plan_accuracy.py's CONFIGS) picks a subset; the default
is the three 1B sft configurations (about a minute); the whole table takes longer. The vision-language (mcqa) rows,
vl3b-lora-448 and vl3b-qlora-448, run only when named there (their model is built and saved first, 7 GiB).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]

_spec = importlib.util.spec_from_file_location(
    "plan_accuracy", Path(__file__).resolve().parents[2] / "benchmarks" / "plan_accuracy.py"
)
accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accuracy)
DEFAULT = "1b-lora-1024,1b-qlora-2048,1b-lora-2048-nockpt"


def test_plan_within_15_percent_of_measured_peak(tmp_path: Path) -> None:
    names = os.environ.get("TUNELAB_PLAN_CONFIGS", DEFAULT).split(",")
    accuracy.prepare(tmp_path, names)
    results = accuracy.measure_all(tmp_path, names)
    print(accuracy.table(results))
    assert all("failed" not in r for r in results), [r["name"] for r in results if "failed" in r]
    assert all(r["error"] is not None and abs(r["error"]) <= 0.15 for r in results), accuracy.table(results)
