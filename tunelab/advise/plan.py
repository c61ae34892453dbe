"""`tunelab plan`: will this config fit on that GPU, and which settings make it fit (or use the room)?

The memory model is in plan_memory.py, the model shapes in plan_shapes.py. This file holds the GPU presets, the
settings read from a config, the recommendation search and the patched config that `--apply` writes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.advise.plan_images import image_side_from_data
from tunelab.advise.plan_memory import LM_TASKS, Estimate, Settings, estimate
from tunelab.advise.plan_shapes import ModelShape, model_shape
from tunelab.config import RunConfig
from tunelab.errors import UserError


@dataclass(frozen=True)
class Gpu:
    """A GPU preset: memory usable by programs (GiB, as torch reports it) and bf16 support."""

    name: str
    memory_gib: float
    bf16: bool


GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        Gpu("T4", 14.57, False),
        Gpu("V100-16", 15.77, False),
        Gpu("V100-32", 31.74, False),
        Gpu("A10G", 22.07, True),
        Gpu("L4", 22.07, True),
        Gpu("RTX3090", 23.69, True),
        Gpu("RTX4090", 23.64, True),
        Gpu("A100-40", 39.39, True),
        Gpu("A100-80", 79.15, True),
        Gpu("H100", 79.19, True),
        Gpu("H200", 139.8, True),
    )
}
ALIASES = {"V100": "V100-16", "3090": "RTX3090", "4090": "RTX4090", "A100": "A100-80", "H100-80": "H100"}
TASKS_WITH_A_MODEL = ("sft", "summarize", "mcqa")
# mcqa: the chat template, image markers and "(a) " letters around a row's text (the 48 tokens this model counted
# before, less the default instruction's 14, which is now counted from data.system_prompt)
TEMPLATE_TOKENS = 34
DEFAULT_IMAGE_SIZE = 448  # mcqa with model.image_size null: the seeds' resolution (the processor's own may be larger)
HEADROOM = 0.92  # plan to use at most this share of the GPU: other processes, spikes, a longer batch


def find_gpu(name: str | None, memory_gib: float | None) -> Gpu:
    """The preset named (case and dashes ignored), or a custom GPU of `memory_gib`; UserError listing presets."""
    if memory_gib is not None:
        if memory_gib <= 0:
            raise UserError(f"--gpu-mem {memory_gib}: give the GPU's memory in GiB, e.g. --gpu-mem 48.")
        base = find_gpu(name, None) if name else None
        return Gpu(f"{base.name if base else 'custom'} ({memory_gib:g} GiB)", memory_gib, base.bf16 if base else True)
    if not name:
        raise UserError(f"plan needs --gpu NAME or --gpu-mem GIB. Known GPUs: {', '.join(GPUS)}.")
    key = name.upper().replace("_", "-").replace(" ", "")
    key = ALIASES.get(key, key)
    for preset in GPUS.values():
        if preset.name.replace("-", "") == key.replace("-", ""):
            return preset
    raise UserError(f"Unknown GPU '{name}'. Known GPUs: {', '.join(GPUS)}; or give --gpu-mem GIB for any other.")


def settings_for(config: RunConfig, gpu: Gpu, gpus: int = 1) -> Settings:
    """What the run would do on this GPU, from the config (checkpointing defaults to on, as on CUDA)."""
    if config.task not in TASKS_WITH_A_MODEL:
        raise UserError(
            f"plan has no memory model for task '{config.task}' yet (it has: {', '.join(TASKS_WITH_A_MODEL)})."
        )
    dtype = config.model.dtype
    dtype_bytes = 4 if dtype == "fp32" else 2
    method = config.method.kind
    target_len = config.data.max_target_length if config.task == "summarize" else 0
    checkpointing = True if config.model.gradient_checkpointing is None else config.model.gradient_checkpointing
    vlm: dict[str, Any] = {}
    if config.task == "mcqa":
        vlm = {
            "image_size": config.model.image_size or DEFAULT_IMAGE_SIZE,
            "train_vision": config.method.train_parts.vision,
            "train_projector": config.method.train_parts.projector,
            "head_tokens_per_row": 3,  # the answer letter, end of turn, and the position before them
        }
    distributed = getattr(config.train, "distributed", "ddp") or "ddp"
    # kernels/fast_path.py, resolved as on CUDA (what plan sizes); sft and summarize install its pieces, mcqa none
    lm_task = config.task in LM_TASKS
    fast_setting = config.train.fast_kernels
    fast_kernels = distributed == "ddp" if fast_setting == "auto" else bool(fast_setting)
    offload_checkpoints = config.model.offload_checkpoints if lm_task else False
    if offload_checkpoints == "auto" and distributed != "ddp":
        offload_checkpoints = False  # auto also leaves encoder-decoders alone: estimate() reads that off the shape
    offload_embedding = config.model.offload_embedding if lm_task and gpus == 1 else False
    return Settings(
        task=config.task,
        method=method,
        quantize=config.model.quantize,
        dtype_bytes=dtype_bytes,
        micro_batch=config.train.batch_size,
        seq_len=config.data.max_length,
        checkpointing=checkpointing,
        rank=config.method.r,
        target=config.method.target,
        lora_dropout=config.method.dropout > 0,
        target_len=target_len,
        freeze_keep_last=config.method.freeze_keep_last,
        gpus=gpus,
        strategy=distributed,
        # plan sizes a CUDA run: auto means on; sft only (summarize keeps the plain loss); one process only, since
        # the wrappers of several processes must see the model's own forward (kernels/causal_lm_loss.py)
        fused_loss=config.task == "sft"
        and config.train.fused_loss is not False
        and method not in ("prefix", "prompt")
        and gpus == 1,
        # resolve_dtype on CUDA: auto is bf16 where the GPU has it; bf16 on a GPU without stops the run
        bf16=gpu.bf16 and dtype in ("auto", "bf16"),
        fast_kernels=fast_kernels,
        offload_checkpoints=offload_checkpoints,
        offload_embedding=offload_embedding,
        trained_token_rows=config.task == "summarize" and bool(config.data.special_tokens),
        **vlm,
    )


def size_images_from_data(config: RunConfig, shape: ModelShape, settings: Settings) -> str | None:
    """With model.image_size null and a pixel-budget (Qwen2-VL-style) model, size the run's images from the
    training data (plan_images.py) instead of DEFAULT_IMAGE_SIZE; returns what the plan says about it."""
    if config.model.image_size or not shape.vision or shape.image_tokens:
        return None
    found = image_side_from_data(config, shape.vision["patch"], shape.vision["merge"])
    if found is None:
        return (
            f"model.image_size is null and no training image could be read: sized for {DEFAULT_IMAGE_SIZE} px "
            "images; set model.image_size to size the run (and the processor) yourself."
        )
    settings.image_size, read = found
    return (
        f"model.image_size is null: the processor keeps images near their own size; the largest of the first "
        f"{read} training images becomes about {settings.image_size} x {settings.image_size} px, which the plan "
        "sizes for (set model.image_size to fix one size)."
    )


def image_tokens(shape: ModelShape, image_size: int) -> int:
    """mcqa: the language-model tokens one image becomes: a fixed count for LLaVA-style models, else one per
    merged patch (Qwen2-VL: 14 px patches merged 2 x 2, so a 448 px image is 256 tokens)."""
    if shape.image_tokens:
        return int(shape.image_tokens)
    vision = shape.vision or {"patch": 14, "merge": 1}
    side = image_size // (vision["patch"] * max(vision["merge"], 1))
    return max(1, side * side)


def prompt_tokens(config: RunConfig) -> int:
    """mcqa: the prompt's text tokens: the chat template and choice letters, the system instruction as configured,
    and the 95th percentile of the training rows' question and choices at about 3.5 characters a token (160 in all
    when the file cannot be read)."""
    from tunelab.data.readers import read_table
    from tunelab.tasks.mcqa_data import DEFAULT_SYSTEM_PROMPT, choice_columns

    system = DEFAULT_SYSTEM_PROMPT if config.data.system_prompt is None else config.data.system_prompt
    try:
        rows = read_table(config.data.train)[:2000] if config.data.train else []
        choices = choice_columns(config.data.train, rows, config) if rows else []
    except (UserError, OSError):
        rows = []
    if not rows:
        return 160
    used = [config.data.columns.question, *([choices] if isinstance(choices, str) else choices)]

    def text_chars(value: object) -> int:
        return sum(len(str(v)) for v in value) if isinstance(value, (list, tuple)) else len(str(value))

    chars = sorted(sum(text_chars(row.get(column, "")) for column in used) for row in rows)
    return int(chars[int(0.95 * (len(chars) - 1))] / 3.5) + TEMPLATE_TOKENS + int(len(system) / 3.5)


@dataclass
class Plan:
    """The estimate for the config as written, and the recommended changes with their estimate."""

    gpu: Gpu
    shape: ModelShape
    current: Estimate
    fits: bool
    changes: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    recommended: Estimate | None = None
    settings: Settings | None = None  # what the estimate assumed (tokens per row included)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": {"name": self.gpu.name, "memory_gib": self.gpu.memory_gib, "bf16": self.gpu.bf16},
            "model": {
                "source": self.shape.source,
                "model_type": self.shape.model_type,
                "params": self.shape.params,
                "layers": self.shape.layers,
                "hidden": self.shape.hidden,
                "vocab": self.shape.vocab,
            },
            "estimate": self.current.to_dict(),
            "fits": self.fits,
            "changes": self.changes,
            "reasons": self.reasons,
            "recommended": self.recommended.to_dict() if self.recommended else None,
        }


def make_plan(config: RunConfig, gpu: Gpu, gpus: int = 1, shape: ModelShape | None = None) -> Plan:
    """Estimate the config on `gpu` and search for settings that fit (or that use spare room)."""
    settings = settings_for(config, gpu, gpus)  # first: a task without a memory model is said before any work
    shape = shape or model_shape(config)
    size_note = None
    if config.task == "mcqa":
        size_note = size_images_from_data(config, shape, settings)
        settings.image_tokens = image_tokens(shape, settings.image_size)
        settings.seq_len = settings.image_tokens + prompt_tokens(config)
    current = estimate(shape, settings)
    budget = gpu.memory_gib * HEADROOM
    plan = Plan(gpu, shape, current, current.total_gib <= gpu.memory_gib, settings=copy.deepcopy(settings))
    changes, reasons = plan.changes, plan.reasons
    if size_note:
        reasons.append(size_note)
    if not gpu.bf16 and config.model.dtype == "bf16":
        changes["model.dtype"] = "fp16"
        reasons.append(f"{gpu.name} has no bf16: fp16 with a loss scaler (model.dtype: auto does this by itself).")
    s = copy.deepcopy(settings)
    effective = s.micro_batch * config.train.grad_accum
    accum = config.train.grad_accum

    def fits(candidate: Settings) -> bool:
        return estimate(shape, candidate).total_gib <= budget

    if not fits(s) and not s.checkpointing:
        s.checkpointing = True
        changes["model.gradient_checkpointing"] = True
        reasons.append("gradient checkpointing: keep one input per block instead of every activation (~30% slower).")
    if not fits(s) and s.method in ("lora", "dora") and s.quantize == "none":
        weights = estimate(shape, s).parts[0].gib
        if weights > 0.35 * budget:
            s.method = "qlora"
            changes["method.kind"] = "qlora"
            reasons.append(f"QLoRA: the {weights:.1f} GiB of weights shrink to about a third in NF4.")
    while not fits(s) and s.micro_batch > 1:
        s.micro_batch //= 2
        accum = max(1, effective // s.micro_batch)
    if s.micro_batch != settings.micro_batch:
        changes["train.batch_size"], changes["train.grad_accum"] = s.micro_batch, accum
        reasons.append(
            f"micro-batch {settings.micro_batch} -> {s.micro_batch} with grad_accum {accum}: the same effective batch "
            f"of {s.micro_batch * accum}."
        )
    if not fits(s) and s.method == "full":
        s.method = "lora"
        changes["method.kind"] = "lora"
        reasons.append("full fine-tuning does not fit: LoRA trains adapters and keeps the base frozen.")
    length = s.seq_len
    while not fits(s) and s.seq_len > 256:
        s.seq_len //= 2
    if s.seq_len != length:
        changes["data.max_length"] = s.seq_len
        reasons.append(
            f"max_length {length} -> {s.seq_len}: the rest did not free enough; check with `tunelab inspect` how "
            "many examples this truncates."
        )
    if fits(s) and accum > 1 and "train.batch_size" not in changes:  # spare room: fewer, larger micro-batches
        grown = copy.deepcopy(s)
        while accum % 2 == 0 and accum > 1:
            grown.micro_batch *= 2
            if estimate(shape, grown).total_gib > 0.8 * budget:
                grown.micro_batch //= 2
                break
            accum //= 2
        if grown.micro_batch != s.micro_batch:
            changes["train.batch_size"], changes["train.grad_accum"] = grown.micro_batch, accum
            reasons.append(
                f"room to spare: micro-batch {s.micro_batch} -> {grown.micro_batch} with grad_accum {accum} (same "
                "effective batch, fewer and fuller GPU passes)."
            )
            s = grown
    if not fits(s):
        reasons.append(
            f"Still about {estimate(shape, s).total_gib:.1f} GiB, over {gpu.name}'s {gpu.memory_gib:.0f} GiB: use a "
            "smaller model, or several GPUs with train.distributed: fsdp."
        )
    if changes:
        plan.recommended = estimate(shape, s)
    return plan


def apply_plan(config_path: Path, plan: Plan, out: Path | None = None) -> Path:
    """Write the config with the plan's changes applied (its own keys kept as written) and return its path."""
    source = yaml.safe_load(config_path.read_text()) or {}
    for key, value in plan.changes.items():
        section, _, name = key.partition(".")
        source.setdefault(section, {})[name] = value
    gpu = plan.gpu.name.split(" ")[0].lower()
    target = out or config_path.with_name(f"{config_path.stem}.{gpu}.yaml")
    target.write_text(f"# {config_path.name} as `tunelab plan --gpu {gpu}` recommends\n" + yaml.safe_dump(source))
    return target


