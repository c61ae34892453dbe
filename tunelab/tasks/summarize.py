"""summarize: dialogue summarization with an encoder-decoder (BART / T5 / mT5) or a decoder LLM, scored by ROUGE.

Top to bottom: the model kind is read from the model's config (model.kind: auto) or insisted on; rows {id,
dialogue, summary} become token examples (summarize_data: sft's prompt, assistant-only masking and left truncation
for decoder models; encoder input and decoder labels for seq2seq); a truncation report runs before any model is
loaded and stops with advice when too much would be cut; speaker tags listed in data.special_tokens become special
tokens, the embedding grows and the new rows are trained and saved with the adapter; the one training loop trains
(LoRA / QLoRA / full / ...); every evaluation reports valid loss and ROUGE-1 / 2 / L and their sum on a generated
subset, and best/ follows rouge_sum; predict writes `id,summary`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.config import RunConfig
from tunelab.data.templates import resolve_template
from tunelab.errors import UserError
from tunelab.evaluate import rouge as rougelib
from tunelab.evaluate.generate import generate_texts
from tunelab.kernels.fast_path import (
    apply_checkpoint_offload,
    apply_embedding_offload,
    apply_fast_kernels,
    apply_keep_dequantized,
    keep_half_norms,
)
from tunelab.models import adapters
from tunelab.models.load import load_lm, load_tokenizer, model_architecture, resolve_dtype, use_gradient_checkpointing
from tunelab.tasks import sft
from tunelab.tasks import summarize_data as sd
from tunelab.train.loop import TrainingJob

DEFAULT_MAX_TRUNCATED = 0.01  # seed 001: 6% of prompts cut at 512 tokens cost 20-30 ROUGE points; 0.11% at 1024
DEFAULT_METRIC = "rouge_sum"  # the competition's score; seed 001 picks the best checkpoint by it for seq2seq

# ----------------------------------------------------------------------------------------------- setup


def apply_task_defaults(config: RunConfig) -> None:
    """Defaults that differ from sft's, applied only where the user did not set the key: 1% truncation allowed,
    best checkpoint by rouge_sum."""
    if "max_truncated" not in config.data.model_fields_set:
        config.data.max_truncated = DEFAULT_MAX_TRUNCATED
    if "metric" not in config.train.early_stop.model_fields_set:
        config.train.early_stop.metric = DEFAULT_METRIC


def resolve_kind(config: RunConfig) -> str:
    """'causal' or 'seq2seq': what the model folder holds, checked against model.kind."""
    found, model_type = model_architecture(config.model)
    wanted = config.model.kind
    if wanted != "auto" and wanted != found:
        holds = "an encoder-decoder (seq2seq)" if found == "seq2seq" else "a decoder-only (causal)"
        raise UserError(
            f"model.kind is {wanted}, but {config.model.name} holds {holds} model ({model_type}). Set "
            f"model.kind: {found} (or auto), or point model.name at a {wanted} model."
        )
    return found


def check_settings(config: RunConfig, kind: str) -> None:
    """Settings that cannot work together, refused before any work."""
    if config.eval.rouge_tokenizer == "ko-morph":
        rougelib.require_kiwi()
    if kind == "seq2seq" and config.data.packing:
        raise UserError("data.packing applies to decoder models only; set data.packing: false for a seq2seq model.")
    if config.data.packing and config.method.kind in ("prefix", "prompt"):
        raise UserError(
            "data.packing cannot be combined with method.kind prefix / prompt. Turn packing off or use lora."
        )
    if config.data.instructions and kind == "seq2seq":
        sft._warn("data.instructions apply to decoder models; this seq2seq model reads the dialogue alone.")


def register_special_tokens(tokenizer: Any, tokens: list[str]) -> tuple[list[int], dict[int, list[int]]]:
    """Add `tokens` as special tokens (never split; kept when decoding here). Returns their ids, and for the ones
    new to the vocabulary the ids of the pieces the tokenizer split them into before (their embedding starts as the
    mean of those pieces). The keyword changed in transformers 5 (extra_special_tokens) from 4.x
    (additional_special_tokens)."""
    if not tokens:
        return [], {}
    import inspect

    known = len(tokenizer)
    pieces = {token: tokenizer(token, add_special_tokens=False)["input_ids"] for token in tokens}

    params = inspect.signature(tokenizer.add_special_tokens).parameters
    if "replace_extra_special_tokens" in params:
        tokenizer.add_special_tokens({"extra_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    else:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": list(tokens)}, replace_additional_special_tokens=False
        )
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(list(tokens))]
    return ids, {i: list(pieces[t]) for t, i in zip(tokens, ids, strict=True) if i >= known and pieces[t]}


def resize_embeddings(model: torch.nn.Module, size: int, new_rows: dict[int, list[int]] | None = None) -> None:
    """Grow the embedding (and an untied head) to `size` rows: rows added start at the mean of the old ones, and
    the rows of registered tokens (`new_rows`: id -> piece ids) at the mean of their pieces' rows.

    A registered tag then starts where its spelling was ("#Person1#" ~ "#", "Person", "1", "#"), so a short LoRA
    run learns to write it: from the mean of all rows, 24 CPU steps left SmolLM2 unable to emit the tags at all
    (the demo's first outputs). Set here rather than by transformers' mean_resizing, which samples around the
    mean: loading a trained run must rebuild exactly the same base rows."""
    old = model.get_input_embeddings().weight.shape[0]
    if size > old:
        model.resize_token_embeddings(size, mean_resizing=False)
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    with torch.no_grad():
        for weight in {id(m.weight): m.weight for m in layers if m is not None}.values():
            if size > old:
                weight[old:] = weight[:old].float().mean(0).to(weight.dtype)
            for row, pieces in (new_rows or {}).items():
                weight[row] = weight[pieces].float().mean(0).to(weight.dtype)


def build_model(config: RunConfig, device: torch.device, tokenizer: Any, kind: str, tags: tuple) -> Any:
    """The base model of `kind`, embeddings grown for the registered tokens (`tags`: their ids and new rows),
    with the configured method applied; the registered tokens' rows are trained beside a LoRA adapter."""
    new_ids, new_rows = tags
    model = load_lm(config.model, config.method.kind, device, kind)
    resize_embeddings(model, len(tokenizer), new_rows)
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False  # useless in training, and it conflicts with checkpointing
    lora = config.method.kind in ("lora", "qlora", "dora")
    if new_ids and not lora and config.method.kind != "full":
        sft._warn(
            f"method.kind {config.method.kind} does not train embedding rows: the {len(new_ids)} registered tokens "
            "keep their initial embedding (the mean of their pieces). Use lora or full to train them."
        )
    checkpointing = use_gradient_checkpointing(config.model, device)
    keep_half = keep_half_norms(config, device, resolve_dtype(config.model.dtype, device))
    model = adapters.apply_method(model, config.method, checkpointing, new_ids if lora else None, keep_half)
    apply_fast_kernels(model, config, device)
    apply_checkpoint_offload(model, config, device)
    freed = apply_embedding_offload(model, config, device)
    apply_keep_dequantized(model, config, freed)
    return model


# ----------------------------------------------------------------------------------------------- loss


def seq2seq_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy of the decoder over the label positions (labels are not shifted: decoder_input_ids
    already are), in fp32."""
    inputs = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
    logits = model(**{key: batch[key] for key in inputs}, use_cache=False).logits
    labels = batch["labels"]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=sd.IGNORE, reduction="sum")


def loss_sum_for(kind: str) -> Any:
    """The summed loss of one batch for this model kind."""
    return sft.lm_loss_sum if kind == "causal" else seq2seq_loss_sum


def collate_for(kind: str, tokenizer: Any, model: torch.nn.Module) -> Any:
    """Batches for this model kind (seq2seq decoder inputs start with the model's decoder start token)."""
    from tunelab.data import text as textdata

    pad_id = tokenizer.pad_token_id
    if kind == "causal":
        return lambda items: textdata.collate(items, pad_id)
    start = getattr(model.config, "decoder_start_token_id", None)
    start = start if start is not None else getattr(model.generation_config, "decoder_start_token_id", None)
    if start is None:
        raise UserError(f"{model.config.model_type}: the model config names no decoder_start_token_id; set it.")
    return lambda items: sd.collate_seq2seq(items, pad_id, int(start))


def targets_in(kind: str, batch: dict[str, torch.Tensor]) -> int:
    """Positions the loss is summed over: causal labels are shifted by one, seq2seq labels are not."""
    labels = batch["labels"][..., 1:] if kind == "causal" else batch["labels"]
    return int((labels != sd.IGNORE).sum())


@torch.no_grad()
def evaluate_loss(
    model: Any, examples: list[dict], kind: str, collate: Any, batch_size: int, accelerator: Any
) -> float:
    """Mean valid loss per target token (sharded over processes by length, summed across them; every process runs
    as many batches, as sharded parameters need)."""
    from tunelab.train.distributed import lockstep_batches

    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    world = accelerator.num_processes if accelerator is not None else 1
    loss_sum, count = 0.0, 0
    for rows, counts in lockstep_batches(order, batch_size, accelerator):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in rows]).items()}
        loss = float(loss_sum_for(kind)(model, batch))
        if counts:  # else a stand-in batch, run only to keep the processes in step
            loss_sum += loss
            count += targets_in(kind, batch)
    if world > 1:
        sums = accelerator.reduce(torch.tensor([loss_sum, count], dtype=torch.float64, device=device), reduction="sum")
        loss_sum, count = sums.tolist()
    return loss_sum / max(count, 1)


