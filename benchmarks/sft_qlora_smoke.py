"""QLoRA smoke benchmark: `method.kind: qlora` (bitsandbytes NF4, double quant) against bf16 LoRA on a
random-init Llama-3.2-1B shape, 20 optimizer steps each, batch 4 x ~1000-2000-token chat examples.

Everything is built offline: the model is a random-init LlamaConfig of the Llama-3.2-1B shape saved in bf16 with
the tests' tiny llama3 tokenizer (its ~650 ids all lie inside the model's 128256-row embedding), the data is a
synthetic multi-turn chat JSONL. Needs a CUDA GPU (and bitsandbytes for qlora).

    python3 benchmarks/sft_qlora_smoke.py                    # build, run qlora and lora, print the table
    python3 benchmarks/sft_qlora_smoke.py --runs DIR [DIR]   # only print the table of finished run folders

tests/gpu/test_qlora_gpu.py runs the same helpers under pytest and asserts on the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

# Llama-3.2-1B: 1,235,814,400 parameters with tied embeddings; GQA with 32 query and 8 key/value heads.
LLAMA_32_1B: dict[str, Any] = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
LLAMA_32_1B_PARAMS = 1_235_814_400
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STEPS = 20


def tiny_llama3_tokenizer() -> Any:
    """The tests' offline llama3 tokenizer (byte-level BPE, real special tokens and chat template)."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from fixtures import make_tokenizer

    return make_tokenizer("llama3")


