"""The memory model behind `tunelab plan`: peak GPU memory of a training run, part by part.

Every term follows what tunelab's own training does (tasks/sft.py, models/adapters.py, train/loop.py), so the
estimate is of *this* program, not of fine-tuning in general:

- weights: block linears in NF4 (4 bits + double-quantized absmax: 4.127 bits) or int8 under quantization; every
  other parameter in the model dtype, or fp32 under QLoRA (peft's prepare_model_for_kbit_training upcasts them),
  except on the bf16 fast path (sft / summarize, train.fast_kernels; kernels/fast_path.py keep_half_norms), which
  skips that upcast: QLoRA's norms, embeddings and head then stay bf16, with no bf16 copy of the head and a bf16
  residual stream; with model.offload_embedding (sft / summarize, one process; kernels/host_embedding.py) a frozen,
  untied plain nn.Embedding lives in pinned CPU memory instead (auto: tables of 64 MiB or more);
- trainable parameters: peft adapters are fp32, each with an fp32 gradient and two fp32 AdamW moments (16 bytes);
  full / freeze train in the model dtype (weight, gradient, two moments), except mcqa, whose trained weights are fp32;
- activations per token per layer, counted from the tensors autograd keeps for a Llama-style block (RMSNorm
  upcasts, LoRA inputs and dropout masks, rotary q / k, attention q / k / v / output, SwiGLU's three products;
  without dropout, adapters fed one tensor save it once); with train.fast_kernels' liger blocks (Llama, Mistral,
  Qwen2, Qwen3: kernels/fast_blocks.py) each RMSNorm keeps its input in the compute dtype, SwiGLU keeps gate and up
  and writes their gradients over them (3 intermediate-width gradients in the MLP's backward instead of 6), and
  QLoRA's train.keep_dequantized holds one block's dense weights through its backward; with gradient
  checkpointing only each block's input is kept, plus one block recomputed at a time, plus the intermediate-width
  gradients of its MLP's backward; with model.offload_checkpoints (sft / summarize; auto:
  decoder-only models under ddp; kernels/offload.py) those inputs wait in CPU memory and only two are on the GPU at
  a time (the one being recomputed and the next, prefetched);
- logits: the output head's bf16 logits, their fp32 copy, log-softmax and its gradient (12 bytes per token and
  vocabulary entry at the peak); with train.fused_loss (sft, on by default on CUDA; kernels/causal_lm_loss.py)
  only one chunk of target rows' logits exists at a time, plus the target rows' hidden states and their gradient;
- vision: a frozen vision tower runs without a graph (one layer of transients); a trained one keeps its layers;
  it is never quantized, and a frozen one stays in the model dtype under QLoRA too;
- outside what PyTorch allocates: the CUDA context and the caching allocator's slack.

Constants are in bytes; GiB = 2**30 bytes. tests/gpu/test_plan_gpu.py checks the estimate against measured peaks
(benchmarks/plan_accuracy.py; BENCHMARKS.md has the table).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tunelab.advise.plan_shapes import ModelShape
from tunelab.kernels.fast_blocks import FAMILIES as FAST_BLOCK_FAMILIES
from tunelab.kernels.host_embedding import MIN_BYTES as EMBEDDING_MIN_BYTES
from tunelab.kernels.offload import MIN_BYTES as OFFLOAD_MIN_BYTES

GIB = 2**30
NF4_BYTES = 4.127 / 8  # 4-bit codes + one 8-bit absmax per 64 weights + one fp32 constant per 256 absmax
INT8_BYTES = 1.0 + 4 / 4096  # int8 weights + an fp32 scale per row (rows of about 4k)
LOGITS_BYTES = 12  # bf16 logits (2) + fp32 log-softmax kept for backward (4) + its gradient in and out (4 + 4) - 2
CUDA_CONTEXT_GIB = 0.55  # driver, kernels and cuBLAS workspace: outside torch's allocator (H100, CUDA 13)
# train.fused_loss, kernels/linear_cross_entropy.py: CHUNK_BYTES of fp32 logits a chunk, reused in place for their
# gradient, beside the bf16 logits and the bf16 gradient (4 + 2 + 2 bytes per row and vocabulary entry)
FUSED_CHUNK_BYTES = 256 * 2**20
FUSED_LOGITS_BYTES = 8
# the backward of a (recomputed) block's MLP, beside its saved activations: down_proj's input gradient through the
# base weight, through the adapter and their sum, then SwiGLU's gradients of up, silu(gate) and gate, each
# tokens x intermediate in the compute dtype (with the fused loss this, not the logits, sets the peak)
MLP_BACKWARD_TENSORS = 6
# liger's SwiGLU (train.fast_kernels' blocks) writes the gate / up gradients over its saved gate and up: only the
# down projection's three input gradients (base, adapter, sum) are new
MLP_BACKWARD_TENSORS_FAST = 3
SLACK = 0.04  # caching-allocator fragmentation with expandable segments, as a share of the peak
LM_TASKS = ("sft", "summarize")  # the tasks that install kernels/fast_path.py's pieces
CHECKPOINTS_ON_GPU = 2  # model.offload_checkpoints: the layer input being recomputed and the next one, prefetched


@dataclass
class Settings:
    """The run settings that set memory (from the config, the GPU and the command line)."""

    task: str
    method: str  # lora | qlora | dora | full | freeze | prefix | prompt | ia3
    quantize: str  # none | nf4 | int8
    dtype_bytes: int  # 2 for bf16 / fp16, 4 for fp32
    micro_batch: int
    seq_len: int  # tokens per row (max_length, or prompt + image tokens for a VLM)
    checkpointing: bool
    rank: int = 16
    target: str | list[str] = "all-linear"
    lora_dropout: bool = True
    target_len: int = 0  # seq2seq decoder tokens
    image_size: int = 0
    train_vision: bool = False
    freeze_keep_last: int = 2
    gpus: int = 1
    strategy: str = "ddp"  # ddp | fsdp | deepspeed-zero2 | deepspeed-zero3
    fused_loss: bool = False  # the head and the loss chunk by chunk (train.fused_loss in effect)
    head_tokens_per_row: int | None = None  # mcqa: the output head runs on the answer positions only
    image_tokens: int = 0  # mcqa: language-model tokens an image becomes (inside seq_len)
    train_projector: bool = False  # mcqa: the projector's full weights train (in the model dtype)
    bf16: bool = False  # the compute dtype is bf16 (model.dtype bf16, or auto on a GPU with bf16)
    fast_kernels: bool = False  # train.fast_kernels in effect (auto: on with CUDA under ddp)
    # model.offload_checkpoints in effect for a task that installs it: True, "auto" (every model but an
    # encoder-decoder; the shape says which), or False. Applies only with checkpointing on.
    offload_checkpoints: bool | str = False
    # model.offload_embedding in effect for a task and process count that install it: True (any size), "auto"
    # (tables of EMBEDDING_MIN_BYTES or more), or False. Applies only to a frozen, untied plain nn.Embedding.
    offload_embedding: bool | str = False
    trained_token_rows: bool = False  # summarize with data.special_tokens: LoRA-family adapters train their rows

    @property
    def keep_half_norms(self) -> bool:
        """QLoRA keeps its non-quantized weights in bf16 (kernels/fast_path.py keep_half_norms; sft / summarize)."""
        return self.method == "qlora" and self.bf16 and self.fast_kernels and self.task in LM_TASKS


@dataclass
class Part:
    """One line of the estimate."""

    name: str
    gib: float
    note: str


@dataclass
class Estimate:
    """Peak memory per GPU, by part; `peak_allocated_gib` is comparable to torch.cuda.max_memory_allocated."""

    parts: list[Part] = field(default_factory=list)
    peak_allocated_gib: float = 0.0
    total_gib: float = 0.0  # with the CUDA context and allocator slack: what the GPU must hold
    trainable_params: int = 0
    chunked_loss_saves_gib: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(shape: ModelShape, s: Settings) -> Estimate:
    """Peak GPU memory of one training process under settings `s`."""
    d = s.dtype_bytes
    peft = s.method in ("lora", "qlora", "dora", "prefix", "prompt", "ia3")
    quantize = "nf4" if s.method == "qlora" else s.quantize
    tokens = s.micro_batch * s.seq_len

    quantized = shape.block_linear_params if quantize != "none" else 0
    other = shape.params - quantized
    half = s.keep_half_norms
    other_bytes = 4 if (s.method == "qlora" and not half) else d
    quant_bytes = {"nf4": NF4_BYTES, "int8": INT8_BYTES}.get(quantize, 0.0)
    host_embedding = _offloaded_embedding_params(shape, s, other_bytes)
    weights = quantized * quant_bytes + (other - host_embedding) * other_bytes
    if s.method == "qlora" and shape.vision and not s.train_vision:  # models/vlm.py casts it back to the model dtype
        weights -= shape.vision_params * (other_bytes - d)

    trainable, states = _trainable(shape, s, peft)
    if s.task == "mcqa" and s.method != "full":
        extra, extra_states = _trainable_parts(shape, s)
        trainable, states = trainable + extra, states + extra_states
    elif s.task == "mcqa":  # models/vlm.py makes every trained weight fp32: + 4 - dtype, fp32 gradient and moments
        states = trainable * (4.0 - d + 12)
    sharded = s.gpus if s.strategy in ("fsdp", "deepspeed-zero3") else 1
    states_shard = s.gpus if s.strategy in ("fsdp", "deepspeed-zero2", "deepspeed-zero3") else 1
    weights /= sharded
    states /= states_shard

    # QLoRA's fp32 embeddings keep the residual stream fp32 (bf16 with half norms)
    resid = 4 if ((s.method == "qlora" and not half) or d == 4) else d
    layer = _layer_bytes_per_token(shape, s, peft, _fast_blocks(shape, s))
    layers, layer_tokens = shape.layers, tokens
    if shape.encoder_decoder:  # encoder over the input, decoder (self + cross attention) over the target
        layer_tokens = s.micro_batch * (s.seq_len + 1.3 * s.target_len)
        layers = max(1, shape.layers)
    head_tokens = s.micro_batch * s.target_len if shape.encoder_decoder else tokens
    if s.head_tokens_per_row is not None:
        head_tokens = s.micro_batch * s.head_tokens_per_row
    logits = head_tokens * shape.vocab * LOGITS_BYTES
    if s.fused_loss:  # one chunk of logits at a time, plus the (at most all) target rows' hidden states and gradient
        chunk_rows = min(head_tokens, FUSED_CHUNK_BYTES // (4 * shape.vocab))
        logits = chunk_rows * shape.vocab * FUSED_LOGITS_BYTES + 2 * head_tokens * shape.hidden * d
    if other_bytes == 4 and d == 2:  # fp32 output head under autocast: a bf16 copy for the forward and backward
        logits += shape.vocab * shape.hidden * 2
    blocks = _fast_blocks(shape, s)
    mlp_backward = (
        (MLP_BACKWARD_TENSORS_FAST if blocks else MLP_BACKWARD_TENSORS) * shape.intermediate * d * layer_tokens
    )
    if blocks and s.method == "qlora" and not s.lora_dropout and host_embedding:
        # train.keep_dequantized (auto where the embedding moved): the layer graphs' recompute keeps the layer's
        # dequantized weights, all but the down projection's, for its backward
        mlp_backward += _dense_layer_bytes(shape, d)
    if s.checkpointing:
        on_gpu = layers
        if _checkpoints_offloaded(shape, s, resid * shape.hidden * tokens):
            on_gpu = min(layers, CHECKPOINTS_ON_GPU)
            activation_note = (
                f"inputs of {on_gpu} layers on the GPU, the rest in CPU memory (model.offload_checkpoints); one block "
                "recomputed at a time"
            )
        else:
            activation_note = f"block inputs of {layers} layers kept; one block recomputed at a time"
        kept = on_gpu * resid * shape.hidden * layer_tokens
        transient = max(logits, layer * layer_tokens + 3 * resid * shape.hidden * layer_tokens + mlp_backward)
    else:
        kept = layers * layer * layer_tokens
        transient = max(logits, mlp_backward)
        activation_note = f"{layer / shape.hidden:.0f} x hidden bytes per token per layer, {layers} layers"
    vision = _vision_bytes(shape, s)
    if sharded > 1:  # FSDP / ZeRO-3 gather one block's weights at a time (and prefetch the next)
        transient += 2 * (shape.params / max(shape.layers, 1)) * (quant_bytes or d)

    parts = [
        Part(
            "weights",
            weights / GIB,
            _weights_note(quantize, quantized, other, other_bytes, sharded, half, host_embedding * other_bytes),
        ),
        Part("trainable states", states / GIB, _states_note(s, peft, trainable, states_shard)),
        Part("activations kept", kept / GIB, activation_note),
        Part(
            "logits / recompute peak",
            transient / GIB,
            (
                f"fused loss: {chunk_rows:,} target rows x {shape.vocab:,} vocabulary x {FUSED_LOGITS_BYTES} bytes"
                if s.fused_loss
                else f"{head_tokens:,} tokens x {shape.vocab:,} vocabulary x {LOGITS_BYTES} bytes at the loss"
            )
            + (", or one recomputed block, the larger" if s.checkpointing else ""),
        ),
    ]
    if vision:
        parts.append(Part("vision tower", vision / GIB, _vision_note(shape, s)))
    peak = sum(p.gib for p in parts)
    total = peak * (1 + SLACK) + CUDA_CONTEXT_GIB
    parts.append(Part("allocator slack + CUDA context", total - peak, "outside torch.cuda.max_memory_allocated"))
    chunk_tokens = 1024  # what a chunked loss would keep of the logits at a time
    saves = max(0.0, (head_tokens - min(head_tokens, chunk_tokens)) * shape.vocab * LOGITS_BYTES / GIB)
    saves = 0.0 if s.fused_loss else saves
    return Estimate(parts, round(peak, 3), round(total, 3), trainable, round(saves, 2))


def _offloaded_embedding_params(shape: ModelShape, s: Settings, table_bytes: int) -> int:
    """Parameters of the input embedding that model.offload_embedding keeps in CPU memory (0: it stays on the GPU),
    as kernels/fast_path.py apply_embedding_offload decides: the table must be frozen (every method but full; freeze
    trains the head, which is the table only when tied, and shape.offloadable_embedding_params is 0 then; a
    LoRA-family adapter training summarize's special-token rows wraps the table in peft's TrainableTokensWrapper),
    and under auto at least EMBEDDING_MIN_BYTES in the dtype it has (`table_bytes` a parameter)."""
    params = shape.offloadable_embedding_params
    if not s.offload_embedding or not params or s.task not in LM_TASKS or s.gpus != 1 or s.method == "full":
        return 0
    if s.trained_token_rows and s.method in ("lora", "qlora", "dora"):
        return 0
    if s.offload_embedding == "auto" and params * table_bytes < EMBEDDING_MIN_BYTES:
        return 0
    return params


def _checkpoints_offloaded(shape: ModelShape, s: Settings, input_bytes: float) -> bool:
    """Whether model.offload_checkpoints moves the checkpointed layers' inputs (`input_bytes` each) to CPU memory,
    as kernels/fast_path.py apply_checkpoint_offload decides (auto: not for encoder-decoders), and whether they are
    large enough for kernels/offload.py to move them (smaller saved tensors stay on the GPU)."""
    if not s.checkpointing or not s.offload_checkpoints or s.task not in LM_TASKS:
        return False
    if s.offload_checkpoints == "auto" and shape.encoder_decoder:
        return False
    return input_bytes >= OFFLOAD_MIN_BYTES


def _trainable(shape: ModelShape, s: Settings, peft: bool) -> tuple[int, float]:
    """(trainable parameters, bytes of their weights if separate + gradients + AdamW moments)."""
    if s.method in ("lora", "qlora", "dora"):
        count = shape.lora_params(s.rank, s.target)
        if s.method == "dora":
            count += sum(x.out_features for x in shape.linears if x.in_blocks and not x.vision)
        return count, count * 16.0  # fp32 adapter + fp32 gradient + two fp32 moments
    if peft:  # prefix / prompt / ia3: small
        count = max(shape.hidden * 20 * 2 * shape.layers, shape.hidden * shape.layers)
        return count, count * 16.0
    if s.method == "freeze":
        count = int(shape.block_linear_params * min(s.freeze_keep_last, shape.layers) / shape.layers)
    else:
        count = shape.params - (0 if s.train_vision else shape.vision_params)
    return count, count * 3.0 * s.dtype_bytes  # gradient + two moments in the weights' dtype


def _trainable_parts(shape: ModelShape, s: Settings) -> tuple[int, float]:
    """mcqa: a trained projector (and vision encoder) beside the language model's adapters, as tunelab.models.vlm
    trains them: the part is made fp32 (its weights are already counted once in the model dtype, so + 4 - dtype),
    an fp32 gradient and two fp32 AdamW moments (+ 12), and under an adapter peft's modules_to_save keeps a
    trained fp32 copy beside the frozen original (+ 4)."""
    count = (shape.projector_params if s.train_projector else 0) + (shape.vision_params if s.train_vision else 0)
    copy = 4 if s.method in ("lora", "qlora", "dora") else 0
    return count, count * (4.0 - s.dtype_bytes + 12 + copy)


def _fast_blocks(shape: ModelShape, s: Settings) -> bool:
    """Whether training installs liger's RMSNorm / SwiGLU kernels (kernels/fast_blocks.py: train.fast_kernels,
    sft / summarize, a Llama / Mistral / Qwen2 / Qwen3 model)."""
    return s.fast_kernels and s.task in LM_TASKS and shape.model_type in FAST_BLOCK_FAMILIES


def _dense_layer_bytes(shape: ModelShape, d: int) -> float:
    """One block's q, k, v, o, gate and up weights in the compute dtype (what train.keep_dequantized holds)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return d * shape.hidden * (2 * q + 2 * kv + 2 * shape.intermediate)


