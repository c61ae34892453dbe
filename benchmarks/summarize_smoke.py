"""summarize on the GPU: a decoder QLoRA run (random-init Llama-3.2-1B shape) and a seq2seq LoRA run (random-init
BART-large shape) train 20 steps, evaluate with generation, and generate summaries for a test file; training
tokens/s and generation throughput (summaries/s, new tokens/s) are measured.

Everything is built offline: random weights of the real shapes saved in bf16, the tests' tiny tokenizers (their ids
all lie inside the real vocabularies, so the embeddings are not resized), the package's generated dialogues with
the speaker tags registered as special tokens (their rows trained beside the adapter). Random weights decide when
end-of-sequence comes: the Llama shape ran every output to max_new_tokens, the BART shape stopped after ~10 tokens,
so compare new tokens/s, not summaries/s, across the two.

    python3 benchmarks/summarize_smoke.py [--out DIR]      # both runs, prints the table (JSON per run into DIR)

tests/gpu/test_summarize_gpu.py runs the same helpers under pytest and asserts on the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
# BART-large: 12 + 12 layers, d_model 1024, 16 heads, FFN 4096, vocabulary 50265, 1024 positions (406M parameters).
BART_LARGE: dict[str, Any] = dict(
    d_model=1024,
    encoder_layers=12,
    decoder_layers=12,
    encoder_attention_heads=16,
    decoder_attention_heads=16,
    encoder_ffn_dim=4096,
    decoder_ffn_dim=4096,
    vocab_size=50265,
    max_position_embeddings=1024,
)
TAGS = ["#Person1#", "#Person2#", "#Person3#"]


def _tests_path() -> None:
    for folder in (ROOT / "tests", ROOT / "tests" / "summarize"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def save_bart_large_shape(folder: Path, seed: int = 0) -> Path:
    """A random-init BART of the BART-large shape (bf16 safetensors) with the tests' tiny BART tokenizer."""
    _tests_path()
    from tiny import make_bart_tokenizer
    from transformers import BartConfig, BartForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_bart_tokenizer()
    config = BartConfig(**BART_LARGE, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                        forced_bos_token_id=None, forced_eos_token_id=2)  # fmt: skip
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = BartForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    gc.collect()
    _sync(empty=True)
    return folder


