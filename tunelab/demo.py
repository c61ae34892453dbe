"""`tunelab demo`: a built-in recipe end to end on the embedded default model and data, on a CPU in minutes."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import UserError


def run_demo(task: str, out: Path | None, overrides: list[str]) -> Path:
    """Write the demo data, train the demo recipe into `out` (default runs/demo-TASK), and print answers before
    and after."""
    out = Path(out) if out is not None else Path(f"runs/demo-{task}")
    if task == "summarize":
        from tunelab.tasks.summarize_demo import run_summarize_demo

        return run_summarize_demo(out, overrides)
    if task == "image_cls":
        from tunelab.tasks.image_cls_demo import run_image_cls_demo

        return run_image_cls_demo(out, overrides)
    if task == "mcqa":
        from tunelab.tasks.mcqa_demo import run_mcqa_demo

        return run_mcqa_demo(out, overrides)
    if task != "sft":
        raise UserError(f"No demo for task '{task}' in this version. Available: sft, summarize, image_cls, mcqa.")
    from rich.console import Console
    from rich.table import Table

    from tunelab.config import load_config
    from tunelab.data.cache import cache_root
    from tunelab.data.demo_data import write_demo_sft_data
    from tunelab.recipes import recipe_path
    from tunelab.tasks import sft
    from tunelab.track.metrics import read_metrics

    console = Console(stderr=True)
    config = load_config(recipe_path("sft-demo"), [f"output.dir={out}", *overrides])
    files = write_demo_sft_data(cache_root(config.data.cache_dir) / "demo" / "sft")
    config.data.train, config.data.valid = str(files["train"]), str(files["valid"])
    console.print(
        f"[bold]tunelab demo sft[/]: LoRA on {config.model.name}, chatterbot-corpus (English + Korean) -> {out}"
    )
    run_dir = sft.train(config, show_before=True)

    records, _ = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r.get("event") == "eval"]
    if evals:
        console.print("valid loss: " + " -> ".join(f"{r['loss']:.3f} (step {r['step']})" for r in evals))
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    table = Table("question", "before", "after", "reference", show_lines=True)
    for before, after in zip(summary.get("samples_before", []), summary.get("samples_after", []), strict=False):
        table.add_row(
            *(_short(text) for text in (before["prompt"], before["answer"], after["answer"], after["reference"]))
        )
    console.print(table)
    return run_dir


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
