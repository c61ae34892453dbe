"""Checkpointed layers' inputs kept in pinned CPU memory between forward and backward (model.offload_checkpoints).

With gradient checkpointing a decoder keeps, per layer, only the layer's input (tokens x hidden, bf16) for the
backward's recompute: 32 MiB a layer for a 1B model at 8k tokens, 1 GiB for an 8B model's 32 layers at 4k. Those
tensors are saved by torch's non-reentrant checkpoint through autograd's saved-tensor hooks, so `OffloadHooks`
placed around each layer's checkpoint function receives exactly them (the tensors saved inside the layer go to the
checkpoint's own, inner hooks). It copies each to pinned host memory on a side stream (the GPU keeps computing),
and in backward brings it back with the next-older layer's input already on its way (a one-layer prefetch), so
the transfers hide behind the recompute instead of stalling it.

Same values bit for bit (a copy there and back); only CUDA tensors of at least MIN_BYTES move.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from typing import Any

import torch

MIN_BYTES = 1 << 20  # smaller saved tensors (masks, position ids) stay where they are: not worth a transfer


class _Offloaded:
    """One tensor's trip: the pinned host copy, the event that says it is complete, and the prefetched return."""

    __slots__ = ("__weakref__", "index", "host", "device", "copied", "back", "arrived")

    def __init__(self, index: int, host: torch.Tensor, device: torch.device, copied: torch.cuda.Event) -> None:
        self.index, self.host, self.device, self.copied = index, host, device, copied
        self.back: torch.Tensor | None = None
        self.arrived: torch.cuda.Event | None = None


class OffloadHooks:
    """pack / unpack hooks for torch.autograd.graph.saved_tensors_hooks that move large CUDA tensors to pinned CPU
    memory on a side stream and prefetch them back in reverse order."""

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None
        self.counter = itertools.count()
        # entries waiting for their backward, by forward order; weak: a graph dropped without a backward frees them
        self.pending: weakref.WeakValueDictionary[int, _Offloaded] = weakref.WeakValueDictionary()

    def pack(self, tensor: torch.Tensor) -> Any:
        if not tensor.is_cuda or tensor.numel() * tensor.element_size() < MIN_BYTES:
            return tensor
        if self.stream is None:
            self.stream = torch.cuda.Stream(tensor.device)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self.stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        tensor.record_stream(self.stream)  # its GPU memory is not reused before the copy has read it
        entry = _Offloaded(next(self.counter), host, tensor.device, copied)
        self.pending[entry.index] = entry
        return entry

    def _fetch(self, entry: _Offloaded) -> None:
        """Start bringing `entry` back on the side stream."""
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(entry.copied)
            entry.back = entry.host.to(entry.device, non_blocking=True)
            entry.arrived = torch.cuda.Event()
            entry.arrived.record(self.stream)

    def unpack(self, entry: Any) -> torch.Tensor:
        if not isinstance(entry, _Offloaded):
            return entry
        self.pending.pop(entry.index, None)
        if entry.back is None:
            self._fetch(entry)
        current = torch.cuda.current_stream(entry.device)
        current.wait_event(entry.arrived)
        tensor = entry.back
        tensor.record_stream(current)  # allocated on the side stream, used and freed on this one
        entry.back = None
        older = [index for index in self.pending.keys() if index < entry.index]
        if older:  # the layer whose backward comes next: its input travels while this layer recomputes
            following = self.pending.get(max(older))
            if following is not None and following.back is None:
                self._fetch(following)
        return tensor


def offload_checkpoints(model: torch.nn.Module) -> int:
    """Wrap the checkpoint function of every checkpointed layer of `model` (transformers' GradientCheckpointingLayer:
    call after checkpointing is enabled) so its saved inputs wait in CPU memory; returns how many layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    hooks = OffloadHooks()
    layers = 0
    for module in model.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if not isinstance(module, GradientCheckpointingLayer) or not module.gradient_checkpointing or not function:
            continue
        if getattr(function, "tunelab_offloaded", False):
            continue

        @functools.wraps(function)
        def offloaded(*args: Any, _function: Any = function, **kwargs: Any) -> Any:
            with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
                return _function(*args, **kwargs)

        offloaded.tunelab_offloaded = True  # type: ignore[attr-defined]
        module._gradient_checkpointing_func = offloaded
        layers += 1
    return layers
