"""Half-precision copies of LoRA adapter matrices, made once per optimizer step instead of at every call.

peft keeps A and B in fp32; the fast path computes in bf16, so every projection call cast A, scaled and cast B and
took their transposes: five small ops, each ~10-30 us of CPU, for every projection in forward and again in the
checkpoint recompute. On a 1B model those ops alone kept the GPU waiting (a step is ~140 ms of GPU work and was
~200 ms of CPU work on a slow host). Here the copies are cached on the parameter and rebuilt when it may have
changed:

- its version counter moved (any in-place op on the parameter: optimizer updates, load_state_dict, copy_), or
- any torch optimizer finished a step since (a global step hook: also covers optimizers that write through
  `param.data`, which does not move the version counter), or
- it now lives in other memory (`param.data = ...`).

Writing a parameter's `.data` by hand between optimizer steps is the one change this cannot see; call
`clear_adapter_caches()` after doing that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_STEPS = [0]  # optimizer steps finished in this process
_BYPASS = [0]  # > 0 while recording a CUDA graph: copies are made fresh (a graph must not read a cached copy)


def _count_step(*_: object) -> None:
    _STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


def clear_adapter_caches() -> None:
    """Invalidate every cached copy (as an optimizer step does)."""
    _STEPS[0] += 1


@contextlib.contextmanager
def bypassed() -> Iterator[None]:
    """Inside: every call makes its copies anew and caches nothing (kernels/graphed_layers.py records the copies
    into its CUDA graphs, so each replay reads the adapters as they are then)."""
    _BYPASS[0] += 1
    try:
        yield
    finally:
        _BYPASS[0] -= 1


def _fresh(param: torch.Tensor, dtype: torch.dtype, scaling: float) -> torch.Tensor:
    with torch.no_grad():
        value = (param * scaling if scaling != 1.0 else param).to(dtype).detach()
        if value.data_ptr() == param.data_ptr():
            value = value.clone()  # never alias the trainable tensor itself
    return value


def _key(params: tuple[torch.Tensor, ...], dtype: torch.dtype, scaling: float) -> tuple:
    return (_STEPS[0], dtype, scaling) + tuple((p._version, p.data_ptr()) for p in params)


def half_copy(param: torch.Tensor, dtype: torch.dtype, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(param * scaling in `dtype`, its transpose), detached; cached on `param` until it may have changed."""
    if _BYPASS[0]:
        value = _fresh(param, dtype, scaling)
        return value, value.t()
    key = _key((param,), dtype, scaling)
    cached = getattr(param, "_tunelab_half", None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    value = _fresh(param, dtype, scaling)
    param._tunelab_half = (key, value, value.t())
    return value, value.t()


def half_concat(params: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(the params concatenated along dim 0 in `dtype`, its transpose); cached on the first param."""
    if _BYPASS[0]:
        with torch.no_grad():
            value = torch.cat([p.detach() for p in params]).to(dtype)
        return value, value.t()
    key = _key(params, dtype, 1.0)
    cached = getattr(params[0], "_tunelab_concat", None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    with torch.no_grad():
        value = torch.cat([p.detach() for p in params]).to(dtype)
    params[0]._tunelab_concat = (key, value, value.t())
    return value, value.t()