# ----------------------------------------------------------------------------------------------- generation


def prompt_ids(rows: list[dict], tokenizer: Any, kind: str, config: RunConfig) -> tuple[list[list[int]], int]:
    """Generation inputs (cut to data.max_length the way training cuts them) and how many had to be cut."""
    if kind == "causal":
        template = resolve_template(config.data.template, tokenizer)
        pairs = [sd.causal_prompt(row, tokenizer, template, config) for row in rows]
    else:
        pairs = [sd.encode_source(row["dialogue"], tokenizer, config.data.max_length) for row in rows]
    return [ids for ids, _ in pairs], sum(length > config.data.max_length for _, length in pairs)


def generate_summaries(
    model: Any,
    tokenizer: Any,
    rows: list[dict],
    kind: str,
    config: RunConfig,
    accelerator: Any = None,
    synced: bool = False,
    progress: Any = None,
) -> list[str]:
    """Summaries for `rows`: batched beam search / greedy with the eval settings, cleaned of special tokens (the
    registered speaker tags stay) and speaker-tag debris. With several processes (`accelerator`) each generates a
    share of the batches and all get every summary; `synced`: the parameters are sharded across them.
    `progress(n)`: told of every batch generated (a bar outside training)."""
    if not rows:
        return []
    prompts, _ = prompt_ids(rows, tokenizer, kind, config)
    ev = config.eval
    texts = generate_texts(
        model,
        tokenizer,
        prompts,
        add_special_tokens=False,  # prompts are token ids already
        max_new_tokens=ev.max_new_tokens,
        batch_size=ev.batch_size,
        do_sample=ev.do_sample,
        temperature=ev.temperature,
        num_beams=ev.num_beams,
        length_penalty=ev.length_penalty,
        no_repeat_ngram_size=ev.no_repeat_ngram_size,
        skip_special_tokens=False,  # skipping would drop the registered speaker tags too
        progress=progress,
        accelerator=accelerator,
        synced_gpus=synced,
    )
    remove = sd.structural_tokens(tokenizer, config.data.special_tokens)
    return [sd.clean_summary(text, remove) for text in texts]