# peft LoRA without dropout: adapters fed the same tensor save it once. Per Llama-style block: q / k / v read the
# attention norm's output, gate / up the MLP norm's, o reads the attention output (already counted with attention)
SHARED_LORA_INPUTS = {
    "q_proj": "attn_norm",
    "k_proj": "attn_norm",
    "v_proj": "attn_norm",
    "gate_proj": "mlp_norm",
    "up_proj": "mlp_norm",
    "o_proj": "attention_output",
}


def _layer_bytes_per_token(shape: ModelShape, s: Settings, peft: bool, fast_blocks: bool = False) -> float:
    """Bytes autograd keeps per token for one block (Llama-style: attention + gated MLP)."""
    d = s.dtype_bytes
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * 4 * h  # RMSNorm computes in fp32 and keeps its input
    attention = d * (2 * q + 2 * kv)  # q, k, v after rotary, and the attention output (flash / sdpa kernels)
    mlp = 3 * d * i  # gate, silu(gate), up
    if fast_blocks:  # liger keeps each norm's input in the compute dtype, and gate and up (silu recomputed)
        norms, mlp = 2 * d * h, 2 * d * i
    if s.method in ("lora", "qlora", "dora"):
        per_input = d + (1 if s.lora_dropout else 0)  # each adapter keeps its own (dropped-out) input copy
        names = None if s.target == "all-linear" else set([s.target] if isinstance(s.target, str) else s.target)
        block = [x for x in shape.linears if x.in_blocks and not x.vision]
        per_layer = [x for x in block if names is None or x.name.rsplit(".", 1)[-1] in names]
        if not s.lora_dropout and s.method != "dora":  # a shared input is one tensor, saved once
            sources: dict[tuple[str, str], int] = {}
            for x in per_layer:
                parent, short = x.name.rsplit(".", 1) if "." in x.name else ("", x.name)
                if SHARED_LORA_INPUTS.get(short) != "attention_output":
                    sources[(parent, SHARED_LORA_INPUTS.get(short, short))] = x.in_features
            inputs = per_input * sum(sources.values()) / max(shape.layers, 1)
        else:
            inputs = per_input * sum(x.in_features for x in per_layer) / max(shape.layers, 1)
        if s.method == "dora":
            inputs *= 2  # DoRA also keeps the base output for its magnitude rescaling
    elif peft:
        inputs = 0.0
    else:  # full / freeze: each distinct linear input is kept for the weight gradients
        inputs = d * (h + q + h + i)
    return norms + attention + mlp + inputs


