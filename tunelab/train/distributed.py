"""Several processes, one run: DDP (accelerate), FSDP2 (PyTorch's fully_shard) or DeepSpeed ZeRO-2 / ZeRO-3
(accelerate's DeepSpeedPlugin), behind the few calls the loop makes: backward, clip, step, and whole tensors for
checkpoints.

Checkpoints keep the single-process format whatever the strategy: FSDP's trainable weights and AdamW state are
gathered into whole tensors on rank 0 and cut back into shards on load, so a run saved by 2 FSDP processes resumes
on 1 (or 4) exactly. DeepSpeed's optimizer state stays in DeepSpeed's own sharded files (its partitions are flat
buffers, not per-parameter tensors) and resumes on the same number of processes; its trainable weights are
consolidated like FSDP's, so evaluation, export and best/ read the same files.

Memory each strategy shards, per GPU with N processes (for `tunelab plan --gpus N`): ddp none (whole weights,
gradients and AdamW state on every GPU); fsdp weights / N, gradients / N, AdamW state / N, plus the whole weights of
about two decoder blocks at a time (the one computing and the one prefetched); deepspeed-zero2 AdamW state / N and
gradients / N, weights whole; deepspeed-zero3 like fsdp (weights gathered per module). With train.cpu_offload the
sharded AdamW state (and fsdp / zero3 weights) live in CPU memory instead. Activations are never sharded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from tunelab.config import RunConfig, TrainConfig
from tunelab.errors import UserError

STRATEGIES = ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")
# Strategies whose parameters are sharded: every forward gathers them, so all processes must run the same number of
# forwards (evaluation and generation included).
SHARDS_PARAMETERS = ("fsdp", "deepspeed-zero3")
# Tasks whose evaluation and generation keep sharded processes in step (lockstep_batches, synced generation) and
# whose save_weights takes the gathered state_dict.
SHARDED_TASKS = ("sft", "summarize")
DEEPSPEED_TAG = "zero"  # the tag (sub-folder) of DeepSpeed's own files inside a checkpoint's deepspeed/ folder

T = TypeVar("T")


def process_count() -> int:
    """Processes in this run: WORLD_SIZE as torchrun and `accelerate launch` set it, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def strategy(train: TrainConfig | None, processes: int) -> str:
    """The strategy that runs: 'single' for one process, else train.distributed (ddp without a config)."""
    if processes <= 1:
        return "single"
    return train.distributed if train is not None else "ddp"


