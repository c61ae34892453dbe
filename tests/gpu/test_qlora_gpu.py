"""QLoRA on the GPU: `method.kind: qlora` on a random-init Llama-3.2-1B shape trains 20 steps with bitsandbytes
NF4 (double quant) and logs tokens/s and peak memory; bf16 LoRA on the same model and data for comparison.

Runs only where CUDA is visible (the device machine); the CPU suite ignores tests/gpu (pyproject addopts):

    python3 -m pytest tests/gpu/test_qlora_gpu.py -m gpu -p no:cacheprovider -o addopts="" -s

The helpers live in benchmarks/sft_qlora_smoke.py. The table of both runs is printed when the module is done;
when TUNELAB_BENCH_OUT names a folder, each run's figures (metrics records included) and the table are written
there. Run folders go under TUNELAB_GPU_RUNS when set (to read them afterwards), else under pytest's tmp_path.
"""

from __future__ import annotations

import gc
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
    "sft_qlora_smoke", Path(__file__).resolve().parents[2] / "benchmarks" / "sft_qlora_smoke.py"
)
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)

ROWS: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("TUNELAB_GPU_RUNS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        return Path(where)
    return tmp_path_factory.mktemp("qlora-smoke")


@pytest.fixture(scope="module")
def model_dir(workdir: Path) -> Path:
    return smoke.save_model_dir(workdir / "llama-3.2-1b-shape")


@pytest.fixture(scope="module")
def chat_files(workdir: Path) -> tuple[Path, Path]:
    tokenizer = smoke.tiny_llama3_tokenizer()
    train = smoke.write_long_chat(workdir / "train.jsonl", tokenizer, n=4 * smoke.STEPS, seed=0)
    valid = smoke.write_long_chat(workdir / "valid.jsonl", tokenizer, n=8, seed=1)
    return train, valid


@pytest.fixture(scope="module", autouse=True)
def print_table():
    """The comparison table, once both runs are done (the device reply carries the end of the output)."""
    yield
    if not ROWS:
        return
    text = f"QLoRA smoke on {torch.cuda.get_device_name(0)}, torch {torch.__version__}\n" + smoke.table(
        list(ROWS.values())
    )
    print("\n\n" + text)
    out = os.environ.get("TUNELAB_BENCH_OUT")
    if out:
        (Path(out) / "qlora_smoke_table.md").write_text(text + "\n", encoding="utf-8")


def inspect_layers(model: torch.nn.Module) -> dict[str, Any]:
    """What the base linear layers of the built model are (class, quant type, double quant) and which dtypes the
    trainable parameters have."""
    import bitsandbytes as bnb

    found: dict[str, Any] = {"classes": set(), "linear4bit": 0, "quant_type": set(), "double_quant": set()}
    for name, module in model.named_modules():
        if not name.endswith(LINEARS):
            continue
        base = getattr(module, "base_layer", module)  # peft's LoRA layer wraps the original one
        found["classes"].add(f"{type(base).__module__}.{type(base).__name__}")
        if isinstance(base, bnb.nn.Linear4bit):
            found["linear4bit"] += 1
            state = base.weight.quant_state
            found["quant_type"].add(state.quant_type)
            found["double_quant"].add(bool(state.nested) and bool(base.weight.compress_statistics))
    found["trainable_dtypes"] = {str(p.dtype) for p in model.parameters() if p.requires_grad}
    found["trainable_devices"] = {str(p.device) for p in model.parameters() if p.requires_grad}
    found["is_loaded_in_4bit"] = bool(getattr(model, "is_loaded_in_4bit", False))
    return {k: sorted(v) if isinstance(v, set) else v for k, v in found.items()}


LINEARS = smoke.LINEAR_NAMES


@pytest.mark.parametrize("kind", ["qlora", "lora"])
def test_llama_1b_shape_trains_20_steps(
    kind: str, model_dir: Path, chat_files: tuple[Path, Path], workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunelab.config import load_config
    from tunelab.tasks import sft

    layers: dict[str, Any] = {}
    build_model = sft.build_model

    def build_and_inspect(config, device):  # looks at the built model without keeping a reference to it
        model = build_model(config, device)
        layers.update(inspect_layers(model))
        return model

    monkeypatch.setattr(sft, "build_model", build_and_inspect)
    config = load_config(smoke.smoke_config(kind, model_dir, *chat_files, workdir))
    gc.collect()
    torch.cuda.empty_cache()
    left_before = torch.cuda.memory_allocated() / 2**30
    run_dir = sft.train(config)
    reserved = torch.cuda.max_memory_reserved() / 2**30

    row = smoke.summarize(run_dir, kind)
    row.update(layers=layers, left_before_gib=left_before, peak_reserved_gib=reserved)
    ROWS[kind] = row
    out = os.environ.get("TUNELAB_BENCH_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"qlora_smoke_{kind}.json").write_text(json.dumps(row, indent=2, default=str), encoding="utf-8")
    print(
        f"\n{kind}: layers {layers}; left on the GPU before the run {left_before:.2f} GiB; peak reserved "
        f"{reserved:.2f} GiB"
    )

    # the run completed every step; throughput and memory are in every train record and in summary.json
    summary, records = row["summary"], row["records"]
    train = [r for r in records if r.get("event") == "train"]
    assert summary["status"] == "completed" and summary["steps"] == smoke.STEPS
    assert [r["step"] for r in train] == list(range(1, smoke.STEPS + 1))
    assert all(r["tokens_per_s"] > 0 and r["mem_gib"] > 0 for r in train)
    assert summary["tokens_per_s"] > 0 and summary["peak_mem_gib"] > 0
    assert all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["loss"] < train[0]["loss"], [round(r["loss"], 3) for r in train]
    assert row["valid_loss"] is not None and math.isfinite(row["valid_loss"])
    assert (run_dir / "best" / "adapter_model.safetensors").exists()
    # no example was cut: the data really is 1000-2000 tokens long
    data = next(r for r in records if r.get("event") == "start")["data"]["train"]
    assert data["truncated"] == 0 and data["dropped_too_long"] == 0
    # the parameter count is the model's (4-bit weights counted as values, not storage elements)
    lora_params = 16 * (65_536 + 40_960 + 40_960 + 65_536 + 3 * 163_840)
    assert row["trainable"] == lora_params
    assert row["total_params"] == smoke.LLAMA_32_1B_PARAMS + lora_params
    # the base linear layers are what the method asks for; the adapters train in fp32
    assert layers["trainable_dtypes"] == ["torch.float32"]
    n_linear = smoke.LLAMA_32_1B["num_hidden_layers"] * len(LINEARS)
    if kind == "qlora":
        assert layers["is_loaded_in_4bit"] and layers["trainable_devices"] == ["cuda:0"]
        assert layers["classes"] == ["bitsandbytes.nn.modules.Linear4bit"]
        assert layers["linear4bit"] == n_linear
        assert layers["quant_type"] == ["nf4"]
        assert layers["double_quant"] == [True]
    else:
        assert layers["linear4bit"] == 0 and layers["classes"] == ["torch.nn.modules.linear.Linear"]
