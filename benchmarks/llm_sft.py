"""LLM SFT speed against the peers (issue 7): tunelab, HF + peft (the seeds' recipe), HF + peft + Liger and
Unsloth train the same random-init Llama shapes on the same batches, each framework in its own process.

Rows (the issue's table): Llama-3.2-1B bf16 LoRA micro 4, Llama-3.2-1B QLoRA nf4 micro 4, Llama-3.1-8B QLoRA nf4
micro 2, Llama-3.1-8B bf16 LoRA micro 2. Every run: LoRA r 16 / alpha 32 / dropout 0 on the 7 linear layers of
each block, seq 2048 (random token ids, every position a target), gradient checkpointing, AdamW lr 2e-4 (torch's,
fused where the framework's own recipe uses it), gradient clipping at 1.0, bf16. Each framework-row runs `--steps`
optimizer steps; tokens/s counts the steps after `--warmup` (synchronised wall clock), peak GiB is
torch.cuda.max_memory_allocated over loading and training, the loss is the mean token loss of the last step.

    python3 benchmarks/llm_sft.py --out DIR            # all frameworks and rows; table + JSON in DIR
    python3 benchmarks/llm_sft.py --frameworks tunelab,hf --rows 1b-lora
    python3 benchmarks/llm_sft.py --frameworks tunelab,tunelab-plain --profile   # + kernel-time tables

`tunelab` is tunelab's default on CUDA (train.fast_kernels on: fused LoRA projections, liger RMSNorm / SwiGLU /
rotary, QLoRA in bf16; model.offload_checkpoints on: layer inputs in CPU memory); `tunelab-no-offload` keeps the
layer inputs on the GPU; `tunelab-plain` is tunelab with train.fast_kernels and offload off (peft's and
transformers' code with tunelab's fused loss), to measure what the fast path adds. `--profile` adds, per
framework-row, a torch.profiler table of the GPU kernels of two more steps (PROFILE-<framework>-<row>.txt in --out),
with a second table by own CPU time (the 1B rows are CPU-bound on some hosts). LLM_SFT_TOGGLES switches single
pieces of tunelab's fast path off (`fused_mlp=0`, `fused_qkv=0`, `thin_first=0`, `direct_dequant=0`,
`cuda_graphs=0`); compare only runs of the same call and host (benchmarks/lora_kernels_micro.py times the pieces
alone).

The real-length mode (seed-001-like dialogue lengths, packed against padded, effective tokens/s) is the sibling
script benchmarks/llm_sft_packed.py.

A framework-row that fails records its error and the others go on; `--budget-s` stops starting new work when the
time is spent (rows left out are listed). Needs CUDA; peers' wheels from `../shared/tools/gpu-wheels.sh`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# Llama-3.1-8B: 8,030,261,248 parameters, untied head; GQA 32 / 8 heads of 128.
LLAMA_31_8B: dict[str, Any] = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# name: (model shape, method, micro-batch)
ROWS: dict[str, tuple[str, str, int]] = {
    "1b-lora": ("1b", "lora", 4),
    "1b-qlora": ("1b", "qlora", 4),
    "8b-qlora": ("8b", "qlora", 2),
    "8b-lora": ("8b", "lora", 2),
}
# issue 7's goals for tunelab: (tokens/s at least, peak GiB at most)
GOALS = {"1b-lora": (60_000, 3.7), "1b-qlora": (57_000, 2.3), "8b-qlora": (11_500, 7.0), "8b-lora": (12_000, 16.7)}
FRAMEWORKS = ("tunelab", "unsloth", "hf", "liger")
HOST_EMBEDDING = {"on": True}  # model.offload_embedding for the tunelab framework (LLM_SFT_TOGGLES host_embedding=0)
EXTRA_FRAMEWORKS = ("tunelab-no-offload", "tunelab-plain")
LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 2048
# LLM_SFT_DEVICE=cpu with LLM_SFT_SEQ=64 runs the tunelab and hf workers on a tiny model folder (a dry run of the
# script's own code on a machine without a GPU); the figures only mean something on CUDA
DEVICE = os.environ.get("LLM_SFT_DEVICE", "cuda")
SEQ = int(os.environ.get("LLM_SFT_SEQ", SEQ))
LR = 2e-4


def build_models(workdir: Path, shapes: set[str]) -> dict[str, Path]:
    """Random-init bf16 checkpoints of the shapes (seed 0), with the tests' offline llama3 tokenizer; reused."""
    import sft_qlora_smoke as smoke

    folders = {}
    for shape in sorted(shapes):
        folder = workdir / f"llama-{shape}"
        if not (folder / "config.json").exists():
            smoke.save_model_dir(folder, smoke.LLAMA_32_1B if shape == "1b" else LLAMA_31_8B)
        folders[shape] = folder
    return folders


