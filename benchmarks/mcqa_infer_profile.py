"""Where mcqa inference time goes (issue 3's inference ratio), on benchmarks/mcqa.py's random-init Qwen2.5-VL-3B
shape with a LoRA r 32 adapter on its language model (as the benchmark's trained run has).

Prints, as JSON: example preparation, the loader alone, one batch's forward and vision tower, the Scorer over all
questions; a per-phase split of the Scorer's loop (wait for examples, collate, host-to-device copy, forward,
read-back; each phase synchronised, so the sum exceeds the overlapped total); then a cProfile of the Scorer's main
process and the top CUDA / CPU ops of one forward. Untrained weights (scoring cost does not depend on them).

    python benchmarks/mcqa_infer_profile.py --out /tmp/mcqa-profile          # GPU
    python benchmarks/mcqa_infer_profile.py --smoke --out /tmp/mcqa-profile  # CPU wiring check
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import itertools
import json
import pstats
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


def phases(scorer, model, questions, device: torch.device, workers: int) -> dict[str, float]:
    """The Scorer's loop (tunelab.tasks.mcqa.score) with every phase synchronised and timed."""
    from tunelab.tasks import mcqa
    from tunelab.tasks.mcqa_data import Chunks, collate, length_order

    dataset = scorer.dataset(questions, with_answer=False)
    batch_size, pad_id = scorer.config.eval.batch_size, scorer.processor.tokenizer.pad_token_id
    names = ("loader_start", "wait_examples", "collate_and_positions", "to_device", "forward", "read_back")
    times = dict.fromkeys(names, 0.0)
    started = time.perf_counter()
    order = length_order(questions, scorer.processor)
    chunk = next(size for size in (4, 2, 1) if batch_size % size == 0) if workers else 1
    pieces = [order[i : i + chunk] for i in range(0, len(order), chunk)]
    loader = torch.utils.data.DataLoader(
        Chunks(dataset, pieces, pad_id), batch_size=None, num_workers=workers, pin_memory=device.type == "cuda"
    )
    received = iter(loader)
    times["loader_start"] = time.perf_counter() - started
    for _ in range(0, len(questions), batch_size):
        t0 = time.perf_counter()
        group = list(itertools.islice(received, batch_size // chunk))
        t1 = time.perf_counter()
        batch = collate(group, pad_id, skip=("pixel_values",))
        positions = mcqa.vlm.rope_positions(model, batch)
        if positions is not None:
            batch["position_ids"] = positions
        t2 = time.perf_counter()
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        batch["pixel_values"] = torch.cat([c["pixel_values"].to(device, non_blocking=True) for c in group])
        bench._sync(device)
        t3 = time.perf_counter()
        logits = mcqa.answer_logits(model, batch, 1)
        bench._sync(device)
        t4 = time.perf_counter()
        logits[:, 0].softmax(-1).cpu()
        t5 = time.perf_counter()
        for key, (a, b) in zip(list(times)[1:], [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5)], strict=True):
            times[key] += b - a
    times["total"] = time.perf_counter() - started
    return {key: round(value, 3) for key, value in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mcqa-profile"))
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    from tunelab.config import validate_config
    from tunelab.models import fused_inference
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
            "method": {"kind": "lora", "r": 32, "alpha": 64, "dropout": 0.05},
            "data": {"train": str(test_csv)},
            "eval": {"batch_size": args.batch},
        }
    )
    processor = mcqa.vlm.load_processor(config.model)
    model = mcqa.build_model(config, device).eval()  # LoRA r 32 on the language model, projector trained
    scorer = mcqa.Scorer(processor, answer_tokens(processor), config)
    questions = read_questions(str(test_csv), config, True, "test")
    dataset = scorer.dataset(questions, with_answer=False)
    workers = mcqa.loader_workers(config, device)
    report: dict[str, object] = {"questions": len(questions), "workers": workers}

    n = min(32, len(dataset))
    report["prepare_one_ms"] = seconds(lambda: [dataset[i] for i in range(n)], device) / n * 1000
    report["length_order_s"] = seconds(lambda: length_order(questions, processor), device)
    order = length_order(questions, processor)

    def load_all() -> None:
        for _ in torch.utils.data.DataLoader(dataset, batch_size=None, sampler=order, num_workers=workers):
            pass

    report["loader_all_s"] = seconds(load_all, device)
    batch = collate([dataset[i] for i in order[: args.batch]], processor.tokenizer.pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        mcqa.answer_logits(model, batch, 1)  # warm-up
        report["forward_batch_s"] = seconds(lambda: mcqa.answer_logits(model, batch, 1), device)
        visual = getattr(model, "visual", None) or model.base_model.model.model.visual
        pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
        with mcqa.half_autocast(model, device):
            report["vision_batch_s"] = seconds(lambda: visual(pixels, grid_thw=grid), device)
    scorer.probabilities(model, questions[:8], permute=False)  # warm-up, as benchmarks/mcqa.py
    report["scorer_all_s"] = seconds(lambda: scorer.probabilities(model, questions, permute=False), device)
    report["scorer_samples_per_s"] = len(questions) / report["scorer_all_s"]
    steps = (fused_inference.RMS_NORM, fused_inference.SILU_MUL, fused_inference.VISION_ROTARY)
    for step in steps:  # the reference twins instead of the compiled steps
        step.failed = True
    report["unfused_scorer_all_s"] = seconds(lambda: scorer.probabilities(model, questions, permute=False), device)
    report["unfused_samples_per_s"] = len(questions) / report["unfused_scorer_all_s"]
    for step in steps:
        step.failed = False
    with torch.no_grad():
        report["phases"] = phases(scorer, model, questions, device, workers)
    print(json.dumps(report, indent=2), flush=True)

    profiler = cProfile.Profile()
    profiler.enable()
    scorer.probabilities(model, questions, permute=False)
    bench._sync(device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue()[-9000:], flush=True)
    if device.type == "cuda":
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
            mcqa.answer_logits(model, batch, 1)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=50))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=50))

    merged = model.merge_and_unload().eval()
    scorer.probabilities(merged, questions[:8], permute=False)
    report["merged_scorer_all_s"] = seconds(lambda: scorer.probabilities(merged, questions, permute=False), device)
    report["merged_samples_per_s"] = len(questions) / report["merged_scorer_all_s"]
    with torch.no_grad():
        report["merged_phases"] = phases(scorer, merged, questions, device, workers)
    print(json.dumps({k: v for k, v in report.items() if k.startswith("merged")}, indent=2))
    (args.out / "profile.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