def check_distributed(config: RunConfig, processes: int | None = None) -> None:
    """UserError for settings that cannot run, before any work: DeepSpeed without CUDA or without the package,
    sharding for a task that has no decoder blocks, fp16 with FSDP, EMA with DeepSpeed, offload under ddp."""
    train, kind = config.train, config.train.distributed
    processes = process_count() if processes is None else processes
    if kind.startswith("deepspeed"):
        if not torch.cuda.is_available():
            raise UserError(
                f"train.distributed is {kind}, but DeepSpeed runs on CUDA GPUs and none is visible. On this machine "
                "use train.distributed: ddp (or fsdp)."
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(
                f"train.distributed is {kind}, but the deepspeed package is not installed: pip install "
                "'tunelab[deepspeed]', or use train.distributed: fsdp (built into PyTorch)."
            )
        if train.ema is not None:
            raise UserError(
                f"train.ema is not supported with train.distributed {kind} (ZeRO keeps the weights in its own "
                "partitions). Drop train.ema, or use train.distributed: fsdp or ddp."
            )
    if kind != "ddp" and config.task not in SHARDED_TASKS:
        raise UserError(
            f"train.distributed {kind} shards the decoder blocks of task sft and summarize models; task "
            f"{config.task} trains with train.distributed: ddp (the default) in this version."
        )
    if train.cpu_offload and kind == "ddp":
        raise UserError(
            "train.cpu_offload needs a sharding strategy: set train.distributed to fsdp, deepspeed-zero2 or "
            "deepspeed-zero3 (ddp keeps everything on each GPU), or drop train.cpu_offload."
        )
    if kind == "fsdp" and processes > 1 and torch.cuda.is_available():
        from tunelab.models.load import resolve_dtype

        if resolve_dtype(config.model.dtype) == torch.float16:
            raise UserError(
                "train.distributed fsdp trains in bf16 or fp32; this run is fp16 (model.dtype, or a GPU without "
                "bf16 such as the T4 / V100), whose loss scaling FSDP2 does not share across shards. Use "
                "train.distributed: deepspeed-zero3 (its loss scaler handles fp16) or ddp."
            )


def note_single_process(config: RunConfig, processes: int, say: Callable[[str], None]) -> None:
    """Tell a one-process run that its train.distributed / train.cpu_offload settings do not apply."""
    if processes == 1 and (config.train.distributed != "ddp" or config.train.cpu_offload):
        say(
            f"train.distributed {config.train.distributed}{' with cpu_offload' if config.train.cpu_offload else ''} "
            "applies to several processes (tunelab train CONFIG --gpus N); this run has one, so it trains on one "
            "device as usual."
        )


# ----------------------------------------------------------------------------------------------- accelerator


def mixed_precision(dtype: torch.dtype) -> str:
    """accelerate's mixed precision for a model dtype: bf16 / fp16 autocast on CUDA, none on CPU or for fp32."""
    if not torch.cuda.is_available():
        return "no"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def make_accelerator(dtype: torch.dtype, config: RunConfig | None = None) -> Any:
    """The Accelerator of a run. Under torchrun or `accelerate launch` it joins the process group (NCCL on GPUs,
    gloo on CPUs); with train.distributed deepspeed-* it carries a DeepSpeedPlugin built from the run config.

    FSDP is not handed to accelerate's FullyShardedDataParallelPlugin: accelerate enables FSDP only for GPU process
    groups (on gloo it silently falls back to DDP), so its path could not be tested on CPUs, and it re-maps the
    optimizer's parameters after sharding by name. tunelab shards with torch's fully_shard itself (see
    Parallel.prepare), the same code on gloo and NCCL, and builds the optimizer on the sharded parameters."""
    from accelerate import Accelerator

    processes = process_count()
    if config is not None:
        check_distributed(config, processes)
    precision = mixed_precision(dtype)
    kind = strategy(config.train if config is not None else None, processes)
    if kind.startswith("deepspeed"):
        from accelerate.utils import DeepSpeedPlugin

        # zero3_init_flag off: each process loads the model onto its own GPU (device_map, QLoRA's quantization),
        # and ZeRO-3 partitions it when the engine starts; transformers' zero.Init path refuses a device_map
        plugin = DeepSpeedPlugin(
            hf_ds_config=deepspeed_config(config.train, precision, processes), zero3_init_flag=False
        )
        return Accelerator(mixed_precision=precision, deepspeed_plugin=plugin)
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def deepspeed_config(train: TrainConfig, precision: str, processes: int) -> dict[str, Any]:
    """The DeepSpeed config of a run, generated from the YAML (users never write one): ZeRO stage, precision,
    micro batch and accumulation, clipping, offload.

    The optimizer is tunelab's AdamW (parameter groups without decay on norms and biases), handed to DeepSpeed as
    a client optimizer; with offload it runs on the CPU partitions as torch's AdamW, since DeepSpeed's CPUAdam is a
    C++ op compiled at first use and a GPU machine without a compiler would fail there."""
    stage = 3 if train.distributed == "deepspeed-zero3" else 2
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        # tunelab gathers the trainable weights itself (safe_get_full_fp32_param), so DeepSpeed need not gather a
        # 16-bit copy of the whole model into rank 0 at each save
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if train.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * processes,
        # 0 turns DeepSpeed's clipping off (train.max_grad_norm: null)
        "gradient_clipping": float(train.max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # dynamic loss scaling (loss_scale 0) from 2**16, as torch's GradScaler
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # tunelab logs the steps; DeepSpeed's own lines would interleave
        "wall_clock_breakdown": False,
    }
    return config


def size_buckets(config: dict[str, Any], model: torch.nn.Module) -> None:
    """ZeRO's communication buffers sized by the model's hidden size, as the "auto" values of the DeepSpeed configs
    in transformers and accelerate: DeepSpeed's defaults (5e8 elements) allocate a 1 GB bf16 gradient bucket on
    every GPU even for LoRA's few million trainable parameters."""
    model_config = getattr(model, "config", None)
    hidden = getattr(model_config, "hidden_size", None) or getattr(
        getattr(model_config, "text_config", None), "hidden_size", None
    )
    if not hidden:
        return
    zero = config["zero_optimization"]
    zero.setdefault("reduce_bucket_size", hidden * hidden)
    if zero["stage"] == 3:
        zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
        zero.setdefault("stage3_param_persistence_threshold", 10 * hidden)


# ----------------------------------------------------------------------------------------------- sharding


def decoder_block_classes(model: torch.nn.Module) -> set[type]:
    """The classes FSDP wraps one unit each: those named in the model's _no_split_modules (transformers lists its
    decoder layers there), else the element class of the longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(module) for module in model.modules() if type(module).__name__ in names}
    if classes:
        return classes
    longest = max(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=torch.nn.ModuleList()
    )
    return {type(block) for block in longest}


def shard_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, cpu_offload: bool) -> None:
    """Apply FSDP2 in place: one unit per decoder block, one for the input embedding, one for the final norm and
    output head (with the embedding when they are tied), then the root. Frozen and trainable parameters share the
    units (FSDP2 shards per parameter, so a LoRA block's frozen base and its adapters sit together).

    Under bf16 / fp16 parameters are gathered in that dtype (LoRA's fp32 adapters included) and gradients reduced
    in fp32, so every unit gathers one dtype; QLoRA's NF4 weights shard as long as their storage dtype is the
    compute dtype (models/load.py sets bnb_4bit_quant_storage so)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    half = dtype in (torch.bfloat16, torch.float16) and device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()
    # offload only means something with a GPU: on a CPU process group the parameters are in CPU memory already
    offload = CPUOffloadPolicy() if cpu_offload and device.type == "cuda" else OffloadPolicy()
    options = {"mesh": mesh, "mp_policy": policy, "offload_policy": offload}
    blocks = decoder_block_classes(model)
    for module in list(model.modules()):
        if type(module) in blocks:
            fully_shard(module, **options)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = embed is not None and head is not None and embed.weight is head.weight
    # the tail runs last in forward and first in backward: keeping it gathered saves a second all-gather
    tail = [m for m in (embed if tied else None, *_final_norms(model, blocks), head) if m is not None]
    if embed is not None and not tied:
        fully_shard(embed, **options)
    if tail:
        fully_shard(tail, **options, reshard_after_forward=False)
    fully_shard(model, **options)


def _final_norms(model: torch.nn.Module, blocks: set[type]) -> list[torch.nn.Module]:
    """Modules with parameters beside the decoder blocks' list in the body (Llama's model.norm), so generation,
    which enters below the root module, finds no parameter left in the root's unit."""
    for module in model.modules():
        children = dict(module.named_children())
        if any(isinstance(c, torch.nn.ModuleList) and c and type(c[0]) in blocks for c in children.values()):
            embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            return [
                child
                for child in children.values()
                if not isinstance(child, torch.nn.ModuleList)
                and child is not embed
                and any(True for _ in child.parameters(recurse=True))
            ]
    return []


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU: all-gathered when it is an FSDP shard (a collective: every process calls it)."""
    if not _is_dtensor(tensor):
        return tensor.detach().to("cpu")
    from torch.distributed.tensor import DTensor

    local, mesh = tensor.to_local(), tensor.device_mesh
    if local.device.type != mesh.device_type:  # an offloaded shard: NCCL gathers GPU tensors only
        tensor = DTensor.from_local(
            local.to(mesh.device_type),
            mesh,
            tensor.placements,
            run_check=False,
            shape=tensor.shape,
            stride=tensor.stride(),
        )
    return tensor.detach().full_tensor().to("cpu")


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut into the shard this process holds of `like` (an FSDP DTensor), on `like`'s device; a plain
    tensor when `like` is plain. Every process reads the same checkpoint, so no data moves between them."""
    if not _is_dtensor(like):
        return full.to(like.device, like.dtype)
    from torch.distributed.tensor import DTensor, distribute_tensor

    mesh = like.device_mesh
    local = distribute_tensor(full.to(mesh.device_type, like.dtype), mesh, like.placements, src_data_rank=None)
    return DTensor.from_local(
        local.to_local().to(like.to_local().device),
        mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def clip_sharded_grad_norm(parameters: Sequence[torch.nn.Parameter], max_norm: float, device: torch.device) -> Any:
    """Clip FSDP-sharded gradients to a global 2-norm and return the norm before clipping (as
    torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6), at most 1).

    Written here because torch's clip_grad_norm_ reduces a DTensor norm over the process group's backend, and under
    train.cpu_offload the gradient shards are CPU tensors that NCCL cannot reduce. Each element of a Shard(0)
    parameter lives on exactly one process, so the squared norm is the sum over processes of the local sums."""
    grads = [p.grad.to_local() if _is_dtensor(p.grad) else p.grad for p in parameters if p.grad is not None]
    squared = torch.zeros((), device=device, dtype=torch.float32)
    for grad in grads:
        squared += grad.detach().float().pow(2).sum().to(device)
    torch.distributed.all_reduce(squared)
    norm = squared.sqrt()
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(coefficient.to(grad.device, grad.dtype))
    return norm


# ----------------------------------------------------------------------------------------------- the loop's view


class Parallel:
    """How the loop's model is spread over the processes, and the calls that differ per strategy."""

    def __init__(self, accelerator: Any, train: TrainConfig | None) -> None:
        self.accelerator, self.train = accelerator, train
        self.kind = strategy(train, accelerator.num_processes)
        if self.kind.startswith("deepspeed") and accelerator.distributed_type.value != "DEEPSPEED":
            raise RuntimeError("train.distributed deepspeed-* needs the accelerator from make_accelerator(config)")
        self.engine: Any = None  # the DeepSpeed engine
        self.optimizer: torch.optim.Optimizer | None = None  # the torch optimizer (under DeepSpeed's wrappers)
        self.names: list[list[str]] = []  # parameter names per optimizer group, in the single-process order

    @property
    def deepspeed(self) -> bool:
        """Whether DeepSpeed owns the model and the optimizer step."""
        return self.kind.startswith("deepspeed")

    @property
    def gathers(self) -> bool:
        """Whether whole trainable tensors must be gathered (collectively) to be saved."""
        return self.kind in ("fsdp", "deepspeed-zero2", "deepspeed-zero3")

    @property
    def lockstep(self) -> bool:
        """Whether every forward is collective (sharded parameters), so all processes must run as many."""
        return self.kind in SHARDS_PARAMETERS

    @property
    def scales_loss(self) -> bool:
        """Whether an fp16 loss scaler runs (it makes inf gradient norms on purpose, then skips the step)."""
        if self.deepspeed:
            return bool(self.accelerator.state.deepspeed_plugin.deepspeed_config["fp16"]["enabled"])
        return self.accelerator.mixed_precision == "fp16"

    def prepare(
        self, model: torch.nn.Module, create_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    ) -> tuple[torch.nn.Module, Any, torch.optim.Optimizer]:
        """(model to call, optimizer to step, the torch optimizer under it for the LR schedule)."""
        accelerator = self.accelerator
        if self.kind == "fsdp":
            dtype = next((p.dtype for p in model.parameters() if not p.requires_grad), torch.float32)
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, dtype)
            shard_model(model, accelerator.device, dtype, bool(self.train and self.train.cpu_offload))
            optimizer = create_optimizer(model)
            return model, optimizer, optimizer
        optimizer = create_optimizer(model)
        self.optimizer = optimizer
        name_of = {id(p): name for name, p in model.named_parameters()}
        self.names = [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        if self.deepspeed and self.train and self.train.cpu_offload:
            for group in optimizer.param_groups:  # the partitions it steps will be CPU tensors
                group["fused"] = False
            optimizer.defaults["fused"] = False
        if self.deepspeed:
            size_buckets(accelerator.state.deepspeed_plugin.deepspeed_config, model)
        prepared_model, prepared_optimizer = accelerator.prepare(model, optimizer)
        if self.deepspeed:
            self.engine = prepared_model
        return prepared_model, prepared_optimizer, optimizer

    def sync_gradients(self, model: torch.nn.Module, last: bool) -> Any:
        """Context for one micro-batch's forward and backward: DDP skips its all-reduce except on the window's last
        micro-batch. FSDP reduce-scatters every micro-batch (keeping whole gradients to the end would cost the
        memory FSDP is chosen to save); DeepSpeed is told the boundary in backward()."""
        if last or self.kind != "ddp":
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's (already normalised) loss."""
        if self.deepspeed:
            # the loop normalises over the whole window itself, so DeepSpeed must not divide by its accumulation
            # steps; the boundary is explicit since an epoch's last window may hold fewer micro-batches
            self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> Any:
        """Clip to max_norm; the norm before clipping (None under DeepSpeed, which clips inside its step)."""
        if self.deepspeed:
            return None
        if self.kind == "fsdp":
            trainable = [p for p in model.parameters() if p.requires_grad]
            return clip_sharded_grad_norm(trainable, max_norm, self.accelerator.device)
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def step(self, optimizer: Any) -> Any:
        """The optimizer step; under DeepSpeed the engine's, returning its global gradient norm."""
        if not self.deepspeed:
            optimizer.step()
            return None
        self.engine.step()
        return self.engine.get_global_grad_norm()

    # ------------------------------------------------------------------------------------------- whole state

    def trainable_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The trainable parameters as whole CPU tensors on the main process (None on the others). Collective
        under fsdp and deepspeed: every process must call it. DeepSpeed gives its fp32 master weights."""
        module = self.accelerator.unwrap_model(model)
        main = self.accelerator.is_main_process
        state: dict[str, torch.Tensor] = {}
        for name, parameter in module.named_parameters():
            if not parameter.requires_grad:
                continue
            tensor = self._whole_parameter(parameter)
            if main:
                state[name] = tensor.to("cpu").contiguous()
        return state if main else None

    def _whole_parameter(self, parameter: torch.nn.Parameter) -> torch.Tensor:
        if not self.deepspeed:
            return whole(parameter)
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(parameter)  # collective under ZeRO
        if full is not None:
            return full.detach()
        if hasattr(parameter, "ds_id"):  # a ZeRO-3 parameter outside the optimizer's mapping
            import deepspeed

            with deepspeed.zero.GatheredParameters([parameter]):
                return parameter.detach().clone()
        return parameter.detach()

    def load_trainable_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy whole saved trainable tensors into this process's (possibly sharded) parameters."""
        module = self.accelerator.unwrap_model(model)
        params = dict(module.named_parameters())
        missing = [name for name in state if name not in params]
        if missing:
            raise RuntimeError(f"checkpoint has parameters this model lacks, first: {missing[0]}")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(shard_like(tensor, params[name]))

    def optimizer_state(
        self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, steps: int
    ) -> dict[str, Any] | None:
        """The optimizer's state_dict in the single-process format (whole tensors) on the main process, None on
        the others; collective under fsdp and deepspeed. `steps`: optimizer steps taken (AdamW's step count, which
        DeepSpeed keeps per flat partition rather than per parameter)."""
        if self.deepspeed:
            return self._deepspeed_optimizer_state(model, steps)
        if self.kind != "fsdp":
            return optimizer.state_dict() if self.accelerator.is_main_process else None
        sharded = optimizer.state_dict()
        state: dict[int, dict[str, Any]] = {}
        for index in sorted(sharded["state"]):
            state[index] = {key: whole(value) for key, value in sorted(sharded["state"][index].items())}
        if not self.accelerator.is_main_process:
            return None
        return {"state": state, "param_groups": sharded["param_groups"]}

    def _deepspeed_optimizer_state(self, model: torch.nn.Module, steps: int) -> dict[str, Any] | None:
        """AdamW's moments gathered whole from ZeRO's fp32 partitions (DeepSpeed's safe_get_full_optimizer_state,
        a collective), in the single-process layout, so a DeepSpeed checkpoint resumes without DeepSpeed too."""
        from deepspeed.utils import safe_get_full_optimizer_state

        params = dict(self.accelerator.unwrap_model(model).named_parameters())
        main = self.accelerator.is_main_process
        state: dict[int, dict[str, Any]] = {}
        groups = []
        for group, names in zip(self.optimizer.param_groups, self.names, strict=True):
            indices = list(range(len(state), len(state) + len(names)))
            for index, name in zip(indices, names, strict=True):
                entry = {}
                for key in ("exp_avg", "exp_avg_sq"):
                    full = safe_get_full_optimizer_state(params[name], key)
                    if full is not None and main:
                        entry[key] = full.detach().to("cpu").clone()
                state[index] = {"step": torch.tensor(float(steps)), **entry} if entry else {}
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
        if not main:
            return None
        return {"state": {i: entry for i, entry in state.items() if entry}, "param_groups": groups}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
        """Load a single-process optimizer state_dict, cutting each tensor into this process's shard."""
        if self.kind == "fsdp":
            params = [p for group in optimizer.param_groups for p in group["params"]]
            saved = {
                "state": {
                    index: {
                        key: value if key == "step" else shard_like(value, params[int(index)])
                        for key, value in entry.items()
                    }
                    for index, entry in saved["state"].items()
                },
                "param_groups": saved["param_groups"],
            }
        optimizer.load_state_dict(saved)

    def whole_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Whole CPU copies of named (possibly sharded) tensors on the main process, None elsewhere (e.g. EMA)."""
        gathered = {name: whole(tensor) for name, tensor in tensors.items()}
        return gathered if self.accelerator.is_main_process else None

    def shard_tensors(self, saved: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole saved tensors cut like the live ones (the inverse of whole_tensors)."""
        return {name: shard_like(saved[name], like[name]) for name in like}

    def save_engine(self, folder: Any) -> None:
        """DeepSpeed's own sharded optimizer state (every process writes its part). Collective."""
        if self.deepspeed:
            self.engine.save_checkpoint(
                str(folder), tag=DEEPSPEED_TAG, client_state={}, save_latest=False, exclude_frozen_parameters=True
            )

    def load_engine(self, folder: Any) -> None:
        """Restore what save_engine wrote: trainable weights (with their fp32 masters) and optimizer state."""
        self.engine.load_checkpoint(
            str(folder),
            tag=DEEPSPEED_TAG,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )


# ----------------------------------------------------------------------------------------------- evaluation


def inference_accelerator() -> Any:
    """For `tunelab eval / predict --gpus N`: an Accelerator that joins the process group when this is one of
    several processes (each holds a whole model on its own GPU and takes every N-th row), else None."""
    if process_count() <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def lockstep_batches(order: Sequence[T], batch_size: int, accelerator: Any = None) -> list[tuple[list[T], bool]]:
    """This process's evaluation batches, each flagged with whether its results count.

    The batches are those one process would make (`order` cut every batch_size items), so every batch holds the
    same rows, padding and shapes as on one GPU and gives the same numbers; process r takes batches r, r + N, ...
    and, where it has one fewer than the others, repeats a batch flagged False (run it, discard its results). With
    sharded parameters (FSDP, ZeRO-3) each forward is a collective, and a process with a batch fewer would leave the
    others waiting forever."""
    batches = [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    world = accelerator.num_processes if accelerator is not None else 1
    if world == 1:
        return [(batch, True) for batch in batches]
    mine = [(batch, True) for batch in batches[accelerator.process_index :: world]]
    stand_ins = math.ceil(len(batches) / world) - len(mine)
    return mine + [(batches[0], False)] * stand_ins if stand_ins else mine


def gather_rows(mine: dict[int, T], total: int, accelerator: Any = None) -> list[T]:
    """Every process's results by row index ({row: value} for the rows it computed), merged in row order on every
    process."""
    if accelerator is None or accelerator.num_processes == 1:
        return [mine[i] for i in range(total)]
    from accelerate.utils import gather_object

    merged: dict[int, T] = {}
    for part in gather_object([mine]):
        merged.update(part)
    return [merged[i] for i in range(total)]
