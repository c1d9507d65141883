"""Codes → frame-rate conditioning ``mu``: code embedding, Transformer encoder, length regulator.

The length regulator (CosyVoice's ``InterpolateRegulator``) stretches the encoder output to the
mel frame count by linear interpolation — per utterance here, from its own code length to its
own mel length, vectorised with a gather, so padding in a batch does not move any frame — then
refines it with a few convolutions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from audiotune.errors import DataError
from audiotune.models.flow.config import FlowConfig
from audiotune.models.flow.modules import ChannelNorm, TransformerBlock, rotary_tables


class FlowCodesError(DataError, ValueError):
    """Codes outside the flow's codebook (the stages check the Tokens before training: see audiotune.data.codes)."""


def lengths_to_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, length]`` bool: True for the first ``lengths[b]`` positions."""
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]


def interpolate(h: torch.Tensor, src_lengths: torch.Tensor, dst_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation of each ``h[b, :src_lengths[b]]`` to ``dst_lengths[b]`` frames.

    Same sampling grid as ``F.interpolate(mode="linear", align_corners=False)`` on the unpadded
    sequence. Frames past ``dst_lengths[b]`` are zero.

    Args:
        h: ``[B, T_src, C]``.
        src_lengths: ``[B]`` valid source frames (≥ 1).
        dst_lengths: ``[B]`` wanted frames.
        length: Padded output length (≥ ``dst_lengths.max()``).

    Returns:
        ``[B, length, C]``.
    """
    src = src_lengths.clamp(min=1).to(torch.float32)[:, None]
    dst = dst_lengths.clamp(min=1).to(torch.float32)[:, None]
    j = torch.arange(length, device=h.device, dtype=torch.float32)[None, :]
    pos = ((j + 0.5) * src / dst - 0.5).clamp(min=0.0)
    pos = torch.minimum(pos, src - 1)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (src - 1).long())
    w = (pos - lo.to(pos.dtype)).to(h.dtype)[..., None]
    channels = h.shape[-1]
    lo_h = h.gather(1, lo[..., None].expand(-1, -1, channels))
    hi_h = h.gather(1, hi[..., None].expand(-1, -1, channels))
    out = lo_h + (hi_h - lo_h) * w
    return out * lengths_to_mask(dst_lengths, length)[..., None].to(h.dtype)


class LengthRegulator(nn.Module):
    """Interpolation to the mel length, then ``layers`` × (Conv1d k3 → ChannelNorm → Mish) and a 1×1 conv."""

    def __init__(self, channels: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, 3, padding=1) for _ in range(layers))
        self.norms = nn.ModuleList(ChannelNorm(channels) for _ in range(layers))
        self.out = nn.Conv1d(channels, channels, 1)

    def forward(self, h: torch.Tensor, src_lengths: torch.Tensor, dst_lengths: torch.Tensor,
                length: int) -> torch.Tensor:
        """``h`` ``[B, T_src, C]`` → ``[B, C, length]`` (channels first, padding zero)."""
        mask = lengths_to_mask(dst_lengths, length)[:, None, :].to(h.dtype)
        x = interpolate(h, src_lengths, dst_lengths, length).transpose(1, 2)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = F.mish(norm(conv(x * mask))) * mask
        return self.out(x * mask) * mask


class CodeEncoder(nn.Module):
    """Codes ``[B, C, T]`` → ``mu`` ``[B, n_mels, T_mel]``: everything that ``freeze_encoder`` freezes.

    Codebook k uses rows ``k·codebook_size …`` of one embedding table; the codebooks' embeddings
    are summed per frame.
    """

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        e = config.encoder
        self.num_codebooks, self.codebook_size = config.num_codebooks, config.codebook_size
        self.embed = nn.Embedding(config.num_codebooks * config.codebook_size, e.dim)
        self.register_buffer("offsets", torch.arange(config.num_codebooks) * config.codebook_size, persistent=False)
        self.head_dim = e.dim // e.heads
        self.blocks = nn.ModuleList(TransformerBlock(e.dim, e.heads, self.head_dim, e.ff_dim, e.dropout)
                                    for _ in range(e.layers))
        self.norm = nn.LayerNorm(e.dim)
        self.proj = nn.Linear(e.dim, config.n_mels)
        self.regulator = LengthRegulator(config.n_mels, config.regulator_layers)
        self.scale = math.sqrt(e.dim)

    def forward(self, codes: torch.Tensor, code_lengths: torch.Tensor, mel_lengths: torch.Tensor,
                length: int) -> torch.Tensor:
        """``mu`` ``[B, n_mels, length]`` for codes ``[B, C, T]`` (padding anything; masked here)."""
        if codes.dim() != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"flow encoder: codes must be [batch, {self.num_codebooks} codebooks, frames], "
                             f"got {tuple(codes.shape)}")
        key_mask = lengths_to_mask(code_lengths, codes.shape[-1])
        ids = codes.long().masked_fill(~key_mask[:, None, :], 0)  # padding may hold anything
        outside = (ids < 0) | (ids >= self.codebook_size)
        if bool(outside.any()):  # never clamped: codes of another tokenizer would train silently
            b, k, t = (int(i) for i in outside.nonzero()[0])
            raise FlowCodesError(f"flow encoder: code {int(ids[b, k, t])} (batch item {b}, codebook {k}, frame {t}) "
                                 f"lies outside the codebook [0, {self.codebook_size})")
        ids = ids + self.offsets[None, :, None]
        x = self.embed(ids).sum(1) * key_mask[..., None]
        rotary = rotary_tables(codes.shape[-1], self.head_dim, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, key_mask, rotary)
        h = self.proj(self.norm(x))
        return self.regulator(h, code_lengths, mel_lengths, length)
