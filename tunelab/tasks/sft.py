"""sft: causal-LM instruction tuning, top to bottom.

Rows (alpaca or chat) become conversations, rendered by the tokenizer's chat template (or a plain template for
base models); the loss is taken on assistant tokens only (every assistant turn, end-of-turn token included);
long examples lose history from the left, never the system prompt or the final answer header; the model is an
AutoModelForCausalLM with LoRA / QLoRA / DoRA / full / freeze / prefix / prompt / IA3; evaluation reports valid
loss, perplexity and token accuracy; prediction generates answers.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.config import RunConfig
from tunelab.data import text as textdata
from tunelab.data.cache import cache_root, cached, content_key, tokenizer_fingerprint
from tunelab.data.readers import read_table
from tunelab.data.templates import (
    answer_is_empty,
    detect_format,
    render,
    render_prompt,
    resolve_template,
    row_to_messages,
)
from tunelab.errors import UserError
from tunelab.evaluate.generate import generate_texts
from tunelab.kernels.causal_lm_loss import decoder_and_head, fused_loss_enabled, lm_loss_sum_fused
from tunelab.kernels.fast_path import (
    apply_checkpoint_offload,
    apply_embedding_offload,
    apply_fast_kernels,
    apply_keep_dequantized,
    keep_half_norms,
)
from tunelab.models import adapters
from tunelab.models.load import load_causal_lm, load_tokenizer, resolve_dtype, use_gradient_checkpointing
from tunelab.train.loop import TrainingJob

# ----------------------------------------------------------------------------------------------- data


def read_conversations(path: str, config: RunConfig, need_answer: bool = True) -> list[dict[str, Any]]:
    """Rows of a data file as {"id", "messages"}; rows with an empty answer are dropped (an error if all are)."""
    rows = read_table(path)
    shape = detect_format(rows, config.data, path)
    if shape == "alpaca" and need_answer and config.data.columns.output not in rows[0]:
        from tunelab.data.readers import require_columns

        require_columns(path, rows, [config.data.columns.output], "data.columns.output")
    if (
        shape == "alpaca"
        and config.data.columns.instruction not in rows[0]
        and config.data.columns.input not in rows[0]
    ):
        from tunelab.data.readers import require_columns

        require_columns(path, rows, [config.data.columns.instruction], "data.columns.instruction")
    conversations = []
    empty: list[int] = []
    for number, row in enumerate(rows, start=1):
        where = f"Data file {path}, row {number}"
        messages = row_to_messages(row, shape, config.data, where, need_answer)
        if need_answer and answer_is_empty(messages):
            empty.append(number)
            continue
        row_id = row.get(config.data.columns.id)
        conversations.append({"id": str(row_id) if row_id not in (None, "") else str(number - 1), "messages": messages})
    if need_answer and not conversations:
        raise UserError(
            f"Data file {path}: all {len(rows)} rows have an empty answer, so there is nothing to learn. "
            f"Check the answer column ('{config.data.columns.output}' or the assistant turns)."
        )
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        _warn(f"{path}: dropped {len(empty)} of {len(rows)} rows with an empty answer (rows {shown}).")
    return conversations


def _warn(message: str) -> None:
    from tunelab.track.progress import console

    console.print(f"[yellow]warning:[/] {message}")


def split_train_valid(
    config: RunConfig, read: Callable[[str, RunConfig], list[dict]] | None = None
) -> tuple[list[dict], list[dict]]:
    """Train and validation rows: data.valid when given, else a seeded valid_split of train. `read` turns a data
    file into rows (default: read_conversations; other text tasks pass their own reader)."""
    read = read or read_conversations
    if not config.data.train:
        raise UserError("data.train is not set. Point it at a CSV, JSONL or Parquet file.")
    train = read(config.data.train, config)
    if config.data.limit:
        train = train[: config.data.limit]
    if config.data.valid:
        valid = read(config.data.valid, config)
    elif config.data.valid_split == 0 or len(train) < 2:
        valid = []
    else:
        order = list(range(len(train)))
        random.Random(config.train.seed).shuffle(order)
        n_valid = max(1, int(round(len(train) * config.data.valid_split)))
        valid_ids = set(order[:n_valid])
        valid = [c for i, c in enumerate(train) if i in valid_ids]
        train = [c for i, c in enumerate(train) if i not in valid_ids]
    return train, valid[: config.data.valid_limit] if config.data.valid_limit else valid


def tokenize_conversations(
    conversations: list[dict], tokenizer: Any, template: str, max_length: int
) -> tuple[list[dict[str, list[int]]], textdata.TokenStats]:
    """Examples with assistant-only labels, left-truncated to max_length; too-long answers dropped and counted."""
    stats = textdata.TokenStats()
    examples = []
    add_special = template != "chat"  # chat templates write their own bos; plain text gets the tokenizer's
    for conversation in conversations:
        stats.examples += 1
        rendered = render(conversation["messages"], template, tokenizer)
        ids, labels, head, tail = textdata.tokenize_rendered(rendered, tokenizer, add_special)
        stats.lengths.append(len(ids))
        cut = textdata.truncate_left(ids, labels, head, tail, max_length)
        if cut is None:
            stats.dropped_too_long += 1
            continue
        if len(cut[0]) < len(ids):
            stats.truncated += 1
        if all(label == textdata.IGNORE for label in cut[1][1:]):
            stats.no_target += 1
            continue
        examples.append({"input_ids": cut[0], "labels": cut[1]})
    return examples, stats


def build_examples(
    conversations: list[dict], tokenizer: Any, config: RunConfig
) -> tuple[list[dict[str, list[int]]], textdata.TokenStats, bool]:
    """Tokenized examples from the cache when the same data, tokenizer and settings were seen before."""
    template = resolve_template(config.data.template, tokenizer)
    key = content_key(
        [c["messages"] for c in conversations], tokenizer_fingerprint(tokenizer), template, config.data.max_length
    )

    def build() -> dict[str, Any]:
        examples, stats = tokenize_conversations(conversations, tokenizer, template, config.data.max_length)
        return {"examples": examples, "stats": {**stats.to_dict(), "lengths": stats.lengths}}

    value, hit = cached(key, build, cache_root(config.data.cache_dir))
    raw = value["stats"]
    stats = textdata.TokenStats(
        examples=raw["examples"],
        truncated=raw["truncated"],
        dropped_too_long=raw["dropped_too_long"],
        no_target=raw["no_target"],
        lengths=list(raw["lengths"]),
    )
    return value["examples"], stats, hit


def check_truncation(stats: textdata.TokenStats, config: RunConfig, split: str) -> None:
    """Stop before training when too much is cut or nothing is left to learn (e.g. every label masked)."""
    if stats.examples and stats.examples == stats.dropped_too_long + stats.no_target:
        raise UserError(
            f"{split}: none of the {stats.examples} examples has an answer token left to learn "
            f"(dropped as too long: {stats.dropped_too_long}, fully masked: {stats.no_target}). "
            f"Raise data.max_length (now {config.data.max_length}; the longest example has "
            f"{stats.percentiles().get('max')} tokens)."
        )
    share = (stats.truncated + stats.dropped_too_long) / max(stats.examples, 1)
    if share > config.data.max_truncated:
        p99 = stats.percentiles().get("p99")
        raise UserError(
            f"{split}: {share:.1%} of examples are truncated or dropped at data.max_length="
            f"{config.data.max_length} (allowed: data.max_truncated={config.data.max_truncated}). "
            f"Raise data.max_length (p99 length is {p99}) or allow more with data.max_truncated."
        )


# ----------------------------------------------------------------------------------------------- model and loss


def build_model(config: RunConfig, device: torch.device) -> torch.nn.Module:
    """The base causal LM with the configured method applied (only the method's parameters trainable)."""
    if config.data.packing and config.method.kind in ("prefix", "prompt"):
        raise UserError(
            "data.packing cannot be combined with method.kind prefix / prompt (the virtual tokens "
            "would be shared by the packed examples). Turn packing off or use lora."
        )
    if device.type == "cpu" and config.model.dtype in ("bf16", "fp16") and config.method.kind in ("full", "freeze"):
        _warn("training full weights in half precision on a CPU is slow and imprecise; model.dtype: auto uses fp32.")
    model = load_causal_lm(config.model, config.method.kind, device)
    if model.config.use_cache is not None:
        model.config.use_cache = False  # the cache is useless in training and conflicts with checkpointing
    checkpointing = use_gradient_checkpointing(config.model, device)
    keep_half = keep_half_norms(config, device, resolve_dtype(config.model.dtype, device))
    model = adapters.apply_method(model, config.method, checkpointing, keep_half=keep_half)
    installed = apply_fast_kernels(model, config, device)
    if installed and config.method.kind in ("lora", "qlora") and config.method.dropout > 0:
        _note(
            f"method.dropout is {config.method.dropout}: LoRA layers with dropout keep peft's own code, so the fast "
            "path's fused projections and MLP and the layer graphs do not apply (about 1.5-2x slower on a GPU); "
            "set method.dropout: 0 to use them (Unsloth's recommendation too)."
        )
    apply_checkpoint_offload(model, config, device)
    freed = apply_embedding_offload(model, config, device)
    apply_keep_dequantized(model, config, freed)
    return model


def _note(message: str) -> None:
    from tunelab.track.progress import console

    console.print(f"[cyan]note:[/] {message}")


def lm_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], fused: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy over the target positions (labels != -100), in fp32.

    Equal to the model's own mean loss times the target count; the loop divides by the window's targets.
    `fused` (train.fused_loss): the output head and the loss run chunk by chunk over the target positions only
    (kernels/causal_lm_loss.py), the same value and gradients without the full logits tensor; models and methods
    it cannot serve (prompt / prefix tuning, soft-capped heads, several processes) keep the plain path below.
    """
    if fused:
        parts = decoder_and_head(model)
        if parts is not None:
            return lm_loss_sum_fused(model, batch, parts)
    labels = batch["labels"]
    # use_cache=False: with a KV cache, transformers would ignore the packed position_ids boundaries
    logits = model(**textdata.model_inputs(batch), use_cache=False).logits
    logits = logits[:, -labels.shape[1] :]  # prompt tuning prepends virtual-token positions to the logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=textdata.IGNORE, reduction="sum"
    )


@torch.no_grad()
def evaluate_examples(
    model: torch.nn.Module,
    examples: list[dict],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    accelerator: Any = None,
) -> dict[str, float]:
    """Valid loss (mean over target tokens), perplexity and next-token accuracy on the targets.

    With several processes each scores every N-th example (by length, so the shards cost about the same) and
    the sums are added up across processes; every process runs as many batches (lockstep_batches), as sharded
    parameters (FSDP, ZeRO-3) need."""
    from tunelab.train.distributed import lockstep_batches

    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    sharded = accelerator is not None and accelerator.num_processes > 1
    loss_sum, correct, count = 0.0, 0, 0
    for rows, counts in lockstep_batches(order, batch_size, accelerator):
        batch = textdata.collate([examples[i] for i in rows], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"]
        logits = model(**textdata.model_inputs(batch), use_cache=False).logits[:, -labels.shape[1] :]
        if not counts:  # a stand-in batch: run only to keep the processes in step
            continue
        shifted, targets = logits[:, :-1].float(), labels[:, 1:]
        mask = targets != textdata.IGNORE
        loss_sum += float(
            F.cross_entropy(shifted.flatten(0, 1), targets.flatten(), ignore_index=textdata.IGNORE, reduction="sum")
        )
        correct += int(((shifted.argmax(-1) == targets) & mask).sum())
        count += int(mask.sum())
    model.train(was_training)
    if sharded:
        sums = torch.tensor([loss_sum, correct, count], dtype=torch.float64, device=accelerator.device)
        loss_sum, correct, count = accelerator.reduce(sums, reduction="sum").tolist()
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / max(count, 1)}


def save_weights(model: torch.nn.Module, tokenizer: Any, folder: Path, state_dict: dict | None = None) -> None:
    """Adapter files for peft methods, a complete safetensors model otherwise; the tokenizer beside them.
    `state_dict`: the whole trainable tensors of a sharded model (FSDP, DeepSpeed), which save_pretrained writes in
    place of the model's own (sharded) ones."""
    extra = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(folder, safe_serialization=True, **extra)
    tokenizer.save_pretrained(folder)