def default_workdir() -> Path:
    """/dev/shm where it holds both checkpoints (~19 GB; then written and read at memory speed), else /tmp."""
    import shutil

    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 24 * 2**30:
        return shm / "llm_sft_bench"
    return Path("/tmp/llm_sft_bench")


def batches(micro: int, steps: int, vocab: int, seed: int = 0) -> list[Any]:
    """The same `steps` batches of random token ids for every framework (CPU tensors)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (micro, SEQ), generator=generator) for _ in range(steps)]


# ----------------------------------------------------------------------------------------------- one framework


def load_tunelab(
    folder: Path, method: str, micro: int, fast: bool = True, offload: bool = False, packing: bool = False
) -> tuple[Any, Any, Any]:
    """The model, optimizer and loss of tunelab's own sft path (build_model, create_optimizer, lm_loss_sum);
    `fast`: train.fast_kernels auto (on with CUDA) or false; `offload`: model.offload_checkpoints; `packing`:
    data.packing (the batches carry packed rows: with the fast path, variable-length attention)."""
    import torch

    from tunelab.config import load_config
    from tunelab.kernels.causal_lm_loss import fused_loss_enabled
    from tunelab.tasks import sft
    from tunelab.train.optim import create_optimizer

    config = load_config(
        {
            "model": {
                "name": str(folder),
                "dtype": "bf16",
                "offload_checkpoints": "auto" if offload else False,
                "offload_embedding": "auto" if offload and HOST_EMBEDDING["on"] else False,
            },
            "method": {"kind": method, "r": 16, "alpha": 32, "dropout": 0.0, "target": "all-linear"},
            "data": {"train": "unused.jsonl", "max_length": SEQ, "packing": packing},
            "train": {
                "batch_size": micro,
                "grad_accum": 1,
                "lr": LR,
                "max_grad_norm": 1.0,
                "fast_kernels": "auto" if fast else False,
            },
        }
    )
    device = torch.device(DEVICE)
    model = sft.build_model(config, device)
    fused = fused_loss_enabled(config.train.fused_loss, device)

    def loss_fn(model: Any, ids: Any) -> Any:
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        return sft.lm_loss_sum(model, batch, fused=fused) / (ids.shape[0] * (ids.shape[1] - 1))

    return model, create_optimizer(model, config.train), loss_fn


def load_hf(folder: Path, method: str, framework: str) -> tuple[Any, Any, Any]:
    """HF + peft as the seeds' recipe builds it (Liger: its kernels patched into transformers' Llama first;
    Unsloth: FastLanguageModel with its own checkpointing)."""
    import torch

    if framework == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(folder), max_seq_length=SEQ, dtype=torch.bfloat16, load_in_4bit=method == "qlora"
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=LINEAR_NAMES,
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=0,
        )
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if framework == "liger":
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama()  # rope, rms_norm, swiglu, fused linear cross-entropy
        quant = None
        if method == "qlora":
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, quantization_config=quant, device_map={"": 0} if DEVICE == "cuda" else None
        )
        model.config.use_cache = False
        if method == "qlora":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEAR_NAMES, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR)

    def loss_fn(model: Any, ids: Any) -> Any:
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss

    return model, optimizer, loss_fn


def apply_toggles() -> dict[str, bool]:
    """LLM_SFT_TOGGLES (e.g. "fused_mlp=0,thin_first=0,direct_dequant=0"): switch single pieces of tunelab's fast
    path off, to time what each adds on the same GPU. Returns the settings in force."""
    from tunelab.kernels import fast_blocks, graphed_layers, lora_projection, lora_qkv

    settings = {"fused_mlp": True, "fused_qkv": True, "thin_first": True, "direct_dequant": True, "cuda_graphs": True,
                "keep_dense": True, "host_embedding": True}  # fmt: skip
    for item in filter(None, os.environ.get("LLM_SFT_TOGGLES", "").split(",")):
        name, _, value = item.partition("=")
        if name not in settings:
            raise SystemExit(f"LLM_SFT_TOGGLES: unknown piece {name!r}; known: {', '.join(settings)}")
        settings[name] = value not in ("0", "false", "off")
    fast_blocks.FUSED_MLP_ENABLED["on"] = settings["fused_mlp"]
    lora_qkv.FUSED_QKV_ENABLED["on"] = settings["fused_qkv"]
    graphed_layers.ENABLED["on"] = settings["cuda_graphs"]
    lora_projection.THIN_TERM_FIRST = settings["thin_first"]
    lora_projection.KEEP_DENSE_ENABLED["on"] = settings["keep_dense"]
    HOST_EMBEDDING["on"] = settings["host_embedding"]
    if not settings["direct_dequant"]:
        lora_projection._bnb_library = lambda: None  # bitsandbytes' own dequantize_4bit
    return settings


def run_row(
    framework: str, row: str, folder: Path, steps: int, warmup: int, profile_to: Path | None = None
) -> dict[str, Any]:
    """Train `steps` steps of one framework-row; tokens/s, peak GiB and the last loss."""
    import torch

    shape, method, micro = ROWS[row]
    cuda = DEVICE == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # memory an earlier row of this process still holds (a framework's rows share its process): part of the peak
    start_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    started = time.perf_counter()
    if framework.startswith("tunelab"):
        fast, offload = framework != "tunelab-plain", framework == "tunelab"
        model, optimizer, loss_fn = load_tunelab(folder, method, micro, fast=fast, offload=offload)
    else:
        model, optimizer, loss_fn = load_hf(folder, method, framework)
    load_s = time.perf_counter() - started
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = []
    timed_from = None
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else 128256

    def train_step(ids: Any) -> Any:
        ids = ids.to(DEVICE, non_blocking=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = loss_fn(model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    data = batches(micro, steps, vocab)
    for step, ids in enumerate(data):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            timed_from = time.perf_counter()
        losses.append(train_step(ids))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - timed_from
    if profile_to is not None and cuda:
        profile_to.write_text(kernel_table(train_step, data[-2:], f"{framework} {row}"), encoding="utf-8")
    tokens = micro * SEQ * (steps - warmup)
    result = {
        "framework": framework,
        "row": row,
        "tokens_per_s": tokens / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
        "start_gib": start_gib,
        "loss_first": float(losses[0]),
        "loss_last": float(losses[-1]),
        "losses": [round(float(x), 5) for x in losses],
        "steps": steps,
        "timed_steps": steps - warmup,
        "load_s": round(load_s, 1),
        "trainable": sum(p.numel() for p in trainable),
    }
    recorder = getattr(model, "_tunelab_layer_recorder", None)
    if recorder is not None:  # tunelab's layer graphs: how many layer calls replayed, recorded, ran eagerly
        result["layer_graphs"] = dict(recorder.counts)
    model = optimizer = trainable = loss_fn = train_step = None  # free the GPU memory before the next row
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def kernel_table(train_step: Any, data: list[Any], title: str) -> str:
    """torch.profiler's table of the GPU kernels of `len(data)` training steps, heaviest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for ids in data:
            train_step(ids)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    total = sum(e.device_time_total for e in averages if e.device_type.name == "CUDA") / 1000 / len(data)
    table = averages.table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70)
    # where the CPU goes (a step is CPU-bound when this exceeds the GPU time): own time of each op / function
    cpu_table = averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
    cpu = sum(e.self_cpu_time_total for e in averages) / 1000 / len(data)
    head = f"{title}: {len(data)} steps, GPU kernel time {total:.1f} ms a step, CPU time {cpu:.1f} ms a step"
    return f"{head}\n{table}\n\nby own CPU time:\n{cpu_table}\n"


