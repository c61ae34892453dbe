"""What the main process spends receiving scoring examples from DataLoader workers (issue 3's inference ratio):
single examples (tunelab before 0ccf668) against collated chunks of 4 (now), with pixel values in float32 and bf16.

On an H200 host the Scorer's main process waited 0.885 s for 256 examples at 448 px while the model's forward took
3.0 s, with the workers themselves able to prepare the 256 in about 1 s; the main process, not the workers, was the
limit (cProfile: 12,800 pipe reads and 2,048 file-descriptor receives). This measures that cost on any machine: the
main process's CPU seconds (time.process_time) and the wall seconds to receive every example of a Qwen2.5-VL-
processed test set, with one worker (two cores here; the GPU host has sixteen).

    python benchmarks/mcqa_loader.py --out /tmp/mcqa-loader
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


def receive(loader: torch.utils.data.DataLoader) -> tuple[float, float, int]:
    """(main-process CPU seconds, wall seconds, transfers) to take everything from the loader."""
    cpu, wall, count = time.process_time(), time.perf_counter(), 0
    for _ in loader:
        count += 1
    return time.process_time() - cpu, time.perf_counter() - wall, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/mcqa-loader"))
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    from tunelab.config import validate_config
    from tunelab.tasks import mcqa
    from tunelab.tasks.mcqa_data import Chunks, answer_tokens, length_order, read_questions

    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / "model"
    if not (model_dir / "config.json").exists():  # a tiny model: only its processor matters here
        bench.make_model_dir(model_dir, {**bench.SHAPES_SMOKE, "image_size": args.size}, torch.device("cpu"))
    test_csv = bench.make_data(args.out, args.test, args.size, 1, "test")
    config = validate_config({"task": "mcqa", "model": {"name": str(model_dir)}, "data": {"train": str(test_csv)}})
    processor = mcqa.vlm.load_processor(config.model)
    scorer = mcqa.Scorer(processor, answer_tokens(processor), config)
    questions = read_questions(str(test_csv), config, True, "test")
    dataset = scorer.dataset(questions, with_answer=False)
    order = length_order(questions, processor)
    pad_id = processor.tokenizer.pad_token_id
    rows = {}
    for dtype in (None, torch.bfloat16):
        dataset.pixel_dtype = dtype
        for chunk in (1, 4):
            pieces = [order[i : i + chunk] for i in range(0, len(order), chunk)]
            source = Chunks(dataset, pieces, pad_id)
            loader = torch.utils.data.DataLoader(source, batch_size=None, num_workers=args.workers)
            cpu, wall, count = receive(loader)
            name = f"chunks of {chunk}, pixels {'float32' if dtype is None else 'bf16'}"
            rows[name] = {"main_cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "transfers": count}
            print(f"{name}: main process {cpu:.3f} CPU s, {wall:.3f} wall s, {count} transfers", flush=True)
    (args.out / "loader.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
