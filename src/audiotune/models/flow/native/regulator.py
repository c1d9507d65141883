"""CosyVoice-300M's ``InterpolateRegulator``: token-rate encoder output → mel-rate ``mu``.

Linear interpolation (``align_corners=False``) to the mel length, then per sampling ratio a
Conv1d(k3) → GroupNorm → Mish block, then a 1×1 conv (keys ``model.0`` … ``model.3n``).

In training the whole padded batch is stretched to the longest mel length and padding is zeroed
afterwards (upstream's arithmetic, padding frames included). At inference the prompt tokens and the
target tokens are stretched separately, so the prompt's mel frames end exactly where its tokens
end; a target longer than 40 tokens is stretched in three pieces (20 tokens, the middle, 20 tokens)
so that the head and tail keep the frame count of a 20-token overlap window, as upstream does for
its streaming hand-over.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Upstream's inference hard-codes its 22.05 kHz / hop-256 mel rate and a 20-token overlap window.
UPSTREAM_SAMPLE_RATE = 22050
UPSTREAM_HOP = 256
OVERLAP_TOKENS = 20


def mel_frames(tokens: int, token_rate: float, sample_rate: int = UPSTREAM_SAMPLE_RATE, hop: int = UPSTREAM_HOP) -> int:
    """Mel frames for ``tokens`` tokens at ``token_rate`` Hz, rounded down, in upstream's operation order."""
    return int(tokens / token_rate * sample_rate / hop)


def _stretch(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``[B, T, C]`` → ``[B, C, frames]`` by linear interpolation."""
    return F.interpolate(x.transpose(1, 2).contiguous(), size=frames, mode="linear")


class InterpolateRegulator(nn.Module):
    """Args:
        channels: Input (and, by default, output) channels.
        sampling_ratios: One conv block per entry (the values themselves are unused, as upstream).
        out_channels: Output channels of the final 1×1 conv.
        groups: GroupNorm groups.
    """

    def __init__(self, channels: int, sampling_ratios: Sequence, out_channels: int | None = None,
                 groups: int = 1) -> None:
        super().__init__()
        self.sampling_ratios = tuple(sampling_ratios)
        layers: list[nn.Module] = []
        for _ in self.sampling_ratios:
            layers += [nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(groups, channels), nn.Mish()]
        layers.append(nn.Conv1d(channels, out_channels or channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, ylens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training path: ``x [B, T, C]`` → ``([B, max(ylens), C'], ylens)``, frames past ``ylens[b]`` zero."""
        length = int(ylens.max())
        mask = (torch.arange(length, device=ylens.device)[None, :] < ylens[:, None]).to(x)[..., None]
        out = self.model(_stretch(x, length)).transpose(1, 2).contiguous()
        return out * mask, ylens

    def inference(self, x1: torch.Tensor, x2: torch.Tensor, mel_len1: int, mel_len2: int,
                  input_frame_rate: float = 50, sample_rate: int = UPSTREAM_SAMPLE_RATE,
                  hop: int = UPSTREAM_HOP) -> tuple[torch.Tensor, int]:
        """Prompt part ``x1 [B, T1, C]`` → ``mel_len1`` frames and target part ``x2 [B, T2, C]`` → ``mel_len2``
        frames, stretched separately and concatenated → ``([B, mel_len1+mel_len2, C'], total frames)``."""
        if x2.shape[1] > 2 * OVERLAP_TOKENS:
            edge = mel_frames(OVERLAP_TOKENS, input_frame_rate, sample_rate, hop)
            parts = [_stretch(x2[:, :OVERLAP_TOKENS], edge),
                     _stretch(x2[:, OVERLAP_TOKENS:-OVERLAP_TOKENS], mel_len2 - 2 * edge),
                     _stretch(x2[:, -OVERLAP_TOKENS:], edge)]
            target = torch.cat(parts, dim=2)
        else:
            target = _stretch(x2, mel_len2)
        x = torch.cat([_stretch(x1, mel_len1), target], dim=2) if x1.shape[1] else target
        return self.model(x).transpose(1, 2).contiguous(), mel_len1 + mel_len2