def worker(
    framework: str,
    rows: list[str],
    folders: dict[str, str],
    steps: dict[str, int],
    warmup: int,
    out: Path,
    profile_dir: Path | None = None,
):
    """One framework's rows in this process (Unsloth patches transformers on import: it must come first)."""
    results = []
    if framework == "unsloth":
        try:
            import unsloth  # noqa: F401
        except Exception as error:  # recorded per row, like a failing run
            traceback.print_exc()
            results = [{"framework": framework, "row": row, "error": f"import unsloth: {error}"[:400]} for row in rows]
            out.write_text(json.dumps(results, indent=1))
            return
    elif framework.startswith("tunelab") or DEVICE == "cpu":  # the CPU venv needs tunelab's torchvision shim first
        import tunelab  # noqa: F401
    toggles = apply_toggles() if framework.startswith("tunelab") else {}
    for row in rows:
        try:
            profile_to = profile_dir / f"PROFILE-{framework}-{row}.txt" if profile_dir else None
            results.append(run_row(framework, row, Path(folders[ROWS[row][0]]), steps[row], warmup, profile_to))
            if any(value is False for value in toggles.values()):
                results[-1]["toggles"] = toggles
        except Exception as error:  # one failing peer must not hide the others' figures
            traceback.print_exc()
            results.append({"framework": framework, "row": row, "error": f"{type(error).__name__}: {error}"[:400]})
        out.write_text(json.dumps(results, indent=1))  # after each row: a timeout keeps what finished
        print(json.dumps({k: v for k, v in results[-1].items() if k != "losses"}), flush=True)