def make_job(
    config: RunConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    train_examples: list[dict],
    valid_examples: list[dict],
    device: torch.device,
    accelerator: Any = None,
) -> TrainingJob:
    """The TrainingJob for sft (evaluation sharded over the accelerator's processes when there are several)."""
    pad_id = tokenizer.pad_token_id
    data = (
        textdata.pack_examples(train_examples, config.data.max_length, config.train.seed)
        if config.data.packing
        else train_examples
    )

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return evaluate_examples(m, valid_examples, pad_id, config.eval.batch_size, device, accelerator)

    return TrainingJob(
        model=model,
        train_data=data,
        collate=lambda items: textdata.collate(items, pad_id),
        targets_in=lambda batch: textdata.count_targets(batch["labels"]),
        loss_sum=functools.partial(lm_loss_sum, fused=fused_loss_enabled(config.train.fused_loss, device)),
        evaluate=evaluate if valid_examples else None,
        save_weights=lambda m, folder, state=None: save_weights(m, tokenizer, folder, state),
        units_in=lambda batch: int(batch["real_tokens"].sum()),
    )


def device_and_dtype(config: RunConfig) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype this machine trains."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return device, resolve_dtype(config.model.dtype, device)


def started_clock() -> float:
    """Wall-clock start of a run (for summary.json)."""
    return time.time()


