"""Multi-GPU benchmark (issue 8): the same tunelab config on 1 and 2 GPUs, through the real command line.

1. DDP scaling: a random-init Llama-3.2-1B shape, bf16 LoRA r 16 all-linear, packed rows of 2048 tokens,
   micro-batch 4 per GPU, gradient checkpointing; tokens/s of `--gpus 2` (DDP, all GPUs' tokens) over 1 GPU.
   Goal: at least 1.85x.
2. FSDP2 and DeepSpeed ZeRO-3: a random-init Llama-3.1-8B shape, bf16 LoRA and QLoRA (NF4) at seq 4096,
   micro-batch 1: peak allocated memory of the most loaded GPU with `--gpus 2` against the same run on one GPU.
3. Predictions: `tunelab predict --gpus 2` on the 1B DDP run's best weights against `tunelab predict` on one GPU:
   the files must be equal.

Every run is a fresh `python -m tunelab` process (torchrun under --gpus 2); figures are read back from the run
folders (metrics.jsonl: tokens_per_s and mem_gib of each step, the latter the maximum over the processes). Runs are
ordered by what the acceptance needs first and skipped, recorded as such, when the time budget would be exceeded;
OUT/multi_gpu.json and OUT/multi_gpu.md are rewritten after every run, so a failure leaves the rest.

    python3 benchmarks/multi_gpu.py --out DIR [--work /tmp/multi_gpu] [--budget 480] [--only ddp,fsdp,predict,deepspeed]

tests/gpu/test_multi_gpu.py runs it and asserts the acceptance figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

# Llama-3.2-1B (tied embeddings) and Llama-3.1-8B (untied): GQA with 8 key/value heads, 128256-token vocabulary.
SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, head_dim=128),
}
COMMON = dict(num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)
TIED = {"1b": True, "8b": False}


@dataclass
class Run:
    """One `tunelab train` run."""

    name: str
    group: str  # ddp | fsdp | deepspeed | baseline (the 1-GPU 8B runs, wanted by fsdp and deepspeed): --only
    shape: str
    method: str
    length: int
    batch: int
    steps: int
    gpus: int
    strategy: str = "ddp"
    devices: str = "0,1"  # CUDA_VISIBLE_DEVICES
    warmup_steps: int = 1  # steps left out of the steady tokens/s (the first includes lazy initialisation)


@dataclass
class Predict:
    """One `tunelab predict` of the 1B DDP run."""

    name: str
    gpus: int
    devices: str = "0,1"
    group: str = "predict"


@dataclass
class Phase:
    """Runs started together (one per GPU when they use one each), and the seconds the phase is expected to take."""

    jobs: list[Any]
    expected_s: float
    results: list[dict[str, Any]] = field(default_factory=list)


def phases() -> list[Phase]:
    """In the order the acceptance needs them; each 8B run on 2 GPUs has its 1-GPU baseline run first."""
    one_b = dict(shape="1b", method="lora", length=2048, batch=4, steps=14, warmup_steps=3)
    eight_b = dict(length=4096, batch=1, steps=5, shape="8b")
    zero3 = dict(gpus=2, strategy="deepspeed-zero3", **eight_b)
    # expected seconds: python start-up and imports ~10, loading 16 GB of 8B weights ~10 (plus ~10 to quantize),
    # a few steps; the budget check leaves out a phase that would not end in time
    return [
        Phase([Run("1b-lora-1gpu", "ddp", gpus=1, devices="0", **one_b)], 40),
        Phase([Run("1b-lora-ddp-2gpu", "ddp", gpus=2, **one_b)], 45),
        Phase(
            [
                Run("8b-lora-1gpu", "baseline", method="lora", gpus=1, devices="0", **eight_b),
                Run("8b-qlora-1gpu", "baseline", method="qlora", gpus=1, devices="1", **eight_b),
                Predict("predict-1gpu", gpus=1, devices="1"),
            ],
            60,
        ),
        Phase([Run("8b-lora-fsdp-2gpu", "fsdp", method="lora", gpus=2, strategy="fsdp", **eight_b)], 60),
        Phase([Run("8b-qlora-fsdp-2gpu", "fsdp", method="qlora", gpus=2, strategy="fsdp", **eight_b)], 70),
        Phase([Predict("predict-2gpu", gpus=2)], 35),
        Phase([Run("8b-lora-zero3-2gpu", "deepspeed", method="lora", **zero3)], 70),
        Phase([Run("8b-qlora-zero3-2gpu", "deepspeed", method="qlora", **zero3)], 80),
    ]


# ----------------------------------------------------------------------------------------------- inputs


def model_dir(work: Path, shape: str) -> Path:
    """The random-init model of `shape`, built once on the GPU (seconds) and saved in bf16 with the tests' tiny
    llama3 tokenizer (its ids all lie inside the 128256-row embedding)."""
    from sft_qlora_smoke import save_model_dir

    folder = work / f"llama-{shape}"
    if not (folder / "config.json").exists():
        save_model_dir(folder, SHAPES[shape] | COMMON | {"tie_word_embeddings": TIED[shape]})
    return folder


def data_files(work: Path) -> tuple[Path, Path]:
    """(training chat JSONL, 16 prompts to predict). Conversations of 150-400 tokens, packed into full rows."""
    from sft_qlora_smoke import tiny_llama3_tokenizer, write_long_chat

    tokenizer = tiny_llama3_tokenizer()
    train, prompts = work / "chat.jsonl", work / "prompts.jsonl"
    if not train.exists():
        write_long_chat(train, tokenizer, 900, lengths=(150, 400), seed=1)  # ~250k tokens: 14 x 4 x 2 rows of 2048
    if not prompts.exists():
        write_long_chat(prompts, tokenizer, 16, lengths=(60, 200), seed=2)
    return train, prompts


def run_config(run: Run, work: Path) -> dict[str, Any]:
    """A `tunelab train` config: r 16 all-linear, bf16, checkpointing, plain loss, packed rows, no validation
    (best/ is the last step), one save at the end, a record every step."""
    return {
        "model": {"name": str(model_dir(work, run.shape)), "dtype": "bf16", "gradient_checkpointing": True},
        "method": {"kind": run.method, "r": 16, "alpha": 32, "target": "all-linear"},
        "data": {
            "train": str(work / "chat.jsonl"),
            "valid_split": 0.0,
            "packing": True,
            "max_length": run.length,
            "cache_dir": str(work / f"cache-{run.name}"),  # runs started together must not share a cache
        },
        "train": {
            "batch_size": run.batch,
            "grad_accum": 1,
            "max_steps": run.steps,
            "save_every": 10_000,
            "log_every": 1,
            "warmup": 0.0,
            "distributed": run.strategy,
            # several processes always take the plain loss (the fused one skips the wrappers' forward), so the
            # 1-GPU baselines take it too: the same computation on both sides
            "fused_loss": False,
        },
        "eval": {"samples": 0, "max_new_tokens": 32, "batch_size": 4},
        "output": {"dir": str(work / f"run-{run.name}"), "overwrite": True},
    }


# ----------------------------------------------------------------------------------------------- running


def command(job: Any, work: Path) -> list[str]:
    """The command line of a job."""
    # --debug: every process prints its traceback (without it only rank 0 speaks, and a failure of rank 1 alone
    # ends rank 0 before it says anything)
    base = [sys.executable, "-m", "tunelab", "--debug"]
    if isinstance(job, Run):
        path = work / f"{job.name}.yaml"
        import yaml

        path.write_text(yaml.safe_dump(run_config(job, work)))
        return [*base, "train", str(path), *(["--gpus", str(job.gpus)] if job.gpus > 1 else [])]
    run = work / "run-1b-lora-ddp-2gpu"
    out = work / f"{job.name}.csv"
    return [*base, "predict", str(run), "--data", str(work / "prompts.jsonl"), "--out", str(out)] + (
        ["--gpus", str(job.gpus)] if job.gpus > 1 else []
    )


def start(job: Any, work: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": job.devices,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = (work / f"{job.name}.log").open("w")
    return subprocess.Popen(command(job, work), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def run_phase(phase: Phase, work: Path, deadline: float) -> None:
    """Start the phase's jobs together and wait for them (killed at the deadline); results in phase.results."""
    started = time.time()
    processes = [(job, start(job, work)) for job in phase.jobs]
    for job, process in processes:
        try:
            code = process.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = "timeout"
        tail = (work / f"{job.name}.log").read_text(errors="replace")[-4000:]
        result: dict[str, Any] = {"name": job.name, "job": asdict(job), "wall_s": round(time.time() - started, 1)}
        if code != 0:
            result.update(status=f"failed ({code})", log_tail=tail)
        elif isinstance(job, Run):
            result.update(status="ok", **read_run(work / f"run-{job.name}", job))
        else:
            result.update(status="ok", csv=(work / f"{job.name}.csv").read_text())
        phase.results.append(result)