# ----------------------------------------------------------------------------------------------- driver


def table(results: list[dict[str, Any]], rows: list[str]) -> str:
    """Markdown: one line per row, one column per framework (tokens/s, peak GiB, last loss), then the goal."""
    by = {(r["framework"], r["row"]): r for r in results}
    frameworks = [*FRAMEWORKS, *(f for f in EXTRA_FRAMEWORKS if any(r["framework"] == f for r in results))]
    header = ["work", *frameworks, "goal for tunelab", "tunelab meets goal"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        shape, method, micro = ROWS[row]
        cells = [f"{shape} {method}, micro {micro}"]
        for framework in frameworks:
            r = by.get((framework, row))
            if r is None:
                cells.append("not run")
            elif "error" in r:
                cells.append("failed: " + r["error"][:80].replace("|", "/"))
            else:
                cells.append(
                    f"{r['tokens_per_s'] / 1000:.1f}k tok/s, {r['peak_gib']:.1f} GiB, loss {r['loss_last']:.3f}"
                )
        goal_tps, goal_gib = GOALS[row]
        cells.append(f">= {goal_tps / 1000:.1f}k at <= {goal_gib} GiB")
        ours = by.get(("tunelab", row))
        met = ours is not None and "error" not in ours
        met = met and ours["tokens_per_s"] >= goal_tps and ours["peak_gib"] <= goal_gib
        cells.append("yes" if met else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--steps-1b", type=int, default=20)
    parser.add_argument("--steps-8b", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=default_workdir())
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no framework after this many seconds")
    parser.add_argument("--profile", action="store_true", help="also write a GPU kernel table per framework-row")
    parser.add_argument("--profile-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folders", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rows = args.rows.split(",")
    steps = {row: args.steps_1b if ROWS[row][0] == "1b" else args.steps_8b for row in rows}
    if args.build:
        build_models(args.workdir, set(args.build.split(",")))
        return
    if args.worker:
        worker(args.worker, rows, json.loads(args.folders), steps, args.warmup, args.out, args.profile_dir)
        return
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    # the checkpoints are written by a child so this process never holds GPU memory beside the workers
    shapes = sorted({ROWS[row][0] for row in rows})
    me = str(Path(__file__).resolve())
    subprocess.run([sys.executable, me, "--build", ",".join(shapes), "--workdir", str(args.workdir)], check=True)
    folders = {shape: str(args.workdir / f"llama-{shape}") for shape in shapes}
    print(f"models ready in {time.time() - started:.0f} s", flush=True)
    results: list[dict[str, Any]] = []
    skipped = []
    frameworks = args.frameworks.split(",")
    for index, framework in enumerate(frameworks):
        left = args.budget_s - (time.time() - started)
        if left < 30:
            skipped.append(framework)
            continue
        part = args.workdir / f"{framework}.json"
        part.unlink(missing_ok=True)
        command = [sys.executable, me, "--worker", framework, "--rows", ",".join(rows)]
        command += ["--folders", json.dumps(folders), "--out", str(part), "--warmup", str(args.warmup)]
        command += ["--steps-1b", str(args.steps_1b), "--steps-8b", str(args.steps_8b)]
        command += ["--profile-dir", str(args.out.resolve())] if args.profile else []
        # keep about 45 s for each framework still to come, so one slow peer cannot starve the rest
        timeout = max(30.0, left - 45.0 * (len(frameworks) - index - 1))
        try:
            env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
            subprocess.run(command, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            print(f"{framework}: stopped after {timeout:.0f} s", flush=True)
        if part.exists():
            results += json.loads(part.read_text())
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    report = {"device": device, "rows": rows, "steps": steps, "warmup": args.warmup, "skipped": skipped}
    report["results"] = results
    report["wall_s"] = round(time.time() - started, 1)
    (args.out / "llm_sft.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    text = table(results, rows)
    (args.out / "llm_sft.md").write_text(text + "\n", encoding="utf-8")
    print(device)
    print(text)
    if skipped:
        print("not run (time budget):", ", ".join(skipped))


if __name__ == "__main__":
    main()
