"""`tunelab demo image_cls`: the embedded ImageNet MobileNetV2 fine-tuned on scikit-learn's handwritten digits
on a CPU, with validation accuracy (raw and EMA weights), the confusion matrix, test predictions, and the INT8
export compared with fp32."""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_image_cls_demo(out: Path, overrides: list[str]) -> Path:
    """Write the digits as PNG class folders, train the image_cls-demo recipe into `out`, predict the held-out
    test images, export INT8, and print what happened."""
    import pandas as pd
    from rich.console import Console

    from tunelab.config import load_config
    from tunelab.data.cache import cache_root
    from tunelab.data.demo_images import write_digits
    from tunelab.recipes import recipe_path
    from tunelab.tasks import image_cls
    from tunelab.track.metrics import read_metrics

    started = time.time()
    console = Console(stderr=True)
    config = load_config(recipe_path("image_cls-demo"), [f"output.dir={out}", *overrides])
    files = write_digits(cache_root(config.data.cache_dir) / "demo" / "digits")
    config.data.train = str(files["train"])
    console.print(
        f"[bold]tunelab demo image_cls[/]: {config.model.name} (embedded ImageNet weights) on scikit-learn's "
        f"handwritten digits, {config.model.image_size} px, CPU -> {out}"
    )
    run_dir = image_cls.train(config)
    trained_at = time.time()

    records, _ = read_metrics(run_dir / "metrics.jsonl")
    for record in (r for r in records if r.get("event") == "eval"):
        console.print(
            f"  epoch {record['epoch']:.1f}: valid accuracy {record['accuracy']:.4f} raw, "
            f"{record.get('ema_accuracy', float('nan')):.4f} EMA"
        )
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    valid = summary.get("valid", {})
    console.print(f"best ({summary['best']['metric']}): valid accuracy {valid.get('accuracy', 0):.4f}")
    _print_matrix(console, valid.get("confusion_matrix", []), json.loads((run_dir / "classes.json").read_text()))
    console.print(f"confusion matrix plot: {run_dir / 'confusion_matrix.png'}")

    predictions = image_cls.predict_run(run_dir, str(files["test"]), run_dir / "predictions.csv")
    truth = pd.read_csv(files["test"], dtype=str)
    predicted = pd.read_csv(predictions, dtype=str)
    test_accuracy = float((truth["label"].values == predicted["label"].values).mean())
    console.print(f"test (never trained on): {len(truth)} images, accuracy {test_accuracy:.4f} -> {predictions}")
    image_cls.export_run(run_dir, run_dir / "export", int8=True)
    console.print(f"training {(trained_at - started) / 60:.1f} min, everything {(time.time() - started) / 60:.1f} min")
    return run_dir


def _print_matrix(console: object, matrix: list[list[int]], classes: list[str]) -> None:
    """The confusion matrix as text: rows true class, columns predicted."""
    if not matrix:
        return
    width = max(3, *(len(str(v)) for row in matrix for v in row), *(len(c) for c in classes))
    lines = ["true \\ predicted " + " ".join(c.rjust(width) for c in classes)]
    for name, row in zip(classes, matrix, strict=True):
        lines.append(f"{name:>16} " + " ".join(str(v).rjust(width) for v in row))
    console.print("\n".join(lines), highlight=False)  # type: ignore[attr-defined]
