"""Step-Audio-EditX's estimator: a DiT with adaLN-Zero modulation and a causal conv branch per block.

Upstream: ``stepvocoder/cosyvoice2/flow/decoder_dit.py::DiT`` ("DiT-v5"). Attribute names follow
upstream's so its ``flow.pt`` loads strictly: ``t_embedder.mlp.{0,2}``, ``in_proj``,
``blocks.{i}.{attn,mlp,conv,adaLN_modulation}``, ``final_layer.{adaLN_modulation.1,linear}``.

None of our own blocks (``models/flow/modules.py``) matches: the attention has q/k/v biases, per-head
LayerNorm on q and k and an output named ``proj``; the MLP uses tanh-GELU with ``fc1``/``fc2``; the time
embedding is GLIDE's (cos first, frequencies over ``half``, 256 wide) rather than Matcha's. Upstream's
non-persistent streaming buffers (``att_cache_buffer``, ``cnn_cache_buffer``) and CUDA-graph chunk
decoding are left out: only full-sequence forward passes are built here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from audiotune.models.flow.native.decoder import CausalConv1d, Transpose


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """GLIDE sinusoid of ``1000·t`` (``[cos, sin]``, ``frequency_embedding_size`` wide) → Linear → SiLU → Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dim = self.frequency_embedding_size
        half = dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half).to(t)
        args = (t * 1000)[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return self.mlp(emb)


class DiTAttention(nn.Module):
    """Self-attention with q/k/v biases and LayerNorm on each head's q and k; ``proj`` out."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.q_norm = nn.LayerNorm(head_dim)
        self.k_norm = nn.LayerNorm(head_dim)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """``key_mask``: ``[B, 1, T]`` bool (True: a real frame)."""
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = self.q_norm(heads(self.to_q(x))), self.k_norm(heads(self.to_k(x))), heads(self.to_v(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None])
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """``fc1`` → tanh-GELU → ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CausalConvBlock(nn.Module):
    """On ``[B, T, C]``: causal conv (k) → LayerNorm → Mish → causal conv (k); upstream's ``block.{1,3,6}`` layout."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Transpose(1, 2), CausalConv1d(in_channels, out_channels, kernel_size), Transpose(1, 2),
            nn.LayerNorm(out_channels), nn.Mish(),
            Transpose(1, 2), CausalConv1d(out_channels, out_channels, kernel_size), Transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DiTBlock(nn.Module):
    """adaLN-Zero block: attention, then the causal conv branch, then the MLP, each gated by the time embedding."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = DiTAttention(hidden_size, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio))
        self.norm3 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.conv = CausalConvBlock(hidden_size, hidden_size, 3)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 9 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         shift_conv, scale_conv, gate_conv) = self.adaLN_modulation(c).chunk(9, dim=-1)
        x = x + gate_msa * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa), key_mask)
        x = x + gate_conv * self.conv(_modulate(self.norm3(x), shift_conv, scale_conv))
        return x + gate_mlp * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm → Linear to the mel channels."""

    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """The DiT estimator: ``[x, mu, spks, cond]`` → ``in_proj`` → DiT blocks → final layer; velocity ``[B, 80, T]``.

    Args mirror upstream's constructor and its defaults. The output is not masked (upstream's neither).
    ``LORA_TARGETS``: its attention and MLP linears (peft ``target_modules`` suffixes).
    """

    LORA_TARGETS = ("to_q", "to_k", "to_v", "proj", "fc1", "fc2")

    def __init__(self, in_channels: int, out_channels: int, mlp_ratio: float = 4.0, depth: int = 28,
                 num_heads: int = 8, head_dim: int = 64, hidden_size: int = 256) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.in_proj = nn.Linear(in_channels, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, head_dim, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """Upstream's init: Xavier linears, N(0, 0.02) time MLP, zeroed adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                       self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                streaming: bool = False) -> torch.Tensor:
        """The velocity at ``x`` (not masked).

        Args:
            x: Noisy mel ``[B, 80, T]``.
            mask: ``[B, 1, T]``, 1.0 on valid frames (masks attention keys only).
            mu: Encoder conditioning ``[B, 80, T]``.
            t: Flow times ``[B]`` (a 0-d tensor is taken as batch 1).
            spks: Projected speaker vectors ``[B, 80]`` (or None).
            cond: Prompt mel ``[B, 80, T]`` (or None).
            streaming: Accepted for the CFM's uniform call and ignored (upstream's chunked
                training is not published).
        """
        c = self.t_embedder(t.reshape(-1))[:, None]
        parts = [x, mu]
        if spks is not None:
            parts.append(spks[:, :, None].expand(-1, -1, x.shape[-1]))
        if cond is not None:
            parts.append(cond)
        h = self.in_proj(torch.cat(parts, dim=1).transpose(1, 2))
        key_mask = mask.bool()
        for block in self.blocks:
            h = block(h, c, key_mask)
        return self.final_layer(h, c).transpose(1, 2)