# ----------------------------------------------------------------------------------------------- verbs


def show_data_report(name: str, stats: textdata.TokenStats, hit: bool, max_length: int) -> None:
    """Print what tokenization did before training starts: counts, truncation and length percentiles."""
    from tunelab.track.progress import console

    pct = stats.percentiles()
    lengths = " ".join(f"{k} {v}" for k, v in pct.items())
    console.print(
        f"[bold]{name}[/]: {stats.examples} examples, {stats.truncated} truncated and "
        f"{stats.dropped_too_long} dropped at max_length {max_length}, {stats.no_target} without "
        f"target tokens; tokens {lengths}{' (cached)' if hit else ''}"
    )


def sample_answers(
    model: torch.nn.Module, tokenizer: Any, conversations: list[dict], config: RunConfig, synced: bool = False
) -> list[dict[str, str]]:
    """Generated answers for a few conversations (shown before / after training). `synced`: every process runs
    this with the same conversations (sharded parameters gather in every forward)."""
    if not conversations:
        return []
    template = resolve_template(config.data.template, tokenizer)
    prompts = [render_prompt(c["messages"], template, tokenizer) for c in conversations]
    answers = generate_texts(
        model,
        tokenizer,
        prompts,
        add_special_tokens=template != "chat",
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=config.eval.batch_size,
        synced_gpus=synced,
    )
    return [
        {
            "prompt": next(m["content"] for m in reversed(c["messages"]) if m["role"] == "user"),
            "reference": c["messages"][-1]["content"],
            "answer": a,
        }
        for c, a in zip(conversations, answers, strict=True)
    ]