def read_run(run_dir: Path, run: Run) -> dict[str, Any]:
    """Throughput, memory and losses of a finished run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("event") == "train"]
    steady = [r["tokens_per_s"] for r in train[run.warmup_steps :] if r.get("tokens_per_s")]
    start = next((r for r in records if r.get("event") == "start"), {})
    return {
        "steps": len(train),
        "tokens_per_s": statistics.median(steady) if steady else None,
        "peak_gib_per_gpu": max((r["mem_gib"] for r in train if r.get("mem_gib") is not None), default=None),
        "loss_first": train[0]["loss"] if train else None,
        "loss_last": train[-1]["loss"] if train else None,
        "processes": start.get("processes"),
        "trainable": start.get("trainable"),
        "total_params": start.get("total_params"),
    }


# ----------------------------------------------------------------------------------------------- report


def checks(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The acceptance figures from the runs that finished."""

    def figure(name: str, key: str) -> float | None:
        row = results.get(name, {})
        return row.get(key) if row.get("status") == "ok" else None

    found: dict[str, Any] = {}
    one, two = figure("1b-lora-1gpu", "tokens_per_s"), figure("1b-lora-ddp-2gpu", "tokens_per_s")
    if one and two:
        found["ddp_scaling"] = round(two / one, 3)
    for method in ("lora", "qlora"):
        alone = figure(f"8b-{method}-1gpu", "peak_gib_per_gpu")
        for strategy in ("fsdp", "zero3"):
            shared = figure(f"8b-{method}-{strategy}-2gpu", "peak_gib_per_gpu")
            if alone and shared:
                found[f"{strategy}_{method}_memory_ratio"] = round(shared / alone, 3)
    csvs = [results.get(name, {}).get("csv") for name in ("predict-1gpu", "predict-2gpu")]
    if all(csvs):
        found["predictions_equal"] = csvs[0] == csvs[1]
        found["predictions_rows"] = csvs[0].count("\n") - 1
    return found