def _vision_bytes(shape: ModelShape, s: Settings) -> float:
    if not shape.vision or not s.image_size:
        return 0.0
    v = shape.vision
    patches = s.micro_batch * (s.image_size // v["patch"]) ** 2
    per_token_layer = s.dtype_bytes * (6 * v["hidden"] + 3 * v["intermediate"]) + 8 * v["hidden"]
    if s.train_vision:
        return patches * per_token_layer * v["layers"]
    # no graph inside a frozen encoder: one layer's tensors at a time, plus the trained projector's kept input
    return patches * per_token_layer + (patches * v["hidden"] * s.dtype_bytes if s.train_projector else 0)


def _vision_note(shape: ModelShape, s: Settings) -> str:
    v = shape.vision or {}
    per_image = (s.image_size // v.get("patch", 14)) ** 2
    how = "trained: every layer kept" if s.train_vision else "frozen: one layer at a time, no graph"
    return f"{per_image:,} patches per {s.image_size} px image, {how}"


def _weights_note(
    quantize: str, quantized: int, other: int, other_bytes: int, sharded: int, half: bool, host_bytes: float
) -> str:
    what = f"{quantized / 1e9:.2f}B block-linear params in {quantize.upper()}, " if quantized else ""
    why = " (QLoRA's bf16 fast path: train.fast_kernels)" if half else ""
    share = f"; sharded over {sharded} GPUs" if sharded > 1 else ""
    host = (
        f"; of them the input embedding ({host_bytes / GIB:.2f} GiB) in CPU memory (model.offload_embedding)"
        if host_bytes
        else ""
    )
    return f"{what}{other / 1e9:.2f}B params at {other_bytes} bytes{why}{share}{host}"


def _states_note(s: Settings, peft: bool, trainable: int, shards: int) -> str:
    share = f"; sharded over {shards} GPUs" if shards > 1 else ""
    if s.method in ("lora", "qlora", "dora") or peft:
        return f"{trainable / 1e6:.1f}M adapter params: fp32 weight + gradient + 2 AdamW moments{share}"
    return f"{trainable / 1e9:.2f}B params: gradient + 2 AdamW moments in the model dtype{share}"