def train(config: RunConfig, resume: bool = False, show_before: bool = False) -> Path:
    """Train a run end to end and return its folder. Data and model problems surface before the folder is made."""
    from accelerate.utils import set_seed

    from tunelab.advise.diagnose import diagnose_after_training
    from tunelab.advise.inspect import check_before_training
    from tunelab.advise.inspect_report import write_json
    from tunelab.errors import RunStopped
    from tunelab.track.progress import TrainProgress, console
    from tunelab.train.distributed import SHARDS_PARAMETERS
    from tunelab.train.loop import train_loop
    from tunelab.train.run import finish_run, make_accelerator, open_run, preflight, warn_if_over_memory

    started = time.time()
    preflight(config, resume)
    _, dtype = device_and_dtype(config)
    accelerator = make_accelerator(dtype, config)
    device = accelerator.device
    warn_if_over_memory(config, accelerator)
    set_seed(config.train.seed)
    tokenizer = load_tokenizer(config.model)
    train_conv, valid_conv = split_train_valid(config)
    train_examples, train_stats, hit = build_examples(train_conv, tokenizer, config)
    show_data_report("train", train_stats, hit, config.data.max_length)
    check_truncation(train_stats, config, "train")
    data_report = check_before_training(config, tokenizer)  # fast inspect: stops on fatal findings, prints a line
    valid_examples, valid_stats, hit = build_examples(valid_conv, tokenizer, config) if valid_conv else ([], None, 0)
    if valid_stats is not None:
        show_data_report("valid", valid_stats, hit, config.data.max_length)
    model = build_model(config, device)
    trainable, total = adapters.trainable_summary(model)
    console.print(
        f"model {config.model.name}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.3f}M trainable "
        f"({100 * trainable / max(total, 1):.2f}%), method {config.method.kind}, dtype {dtype}, "
        f"device {device.type} x {accelerator.num_processes}"
    )
    samples = valid_conv[: config.eval.samples]
    before = sample_answers(model.to(device), tokenizer, samples, config) if show_before else []
    run_dir, resume_from, log = open_run(config, resume, accelerator)
    if accelerator.is_main_process:
        write_json(data_report, run_dir / "inspect.json")  # diagnose carries its serious findings
    if resume_from is None:
        data_stats = {"train": train_stats.to_dict(), "valid": valid_stats.to_dict() if valid_stats else None}
        log.write(
            {
                "event": "start",
                "step": 0,
                "task": "sft",
                "model": config.model.name,
                "trainable": trainable,
                "total_params": total,
                "processes": accelerator.num_processes,
                "data": data_stats,
            }
        )
        if show_before and valid_examples:  # the starting point of the valid curve
            metrics = evaluate_examples(
                model.to(device), valid_examples, tokenizer.pad_token_id, config.eval.batch_size, device
            )
            log.write({"event": "eval", "step": 0, "epoch": 0.0, "split": "valid", **metrics})
    else:
        console.print(f"resuming from {resume_from}")
    job = make_job(config, model, tokenizer, train_examples, valid_examples, device, accelerator)
    try:
        summary = train_loop(job, config, run_dir, accelerator, log, TrainProgress, resume_from)
    except RunStopped:
        if accelerator.is_main_process:
            diagnose_after_training(run_dir)  # a NaN stop is diagnosed too: the run folder holds the curves
        raise
    finally:
        log.close()
    # rank 0 writes the summary and shows the answers; with sharded parameters every process must generate along
    lockstep = accelerator.num_processes > 1 and config.train.distributed in SHARDS_PARAMETERS
    if not accelerator.is_main_process and not (samples and lockstep):
        return run_dir
    model = accelerator.unwrap_model(job.model)
    after = sample_answers(model, tokenizer, samples, config, synced=lockstep) if samples else []
    if not accelerator.is_main_process:
        return run_dir
    for item in after if not show_before else []:  # the demo prints before / after side by side instead
        console.print(f"[bold]Q[/] {item['prompt']}\n[bold]A[/] {item['answer']}")
    finish_run(
        run_dir,
        {"task": "sft", "status": "early_stopped" if summary["stopped_early"] else "completed", **summary},
        started,
        {"samples_before": before, "samples_after": after},
    )
    if accelerator.is_main_process:
        diagnose_after_training(run_dir)  # writes diagnosis.json, prints the headline
    return run_dir


