"""An exponential moving average of a model's trainable weights, kept in float32 beside the training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class EMA:
    """Exponential moving average of a model's trainable parameters (float32 shadows).

    ``shadow = decay · shadow + (1 - decay) · param`` after each optimizer step. Frozen
    parameters are constant, so their average is themselves and they are not copied.

    Args:
        model: The (unwrapped) model whose parameters are averaged.
        decay: Weight of the past.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.num_updates = 0

    def _params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.shadow]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One averaging step (vectorised over all tensors)."""
        params = [p.detach().float() for p in self._params(model)]
        torch._foreach_lerp_(list(self.shadow.values()), params, 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite the model's parameters with the averages."""
        for p, s in zip(self._params(model), self.shadow.values(), strict=True):
            p.copy_(s.to(p.dtype))

    @contextlib.contextmanager
    def swapped(self, model: torch.nn.Module) -> Iterator[None]:
        """The averaged weights inside the block, the raw ones restored after."""
        backup = [p.detach().clone() for p in self._params(model)]
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self._params(model), backup, strict=True):
                    p.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (saved as safetensors in checkpoints)."""
        out = {f"shadow.{n}": s.detach().cpu().contiguous() for n, s in self.shadow.items()}
        out["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`'s output (same parameter names required)."""
        names = {k[len("shadow."):] for k in state if k.startswith("shadow.")}
        if names != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - names), sorted(names - set(self.shadow))
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for n, s in self.shadow.items():
            s.copy_(state[f"shadow.{n}"].to(s.device))
        self.num_updates = int(state["num_updates"])
