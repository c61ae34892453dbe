"""How close is `tunelab plan` to the memory a real run takes? Measured on the GPU machine.

For each configuration: a random-init Llama of the real shape (Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B; saved
once in bf16 with the tests' tiny llama3 tokenizer), `tunelab.tasks.sft.train` for a few optimizer steps on
packed synthetic chat data (every row `max_length` tokens, as the plan assumes), and the plan's estimate of the
same config. Each run is a fresh process; the measured figure is torch.cuda.max_memory_allocated over the
training steps, compared with the plan's `peak_allocated_gib`.

    python3 benchmarks/plan_accuracy.py --out DIR            # every configuration, a table and plan_accuracy.json
    python3 benchmarks/plan_accuracy.py --only 1b-lora-1024  # one of them

tests/gpu/test_plan_gpu.py runs it and asserts every estimate is within 15% of its measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, head_dim=64),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, head_dim=128),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, head_dim=128),
}
COMMON = dict(num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)
TIED = {"1b": True, "3b": True, "8b": False}
# (name, shape, method, max_length, micro-batch, gradient checkpointing, train.fused_loss); the default loss on
# CUDA is the fused one, the "-plain" rows keep the full logits (train.fused_loss: false)
CONFIGS: list[tuple[str, str, str, int, int, bool, bool]] = [
    ("1b-lora-1024", "1b", "lora", 1024, 4, True, True),
    ("1b-qlora-2048", "1b", "qlora", 2048, 4, True, True),
    ("1b-lora-2048-nockpt", "1b", "lora", 2048, 2, False, True),
    ("3b-lora-2048", "3b", "lora", 2048, 2, True, True),
    ("3b-qlora-1024", "3b", "qlora", 1024, 4, True, True),
    ("8b-lora-2048", "8b", "lora", 2048, 2, True, True),
    ("8b-qlora-1024", "8b", "qlora", 1024, 4, True, True),
    ("8b-qlora-2048", "8b", "qlora", 2048, 2, True, True),
    ("1b-lora-1024-plain", "1b", "lora", 1024, 4, True, False),
    ("1b-lora-2048-nockpt-plain", "1b", "lora", 2048, 2, False, False),
    ("8b-qlora-2048-plain", "8b", "qlora", 2048, 2, True, False),
]
STEPS = 3


def model_dir(work: Path, shape: str) -> Path:
    """The random-init model of `shape`, built once (on the GPU: seconds) and saved in bf16."""
    from sft_qlora_smoke import save_model_dir

    folder = work / f"llama-{shape}"
    if not (folder / "config.json").exists():
        save_model_dir(folder, SHAPES[shape] | COMMON | {"tie_word_embeddings": TIED[shape]})
    return folder


def data_file(work: Path) -> Path:
    from sft_qlora_smoke import tiny_llama3_tokenizer, write_long_chat

    path = work / "chat.jsonl"
    if not path.exists():
        write_long_chat(path, tiny_llama3_tokenizer(), 200, lengths=(150, 400), seed=1)  # packed rows fill max_length
    return path


def run_config(name: str, work: Path) -> dict[str, Any]:
    _, shape, method, length, batch, checkpointing, fused = next(c for c in CONFIGS if c[0] == name)
    return {
        "model": {"name": str(model_dir(work, shape)), "dtype": "bf16", "gradient_checkpointing": checkpointing},
        "method": {"kind": method, "r": 16, "alpha": 32, "target": "all-linear"},
        "data": {
            "train": str(data_file(work)),
            "valid_split": 0.0,
            "packing": True,
            "max_length": length,
            "cache_dir": str(work / "cache"),
        },
        "train": {
            "batch_size": batch,
            "grad_accum": 1,
            "max_steps": STEPS,
            "save_every": 10_000,
            "log_every": 1,
            "fused_loss": fused,
        },
        "eval": {"samples": 0},
        "output": {"dir": str(work / f"run-{name}"), "overwrite": True},
    }


def measure_one(name: str, work: Path) -> dict[str, Any]:
    """Train one configuration in this process; return the plan's estimate beside the measured peak."""
    import tunelab  # noqa: F401
    from tunelab.advise.plan import Gpu, make_plan
    from tunelab.config import validate_config
    from tunelab.tasks import sft

    config = validate_config(run_config(name, work))
    plan = make_plan(config, Gpu("H100", 79.19, True))
    sft.train(config)
    run = Path(config.output.dir)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("event") == "train"]
    measured = max(r["mem_gib"] for r in train)
    estimated = plan.current.peak_allocated_gib
    return {
        "name": name,
        "measured_gib": measured,
        "estimated_gib": estimated,
        "error": (estimated - measured) / measured,
        "parts": {p.name: round(p.gib, 3) for p in plan.current.parts},
        "tokens_per_s": [r.get("tokens_per_s") for r in train],
        "loss": [r["loss"] for r in train],
    }


def measure_all(work: Path, names: list[str]) -> list[dict[str, Any]]:
    """Each configuration in a fresh process (a clean allocator), one after the other."""
    results = []
    for name in names:
        started = time.time()
        done = subprocess.run(
            [sys.executable, __file__, "--one", name, "--work", str(work)], capture_output=True, text=True
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            results.append({"name": name, "failed": (done.stdout + done.stderr)[-3000:]})
        else:
            results.append(json.loads(lines[-1][len("RESULT ") :]) | {"wall_s": round(time.time() - started, 1)})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "failed"}), flush=True)
        if "failed" in results[-1]:
            print(results[-1]["failed"], flush=True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| configuration | measured peak GiB | plan GiB | error |",
        "|---|---|---|---|",
    ]
    for r in results:
        if "failed" in r:
            rows.append(f"| {r['name']} | failed | | |")
        else:
            rows.append(f"| {r['name']} | {r['measured_gib']:.2f} | {r['estimated_gib']:.2f} | {r['error']:+.1%} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--work", type=Path, default=Path("/tmp/plan_accuracy"))
    parser.add_argument("--only", default=",".join(c[0] for c in CONFIGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one:
        print("RESULT " + json.dumps(measure_one(args.one, args.work)), flush=True)
        return
    names = args.only.split(",")
    for shape in sorted({c[1] for c in CONFIGS if c[0] in names}):
        model_dir(args.work, shape)
    data_file(args.work)
    results = measure_all(args.work, names)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plan_accuracy.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