def rouge_on(
    model: Any, tokenizer: Any, rows: list[dict], kind: str, config: RunConfig, accelerator: Any = None
) -> tuple[dict[str, float], list[str]]:
    """Corpus ROUGE of generated summaries against the rows' references, and the predictions in the rows' order.
    With several processes each generates a share of the batches; every process gets all predictions (the same
    as one process makes) and scores them."""
    from tunelab.train.distributed import SHARDS_PARAMETERS

    world = accelerator.num_processes if accelerator is not None else 1
    synced = world > 1 and config.train.distributed in SHARDS_PARAMETERS
    predictions = generate_summaries(model, tokenizer, rows, kind, config, accelerator, synced)
    per_example = rougelib.score_examples(
        predictions, [r["summaries"] for r in rows], config.eval.rouge_tokenizer, config.eval.rouge_references
    )
    return rougelib.mean_scores(per_example), predictions


# ----------------------------------------------------------------------------------------------- job


def save_weights(model: torch.nn.Module, tokenizer: Any, folder: Path, state_dict: dict | None = None) -> None:
    """Adapter files (with the trained token rows, without the whole embedding: loading rebuilds the grown base
    deterministically) or a complete model; the tokenizer beside them. `state_dict`: the whole trainable tensors
    of a sharded model (FSDP, DeepSpeed), written in place of its own (sharded) ones."""
    extra = {} if state_dict is None else {"state_dict": state_dict}
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False, **extra)
    else:
        model.save_pretrained(folder, safe_serialization=True, **extra)
    tokenizer.save_pretrained(folder)


