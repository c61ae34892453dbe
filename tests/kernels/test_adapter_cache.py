"""kernels/adapter_cache.py: cached half copies of adapter matrices are reused while the parameter is unchanged and
rebuilt after anything that may change it (in-place ops, optimizer steps, even ones writing through `.data`)."""

from __future__ import annotations

import torch

from tunelab.kernels.adapter_cache import clear_adapter_caches, half_concat, half_copy


def test_reused_until_the_parameter_changes() -> None:
    param = torch.nn.Parameter(torch.randn(4, 8))
    value, value_t = half_copy(param, torch.bfloat16, 2.0)
    assert value.dtype == torch.bfloat16 and torch.equal(value, (param.detach() * 2).to(torch.bfloat16))
    assert torch.equal(value_t, value.t())
    again, _ = half_copy(param, torch.bfloat16, 2.0)
    assert again is value  # no new ops while nothing changed
    assert half_copy(param, torch.bfloat16, 1.0)[0] is not value  # another scaling is another copy
    with torch.no_grad():
        param.add_(1.0)  # moves the version counter
    changed, _ = half_copy(param, torch.bfloat16, 2.0)
    assert torch.equal(changed, (param.detach() * 2).to(torch.bfloat16))


def test_rebuilt_after_any_optimizer_step_even_through_data() -> None:
    param = torch.nn.Parameter(torch.randn(4, 8))

    class DataWriter(torch.optim.Optimizer):
        """Writes through .data (as some third-party optimizers do): the version counter does not move."""

        def __init__(self, params):  # noqa: ANN001
            super().__init__(params, {})

        def step(self, closure=None):  # noqa: ANN001, ANN201
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.mul_(3.0)

    before = half_copy(param, torch.bfloat16)[0].clone()
    version = param._version
    DataWriter([param]).step()
    assert param._version == version  # invisible to the version counter...
    after, _ = half_copy(param, torch.bfloat16)
    assert torch.equal(after, (param.detach()).to(torch.bfloat16))  # ...but the step hook saw it
    assert not torch.equal(after, before)
    param.data.mul_(2.0)  # by hand, outside an optimizer: needs the explicit call
    clear_adapter_caches()
    assert torch.equal(half_copy(param, torch.bfloat16)[0], param.detach().to(torch.bfloat16))


def test_same_dtype_copy_never_aliases_the_parameter() -> None:
    param = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.bfloat16))
    value, _ = half_copy(param, torch.bfloat16)
    assert value.data_ptr() != param.data_ptr() and torch.equal(value, param.detach())


def test_concat() -> None:
    first, second = torch.nn.Parameter(torch.randn(2, 6)), torch.nn.Parameter(torch.randn(3, 6))
    value, value_t = half_concat((first, second), torch.bfloat16)
    assert torch.equal(value, torch.cat([first, second]).detach().to(torch.bfloat16))
    assert half_concat((first, second), torch.bfloat16)[0] is value
    with torch.no_grad():
        second.zero_()
    assert torch.equal(half_concat((first, second), torch.bfloat16)[0][2:], torch.zeros(3, 6, dtype=torch.bfloat16))
