"""The vector-field estimator: a conditional 1-D U-Net with Transformer blocks (CosyVoice's ConditionalDecoder).

Input channels are ``[x, mu, speaker, prompt]`` stacked (4 × n_mels): the noisy mel, the
encoder's conditioning, the projected speaker vector repeated over time, and the prompt mel
(zero outside the prompt). The time step enters every ResNet block through a sinusoidal
embedding and an MLP. Each level is ResNet → Transformer blocks → down-sampling (stride 2,
except the last level); the up path mirrors it with skip connections.
"""

from __future__ import annotations

import torch
from torch import nn

from audiotune.models.flow.config import FlowConfig
from audiotune.models.flow.modules import Block1D, ResnetBlock1D, TimeEmbedding, TransformerBlock


class _Stage(nn.Module):
    """A ResNet block followed by Transformer blocks."""

    def __init__(self, dim: int, dim_out: int, time_dim: int, cfg) -> None:
        super().__init__()
        self.resnet = ResnetBlock1D(dim, dim_out, time_dim)
        self.transformers = nn.ModuleList(
            TransformerBlock(dim_out, cfg.heads, cfg.head_dim, cfg.ff_mult * dim_out, cfg.dropout)
            for _ in range(cfg.n_blocks))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = self.resnet(x, mask, t_emb)
        if not self.transformers:
            return x
        key_mask = mask[:, 0].bool()
        h = x.transpose(1, 2)
        for block in self.transformers:
            h = block(h, key_mask)
        return h.transpose(1, 2)


class ConditionalUNet1D(nn.Module):
    """Predicts the flow's vector field ``[B, n_mels, T]``."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        cfg = config.estimator
        channels = tuple(cfg.channels)
        in_channels = 4 * config.n_mels
        time_dim = 4 * channels[0]
        self.time_embedding = TimeEmbedding(in_channels, time_dim)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        dim = in_channels
        for i, ch in enumerate(channels):
            self.down.append(_Stage(dim, ch, time_dim, cfg))
            last = i == len(channels) - 1
            self.downsample.append(nn.Conv1d(ch, ch, 3, padding=1) if last else nn.Conv1d(ch, ch, 3, 2, 1))
            dim = ch
        self.mid = nn.ModuleList(_Stage(channels[-1], channels[-1], time_dim, cfg) for _ in range(cfg.num_mid_blocks))
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        rev = channels[::-1] + (channels[0],)
        for i in range(len(channels)):
            self.up.append(_Stage(2 * rev[i], rev[i + 1], time_dim, cfg))
            last = i == len(channels) - 1
            self.upsample.append(nn.Conv1d(rev[i + 1], rev[i + 1], 3, padding=1) if last
                                 else nn.ConvTranspose1d(rev[i + 1], rev[i + 1], 4, 2, 1))
        self.final_block = Block1D(channels[0], channels[0])
        self.final_proj = nn.Conv1d(channels[0], config.n_mels, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spk: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The vector field at ``x``.

        Args:
            x: Noisy mel ``[B, n_mels, T]``.
            mask: ``[B, 1, T]`` 1.0 on valid frames.
            mu: Encoder conditioning ``[B, n_mels, T]``.
            t: Time steps ``[B]`` in [0, 1].
            spk: Speaker vectors ``[B, n_mels]``.
            cond: Prompt mel ``[B, n_mels, T]`` (zero outside the prompt).
        """
        t_emb = self.time_embedding(t)
        h = torch.cat([x, mu, spk[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)
        masks, skips = [mask], []
        for i, (stage, down) in enumerate(zip(self.down, self.downsample, strict=True)):
            h = stage(h, masks[-1], t_emb)
            skips.append(h)
            h = down(h * masks[-1])
            if i < len(self.down) - 1:
                masks.append(masks[-1][:, :, ::2])
        for stage in self.mid:
            h = stage(h, masks[-1], t_emb)
        for stage, up in zip(self.up, self.upsample, strict=True):
            skip = skips.pop()
            m = masks.pop()
            h = stage(torch.cat([h[:, :, :skip.shape[-1]], skip], dim=1), m, t_emb)
            h = up(h * m)
        h = self.final_block(h[:, :, :mask.shape[-1]], mask)
        return self.final_proj(h * mask) * mask
