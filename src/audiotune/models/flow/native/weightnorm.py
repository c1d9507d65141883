"""Weight-normalised 1-D convolutions that keep the legacy ``weight_g`` / ``weight_v`` parameters.

CosyVoice's HiFT releases (``hift.pt``) store every weight-normalised convolution as
``<module>.weight_g`` (the per-output-row gain, shape ``[dim0, 1, 1]``) and ``<module>.weight_v``
(the direction, the full kernel shape), the names of the old ``torch.nn.utils.weight_norm``. The
effective kernel is ``weight = weight_v · weight_g / ‖weight_v‖`` with the norm over every dim
except dim 0 (for a transposed convolution dim 0 is its *input* channels, as upstream).

These modules hold exactly those two parameters (plus ``bias``), so a release state dict loads
strictly with no key mapping, fine-tuning trains ``g`` and ``v`` as upstream training does, and
``state_dict()`` writes a ``hift.pt`` in the release layout. torch's own parametrized weight norm
would rename them to ``parametrizations.weight.original0/1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _WeightNormConv(nn.Module):
    """Shared parameters and initialisation of :class:`WNConv1d` and :class:`WNConvTranspose1d`."""

    def __init__(self, shape: tuple[int, ...], bias_size: int, fan_in: int) -> None:
        super().__init__()
        # bias first: the release files list <m>.bias before <m>.weight_g / <m>.weight_v
        bound = 1.0 / math.sqrt(fan_in)
        self.bias = nn.Parameter(torch.empty(bias_size).uniform_(-bound, bound))
        direction = torch.empty(shape)
        nn.init.kaiming_uniform_(direction, a=math.sqrt(5))
        self.weight_g = nn.Parameter(torch.norm_except_dim(direction, 2, 0))
        self.weight_v = nn.Parameter(direction)

    @property
    def weight(self) -> torch.Tensor:
        """The effective kernel ``v · g / ‖v‖`` (norm over all dims but 0).

        ``aten::_weight_norm`` is the op both of torch's weight-norm utilities call (upstream's numbers
        bit for bit; a hand-written ``v * (g / norm)`` differs in the last bit).
        """
        return torch._weight_norm(self.weight_v, self.weight_g, 0)


class WNConv1d(_WeightNormConv):
    """``Conv1d`` with weight norm over dim 0 (output channels); arguments as ``nn.Conv1d``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1) -> None:
        super().__init__((out_channels, in_channels, kernel_size), out_channels, in_channels * kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


class WNConvTranspose1d(_WeightNormConv):
    """``ConvTranspose1d`` with weight norm over dim 0 (its input channels); arguments as ``nn.ConvTranspose1d``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0) -> None:
        super().__init__((in_channels, out_channels, kernel_size), out_channels, out_channels * kernel_size)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.weight, self.bias, self.stride, self.padding)