def make_job(config: RunConfig, parts: dict[str, Any], accelerator: Any, captured: dict[str, Any]) -> TrainingJob:
    """The TrainingJob: `parts` holds kind, model, tokenizer, train / valid examples and valid rows; each evaluation
    stores its predictions in `captured` (shown by the demo)."""
    from tunelab.data import text as textdata

    kind, model, tokenizer = parts["kind"], parts["model"], parts["tokenizer"]
    collate = collate_for(kind, tokenizer, model)
    data = parts["train_examples"]
    if config.data.packing:
        data = textdata.pack_examples(data, config.data.max_length + config.data.max_target_length, config.train.seed)
    subset = parts["valid_rows"][: config.eval.generate_subset]

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        loss = evaluate_loss(m, parts["valid_examples"], kind, collate, config.eval.batch_size, accelerator)
        scores, captured["predictions"] = rouge_on(m, tokenizer, subset, kind, config, accelerator)
        return {"loss": loss, **scores}

    return TrainingJob(
        model=model,
        train_data=data,
        collate=collate,
        targets_in=lambda batch: targets_in(kind, batch),
        loss_sum=loss_sum_for(kind),
        evaluate=evaluate if parts["valid_examples"] else None,
        save_weights=lambda m, folder, state=None: save_weights(m, tokenizer, folder, state),
        units_in=lambda batch: int(batch["real_tokens"].sum()),
    )


# ----------------------------------------------------------------------------------------------- verbs


def prepare_data(config: RunConfig, tokenizer: Any, kind: str) -> dict[str, Any]:
    """Read, tokenize and report both splits; stop on too much truncation before any model is loaded."""
    train_rows, valid_rows = sft.split_train_valid(config, sd.read_dialogues)
    train_examples, stats, hit = sd.build_split(train_rows, tokenizer, kind, config, training=True)
    report = sd.truncation_report(stats["prompt_lengths"], stats["target_lengths"], config)
    sd.show_truncation_report("train", report, hit)
    sd.check_report(report, config, "train")
    if not train_examples:
        raise UserError("train: no example fits data.max_length; raise it (see the report above).")
    reports = {"train": {**report, "dropped": stats["dropped"]}}
    valid_examples: list[dict] = []
    if valid_rows:
        valid_config = config.model_copy(deep=True)
        valid_config.data.long_targets = "truncate"  # valid loss only: ROUGE reads the whole reference text
        valid_examples, stats, hit = sd.build_split(valid_rows, tokenizer, kind, valid_config, training=False)
        reports["valid"] = sd.truncation_report(stats["prompt_lengths"], stats["target_lengths"], config)
        sd.show_truncation_report("valid", reports["valid"], hit)
    return {
        "train_rows": train_rows,
        "valid_rows": valid_rows,
        "train_examples": train_examples,
        "valid_examples": valid_examples,
        "reports": reports,
    }


def prepare_tokenizer(config: RunConfig) -> tuple[Any, tuple[list[int], dict[int, list[int]]]]:
    """The tokenizer with data.special_tokens registered, and their ids and new rows (register_special_tokens)."""
    tokenizer = load_tokenizer(config.model)
    return tokenizer, register_special_tokens(tokenizer, config.data.special_tokens)


