"""Input layers of the native encoders: the linear input layer and Step-Audio-EditX's dual-codebook embedding.

* :class:`LinearInput` — upstream ``input_layer: 'linear'`` (``LinearNoSubsampling``): Linear →
  LayerNorm(eps 1e-5) → Dropout, then the positional encoding (keys ``out.0``, ``out.1``).
* :class:`DualCodebookEmbedding` — one table shared by both codebooks of a ``[B, T, 2]`` pair stream;
  each column is looked up with ``input_size // 2`` channels and the halves are concatenated.
"""

from __future__ import annotations

import torch
from torch import nn

from audiotune.models.flow.native.attention import RelativePositionEncoding


class LinearInput(nn.Module):
    """Project to the model width and add the relative-position table (no subsampling).

    Args:
        idim: Input channels.
        odim: Model width.
        dropout_rate: Dropout after the LayerNorm.
        pos_enc: The positional encoding applied afterwards.
    """

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc: RelativePositionEncoding) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5), nn.Dropout(dropout_rate))
        self.pos_enc = pos_enc

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, idim]`` → ``([B, T, odim], pos_emb [1, 2T-1, odim])``."""
        return self.pos_enc(self.out(x))


class DualCodebookEmbedding(nn.Module):
    """Step-Audio-EditX's token embedding for ``[B, T, 2]`` (vq02, vq06) pairs (key ``embedding.weight``).

    Args:
        vocab_size: Rows of the shared table (both codebooks' ids, see
            :func:`audiotune.models.vocab.step_pairs_from_interleaved`).
        input_size: Output channels; each codebook gets ``input_size // 2`` of them.
    """

    def __init__(self, vocab_size: int, input_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, input_size // 2)

    @property
    def output_size(self) -> int:
        """Channels of the concatenated output."""
        return 2 * self.embedding.embedding_dim

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        """``[B, T, 2]`` ids → ``[B, T, 2·(input_size//2)]``."""
        return torch.cat([self.embedding(token[..., 0]), self.embedding(token[..., 1])], dim=-1)
