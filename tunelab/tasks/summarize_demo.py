"""`tunelab demo summarize`: LoRA on the embedded SmolLM2-135M-Instruct over generated dialogues (English and
Korean), with ROUGE on the held-out split before and after fine-tuning and a few summaries side by side."""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_summarize_demo(out: Path, overrides: list[str]) -> Path:
    """Write the demo dialogues, train the summarize-demo recipe into `out`, predict the test split, and print
    ROUGE before / after and sample summaries."""
    from rich.console import Console
    from rich.table import Table

    from tunelab.config import load_config
    from tunelab.data.cache import cache_root
    from tunelab.data.demo_dialogues import write_demo_summarize_data
    from tunelab.recipes import recipe_path
    from tunelab.tasks import summarize
    from tunelab.track.metrics import read_metrics

    started = time.time()
    console = Console(stderr=True)
    config = load_config(recipe_path("summarize-demo"), [f"output.dir={out}", *overrides])
    files = write_demo_summarize_data(cache_root(config.data.cache_dir) / "demo" / "summarize", 240, 16, 4)
    config.data.train, config.data.valid, config.data.test = (str(files[k]) for k in ("train", "valid", "test"))
    console.print(
        f"[bold]tunelab demo summarize[/]: LoRA on {config.model.name}, generated dialogues (English + Korean) -> {out}"
    )
    run_dir = summarize.train(config, show_before=True)
    predictions = summarize.predict_run(run_dir, config.data.test, run_dir / "predictions.csv")

    records, _ = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r.get("event") == "eval"]
    table = Table("valid (held out)", *(f"step {r['step']}" for r in evals))
    for key in ("rouge1", "rouge2", "rougeL", "rouge_sum", "loss"):
        table.add_row(key, *(f"{r[key]:.2f}" if key != "loss" else f"{r[key]:.3f}" for r in evals))
    console.print(table)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    samples = Table("dialogue", "before", "after", "reference", show_lines=True)
    for item in summary.get("samples", []):
        samples.add_row(*(_short(item[k]) for k in ("dialogue", "before", "after", "reference")))
    console.print(samples)
    console.print(f"predictions: {predictions}; {(time.time() - started) / 60:.1f} minutes in all")
    return run_dir


def _short(text: str, limit: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
