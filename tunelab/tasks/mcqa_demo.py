"""`tunelab demo mcqa`: the embedded LLaVA-style model (ImageNet MobileNetV2 + SmolLM2-135M-Instruct, joined by a
projector trained here) fine-tuned on easy-VQA as multiple choice, on a CPU: valid accuracy before and after,
then a submission for held-out test questions scored against their answers."""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_mcqa_demo(out: Path, overrides: list[str]) -> Path:
    """Write the easy-VQA rows, train the mcqa-demo recipe into `out`, predict the test rows and print what
    happened (accuracy before / after, per kind, minutes)."""
    import pandas as pd
    from rich.console import Console

    from tunelab.config import load_config
    from tunelab.data.cache import cache_root
    from tunelab.data.demo_vqa import write_demo_vqa
    from tunelab.recipes import recipe_path
    from tunelab.tasks import mcqa
    from tunelab.track.metrics import read_metrics

    started = time.time()
    console = Console(stderr=True)
    config = load_config(recipe_path("mcqa-demo"), [f"output.dir={out}", *overrides])
    files = write_demo_vqa(cache_root(config.data.cache_dir) / "demo" / "easy_vqa")
    config.data.train, config.data.valid = str(files["train"]), str(files["valid"])
    config.data.image_root = str(files["image_root"])
    console.print(
        f"[bold]tunelab demo mcqa[/]: {config.model.name} (frozen ImageNet MobileNetV2 -> trained projector -> "
        f"LoRA SmolLM2-135M-Instruct) on easy-VQA multiple choice, {config.model.image_size} px, CPU -> {out}"
    )
    run_dir = mcqa.train(config, show_before=True)
    trained_at = time.time()

    records, _ = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r.get("event") == "eval"]
    console.print("valid accuracy: " + " -> ".join(f"{r['accuracy']:.3f} (step {r['step']})" for r in evals))
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    before = (summary.get("valid_before") or {}).get("accuracy")
    best = summary["best"]["value"]
    console.print(f"valid accuracy before {before:.4f}, after {best:.4f} (best, step {summary['best']['step']})")

    predictions = mcqa.predict_run(run_dir, str(files["test"]), run_dir / "submission.csv")
    truth = pd.read_csv(files["truth"], dtype=str)
    predicted = pd.read_csv(predictions, dtype=str)
    hits = truth["answer"].values == predicted["answer"].values
    by_kind = ", ".join(
        f"{kind} {hits[(truth['kind'] == kind).values].mean():.3f}" for kind in sorted(set(truth["kind"]))
    )
    console.print(f"test (never trained on): {len(truth)} questions, accuracy {hits.mean():.4f} ({by_kind})")
    console.print(f"submission: {predictions}, per-choice probabilities: {predictions.with_name('probs.csv')}")
    console.print(f"training {(trained_at - started) / 60:.1f} min, everything {(time.time() - started) / 60:.1f} min")
    return run_dir