def save_llama_1b_shape(folder: Path) -> Path:
    """The sft smoke's random-init Llama-3.2-1B shape with the tiny llama3 tokenizer."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sft_qlora_smoke

    return sft_qlora_smoke.save_model_dir(folder)


def write_data(folder: Path, n_train: int, n_valid: int, n_test: int) -> dict[str, Path]:
    """Generated dialogues (English and Korean) as train / valid / test CSV."""
    from tunelab.data.demo_dialogues import write_demo_summarize_data

    return write_demo_summarize_data(folder, n_train, n_valid, n_test)


def run_config(kind: str, model_dir: Path, files: dict[str, Path], out: Path) -> dict[str, Any]:
    """The run: qlora on the decoder, lora on the seq2seq model; r 16 all-linear, batch 16, 20 steps, one
    evaluation (valid loss + ROUGE on 32 generated summaries, 4 beams) at the end."""
    return {
        "task": "summarize",
        "model": {"name": str(model_dir), "kind": kind, "dtype": "bf16"},
        "method": {"kind": "qlora" if kind == "causal" else "lora", "r": 16, "alpha": 32, "target": "all-linear"},
        "data": {"train": str(files["train"]), "valid": str(files["valid"]), "max_length": 1024,
                 "max_target_length": 256, "special_tokens": TAGS},
        "train": {"max_steps": STEPS, "batch_size": 16, "grad_accum": 1, "lr": 2e-4, "eval_every": STEPS,
                  "save_every": STEPS, "seed": 0},
        "eval": {"max_new_tokens": 64, "batch_size": 32, "num_beams": 4, "no_repeat_ngram_size": 3,
                 "generate_subset": 32},
        "output": {"dir": str(out), "overwrite": True},
    }  # fmt: skip


def _sync(empty: bool = False) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        if empty:
            torch.cuda.empty_cache()


def measure_generation(run_dir: Path, test_file: Path, num_beams: int) -> dict[str, Any]:
    """Summaries of every test row from the run's best weights, timed; new tokens counted from generate's output."""
    from tunelab.tasks import summarize
    from tunelab.tasks import summarize_data as sd

    config, tokenizer, model, kind = summarize.load_trained(run_dir)
    config.eval.num_beams = num_beams
    rows = sd.read_dialogues(str(test_file), config, need_summary=False)
    counted = {"new_tokens": 0}
    generate = model.generate

    def counting_generate(*args: Any, **kwargs: Any) -> torch.Tensor:
        output = generate(*args, **kwargs)
        prompt = 1 if kind == "seq2seq" else kwargs["input_ids"].shape[1]  # seq2seq: after the decoder start
        new = output[:, prompt:]
        counted["new_tokens"] += int((new != tokenizer.pad_token_id).sum())
        return output

    model.generate = counting_generate
    summarize.generate_summaries(model, tokenizer, rows[:8], kind, config)  # warm-up (kernels, allocator)
    counted["new_tokens"] = 0
    _sync()
    started = time.perf_counter()
    summaries = summarize.generate_summaries(model, tokenizer, rows, kind, config)
    _sync()
    seconds = time.perf_counter() - started
    del model
    gc.collect()
    _sync(empty=True)
    return {
        "rows": len(rows),
        "num_beams": num_beams,
        "batch_size": config.eval.batch_size,
        "max_new_tokens": config.eval.max_new_tokens,
        "seconds": seconds,
        "summaries_per_s": len(rows) / seconds,
        "new_tokens_per_s": counted["new_tokens"] / seconds,
        "example": summaries[0][:120],
    }


def run_one(kind: str, workdir: Path) -> dict[str, Any]:
    """Build the model, train, evaluate, generate; the figures of one run."""
    from tunelab.config import load_config
    from tunelab.tasks import summarize

    files = write_data(workdir / "data", 16 * STEPS, 32, 64)
    model_dir = save_llama_1b_shape(workdir / "llama-1b") if kind == "causal" else save_bart_large_shape(
        workdir / "bart-large"
    )  # fmt: skip
    config = load_config(run_config(kind, model_dir, files, workdir / f"run-{kind}"))
    started = time.perf_counter()
    run_dir = summarize.train(config)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    train = [r for r in records if r.get("event") == "train"]
    rates = sorted(r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s"))
    row = {
        "kind": kind,
        "method": config.method.kind,
        "summary": summary,
        "records": records,
        "train_wall_s": wall,
        "tokens_per_s": summary["tokens_per_s"],
        "tokens_per_s_median": rates[len(rates) // 2] if rates else None,
        "peak_mem_gib": summary["peak_mem_gib"],
        "loss_first": train[0]["loss"],
        "loss_last": train[-1]["loss"],
        "eval": summary["final"],
        "start": next(r for r in records if r.get("event") == "start"),
    }
    row["generation"] = measure_generation(run_dir, files["test"], num_beams=4)
    row["generation_greedy"] = measure_generation(run_dir, files["test"], num_beams=1)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the runs."""
    lines = [
        "| model shape, method | train tokens/s (20 steps) | median | peak GiB | loss step 1 -> 20 | valid rouge_sum | "
        "gen beams 4: summaries/s, new tok/s | greedy: summaries/s, new tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = "Llama-3.2-1B" if r["kind"] == "causal" else "BART-large"
        g, q = r["generation"], r["generation_greedy"]
        lines.append(
            f"| {shape}, {r['method']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_median']:,.0f} | "
            f"{r['peak_mem_gib'] or 0:.2f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | "
            f"{r['eval'].get('rouge_sum', float('nan')):.2f} | "
            f"{g['summaries_per_s']:.1f}, {g['new_tokens_per_s']:,.0f} | "
            f"{q['summaries_per_s']:.1f}, {q['new_tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Both runs, one after the other, in a temporary folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON of each run and the table")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("causal", "seq2seq"):
            rows.append(run_one(kind, Path(tmp)))
            gc.collect()
            torch.cuda.empty_cache()
    text = f"summarize smoke on {torch.cuda.get_device_name(0)}, torch {torch.__version__}\n" + table(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summarize_smoke_table.md").write_text(text + "\n", encoding="utf-8")
        for row in rows:
            (args.out / f"summarize_smoke_{row['kind']}.json").write_text(json.dumps(row, indent=2, default=str))


if __name__ == "__main__":
    main()
