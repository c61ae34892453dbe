"""How close is `tunelab plan` to the memory a real run takes? Measured on the GPU machine.

sft rows: a random-init Llama of the real shape (Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B; saved once in bf16 with
the tests' tiny llama3 tokenizer), `tunelab.tasks.sft.train` for a few optimizer steps on packed synthetic chat data
(every row `max_length` tokens, as the plan assumes).

mcqa rows (vision-language): benchmarks/mcqa.py's random-init Qwen2.5-VL-3B shape (36 x 2048 language layers, vocab
151,936, tied; 32-block 1280-wide vision tower; bf16, with the tests' tiny chatml tokenizer carrying Qwen2-VL's
vision tokens) and its synthetic 4-choice questions on 448 x 448 images (model.image_size 448: 256 image tokens a
row), `tunelab.tasks.mcqa.train` for a few optimizer steps: LoRA / QLoRA r 16 all-linear on the language model,
vision encoder frozen, projector trained (method.train_parts' defaults), loss at the answer positions only. The plan
reads the same config: image tokens from the model's config.json and model.image_size, prompt tokens from the
data file (its 3.5 characters a token; the result's `row_tokens` puts that beside the tokens a training row really
has with the tiny tokenizer), the head on 3 positions a row, the projector's states.

Each run is a fresh process; the measured figure is the largest `mem_gib` (torch.cuda.max_memory_allocated) of
the train records in metrics.jsonl, compared with the plan's `peak_allocated_gib` (make_plan on an H100 preset).

    python3 benchmarks/plan_accuracy.py --out DIR             # every configuration, a table and plan_accuracy.json
    python3 benchmarks/plan_accuracy.py --only 1b-lora-1024   # one of them (comma-separated names for several)
    python3 benchmarks/plan_accuracy.py --only vl3b-lora-448,vl3b-qlora-448 --out DIR   # the mcqa rows
    python3 benchmarks/plan_accuracy.py --tiny --work /tmp/pa-tiny   # CPU: the mcqa LoRA row on a tiny shape

--tiny checks the wiring on a CPU: benchmarks/mcqa.py's tiny Qwen2.5-VL (SHAPES_SMOKE, 112 px images) goes
through the same preparation, subprocess, plan, training and result path; there is no CUDA peak to read, so
`measured_gib` and `error` are null. It covers the mcqa rows only (QLoRA needs CUDA).

tests/gpu/test_plan_gpu.py runs it and asserts every estimate is within 15% of its measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, head_dim=64),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, head_dim=128),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, head_dim=128),
}
COMMON = dict(num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)
TIED = {"1b": True, "3b": True, "8b": False}
# vision-language shapes: names of benchmarks/mcqa.py's shape dicts (text, vision, image_size), the real one and the
# tiny one of the same family that --tiny builds instead
VLM_SHAPES: dict[str, tuple[str, str]] = {"vl3b": ("SHAPES_3B", "SHAPES_SMOKE")}


class Config(NamedTuple):
    """One row of the table."""

    name: str
    shape: str  # a key of SHAPES (sft, Llama) or VLM_SHAPES (mcqa)
    method: str  # lora | qlora
    max_length: int | None  # sft: packed row length; mcqa: None (image tokens + the prompt set a row's length)
    batch: int  # micro-batch
    checkpointing: bool
    fused_loss: bool  # train.fused_loss (sft; mcqa's head runs on the answer positions only)
    task: str = "sft"  # sft | mcqa


# the default loss on CUDA is the fused one, the "-plain" rows keep the full logits (train.fused_loss: false)
CONFIGS: list[Config] = [
    Config("1b-lora-1024", "1b", "lora", 1024, 4, True, True),
    Config("1b-qlora-2048", "1b", "qlora", 2048, 4, True, True),
    Config("1b-lora-2048-nockpt", "1b", "lora", 2048, 2, False, True),
    Config("3b-lora-2048", "3b", "lora", 2048, 2, True, True),
    Config("3b-qlora-1024", "3b", "qlora", 1024, 4, True, True),
    Config("8b-lora-2048", "8b", "lora", 2048, 2, True, True),
    Config("8b-qlora-1024", "8b", "qlora", 1024, 4, True, True),
    Config("8b-qlora-2048", "8b", "qlora", 2048, 2, True, True),
    Config("1b-lora-1024-plain", "1b", "lora", 1024, 4, True, False),
    Config("1b-lora-2048-nockpt-plain", "1b", "lora", 2048, 2, False, False),
    Config("8b-qlora-2048-plain", "8b", "qlora", 2048, 2, True, False),
    Config("vl3b-lora-448", "vl3b", "lora", None, 8, True, False, task="mcqa"),
    Config("vl3b-qlora-448", "vl3b", "qlora", None, 8, True, False, task="mcqa"),
]
STEPS = 3
MCQA_ROWS = 64  # synthetic questions in the mcqa training file (STEPS x micro-batch of them are read)


def config_row(name: str) -> Config:
    """The CONFIGS entry called `name`; SystemExit listing the names when there is none."""
    for row in CONFIGS:
        if row.name == name:
            return row
    raise SystemExit(f"unknown configuration {name!r}; known: {', '.join(c.name for c in CONFIGS)}")


def vlm_shapes(shape: str, tiny: bool) -> dict[str, Any]:
    """benchmarks/mcqa.py's shape dict (text config, vision config, image_size) for a VLM_SHAPES key."""
    import mcqa as mcqa_bench

    return getattr(mcqa_bench, VLM_SHAPES[shape][1 if tiny else 0])


