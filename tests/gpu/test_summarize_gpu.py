"""summarize on the GPU: decoder QLoRA (random-init Llama-3.2-1B shape) and seq2seq LoRA (random-init BART-large
shape) train 20 steps, evaluate with generation and generate test summaries; throughput figures are printed and,
when TUNELAB_BENCH_OUT names a folder, written there. Helpers: benchmarks/summarize_smoke.py.

    python3 -m pytest tests/gpu/test_summarize_gpu.py -m gpu -p no:cacheprovider -o addopts="" -s
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]

_spec = importlib.util.spec_from_file_location(
    "summarize_smoke", Path(__file__).resolve().parents[2] / "benchmarks" / "summarize_smoke.py"
)
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)
ROWS: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="module", autouse=True)
def print_table():
    """The table of both runs once they are done."""
    yield
    if ROWS:
        text = f"summarize smoke on {torch.cuda.get_device_name(0)}, torch {torch.__version__}\n"
        text += smoke.table(list(ROWS.values()))
        print("\n\n" + text)
        out = os.environ.get("TUNELAB_BENCH_OUT")
        if out:
            (Path(out) / "summarize_smoke_table.md").write_text(text + "\n", encoding="utf-8")


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_trains_and_generates(kind: str, tmp_path: Path) -> None:
    row = smoke.run_one(kind, tmp_path)
    ROWS[kind] = row
    out = os.environ.get("TUNELAB_BENCH_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"summarize_smoke_{kind}.json").write_text(json.dumps(row, indent=2, default=str))
    summary, train = row["summary"], [r for r in row["records"] if r.get("event") == "train"]
    assert summary["status"] == "completed" and summary["steps"] == smoke.STEPS and summary["kind"] == kind
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["mem_gib"] > 0 for r in train)
    assert row["loss_last"] < row["loss_first"], [round(r["loss"], 3) for r in train]
    assert {"loss", "rouge1", "rouge2", "rougeL", "rouge_sum"} <= summary["final"].keys()
    assert row["start"]["data"]["train"]["prompts_cut"]["1024"] == 0.0
    assert row["generation"]["rows"] == 64 and row["generation"]["new_tokens_per_s"] > 0
    assert row["generation_greedy"]["new_tokens_per_s"] > 0
