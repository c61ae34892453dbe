"""Checkpointed decoder layers replayed as CUDA graphs (train.cuda_graphs).

With LoRA the GPU work of a layer is a few large GEMMs, but each layer also runs ~100 small PyTorch ops and
Python frames in forward, again in the checkpoint recompute, and ~60 in backward. At 15-60 us of CPU each that is
more than the GPU time of a 1B model's step, and ~20% of an 8B model's, on the H100 host (BENCHMARKS.md: 1B LoRA
178 ms of CPU against 152 ms of GPU work a step; the GPU waits). A CUDA graph replays a recorded sequence of kernels
with one CPU call. Here, per checkpointed layer and input shape:

- a forward graph: the layer under no_grad (what checkpointing runs first: only the output is kept);
- a backward graph: the recompute under grad, then `torch.autograd.grad` of the layer's output against the
  incoming gradient, for the layer input and its trainable parameters. The layer's last projection (the MLP's
  down projection) is not recomputed: backward never reads its output; nor is the SwiGLU forward (backward's
  SwiGLU kernel writes h while it reads the same tiles; lora_mlp.output_unused).

`GraphedLayer` is the autograd function in between: it keeps the layer's input as checkpointing does (the offload
hooks see it the same way), replays the forward graph, and in backward replays the backward graph and returns the
gradients, so AccumulateGrad, gradient accumulation, clipping, DDP hooks and any optimizer work as before.

What stays exact: every graph reads only static buffers that live outside the graphs' memory pool (the layer
input, the incoming gradient, the keyword tensors such as rotary angles and masks, copied in before each replay
unless the buffer still holds exactly that tensor's values: a layer's output is written over its input buffer,
which is the next layer's input) and writes its results to static buffers that are copied out right after, so all
graphs can share one pool.
Adapter half-copies are made inside the graphs (adapter_cache.bypassed), autocast's weight cache is off while
recording, and the recording happens after two eager warm-up passes of exactly the recorded code. While warming
up and recording, the layer's trainable parameters are stand-in leaves sharing their storage
(_fresh_parameter_leaves): a parameter's gradient accumulator kept alive from an earlier graph, made on another
stream, would otherwise be pulled into the capture and invalidate it (a gradient-accumulation loop keeps the
previous micro-batch's graph).

Memory: the graphs' temporaries live in their own pool. Measured on an H100 (BENCHMARKS.md) against the same
fast path without graphs, allocated peak: +0.16 GiB (1B LoRA), +0.12 (1B QLoRA), +0.33 (8B QLoRA), +1.16 (8B LoRA);
reserved memory 1-5 GiB more, which is why train.cuda_graphs auto records only where the GPU has that much free
(LayerRecorder._room_for_graphs).

Used only where that is safe, else the layer keeps torch's checkpoint, call by call: CUDA, grad enabled, no
dropout, no module hooks, a single positional tensor input, keyword arguments that are tensors (not requiring
grad), tuples of tensors or plain values, an output of the input's shape. A shape is recorded the second time it
is seen (a shape seen once is not worth recording), at most MAX_SHAPES shapes per layer. A warm-up that fails
(an op that synchronises: they are set to raise while warming up) is retried with flash / memory-efficient
attention, then that shape stays eager for every layer of the class, with a warning. A recording that fails after
a clean warm-up stops recording in the process (torch may leave its state mid-recording: the random generator
and the allocator's routing to the pool are restored). Numbers: the same as the eager fast path within bf16
rounding (measured on the 1B shape: 1e-4 per step over 12 steps; tests/gpu/test_graphed_layers_gpu.py).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import traceback
import warnings
from typing import Any

import torch

from tunelab.kernels import adapter_cache, lora_mlp, lora_projection

MAX_SHAPES = 8  # recorded input shapes per layer; others run eagerly (each shape costs host memory and a recording)
RECORD_AT = 2  # a shape is recorded the RECORD_AT-th time a layer sees it
WARMUP_PASSES = 2  # eager passes on the recording stream before recording (kernel compilation, cuBLAS workspaces)
ENABLED = {"on": True}  # a process-wide switch (benchmarks time both)
HEADROOM_BYTES = 2 << 30  # train.cuda_graphs auto: free GPU memory wanted beyond what the run reserved so far
# cudaStreamCaptureMode of the recordings: thread_local lets other threads (the data loader's pinned-memory thread)
# make calls a capture forbids; TUNELAB_GRAPH_CAPTURE_MODE=global|relaxed for diagnosing failed recordings
CAPTURE_MODE = os.environ.get("TUNELAB_GRAPH_CAPTURE_MODE", "thread_local")


# ----------------------------------------------------------------------------------------------- keys and checks


def _spec(value: Any) -> Any:
    """A hashable description of one keyword argument, or raise TypeError when it cannot be served."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise TypeError("a keyword tensor requires grad")
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return ("tensors", type(value).__name__, tuple(_spec(v) for v in value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    raise TypeError(f"keyword of type {type(value).__name__}")


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return list(value)
    return []


def _graphable_module(module: torch.nn.Module) -> str | None:
    """Why `module` cannot be recorded (hooks, dropout), or None."""
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return "global module hooks"
    for sub in module.modules():
        if sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or sub._backward_pre_hooks:
            return "module hooks"
        if sub.training and isinstance(sub, torch.nn.modules.dropout._DropoutNd) and sub.p > 0:
            return "dropout"
        if sub.training and float(getattr(sub, "attention_dropout", 0.0) or 0.0) > 0:
            return "attention dropout"
    return None


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


# ----------------------------------------------------------------------------------------------- recorded layers


class _Statics:
    """Static buffers of one input shape, shared by every layer of the model (layers run one after another and
    every result is copied out before the next replay), outside the graphs' pool.

    A forward graph writes the layer's output over its input buffer (`out` is `hidden`: the copy is the graph's
    last op, after every read of the input), so right after a replay the buffer already holds the next layer's
    input; the backward graphs do the same with the input gradient over the incoming one. `held` remembers the
    tensor handed out with the buffer's contents (and its version), and the next replay skips copying it in
    (one tokens x hidden copy less per layer and direction). Whatever else writes a buffer lets go of it."""

    def __init__(self, hidden: torch.Tensor, keywords: dict[str, Any]) -> None:
        self.hidden = torch.empty_like(hidden)
        self.out = self.hidden  # the forward graph's result, written after its last read of the input
        self.grad_out = torch.empty_like(hidden)
        self.grad_in = self.grad_out  # the backward graph's input gradient, written after autograd is done
        # buffer name -> (the tensor handed out holding the same values, its version then); strong references:
        # the tensor is the next layer's input or incoming gradient anyway, and a held pointer cannot be reused
        self.held: dict[str, tuple[torch.Tensor, int]] = {}
        self.keywords: dict[str, Any] = {}
        for name, value in keywords.items():
            tensors = _tensors(value)
            if not tensors:
                self.keywords[name] = value
            elif isinstance(value, torch.Tensor):
                self.keywords[name] = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                                          device=value.device)  # fmt: skip
            else:
                self.keywords[name] = type(value)(
                    torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device) for v in value
                )
        self.sources: dict[str, tuple[list[torch.Tensor], list[int]]] = {}
        self.param_grads: dict[torch.dtype, torch.Tensor] = {}

    def hold(self, buffer: str, tensor: torch.Tensor) -> None:
        """`tensor` now has the same values as the buffer `buffer` ("hidden" or "grad")."""
        self.held[buffer] = (tensor, tensor._version)

    def release(self, buffer: str | None = None) -> None:
        """The buffer (every buffer when None) is about to be written by something else."""
        if buffer is None:
            self.held.clear()
        else:
            self.held.pop(buffer, None)

    def holds(self, buffer: str, tensor: torch.Tensor) -> bool:
        """Whether the buffer already has `tensor`'s values: it is the tensor handed out after the last write (the
        same memory, shape and strides) and nothing has written to that tensor since."""
        entry = self.held.get(buffer)
        if entry is None:
            return False
        kept, version = entry
        return (
            kept.data_ptr() == tensor.data_ptr()
            and kept.shape == tensor.shape
            and kept.stride() == tensor.stride()
            and kept.dtype == tensor.dtype
            and tensor._version == version
        )

    def load_keywords(self, keywords: dict[str, Any]) -> None:
        """Copy keyword tensors in, skipping those already there (the rotary angles are one tensor for all layers)."""
        for name, value in keywords.items():
            tensors = _tensors(value)
            if not tensors:
                continue
            versions = [t._version for t in tensors]
            seen = self.sources.get(name)
            if seen is not None and len(seen[0]) == len(tensors):
                if all(a is b for a, b in zip(seen[0], tensors, strict=True)) and seen[1] == versions:
                    continue
            for static, tensor in zip(_tensors(self.keywords[name]), tensors, strict=True):
                static.copy_(tensor)
            self.sources[name] = (tensors, versions)

    def grad_buffer(self, dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
        buffer = self.param_grads.get(dtype)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self.param_grads[dtype] = buffer
        return buffer


class _LayerGraphs:
    """The forward and backward graphs of one layer at one input shape."""

    def __init__(self, statics: _Statics, params: list[torch.nn.Parameter], needs_input_grad: bool) -> None:
        self.statics, self.params, self.needs_input_grad = statics, params, needs_input_grad
        self.forward_graph = torch.cuda.CUDAGraph()
        self.backward_graph = torch.cuda.CUDAGraph()
        # each parameter's gradient is a slice of one flat buffer per dtype (shared with the other layers: copied
        # out right after every replay), so backward clones one buffer instead of one tensor per parameter
        self.slices: list[tuple[torch.dtype, int, int, torch.Size]] = []  # dtype, offset, numel, shape
        totals: dict[torch.dtype, int] = {}
        for param in params:
            start = totals.get(param.dtype, 0)
            self.slices.append((param.dtype, start, param.numel(), param.shape))
            totals[param.dtype] = start + param.numel()
        device = params[0].device if params else torch.device("cuda")
        self.buffers = {dtype: statics.grad_buffer(dtype, total, device) for dtype, total in totals.items()}
        self.pointers = [p.data_ptr() for p in params]

    def forward(self, hidden: torch.Tensor, keywords: dict[str, Any]) -> torch.Tensor:
        statics = self.statics
        statics.release("grad")  # a new pass: the last backward's input gradient need not be kept for it
        if not statics.holds("hidden", hidden):  # not the previous layer's output, still in the buffer
            statics.hidden.copy_(hidden)
        statics.load_keywords(keywords)
        self.forward_graph.replay()
        out = statics.out.clone()
        statics.hold("hidden", out)
        return out

    def backward(
        self, hidden: torch.Tensor, grad_out: torch.Tensor, keywords: dict[str, Any]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        statics = self.statics
        statics.release("hidden")
        statics.hidden.copy_(hidden)
        if not statics.holds("grad", grad_out):  # not the next layer's input gradient, still in the buffer
            statics.grad_out.copy_(grad_out)
        statics.load_keywords(keywords)
        self.backward_graph.replay()
        grad_in = statics.grad_in.clone() if self.needs_input_grad else None
        if grad_in is not None:
            statics.hold("grad", grad_in)
        else:
            statics.release("grad")
        copies = {dtype: buffer.clone() for dtype, buffer in self.buffers.items()}
        grads = [copies[dtype][start : start + numel].view(shape) for dtype, start, numel, shape in self.slices]
        return grad_in, grads


class GraphedLayer(torch.autograd.Function):
    """A checkpointed layer through its recorded graphs: keeps the input for backward (as checkpointing does),
    returns the output; backward returns the input's and the trainable parameters' gradients."""

    @staticmethod
    def forward(ctx: Any, graphs: _LayerGraphs, keywords: dict[str, Any], hidden: torch.Tensor, *params: Any):
        ctx.graphs, ctx.keywords = graphs, keywords
        ctx.save_for_backward(hidden)
        return graphs.forward(hidden, keywords)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (hidden,) = ctx.saved_tensors
        grad_in, grads = ctx.graphs.backward(hidden, grad_out.contiguous(), ctx.keywords)
        return (None, None, grad_in, *grads)


@contextlib.contextmanager
def _recording(device_type: str, autocast: tuple[bool, torch.dtype], attention: Any) -> Any:
    """The context of warm-up and recording: the caller's autocast without its weight cache (a cached cast would
    be baked into the graph), adapter copies made inside, saved tensors kept in place (no offload hooks)."""
    enabled, dtype = autocast
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
        stack.enter_context(adapter_cache.bypassed())
        if attention is not None:
            stack.enter_context(attention)
        yield


@contextlib.contextmanager
def _fresh_parameter_leaves(module: torch.nn.Module, params: list[torch.nn.Parameter]) -> Any:
    """Inside: every parameter of `params` is replaced in `module` by a new leaf sharing its storage (yielded in
    the same order), so the autograd nodes that receive their gradients are made on the recording stream.

    Why: a parameter's gradient accumulator node keeps the stream it was made on, and lives as long as any graph
    that uses it; a previous micro-batch's graph (a `loss` still referenced while the next forward runs, as in a
    gradient-accumulation loop) or DDP's hooks keep one made on the default stream. autograd.grad inside the
    recording then makes that non-capturing stream wait on the capture, which invalidates it ("operation failed
    due to a previous error during capture"; pytorch#180090). The new leaves' nodes are made during the warm-up
    and the recording themselves. Shares the values: the graphs read the parameters as the optimizer leaves them."""
    aliases = {id(param): torch.nn.Parameter(param.detach(), requires_grad=True) for param in params}
    swapped = []
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and id(param) in aliases:
                swapped.append((sub, name, param))
                sub._parameters[name] = aliases[id(param)]
    try:
        yield [aliases[id(param)] for param in params]
    finally:
        for sub, name, param in swapped:
            sub._parameters[name] = param


def _describe(error: BaseException) -> str:
    """The error in one line, with the error it arose from: a capture that fails reports only "operation failed
    due to a previous error during capture"; the op that broke it is the chained one. TUNELAB_GRAPH_DEBUG=1 adds
    the full tracebacks."""
    parts, seen = [], error
    while seen is not None and len(parts) < 3:
        parts.append(f"{type(seen).__name__}: {' '.join(str(seen).split())[:300]}")
        seen = seen.__cause__ or seen.__context__
    text = " <- ".join(parts)
    if os.environ.get("TUNELAB_GRAPH_DEBUG"):
        text += "\n" + "".join(traceback.format_exception(error))
    return text


def _reset_cuda_generator(device: torch.device) -> None:
    """After a failed recording: give the device's default generator a fresh copy of its state (same seed and
    offset, out of recording mode); torch's capture_end skips that step when the capture was invalidated."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    generator = torch.cuda.default_generators[index]
    if hasattr(generator, "clone_state") and hasattr(generator, "graphsafe_set_state"):
        generator.graphsafe_set_state(generator.clone_state())


@contextlib.contextmanager
def _collector_paused() -> Any:
    """Python's cyclic garbage collector off while a graph records (torch.cuda.graph collects just before):
    objects it would free there may hold CUDA resources whose destructors make calls a capture forbids, and a
    destructor only warns, so the capture fails later with "a previous error during capture" and no culprit.
    A hardening: it is not established as the cause of the failed recordings in BENCHMARKS.md."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _end_pool_routing(device: torch.device, pool: Any) -> None:
    """After a failed recording: end the caching allocator's routing to the graphs' pool. torch's capture_end
    raises on an invalidated capture before it ends that routing, and while any routing is open the allocator
    never processes its stream events: every block freed after a record_stream (the offloaded layer inputs, each
    step) would stay allocated for the rest of the process, and the next capture into the pool would fail."""
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if end is None or pool is None:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    with contextlib.suppress(RuntimeError):  # "not currently recording": capture_end got as far as ending it
        end(index, pool)


@contextlib.contextmanager
def _synchronising_ops_raise() -> Any:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _flash_attention() -> Any:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class LayerRecorder:
    """Per model: the graphs of every layer and shape, the shared pool and recording stream, and counters."""

    def __init__(self) -> None:
        self.pool: Any = None
        self.stream: torch.cuda.Stream | None = None
        self.statics: dict[Any, _Statics] = {}
        self.graphs: dict[tuple[int, Any], _LayerGraphs] = {}
        self.seen: dict[tuple[int, Any], int] = {}
        self.failed: set[tuple[int, Any]] = set()
        self.failed_shapes: set[tuple[type, Any]] = set()
        self.counts = {"replayed": 0, "eager": 0, "recorded": 0, "failed": 0}
        self.reasons: dict[str, int] = {}
        self.layers = 0  # layers routed through this recorder
        self.warmed = False  # the current recording got past its warm-up (a failure after it is a failed capture)
        # train.cuda_graphs auto: record only on a GPU with room for the graphs' memory pool (decided once)
        self.require_headroom = False
        self.headroom_ok: bool | None = None
        # train.keep_dequantized: the recompute keeps 4-bit weights' dense copies for the backward (set before the
        # first recording: the graphs record what it says)
        self.keep_dense = False
        # diagnostics (benchmarks/layer_graphs_memory.py): a list to receive (phase, allocated, peak, reserved) in
        # bytes at each phase of every recording, or None
        self.trace: list[tuple[str, int, int, int]] | None = None

    def _eager(self, reason: str) -> None:
        self.counts["eager"] += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def call(self, module: torch.nn.Module, original: Any, layer_call: Any, *args: Any, **kwargs: Any) -> Any:
        """The layer's checkpoint function: its graphs where possible, `original` (torch's checkpoint) otherwise."""
        reason = self._why_not(module, layer_call, args, kwargs)
        if reason is not None:
            self._eager(reason)
            return original(layer_call, *args, **kwargs)
        hidden = args[0]
        keywords = dict(layer_call.keywords)
        params = [p for p in module.parameters() if p.requires_grad]
        autocast = _autocast_state(hidden.device.type)
        shape_key = (
            tuple(hidden.shape), hidden.stride(), hidden.dtype, hidden.device, hidden.requires_grad, autocast,
            tuple(sorted((name, _spec(value)) for name, value in keywords.items())),
        )  # fmt: skip
        key = (id(module), shape_key)
        if (type(module), shape_key) in self.failed_shapes:  # the same layer class failed at this shape
            self._eager("recording failed")
            return original(layer_call, *args, **kwargs)
        graphs = self.graphs.get(key)
        if graphs is not None and graphs.pointers != [p.data_ptr() for p in params]:
            graphs = None  # parameters moved (to(), load into new tensors): record again
            self.graphs.pop(key)
            self.seen[key] = RECORD_AT - 1
        if graphs is None:
            if key in self.failed:
                self._eager("recording failed")
                return original(layer_call, *args, **kwargs)
            self.seen[key] = self.seen.get(key, 0) + 1
            recorded_shapes = sum(1 for (layer, _) in self.graphs if layer == id(module))
            if self.seen[key] < RECORD_AT or recorded_shapes >= MAX_SHAPES:
                self._eager("shape not recorded")
                return original(layer_call, *args, **kwargs)
            if not self._room_for_graphs(hidden.device):
                self._eager("not enough free GPU memory")
                return original(layer_call, *args, **kwargs)
            graphs = self._record(module, layer_call, hidden, keywords, params, shape_key, autocast)
            if graphs is None:
                self.failed.add(key)
                self.failed_shapes.add((type(module), shape_key))  # its siblings would fail the same way
                self.counts["failed"] += 1
                return original(layer_call, *args, **kwargs)
            self.graphs[key] = graphs
            self.counts["recorded"] += 1
        self.counts["replayed"] += 1
        return GraphedLayer.apply(graphs, keywords, hidden, *params)

    def _room_for_graphs(self, device: torch.device) -> bool:
        """Whether the graphs' memory may be spent: the recorded layers keep their temporaries in a pool of their
        own, next to what the eager steps already reserved (measured on an H100: 1.1-5.2 GiB more reserved memory,
        0.15-1.2 GiB more at the allocated peak, on 1B-8B LoRA / QLoRA; BENCHMARKS.md). With train.cuda_graphs
        auto they are recorded only when the GPU has that much to spare: free memory at least what this process
        reserved so far plus 2 GiB; otherwise the layers stay eager (a GPU sized tightly for the run keeps fitting)."""
        if not self.require_headroom:
            return True
        if self.headroom_ok is None:
            free, _ = torch.cuda.mem_get_info(device)
            reserved = torch.cuda.memory_reserved(device)
            self.headroom_ok = free >= reserved + HEADROOM_BYTES
            if not self.headroom_ok:
                warnings.warn(
                    f"train.cuda_graphs auto: {free / 2**30:.1f} GiB free on the GPU against {reserved / 2**30:.1f} "
                    "GiB reserved by this run: the decoder layers run without CUDA graphs (they would need up to "
                    "about that much more). Set train.cuda_graphs: true to record them anyway.",
                    stacklevel=4,
                )
        return self.headroom_ok

    def _why_not(self, module: torch.nn.Module, layer_call: Any, args: tuple, kwargs: dict) -> str | None:
        if not ENABLED["on"]:
            return "switched off"
        if kwargs or len(args) != 1 or not isinstance(layer_call, functools.partial):
            return "call signature"
        hidden = args[0]
        if not isinstance(hidden, torch.Tensor) or not hidden.is_cuda or not torch.is_grad_enabled():
            return "not a CUDA training call"
        if torch.cuda.is_current_stream_capturing():
            return "already recording"
        try:
            for value in layer_call.keywords.values():
                _spec(value)
        except TypeError as error:
            return str(error)
        return _graphable_module(module)

    def _record(
        self,
        module: torch.nn.Module,
        layer_call: Any,
        hidden: torch.Tensor,
        keywords: dict[str, Any],
        params: list[torch.nn.Parameter],
        shape_key: Any,
        autocast: tuple[bool, torch.dtype],
    ) -> _LayerGraphs | None:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(hidden.device)
        statics = self.statics.get(shape_key)
        if statics is None:
            statics = self.statics[shape_key] = _Statics(hidden, keywords)
        errors = []
        for attention in (None, _flash_attention()):
            self.warmed = False
            statics.release()  # warm-up and recording write every buffer
            try:
                return self._record_with(module, layer_call, hidden, keywords, params, statics, autocast, attention)
            except Exception as error:  # noqa: BLE001 - any failure means: keep the eager checkpoint for this shape
                errors.append(_describe(error))
                torch.cuda.synchronize(hidden.device)
                if self.warmed:
                    # the recording itself failed: torch leaves the CUDA random generator in recording mode (every
                    # later random op would fail) and its allocator routing to the pool: restore both, record
                    # nothing more
                    _reset_cuda_generator(hidden.device)
                    _end_pool_routing(hidden.device, self.pool)
                    ENABLED["on"] = False
                    break
        warnings.warn(
            f"train.cuda_graphs: could not record {type(module).__name__} for input shape {tuple(hidden.shape)} "
            f"({'; '.join(errors)}); {'this shape runs' if ENABLED['on'] else 'the layers run'} without CUDA graphs "
            "(same results, more CPU time). Set train.cuda_graphs: false to silence this.",
            stacklevel=3,
        )
        return None

    def _record_with(
        self,
        module: torch.nn.Module,
        layer_call: Any,
        hidden: torch.Tensor,
        keywords: dict[str, Any],
        params: list[torch.nn.Parameter],
        statics: _Statics,
        autocast: tuple[bool, torch.dtype],
        attention: Any,
    ) -> _LayerGraphs:
        assert self.stream is not None
        needs_input_grad = hidden.requires_grad
        graphs = _LayerGraphs(statics, params, needs_input_grad)
        statics.hidden.copy_(hidden)
        statics.grad_out.zero_()
        statics.sources.clear()
        statics.load_keywords(keywords)
        run = functools.partial(layer_call.func, *layer_call.args, **statics.keywords)
        device_type = hidden.device.type
        leaf = statics.hidden.detach().requires_grad_(needs_input_grad)
        targets: list[torch.Tensor] = []  # set below: the input leaf and the parameters' fresh leaves

        def forward_body() -> torch.Tensor:
            with torch.no_grad():
                out = run(statics.hidden)
            statics.out.copy_(out)
            return out

        def backward_body() -> None:
            keep = lora_projection.dense_kept_for_backward() if self.keep_dense else contextlib.nullcontext()
            with torch.enable_grad(), lora_mlp.output_unused(), keep:
                out = run(leaf)
            grads = list(torch.autograd.grad(out, targets, statics.grad_out, allow_unused=True))
            if needs_input_grad:
                statics.grad_in.copy_(grads.pop(0))
            for grad, (dtype, start, numel, _) in zip(grads, graphs.slices, strict=True):
                view = graphs.buffers[dtype][start : start + numel]
                if grad is None:
                    view.zero_()
                else:
                    view.copy_(grad.reshape(-1))

        def mark(phase: str) -> None:
            if self.trace is not None:
                device = hidden.device
                memory = (torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device))
                self.trace.append((phase, *memory, torch.cuda.memory_reserved(device)))

        current = torch.cuda.current_stream(hidden.device)
        self.stream.wait_stream(current)
        mark("before warm-up")
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.cuda.stream(self.stream))
            stack.enter_context(_recording(device_type, autocast, attention))
            targets += ([leaf] if needs_input_grad else []) + stack.enter_context(
                _fresh_parameter_leaves(module, params)
            )
            # the warm-up runs exactly what is recorded, copies included: every kernel is launched (and, with
            # CUDA's lazy module loading, loaded) before the recording, where loading one would invalidate it
            with _synchronising_ops_raise():  # an op that waits for the GPU cannot be recorded: find it here
                for _ in range(WARMUP_PASSES):
                    out = forward_body()
                    if not isinstance(out, torch.Tensor) or out.shape != hidden.shape or out.dtype != hidden.dtype:
                        raise TypeError("the layer does not return one tensor of its input's shape and dtype")
                    del out
                    backward_body()
            self.warmed = True
            mark("after warm-up")
            with _collector_paused(), torch.cuda.graph(graphs.forward_graph, pool=self.pool, stream=self.stream,
                                                       capture_error_mode=CAPTURE_MODE):  # fmt: skip
                forward_body()
            mark("after forward recording")
            with _collector_paused(), torch.cuda.graph(graphs.backward_graph, pool=self.pool, stream=self.stream,
                                                       capture_error_mode=CAPTURE_MODE):  # fmt: skip
                backward_body()
            mark("after backward recording")
        current.wait_stream(self.stream)
        statics.sources.clear()  # the next replay copies its keywords in again
        return graphs


def install_layer_graphs(model: torch.nn.Module, require_headroom: bool = False) -> LayerRecorder | None:
    """Route every checkpointed layer of `model` (transformers' GradientCheckpointingLayer with checkpointing on)
    through one LayerRecorder; returns it (None when no layer is checkpointed). Call after checkpointing is
    enabled and before model.offload_checkpoints wraps the same function. `require_headroom` (train.cuda_graphs
    auto): record only where the GPU has room for the graphs' memory pool."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    recorder = LayerRecorder()
    recorder.require_headroom = require_headroom
    layers = 0
    for module in model.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if not isinstance(module, GradientCheckpointingLayer) or not module.gradient_checkpointing or not function:
            continue
        if getattr(function, "tunelab_graphed", False):
            continue

        @functools.wraps(function)
        def graphed(*args: Any, _module: Any = module, _function: Any = function, **kwargs: Any) -> Any:
            return recorder.call(_module, _function, *args, **kwargs)

        graphed.tunelab_graphed = True  # type: ignore[attr-defined]
        module._gradient_checkpointing_func = graphed
        layers += 1
    if not layers:
        return None
    recorder.layers = layers
    model._tunelab_layer_recorder = recorder  # benchmarks and tests read its counters
    return recorder
