"""Exponential moving average of the trainable weights, kept in fp32 beside the model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightEMA:
    """shadow = decay * shadow + (1 - decay) * weight after every optimizer step, for trainable weights only."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {name: params[name].detach().float().clone() for name in self.names}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the current weights into the average."""
        params = dict(model.named_parameters())
        for name in self.names:
            self.shadow[name].lerp_(params[name].detach().float(), 1.0 - self.decay)

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """Swap the averaged weights in for evaluation or saving, and the live ones back afterwards."""
        params = dict(model.named_parameters())
        live = {name: params[name].detach().clone() for name in self.names}
        with torch.no_grad():
            for name in self.names:
                params[name].copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(live[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, by parameter name."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the averaged weights saved by state_dict."""
        for name in self.names:
            self.shadow[name].copy_(state[name])