def warn_if_too_big(config: RunConfig, total_gib: float, say: Any, bf16: bool = True, gpus: int = 1) -> None:
    """Before training on CUDA: say so when the plan puts the run over the GPU's memory (never stops the run:
    the estimate can be wrong, and a user may know better). `bf16`: the GPU computes in bf16 (without it QLoRA
    keeps fp32 norms and embeddings); `gpus`: the processes of the run."""
    if config.task not in TASKS_WITH_A_MODEL:
        return
    try:
        plan = make_plan(config, Gpu("this GPU", total_gib, bf16), gpus)
    except UserError:
        return  # no shape offline: nothing to say
    if not plan.fits:
        say(
            f"[yellow]plan: this run needs about {plan.current.total_gib:.1f} GiB, more than this GPU's "
            f"{total_gib:.1f} GiB; it will probably run out of memory. `tunelab plan CONFIG --gpu-mem "
            f"{total_gib:.0f}` prints settings that fit.[/yellow]"
        )


def print_plan(plan: Plan, config: RunConfig) -> None:
    """The estimate by part, the verdict, and the recommended changes, on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    shape, gpu = plan.shape, plan.gpu
    console.print(
        f"[bold]{config.model.name}[/bold]: {shape.model_type}, {shape.params / 1e9:.2f}B parameters, {shape.layers} "
        f"layers, vocabulary {shape.vocab:,} (shape from {shape.source})"
    )
    console.print(
        f"{config.method.kind}, micro-batch {config.train.batch_size} x {plan.settings.seq_len} tokens"
        + (f" ({plan.settings.image_tokens} of them an image's)" if plan.settings.image_tokens else "")
        + ", "
        f"{plan.current.trainable_params / 1e6:,.1f}M trainable parameters, on {gpu.name} ({gpu.memory_gib:g} GiB)"
    )
    table = Table("part", "GiB", "what", title="estimated peak memory per GPU")
    for part in plan.current.parts:
        table.add_row(part.name, f"{part.gib:.2f}", part.note)
    table.add_row("[bold]total[/bold]", f"[bold]{plan.current.total_gib:.2f}[/bold]", "")
    console.print(table)
    verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
    console.print(f"{verdict}: {plan.current.total_gib:.1f} of {gpu.memory_gib:g} GiB")
    if plan.current.chunked_loss_saves_gib > 0.5:
        saves = plan.current.chunked_loss_saves_gib
        console.print(f"the fused loss (train.fused_loss: true) would save about {saves} GiB")
    if plan.changes:
        console.print("[bold]recommended[/bold]: " + " ".join(f"{k}={v}" for k, v in plan.changes.items()))
        for reason in plan.reasons:
            console.print(f"  - {reason}")
        if plan.recommended is not None:
            console.print(f"  with them: about {plan.recommended.total_gib:.1f} GiB")
    else:
        for reason in plan.reasons:
            console.print(f"  - {reason}")
        console.print("no changes recommended")