def train(config: RunConfig, resume: bool = False, show_before: bool = False) -> Path:
    """Train a run end to end and return its folder; data, settings and model-kind problems surface before the
    folder is made. `show_before` also scores the untrained model (step 0 of the curves)."""
    from accelerate.utils import set_seed

    from tunelab.track.progress import TrainProgress, console
    from tunelab.train.loop import train_loop
    from tunelab.train.run import finish_run, make_accelerator, open_run, preflight, warn_if_over_memory

    started = time.time()
    apply_task_defaults(config)
    preflight(config, resume)
    kind = resolve_kind(config)
    check_settings(config, kind)
    _, dtype = sft.device_and_dtype(config)
    accelerator = make_accelerator(dtype, config)
    device = accelerator.device
    warn_if_over_memory(config, accelerator)
    set_seed(config.train.seed)
    tokenizer, tags = prepare_tokenizer(config)
    parts = {"kind": kind, "tokenizer": tokenizer, **prepare_data(config, tokenizer, kind)}
    parts["model"] = model = build_model(config, device, tokenizer, kind, tags)
    trainable, total = adapters.trainable_summary(model)
    console.print(
        f"model {config.model.name} ({kind}): {total / 1e6:.1f}M parameters, {trainable / 1e6:.3f}M trainable, "
        f"method {config.method.kind}, dtype {dtype}, device {device.type} x {accelerator.num_processes}; "
        f"best checkpoint by {config.train.early_stop.metric}"
    )
    captured: dict[str, Any] = {}
    job = make_job(config, parts, accelerator, captured)
    run_dir, resume_from, log = open_run(config, resume, accelerator)
    if resume_from is None:
        log.write({"event": "start", "step": 0, "task": "summarize", "model": config.model.name, "kind": kind,
                   "trainable": trainable, "total_params": total, "processes": accelerator.num_processes,
                   "data": parts["reports"]})  # fmt: skip
        if show_before and job.evaluate is not None:  # the untrained model: the starting point of the curves
            with torch.no_grad():
                before = job.evaluate(model.to(device))
            captured["before"] = captured.get("predictions", [])
            log.write({"event": "eval", "step": 0, "epoch": 0.0, "split": "valid", **before})
            console.print("before training: " + ", ".join(f"{k} {v:.2f}" for k, v in before.items()))
    try:
        summary = train_loop(job, config, run_dir, accelerator, log, TrainProgress, resume_from)
    finally:
        log.close()
    if not accelerator.is_main_process:
        return run_dir
    samples = _samples(parts["valid_rows"], captured, config.eval.samples)
    status = "early_stopped" if summary["stopped_early"] else "completed"
    finish_run(run_dir, {"task": "summarize", "kind": kind, "status": status, **summary}, started, {"samples": samples})
    return run_dir


def _samples(rows: list[dict], captured: dict[str, Any], n: int) -> list[dict[str, str]]:
    """A few validation dialogues with the summaries written before and after training (summary.json)."""
    before, after = captured.get("before", []), captured.get("predictions", [])
    return [
        {
            "id": row["id"],
            "dialogue": row["dialogue"],
            "reference": row["summaries"][0],
            "before": before[i] if i < len(before) else "",
            "after": after[i] if i < len(after) else "",
        }
        for i, row in enumerate(rows[:n])
    ]


