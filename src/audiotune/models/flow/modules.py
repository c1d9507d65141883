"""Building blocks of the flow model: attention, Transformer blocks, 1-D ResNet blocks, time embedding.

Every block takes a mask of valid frames and is padding-invariant: a sequence gives the same
output alone or padded in a batch. Attention masks padded keys (not queries, so no row is
fully masked), and normalisation is per frame over channels (:class:`ChannelNorm`) instead of
CosyVoice's GroupNorm, whose statistics over time would include the padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each frame of a ``[B, C, T]`` tensor."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # statistics in fp32 also under bf16 autocast, as nn.LayerNorm gets
        mean = h.mean(1, keepdim=True)
        var = (h - mean).square().mean(1, keepdim=True)
        h = (h - mean) * torch.rsqrt(var + self.eps) * self.weight.float()[:, None] + self.bias.float()[:, None]
        return h.to(x.dtype)


def rotary_tables(length: int, dim: int, device: torch.device, dtype: torch.dtype,
                  base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of rotary position embeddings, ``[length, dim]`` each."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head self-attention (``to_q``/``to_k``/``to_v``/``to_out``: LoRA targets) on ``[B, T, dim]``."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``key_mask`` is ``[B, T]`` bool (True: a real frame), or a full attention mask ``[B, T or 1, T]``
        (bool, or an additive float bias as upstream's ``mask_to_bias`` gives)."""
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        if rotary is not None:
            q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        attn_mask = key_mask[:, None] if key_mask.dim() == 3 else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class FeedForward(nn.Module):
    """``proj_in`` → GELU → ``proj_out`` (both LoRA targets)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, hidden)
        self.proj_out = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.dropout(F.gelu(self.proj_in(x))))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + feed-forward on ``[B, T, dim]``; padded frames come out zero."""

    def __init__(self, dim: int, heads: int, head_dim: int, ff_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), key_mask, rotary))
        x = x + self.dropout(self.ff(self.norm2(x)))
        return x * key_mask[..., None].to(x.dtype)


class Block1D(nn.Module):
    """Conv1d(k=3) → ChannelNorm → Mish on ``[B, C, T]``, masked before and after.

    ``norm_groups`` swaps the norm for upstream's ``GroupNorm(norm_groups)`` (Matcha-TTS / CosyVoice
    use 8) under the same keys: the arithmetic of the released estimators, whose statistics over
    time include the padded frames (so it is not padding-invariant).
    """

    def __init__(self, dim: int, dim_out: int, norm_groups: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim_out, 3, padding=1)
        self.norm = ChannelNorm(dim_out) if norm_groups is None else nn.GroupNorm(norm_groups, dim_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.mish(self.norm(self.conv(x * mask))) * mask


class ResnetBlock1D(nn.Module):
    """Two :class:`Block1D` with the time embedding added in between, and a 1×1 residual.

    ``norm_groups``: see :class:`Block1D` (None: per-frame ChannelNorm, the default).
    """

    def __init__(self, dim: int, dim_out: int, time_dim: int, norm_groups: int | None = None) -> None:
        super().__init__()
        self.block1 = Block1D(dim, dim_out, norm_groups)
        self.time_proj = nn.Linear(time_dim, dim_out)
        self.block2 = Block1D(dim_out, dim_out, norm_groups)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.time_proj(F.mish(t_emb))[:, :, None]
        return self.block2(h, mask) + self.res_conv(x * mask)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of t ∈ [0, 1] (scaled by 1000, as Matcha/CosyVoice) → Linear → SiLU → Linear."""

    def __init__(self, sinusoid_dim: int, dim: int) -> None:
        super().__init__()
        self.sinusoid_dim = sinusoid_dim
        self.linear_1 = nn.Linear(sinusoid_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.sinusoid_dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                          * -(math.log(10000.0) / max(half - 1, 1)))
        angles = 1000.0 * t.float()[:, None] * freqs[None]
        emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
        if emb.shape[-1] < self.sinusoid_dim:
            emb = F.pad(emb, (0, self.sinusoid_dim - emb.shape[-1]))
        return self.linear_2(F.silu(self.linear_1(emb.to(self.linear_1.weight.dtype))))