def load_trained(
    run_dir: Path, merge: bool = False, device: torch.device | None = None
) -> tuple[RunConfig, Any, torch.nn.Module]:
    """(config, tokenizer, model) of a finished run, with the best weights; `merge` folds adapters in. `device`:
    this process's device when several share the work (default: this machine's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.config import load_config
    from tunelab.models.load import ensure_pad_token

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir} is not a tunelab run folder (no config.yaml). Pass the output.dir of a run.")
    best = run_dir / "best"
    if not best.exists():
        raise UserError(
            f"{run_dir} has no best/ weights yet (the run stopped before its first evaluation). Resume "
            "it with `tunelab train CONFIG --resume`."
        )
    config = load_config(run_dir / "config.yaml")
    default_device, dtype = device_and_dtype(config)
    device = device or default_device
    tokenizer = AutoTokenizer.from_pretrained(best)
    ensure_pad_token(tokenizer)
    if adapters.is_peft(config.method.kind):
        from peft import PeftModel

        kind = "lora" if merge else config.method.kind  # merging needs unquantized base weights
        base = load_causal_lm(config.model, kind, device)
        model = PeftModel.from_pretrained(base, best)
        if merge:
            if config.method.kind in ("prefix", "prompt"):
                raise UserError(
                    f"method.kind {config.method.kind} adds virtual tokens and cannot be merged into "
                    "the weights. Export without --merge."
                )
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(best, dtype=dtype)
    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
        model = model.to(device)
    model.eval()
    return config, tokenizer, model


def evaluate_run(run_dir: Path, data_file: str | None = None) -> dict[str, float]:
    """Metrics of a run's best weights on its validation split or on `data_file` (rows spread over the processes
    under `tunelab eval --gpus N`, sums added up)."""
    from tunelab.train.distributed import inference_accelerator

    accelerator = inference_accelerator()
    config, tokenizer, model = load_trained(run_dir, device=accelerator.device if accelerator else None)
    conversations = read_conversations(data_file, config) if data_file else split_train_valid(config)[1]
    if not conversations:
        raise UserError(f"{run_dir} has no validation split (data.valid_split is 0). Pass --data FILE.")
    examples, _, _ = build_examples(conversations, tokenizer, config)
    device = next(model.parameters()).device
    return evaluate_examples(model, examples, tokenizer.pad_token_id, config.eval.batch_size, device, accelerator)


def predict_run(run_dir: Path, data_file: str, out: Path) -> Path:
    """Generate an answer for every row of `data_file`; write `id,prediction` to `out` (atomically). Under
    `tunelab predict --gpus N` each process answers every N-th batch and rank 0 writes them all in the file's order."""
    import pandas as pd

    from tunelab.track.progress import console, work_bar
    from tunelab.train.distributed import inference_accelerator

    accelerator = inference_accelerator()
    config, tokenizer, model = load_trained(run_dir, device=accelerator.device if accelerator else None)
    conversations = read_conversations(data_file, config, need_answer=False)
    template = resolve_template(config.data.template, tokenizer)
    prompts = [render_prompt(c["messages"], template, tokenizer) for c in conversations]
    console.print(
        f"generating {len(prompts)} answers (batch {config.eval.batch_size}, "
        f"max_new_tokens {config.eval.max_new_tokens}"
        f"{f', {accelerator.num_processes} processes' if accelerator else ''})"
    )
    processes = accelerator.num_processes if accelerator else 1
    with work_bar("predict", len(prompts)) as advance:
        answers = generate_texts(
            model,
            tokenizer,
            prompts,
            add_special_tokens=template != "chat",
            max_new_tokens=config.eval.max_new_tokens,
            batch_size=config.eval.batch_size,
            do_sample=config.eval.do_sample,
            temperature=config.eval.temperature,
            num_beams=config.eval.num_beams,
            progress=lambda n: advance(n * processes),  # rank 0 draws; every process does a like share
            accelerator=accelerator,
        )
    if accelerator is not None and not accelerator.is_main_process:
        return Path(out)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pd.DataFrame({"id": [c["id"] for c in conversations], "prediction": answers}).to_csv(tmp, index=False)
    tmp.replace(out)
    return out


def export_run(run_dir: Path, out: Path, merge: bool) -> Path:
    """Adapter (or, with merge, the merged model) in the standard HF / peft layout, safetensors."""
    from tunelab.train.checkpoint import replace_folder

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"Export folder {out} exists and is not empty. Choose a new folder or remove it.")
    _, tokenizer, model = load_trained(run_dir, merge=merge)

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    if out.exists():
        out.rmdir()
    replace_folder(out, write)
    return out