def model_dir(work: Path, shape: str, tiny: bool = False) -> Path:
    """The random-init model of `shape`, built once (on the GPU: seconds) and saved in bf16."""
    if shape in VLM_SHAPES:
        import mcqa as mcqa_bench
        import torch

        folder = work / f"qwen2_5_vl-{shape}{'-tiny' if tiny else ''}"
        if not (folder / "config.json").exists():
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            mcqa_bench.make_model_dir(folder, vlm_shapes(shape, tiny), device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return folder
    if tiny:
        raise SystemExit("--tiny builds the mcqa rows' tiny shapes only; name mcqa rows with --only")
    from sft_qlora_smoke import save_model_dir

    folder = work / f"llama-{shape}"
    if not (folder / "config.json").exists():
        save_model_dir(folder, SHAPES[shape] | COMMON | {"tie_word_embeddings": TIED[shape]})
    return folder


def data_file(work: Path) -> Path:
    """sft: packed synthetic chat data."""
    from sft_qlora_smoke import tiny_llama3_tokenizer, write_long_chat

    path = work / "chat.jsonl"
    if not path.exists():
        write_long_chat(path, tiny_llama3_tokenizer(), 200, lengths=(150, 400), seed=1)  # packed rows fill max_length
    return path


def mcqa_data(work: Path, size: int) -> Path:
    """mcqa: benchmarks/mcqa.py's synthetic 4-choice questions (id,image,question,a,b,c,d,answer) on size x size
    images; the CSV's folder is data.image_root."""
    import mcqa as mcqa_bench

    folder = work / f"mcqa-{size}px"
    path = folder / "train.csv"
    if not path.exists():
        mcqa_bench.make_data(folder, MCQA_ROWS, size, 0, "train")
    return path


def prepare(work: Path, names: list[str], tiny: bool = False) -> None:
    """Build the models and data the named rows need, once, before their processes start."""
    rows = [config_row(name) for name in names]
    for shape in sorted({row.shape for row in rows}):
        model_dir(work, shape, tiny)
    if any(row.task == "sft" for row in rows):
        data_file(work)
    for shape in sorted({row.shape for row in rows if row.task == "mcqa"}):
        mcqa_data(work, vlm_shapes(shape, tiny)["image_size"])


def run_config(name: str, work: Path, tiny: bool = False) -> dict[str, Any]:
    """The raw config of row `name` (the plan and the training read the same one)."""
    row = config_row(name)
    if row.task == "mcqa":
        return mcqa_config(row, work, tiny)
    if tiny:
        raise SystemExit(f"--tiny runs the mcqa rows only, not {name}")
    return {
        "model": {
            "name": str(model_dir(work, row.shape)),
            "dtype": "bf16",
            "gradient_checkpointing": row.checkpointing,
        },
        "method": {"kind": row.method, "r": 16, "alpha": 32, "target": "all-linear"},
        "data": {
            "train": str(data_file(work)),
            "valid_split": 0.0,
            "packing": True,
            "max_length": row.max_length,
            "cache_dir": str(work / "cache"),
        },
        "train": {
            "batch_size": row.batch,
            "grad_accum": 1,
            "max_steps": STEPS,
            "save_every": 10_000,
            "log_every": 1,
            "fused_loss": row.fused_loss,
        },
        "eval": {"samples": 0},
        "output": {"dir": str(work / f"run-{name}"), "overwrite": True},
    }


def mcqa_config(row: Config, work: Path, tiny: bool) -> dict[str, Any]:
    """An mcqa run: vision frozen and projector trained (method.train_parts' defaults), the default system prompt,
    model.image_size the shape's (448 px -> 256 image tokens), no validation split (no evaluation passes)."""
    size = vlm_shapes(row.shape, tiny)["image_size"]
    train = mcqa_data(work, size)
    return {
        "task": "mcqa",
        "model": {
            "name": str(model_dir(work, row.shape, tiny)),
            "dtype": "bf16",
            "gradient_checkpointing": row.checkpointing,
            "image_size": size,
        },
        "method": {"kind": row.method, "r": 16, "alpha": 32, "target": "all-linear"},
        "data": {"train": str(train), "image_root": str(train.parent), "valid_split": 0.0},
        "train": {"batch_size": row.batch, "grad_accum": 1, "max_steps": STEPS, "save_every": 10_000, "log_every": 1},
        "output": {"dir": str(work / f"run-{row.name}{'-tiny' if tiny else ''}"), "overwrite": True},
    }


def mcqa_row_tokens(config: Any) -> int:
    """Tokens of the first training row as mcqa.train encodes it (template, image tokens, question, choices,
    answer letter and end of turn), for comparison with the plan's seq_len."""
    from tunelab.models import vlm
    from tunelab.tasks.mcqa_data import QuestionDataset, answer_tokens, read_questions

    processor = vlm.load_processor(config.model)
    question = read_questions(str(config.data.train), config, True, "data.train")[:1]
    item = QuestionDataset(question, processor, answer_tokens(processor), config, with_answer=True)[0]
    return int(item["input_ids"].shape[1])


def measure_one(name: str, work: Path, tiny: bool = False) -> dict[str, Any]:
    """Train one configuration in this process; return the plan's estimate beside the measured peak (None where
    the train records carry no mem_gib: on a CPU)."""
    import tunelab  # noqa: F401
    from tunelab.advise.plan import Gpu, make_plan
    from tunelab.config import validate_config
    from tunelab.tasks import mcqa, sft

    row = config_row(name)
    config = validate_config(run_config(name, work, tiny))
    plan = make_plan(config, Gpu("H100", 79.19, True))
    {"sft": sft.train, "mcqa": mcqa.train}[row.task](config)
    run = Path(config.output.dir)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("event") == "train"]
    if not train:
        raise RuntimeError(f"{run / 'metrics.jsonl'} has no train records")
    peaks = [r["mem_gib"] for r in train if r.get("mem_gib") is not None]
    measured = max(peaks) if peaks else None
    estimated = plan.current.peak_allocated_gib
    rate = "tokens_per_s" if row.task == "sft" else "samples_per_s"
    result = {
        "name": name,
        "task": row.task,
        "measured_gib": measured,
        "estimated_gib": estimated,
        "error": (estimated - measured) / measured if measured else None,
        "parts": {p.name: round(p.gib, 3) for p in plan.current.parts},
        rate: [r.get(rate) for r in train],
        "loss": [r["loss"] for r in train],
    }
    if row.task == "mcqa":
        settings = plan.settings
        result["row_tokens"] = {
            "plan": settings.seq_len,
            "plan_image": settings.image_tokens,
            "run": mcqa_row_tokens(config),
        }
    if tiny:
        result["tiny"] = True
    return result