def markdown(report: dict[str, Any]) -> str:
    """The runs as a table, then the acceptance figures."""

    def fmt(value: Any, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = [
        f"{report['machine']}; {report['date']}; {report['wall_s']:.0f} s",
        "",
        "| run | GPUs | strategy | method | seq x micro-batch | steps | tokens/s (median) | peak GiB per GPU | "
        "loss first -> last | wall s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["runs"].values():
        job = row["job"]
        if "method" not in job:  # a predict job
            cells = [row["name"], job["gpus"], "-", "predict", "-", "-", "-", "-", "-", row["wall_s"], row["status"]]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
            continue
        losses = f"{fmt(row.get('loss_first'), 3)} -> {fmt(row.get('loss_last'), 3)}"
        lines.append(
            f"| {row['name']} | {job['gpus']} | {job['strategy'] if job['gpus'] > 1 else '-'} | {job['method']} | "
            f"{job['length']} x {job['batch']} | {row.get('steps', '-')} | {fmt(row.get('tokens_per_s'))} | "
            f"{fmt(row.get('peak_gib_per_gpu'), 2)} | {losses} | {row['wall_s']} | {row['status']} |"
        )
    lines += ["", "| check | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in report["checks"].items()]
    return "\n".join(lines) + "\n"


def machine() -> str:
    import torch

    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} x {names[0] if names else 'no GPU'}; torch {torch.__version__}"


def write(out: Path, report: dict[str, Any]) -> None:
    report["checks"] = checks(report["runs"])
    (out / "multi_gpu.json").write_text(json.dumps(report, indent=2))
    (out / "multi_gpu.md").write_text(markdown(report))


def run_all(out: Path, work: Path, budget_s: float, groups: set[str]) -> dict[str, Any]:
    """Build the models and data, run the phases within the budget, write the report after each; return it."""
    import tunelab  # noqa: F401 - first: its torchvision import hook precedes transformers

    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": {},
        "wall_s": 0.0,
    }
    if groups & {"fsdp", "deepspeed"}:
        groups = groups | {"baseline"}
    todo = []
    for phase in phases():
        phase.jobs = [job for job in phase.jobs if job.group in groups]
        if phase.jobs:
            todo.append(phase)
    for shape in sorted({job.shape for phase in todo for job in phase.jobs if isinstance(job, Run)}):
        model_dir(work, shape)
    data_files(work)
    report["build_s"] = round(time.time() - started, 1)
    deadline = started + budget_s
    for phase in todo:
        left = deadline - time.time()
        if left < phase.expected_s:
            for job in phase.jobs:
                skipped = {"name": job.name, "job": asdict(job), "wall_s": 0, "status": "skipped (time)"}
                report["runs"][job.name] = skipped
            continue
        run_phase(phase, work, deadline)
        for result in phase.results:
            report["runs"][result["name"]] = result
        report["wall_s"] = round(time.time() - started, 1)
        write(out, report)
        print(json.dumps({r["name"]: r["status"] for r in phase.results}), flush=True)
    report["wall_s"] = round(time.time() - started, 1)
    write(out, report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/multi_gpu"))
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for everything (skips what won't fit)")
    parser.add_argument("--only", default="ddp,fsdp,predict,deepspeed")
    args = parser.parse_args()
    report = run_all(args.out, args.work, args.budget, set(args.only.split(",")))
    print(markdown(report))


if __name__ == "__main__":
    main()