def load_trained(
    run_dir: Path, merge: bool = False, device: torch.device | None = None
) -> tuple[RunConfig, Any, Any, str]:
    """(config, tokenizer, model, kind) of a finished run with its best weights; `merge` folds adapters in.
    `device`: this process's device when several share the work (default: this machine's)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from tunelab.config import load_config
    from tunelab.models.load import ensure_pad_token

    run_dir = Path(run_dir)
    best = run_dir / "best"
    if not best.exists():
        raise UserError(
            f"{run_dir} has no best/ weights yet (the run stopped before its first evaluation). Resume it with "
            "`tunelab train CONFIG --resume`."
        )
    config = load_config(run_dir / "config.yaml")
    kind = resolve_kind(config)
    default_device, dtype = sft.device_and_dtype(config)
    device = device or default_device
    tokenizer = AutoTokenizer.from_pretrained(best)
    ensure_pad_token(tokenizer)
    if adapters.is_peft(config.method.kind):
        from peft import PeftModel

        base = load_lm(config.model, "lora" if merge else config.method.kind, device, kind)
        _, (_, new_rows) = prepare_tokenizer(config)  # the same initial rows as in training
        resize_embeddings(base, len(tokenizer), new_rows)
        model = PeftModel.from_pretrained(base, best)
        if merge:
            if config.method.kind in ("prefix", "prompt"):
                raise UserError(
                    f"method.kind {config.method.kind} cannot be merged into the weights. Export without --merge."
                )
            model = model.merge_and_unload()
    else:
        auto_class = AutoModelForCausalLM if kind == "causal" else AutoModelForSeq2SeqLM
        model = auto_class.from_pretrained(best, dtype=dtype)
    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
        model = model.to(device)
    return config, tokenizer, model.eval(), kind


def evaluate_run(run_dir: Path, data_file: str | None = None) -> dict[str, float]:
    """Valid loss and ROUGE of a run's best weights on its whole validation split or on `data_file` (rows spread
    over the processes under `tunelab eval --gpus N`)."""
    from tunelab.train.distributed import inference_accelerator

    accelerator = inference_accelerator()
    config, tokenizer, model, kind = load_trained(run_dir, device=accelerator.device if accelerator else None)
    if config.eval.rouge_tokenizer == "ko-morph":
        rougelib.require_kiwi()
    rows = sd.read_dialogues(data_file, config) if data_file else sft.split_train_valid(config, sd.read_dialogues)[1]
    if not rows:
        raise UserError(f"{run_dir} has no validation split (data.valid_split is 0). Pass --data FILE.")
    eval_config = config.model_copy(deep=True)
    eval_config.data.long_targets = "truncate"
    examples, _, _ = sd.build_split(rows, tokenizer, kind, eval_config, training=False)
    collate = collate_for(kind, tokenizer, model)
    loss = evaluate_loss(model, examples, kind, collate, config.eval.batch_size, accelerator)
    scores, _ = rouge_on(model, tokenizer, rows, kind, config, accelerator)
    return {"loss": loss, **scores, "examples": len(rows)}


def predict_run(run_dir: Path, data_file: str, out: Path) -> Path:
    """A summary for every row of `data_file`, written as `id,summary` to `out` (atomically). Under
    `tunelab predict --gpus N` each process summarizes every N-th batch and rank 0 writes them all in order."""
    import pandas as pd

    from tunelab.track.progress import console, work_bar
    from tunelab.train.distributed import inference_accelerator

    accelerator = inference_accelerator()
    config, tokenizer, model, kind = load_trained(run_dir, device=accelerator.device if accelerator else None)
    rows = sd.read_dialogues(data_file, config, need_summary=False)
    _, cut = prompt_ids(rows, tokenizer, kind, config)
    if cut:
        sft._warn(f"{cut} of {len(rows)} dialogues are longer than data.max_length={config.data.max_length}: "
                  "their oldest turns are cut.")  # fmt: skip
    console.print(f"summarizing {len(rows)} dialogues (batch {config.eval.batch_size}, beams {config.eval.num_beams})")
    processes = accelerator.num_processes if accelerator else 1
    with work_bar("predict", len(rows)) as advance:  # rank 0 draws; every process does a like share
        summaries = generate_summaries(
            model, tokenizer, rows, kind, config, accelerator, progress=lambda n: advance(n * processes)
        )
    if accelerator is not None and not accelerator.is_main_process:
        return Path(out)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pd.DataFrame({"id": [r["id"] for r in rows], "summary": summaries}).to_csv(tmp, index=False)
    tmp.replace(out)
    return out


def export_run(run_dir: Path, out: Path, merge: bool) -> Path:
    """Adapter (or, with merge, the merged model) and tokenizer in the standard HF / peft layout, safetensors."""
    from tunelab.train.checkpoint import replace_folder

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"Export folder {out} exists and is not empty. Choose a new folder or remove it.")
    _, tokenizer, model, _ = load_trained(run_dir, merge=merge)
    if out.exists():
        out.rmdir()
    replace_folder(out, lambda folder: save_weights(model, tokenizer, folder))
    return out