def measure_all(work: Path, names: list[str], tiny: bool = False) -> list[dict[str, Any]]:
    """Each configuration in a fresh process (a clean allocator), one after the other."""
    results = []
    for name in names:
        started = time.time()
        command = [sys.executable, __file__, "--one", name, "--work", str(work)] + (["--tiny"] if tiny else [])
        done = subprocess.run(command, capture_output=True, text=True)
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
        elif r["measured_gib"] is None:  # no CUDA peak (--tiny on a CPU)
            rows.append(f"| {r['name']} | n/a | {r['estimated_gib']:.2f} | n/a |")
        else:
            rows.append(f"| {r['name']} | {r['measured_gib']:.2f} | {r['estimated_gib']:.2f} | {r['error']:+.1%} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--work", type=Path, default=Path("/tmp/plan_accuracy"))
    parser.add_argument("--only", help="comma-separated configuration names (default: all; --tiny: the mcqa LoRA rows)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes of the mcqa rows' family (CPU wiring check)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one:
        print("RESULT " + json.dumps(measure_one(args.one, args.work, args.tiny)), flush=True)
        return
    if args.only:
        names = args.only.split(",")
    elif args.tiny:
        names = [c.name for c in CONFIGS if c.task == "mcqa" and c.method != "qlora"]
    else:
        names = [c.name for c in CONFIGS]
    prepare(args.work, names, args.tiny)
    results = measure_all(args.work, names, args.tiny)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plan_accuracy.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