def save_model_dir(folder: Path, shape: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A random-init Llama of `shape` (default Llama-3.2-1B) saved in bf16 safetensors, with the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_llama3_tokenizer()
    config = LlamaConfig(
        **(shape or LLAMA_32_1B), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:  # initialising 1.2B weights takes seconds on a GPU, minutes on a CPU
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def _words() -> list[str]:
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from fixtures import SAMPLE_TEXT

    return sorted(set(re.findall(r"[^\s.,!?]+", SAMPLE_TEXT)))


def write_long_chat(path: Path, tokenizer: Any, n: int, lengths: tuple[int, int] = (1024, 2000), seed: int = 0) -> Path:
    """`n` multi-turn chat conversations whose rendered length (chat template) is drawn from `lengths`.

    Each turn asks to repeat or reverse 20-60 words; the answer does it, so about half the tokens are targets."""
    rng = random.Random(seed)
    words = _words()

    def length(messages: list[dict[str, str]]) -> int:
        return len(
            tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        )

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            low, high = lengths
            target = rng.randint(low, high)
            messages: list[dict[str, str]] = []
            if i % 2:
                messages.append({"role": "system", "content": "You are a concise assistant."})
            while True:
                chosen = [rng.choice(words) for _ in range(rng.randint(20, 60))]
                reverse = rng.random() < 0.5
                turn = [
                    {
                        "role": "user",
                        "content": ("Reverse" if reverse else "Repeat") + " these words: " + " ".join(chosen),
                    },
                    {"role": "assistant", "content": " ".join(reversed(chosen) if reverse else chosen)},
                ]
                if len(messages) > 1 and length(messages + turn) > target:
                    break
                messages += turn
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


def smoke_config(
    kind: str,
    model_dir: Path,
    train_file: Path,
    valid_file: Path,
    workdir: Path,
    steps: int = STEPS,
    max_length: int = 2048,
) -> dict[str, Any]:
    """The run config of one smoke run: r 16 all-linear, batch 4, no accumulation, one save and eval at the end."""
    return {
        "model": {"name": str(model_dir), "dtype": "bf16"},
        "method": {"kind": kind, "r": 16, "alpha": 32, "target": "all-linear"},
        "data": {
            "train": str(train_file),
            "valid": str(valid_file),
            "max_length": max_length,
            "cache_dir": str(workdir / "cache"),
        },
        "train": {
            "batch_size": 4,
            "grad_accum": 1,
            "max_steps": steps,
            "eval_every": 10_000,
            "save_every": 10_000,
            "log_every": 1,
            "seed": 0,
        },
        "eval": {"samples": 0, "batch_size": 4},
        "output": {"dir": str(workdir / f"run-{kind}"), "overwrite": True},
    }


def summarize(run_dir: Path, method: str | None = None) -> dict[str, Any]:
    """Throughput, memory and losses of a finished run, from its metrics.jsonl and summary.json."""
    run_dir = Path(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    start = next((r for r in records if r.get("event") == "start"), {})
    steady = [r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s")]
    if method is None:
        import yaml

        method = yaml.safe_load((run_dir / "config.yaml").read_text())["method"]["kind"]
    return {
        "method": method,
        "steps": summary.get("steps"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "tokens_per_s_steady": statistics.median(steady) if steady else None,
        "peak_mem_gib": summary.get("peak_mem_gib"),
        "train_mem_gib": max((r["mem_gib"] for r in train if r.get("mem_gib") is not None), default=None),
        "loss_first": train[0]["loss"] if train else None,
        "loss_last": train[-1]["loss"] if train else None,
        "valid_loss": evals[-1]["loss"] if evals else None,
        "trainable": start.get("trainable"),
        "total_params": start.get("total_params"),
        "wall_s": summary.get("wall_s"),
        "summary": summary,
        "records": records,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of summarize() rows."""

    def fmt(value: Any, digits: int) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    header = [
        "method",
        "tokens/s (20 steps)",
        "tokens/s (steps 2-20, median)",
        "peak GiB",
        "peak reserved GiB",
        "loss step 1",
        f"loss step {STEPS}",
        "valid loss",
        "trainable / total params",
        "run wall s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        params = f"{r['trainable'] / 1e6:.1f}M / {r['total_params'] / 1e6:.1f}M" if r.get("total_params") else "-"
        cells = [
            r["method"],
            fmt(r.get("tokens_per_s"), 0),
            fmt(r.get("tokens_per_s_steady"), 0),
            fmt(r.get("peak_mem_gib"), 2),
            fmt(r.get("peak_reserved_gib"), 1),
            fmt(r.get("loss_first"), 3),
            fmt(r.get("loss_last"), 3),
            fmt(r.get("valid_loss"), 3),
            params,
            fmt(r.get("wall_s"), 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_all(workdir: Path, kinds: tuple[str, ...] = ("qlora", "lora")) -> list[dict[str, Any]]:
    """Build the model and data under `workdir`, train each method, return the summarize() rows (plus the
    caching allocator's peak reservation, which tunelab's peak_mem_gib, an allocation peak, leaves out)."""
    from tunelab.config import load_config
    from tunelab.tasks import sft

    model_dir = save_model_dir(workdir / "llama-3.2-1b-shape")
    tokenizer = tiny_llama3_tokenizer()
    train_file = write_long_chat(workdir / "train.jsonl", tokenizer, n=4 * STEPS, seed=0)
    valid_file = write_long_chat(workdir / "valid.jsonl", tokenizer, n=8, seed=1)
    rows = []
    for kind in kinds:
        gc.collect()
        torch.cuda.empty_cache()
        run_dir = sft.train(load_config(smoke_config(kind, model_dir, train_file, valid_file, workdir)))
        rows.append({**summarize(run_dir, kind), "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="*", type=Path, help="finished run folders: only print their table")
    parser.add_argument("--workdir", type=Path, help="where to build the model, data and runs (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the rows (with every metrics record) here")
    args = parser.parse_args(argv)
    if args.runs:
        rows = [summarize(run) for run in args.runs]
    else:
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU")
        if args.workdir:
            rows = run_all(args.workdir)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                rows = run_all(Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str), encoding="utf-8")
    if torch.cuda.is_available():
        print(torch.cuda.get_device_name(0))
    print(table(rows))


if __name__ == "__main__":
    main()
