"""Relative-position self-attention of the CosyVoice-family encoders (Transformer-XL style, ESPnet layout).

Two pieces, both with upstream's parameter names so release weights load strictly:

* :class:`RelativePositionEncoding` — ESPnet's "new" relative encoding (``rel_pos_espnet``): the
  input is scaled by ``sqrt(d_model)``, and a sinusoid table over the relative distances
  ``T-1, …, 1, 0, -1, …, -(T-1)`` (``2T-1`` rows) is returned next to it. No parameters.
* :class:`RelativePositionAttention` — ``rel_selfattn``: multi-head attention whose score is
  ``(q + u)·k + shift((q + v)·W_pos p)``, divided by ``sqrt(d_k)``, where ``shift`` picks, for query
  ``i`` and key ``j``, the table row of distance ``i - j``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _sinusoids(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """``[len(positions), d_model]``: sin on even channels, cos on odd ones (float32, CPU)."""
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    angles = positions[:, None] * inv_freq
    table = torch.zeros(len(positions), d_model)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


def relative_position_table(length: int, d_model: int) -> torch.Tensor:
    """Sinusoids for the relative distances ``length-1 … -(length-1)``: ``[1, 2·length-1, d_model]`` (float32).

    Distances are computed as upstream does (the negative half as ``(-p)·f``, not ``-(p·f)``), so the
    values are the same bits as its table.
    """
    positions = torch.arange(0, length, dtype=torch.float32)
    left = _sinusoids(positions, d_model).flip(0)  # distances length-1 … 0
    right = _sinusoids(-1 * positions, d_model)[1:]  # distances -1 … -(length-1)
    return torch.cat([left, right], dim=0)[None]


class RelativePositionEncoding(nn.Module):
    """``rel_pos_espnet``: scale the input by ``sqrt(d_model)`` and hand out the relative-distance table.

    Both outputs go through the same dropout (as upstream). The table is computed on the CPU in float32,
    grows on demand, and is kept on the device / in the dtype of the latest input (not a buffer: it is
    not part of the state dict, as upstream).

    Args:
        d_model: Channels.
        dropout_rate: Dropout on the scaled input and on the table.
    """

    def __init__(self, d_model: int, dropout_rate: float) -> None:
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.dropout = nn.Dropout(p=dropout_rate)
        self._table = relative_position_table(1, d_model)
        self._placed = self._table  # the table on the device and in the dtype last asked for

    def position_encoding(self, size: int, like: torch.Tensor) -> torch.Tensor:
        """Rows for distances ``size-1 … -(size-1)``: ``[1, 2·size-1, d_model]`` on ``like``'s device/dtype."""
        if self._table.shape[1] < 2 * size - 1:
            self._table = relative_position_table(max(size, 2 * (self._table.shape[1] // 2 + 1)), self.d_model)
            self._placed = self._table
        if self._placed.device != like.device or self._placed.dtype != like.dtype:
            self._placed = self._table.to(device=like.device, dtype=like.dtype)
        center = self._placed.shape[1] // 2
        return self._placed[:, center - size + 1: center + size]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, D]`` → ``(dropout(x·sqrt(D)), dropout(table [1, 2T-1, D]))``."""
        pos_emb = self.position_encoding(x.shape[1], x)
        return self.dropout(x * self.xscale), self.dropout(pos_emb)


def relative_shift(scores: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, 2T-1]`` scores against the distance table → ``[B, H, T, T]``: entry ``(i, j)`` is the
    column of distance ``i - j``, i.e. column ``T-1-i+j``."""
    length = scores.shape[2]
    query = torch.arange(length, device=scores.device)
    index = (length - 1) - query[:, None] + query[None, :]
    return scores.gather(-1, index.expand(*scores.shape[:2], length, length))


class RelativePositionAttention(nn.Module):
    """``rel_selfattn`` multi-head self-attention (upstream key names: ``linear_{q,k,v,out,pos}``,
    ``pos_bias_u``, ``pos_bias_v``).

    Args:
        n_head: Heads.
        n_feat: Model width (a multiple of ``n_head``).
        dropout_rate: Dropout on the attention weights.
        key_bias: Whether ``linear_k`` has a bias.
    """

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float, key_bias: bool = True) -> None:
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"attention width {n_feat} is not a multiple of {n_head} heads")
        self.d_k = n_feat // n_head
        self.h = n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(n_head, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H·d_k]`` → ``[B, T, H, d_k]``."""
        return x.view(x.shape[0], -1, self.h, self.d_k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """Self-attention over ``x``.

        Args:
            x: ``[B, T, D]``.
            mask: bool ``[B, 1, T]`` (padding) or ``[B, T, T]`` (chunks); False = not attended.
            pos_emb: ``[1 or B, 2T-1, D]`` from :class:`RelativePositionEncoding`.

        Returns:
            ``[B, T, D]``.
        """
        batch = x.shape[0]
        q = self._heads(self.linear_q(x))  # [B, T, H, d_k]
        k = self._heads(self.linear_k(x)).transpose(1, 2)  # [B, H, T, d_k]
        v = self._heads(self.linear_v(x)).transpose(1, 2)
        p = self._heads(self.linear_pos(pos_emb)).transpose(1, 2)  # [1, H, 2T-1, d_k]
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        if position.shape != content.shape:
            position = relative_shift(position)
        scores = (content + position) / math.sqrt(self.d_k)
        blocked = ~mask.unsqueeze(1)[..., : scores.shape[-1]]  # [B, 1, 1 or T, T]
        weights = torch.softmax(scores.masked_fill(blocked, -float("inf")), dim=-1).masked_fill(blocked, 0.0)
        out = torch.matmul(self.dropout(weights), v)  # [B, H, T, d_k]
        return self.linear_out(out.transpose(1, 2).contiguous().view(batch, -1, self.h * self.d_k))
