"""Where mcqa inference time goes (issue 3's inference ratio): example preparation (image decode + processor),
the DataLoader over it, and the model's forward per batch, on benchmarks/mcqa.py's random-init Qwen2.5-VL-3B shape.

Untrained weights (scoring cost does not depend on them). Prints seconds per part and the top CUDA ops of one
batch's forward.

    python benchmarks/mcqa_infer_profile.py --out /tmp/mcqa-profile          # GPU
    python benchmarks/mcqa_infer_profile.py --smoke --out /tmp/mcqa-profile  # CPU wiring check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

# isort: off
import tunelab  # noqa: F401 - first: its torchvision shim (tunelab._compat) precedes transformers
import torch

# isort: on

_spec = importlib.util.spec_from_file_location("mcqa_bench", Path(__file__).resolve().parent / "mcqa.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def seconds(fn, device: torch.device) -> float:
    """Wall seconds of fn(), the GPU finished."""
    bench._sync(device)
    started = time.perf_counter()
    fn()
    bench._sync(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mcqa-profile"))
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    from tunelab.config import validate_config
    from tunelab.models import vlm
    from tunelab.tasks import mcqa
    from tunelab.tasks.mcqa_data import answer_tokens, collate, length_order, read_questions

    device = torch.device("cuda") if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    shapes = bench.SHAPES_SMOKE if args.smoke else bench.SHAPES_3B
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / "model"
    if not (model_dir / "config.json").exists():
        bench.make_model_dir(model_dir, shapes, device)
    test_csv = bench.make_data(args.out, args.test, shapes["image_size"], 1, "test")
    config = validate_config(
        {
            "task": "mcqa",
            "model": {"name": str(model_dir), "dtype": "bf16"},
            "data": {"train": str(test_csv)},
            "eval": {"batch_size": args.batch},
        }
    )
    processor = vlm.load_processor(config.model)
    model = vlm.load_vlm(config.model, "lora", device).eval()
    scorer = mcqa.Scorer(processor, answer_tokens(processor), config)
    questions = read_questions(str(test_csv), config, True, "test")
    dataset = scorer.dataset(questions, with_answer=False)
    report: dict[str, float] = {"questions": len(questions), "workers": mcqa.loader_workers(config, device)}

    n = min(32, len(dataset))
    report["prepare_one_ms"] = seconds(lambda: [dataset[i] for i in range(n)], device) / n * 1000
    report["length_order_s"] = seconds(lambda: length_order(questions, processor), device)
    order = length_order(questions, processor)

    def load_all() -> None:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=order, num_workers=report["workers"] or 0
        )
        for _ in loader:
            pass

    report["loader_all_s"] = seconds(load_all, device)
    batch = collate([dataset[i] for i in order[: args.batch]], processor.tokenizer.pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        mcqa.answer_logits(model, batch, 1)  # warm-up
        report["forward_batch_s"] = seconds(lambda: mcqa.answer_logits(model, batch, 1), device)
        visual = getattr(model, "visual", None) or model.model.visual
        pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
        with mcqa.half_autocast(model, device):
            report["vision_batch_s"] = seconds(lambda: visual(pixels, grid_thw=grid), device)
    report["scorer_all_s"] = seconds(lambda: scorer.probabilities(model, questions, permute=False), device)
    report["scorer_samples_per_s"] = len(questions) / report["scorer_all_s"]
    print(json.dumps(report, indent=2))
    if device.type == "cuda":
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
            mcqa.answer_logits(model, batch, 1)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=50))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=50))
    (args.out / "profile.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
