"""CosyVoice's U-Net estimators, ``ConditionalDecoder`` and ``CausalConditionalDecoder``, in upstream's key layout.

Upstream (``cosyvoice/flow/decoder.py``) builds them from Matcha-TTS blocks (``SinusoidalPosEmb``,
``TimestepEmbedding``, ``ResnetBlock1D`` with ``GroupNorm(8)``, ``Downsample1D``/``Upsample1D``) and
diffusers' ``BasicTransformerBlock``. The modules here have the same attribute names, so a released
``flow.pt`` loads strictly (``down_blocks.{i}.0`` ResNet, ``.1`` Transformer blocks, ``.2`` resampler;
``mid_blocks``; ``up_blocks``; ``final_block``; ``final_proj``; ``time_mlp.linear_{1,2}``).

Reuse of our own blocks (``models/flow/modules.py``): :class:`~audiotune.models.flow.modules.TimeEmbedding`
has upstream's layout and arithmetic and is used as ``time_mlp``; our multi-head
:class:`~audiotune.models.flow.modules.Attention` is used with diffusers' ``to_out.0`` layout. Our
``Block1D``/``ResnetBlock1D``/``FeedForward`` name their weights ``conv``/``norm``/``time_proj``/``proj_in``
where upstream has ``block.0``/``block.1``/``mlp.1``/``net.0.proj``; bending them to upstream's names would
take state-dict renaming hooks, i.e. a second set of names in the same module, so the few-line blocks below
are written in upstream's layout instead (our ``ResnetBlock1D`` gained the ``GroupNorm(8)`` option, so our
own estimator can reproduce upstream's numbers through a key map).

The two arithmetic differences from our estimator: GroupNorm statistics run over time (padding included),
and the Transformer output is not re-masked (upstream masks only before convolutions and at the end).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from audiotune.models.flow.io import FlowLoadError
from audiotune.models.flow.modules import Attention, TimeEmbedding

_MASK_BIAS = -1.0e10  # upstream's mask_to_bias value for a masked key


def attention_bias(mask: torch.Tensor, dtype: torch.dtype, chunk_size: int = 0) -> torch.Tensor:
    """Upstream's attention mask as an additive bias, ``[B, 1 or T, T]``.

    ``mask`` is ``[B, 1, T]`` (1.0 on valid frames). ``chunk_size > 0`` adds the static chunk mask
    (a frame sees every frame up to the end of its own chunk), as ``add_optional_chunk_mask`` in
    streaming mode. Rows with no visible key are opened fully, as upstream does.
    """
    allowed = mask.bool()
    if chunk_size > 0:
        pos = torch.arange(mask.shape[-1], device=mask.device)
        chunk_end = (torch.div(pos, chunk_size, rounding_mode="trunc") + 1) * chunk_size
        allowed = allowed & (pos[None, :] < chunk_end[:, None])[None]
    empty = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | empty
    return (1.0 - allowed.to(dtype)) * _MASK_BIAS


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only (``kernel_size - 1`` zeros): frame t sees frames ≤ t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        self.causal_padding = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.causal_padding, 0)))


class Transpose(nn.Module):
    """Swaps two dims (a parameter-free slot in upstream's ``Sequential`` layouts)."""

    def __init__(self, dim0: int, dim1: int) -> None:
        super().__init__()
        self.dim0, self.dim1 = dim0, dim1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(self.dim0, self.dim1)


class Block1D(nn.Module):
    """Conv(k=3) → norm → Mish, masked before and after (``block.0`` conv, ``block.1``/``block.2`` norm).

    Non-causal: ``Conv1d`` + ``GroupNorm(groups)``. Causal: ``CausalConv1d`` + LayerNorm over channels.
    """

    def __init__(self, dim: int, dim_out: int, causal: bool = False, groups: int = 8) -> None:
        super().__init__()
        if causal:
            self.block = nn.Sequential(CausalConv1d(dim, dim_out, 3), Transpose(1, 2), nn.LayerNorm(dim_out),
                                       Transpose(1, 2), nn.Mish())
        else:
            self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class ResnetBlock1D(nn.Module):
    """Two :class:`Block1D` with the time embedding (``mlp``: Mish → Linear) added in between; 1×1 residual."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, causal: bool = False) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block1D(dim, dim_out, causal)
        self.block2 = Block1D(dim_out, dim_out, causal)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(time_emb)[:, :, None]
        return self.block2(h, mask) + self.res_conv(x * mask)


class Resample(nn.Module):
    """Matcha's ``Downsample1D`` (Conv1d k3 s2) / ``Upsample1D`` (ConvTranspose1d k4 s2): a ``conv`` holder."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DiffusersAttention(Attention):
    """Our :class:`Attention` (no q/k/v bias) with diffusers' ``to_out = [Linear, Dropout]`` layout.

    Diffusers applies dropout after the output projection, not on the attention weights.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float = 0.0) -> None:
        super().__init__(dim, heads, head_dim, dropout=0.0)
        self.to_out = nn.Sequential(self.to_out, nn.Dropout(dropout))


class _ProjectThenAct(nn.Module):
    """diffusers' ``GELU``/``GEGLU``/``ApproximateGELU`` and Matcha's ``SnakeBeta``: ``proj`` then the activation."""

    def __init__(self, dim: int, inner: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(dim, 2 * inner if kind == "geglu" else inner)
        if kind == "snakebeta":  # log-scale alpha/beta, as Matcha's default
            self.alpha = nn.Parameter(torch.zeros(inner))
            self.beta = nn.Parameter(torch.zeros(inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        if self.kind == "gelu":
            return F.gelu(h)
        if self.kind == "gelu-approximate":
            return F.gelu(h, approximate="tanh")
        if self.kind == "geglu":
            h, gate = h.chunk(2, dim=-1)
            return h * F.gelu(gate)
        if self.kind == "geglu-approximate":
            return h * torch.sigmoid(1.702 * h)
        return h + 1.0 / (self.beta.exp() + 1e-9) * torch.sin(h * self.alpha.exp()).pow(2)  # snakebeta


_ACTIVATIONS = ("gelu", "gelu-approximate", "geglu", "geglu-approximate", "snakebeta")


class FeedForward(nn.Module):
    """Matcha's ``FeedForward``: ``net.0`` projection + activation, ``net.1`` dropout, ``net.2`` Linear (×4 wide)."""

    def __init__(self, dim: int, dropout: float, activation_fn: str, mult: int = 4) -> None:
        super().__init__()
        if activation_fn not in _ACTIVATIONS:
            raise FlowLoadError(f"ConditionalDecoder act_fn {activation_fn!r} is not supported "
                                f"(supported: {', '.join(_ACTIVATIONS)})")
        inner = int(dim * mult)
        self.net = nn.Sequential(_ProjectThenAct(dim, inner, activation_fn), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """diffusers' self-attention block as Matcha configures it: ``norm1`` → ``attn1``, ``norm3`` → ``ff``."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, dropout: float,
                 activation_fn: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = DiffusersAttention(dim, num_attention_heads, attention_head_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout, activation_fn)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), attn_bias)
        return x + self.ff(self.norm3(x))


class ConditionalDecoder(nn.Module):
    """CosyVoice-300M's estimator: a 1-D U-Net with Transformer blocks, ``[x, mu, spks, cond]`` in, velocity out.

    Args mirror upstream's constructor (and its defaults); ``causal``/``static_chunk_size`` are
    set by :class:`CausalConditionalDecoder`. ``LORA_TARGETS``: its attention and feed-forward linears
    (peft ``target_modules`` suffixes).
    """

    causal = False
    LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")

    def __init__(self, in_channels: int, out_channels: int, channels=(256, 256), dropout: float = 0.05,
                 attention_head_dim: int = 64, n_blocks: int = 1, num_mid_blocks: int = 2, num_heads: int = 4,
                 act_fn: str = "snake") -> None:
        super().__init__()
        channels = tuple(channels)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.static_chunk_size, self.num_decoding_left_chunks = 0, -1
        time_dim = 4 * channels[0]
        self.time_mlp = TimeEmbedding(in_channels, time_dim)  # SinusoidalPosEmb + TimestepEmbedding (silu)

        def transformers(dim: int) -> nn.ModuleList:
            return nn.ModuleList(BasicTransformerBlock(dim, num_heads, attention_head_dim, dropout, act_fn)
                                 for _ in range(n_blocks))

        def conv3(dim: int) -> nn.Module:
            return CausalConv1d(dim, dim, 3) if self.causal else nn.Conv1d(dim, dim, 3, padding=1)

        self.down_blocks = nn.ModuleList()
        dim = in_channels
        for i, ch in enumerate(channels):
            last = i == len(channels) - 1
            down = conv3(ch) if last else Resample(nn.Conv1d(ch, ch, 3, 2, 1))
            self.down_blocks.append(nn.ModuleList([ResnetBlock1D(dim, ch, time_dim, self.causal), transformers(ch),
                                                   down]))
            dim = ch
        mid = channels[-1]
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([ResnetBlock1D(mid, mid, time_dim, self.causal), transformers(mid)])
            for _ in range(num_mid_blocks))
        self.up_blocks = nn.ModuleList()
        rev = channels[::-1] + (channels[0],)
        for i in range(len(channels)):
            last = i == len(channels) - 1
            ch = rev[i + 1]
            up = conv3(ch) if last else Resample(nn.ConvTranspose1d(ch, ch, 4, 2, 1))
            self.up_blocks.append(nn.ModuleList([ResnetBlock1D(2 * rev[i], ch, time_dim, self.causal),
                                                 transformers(ch), up]))
        self.final_block = Block1D(rev[-1], rev[-1], self.causal)
        self.final_proj = nn.Conv1d(rev[-1], out_channels, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        """Upstream's init: Kaiming-normal (ReLU) for convs and linears, zero biases, unit GroupNorm."""
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _transform(self, blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor, streaming: bool) -> torch.Tensor:
        if len(blocks) == 0:
            return x
        chunk = self.static_chunk_size if (streaming and self.causal) else 0
        bias = attention_bias(mask, x.dtype, chunk)
        h = x.transpose(1, 2)
        for block in blocks:
            h = block(h, bias)
        return h.transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                streaming: bool = False) -> torch.Tensor:
        """The velocity at ``x``, masked.

        Args:
            x: Noisy mel ``[B, 80, T]``.
            mask: ``[B, 1, T]``, 1.0 on valid frames.
            mu: Encoder conditioning ``[B, 80, T]``.
            t: Flow times ``[B]`` (a 0-d tensor is taken as batch 1).
            spks: Projected speaker vectors ``[B, 80]`` (or None).
            cond: Prompt mel ``[B, 80, T]`` (or None).
            streaming: Causal decoder only: static chunk attention masks (upstream's streaming training).
        """
        t_emb = self.time_mlp(t.reshape(-1))
        parts = [x, mu]
        if spks is not None:
            parts.append(spks[:, :, None].expand(-1, -1, x.shape[-1]))
        if cond is not None:
            parts.append(cond)
        h = torch.cat(parts, dim=1)
        masks, skips = [mask], []
        for resnet, blocks, down in self.down_blocks:
            m = masks[-1]
            h = self._transform(blocks, resnet(h, m, t_emb), m, streaming)
            skips.append(h)
            h = down(h * m)
            masks.append(m[:, :, ::2])
        masks.pop()
        for resnet, blocks in self.mid_blocks:
            h = self._transform(blocks, resnet(h, masks[-1], t_emb), masks[-1], streaming)
        for resnet, blocks, up in self.up_blocks:
            m, skip = masks.pop(), skips.pop()
            h = torch.cat([h[:, :, :skip.shape[-1]], skip], dim=1)
            h = self._transform(blocks, resnet(h, m, t_emb), m, streaming)
            h = up(h * m)
        h = self.final_block(h, mask)
        return self.final_proj(h * mask) * mask


class CausalConditionalDecoder(ConditionalDecoder):
    """CosyVoice2's estimator: :class:`ConditionalDecoder` with causal convolutions and LayerNorm blocks.

    ``streaming=True`` limits attention to static chunks of ``static_chunk_size`` frames (upstream's
    streaming training); ``num_decoding_left_chunks`` is kept for the record (upstream ignores it too).
    """

    causal = True

    def __init__(self, in_channels: int, out_channels: int, channels=(256, 256), dropout: float = 0.05,
                 attention_head_dim: int = 64, n_blocks: int = 1, num_mid_blocks: int = 2, num_heads: int = 4,
                 act_fn: str = "snake", static_chunk_size: int = 50, num_decoding_left_chunks: int = 2) -> None:
        super().__init__(in_channels, out_channels, channels, dropout, attention_head_dim, n_blocks, num_mid_blocks,
                         num_heads, act_fn)
        self.static_chunk_size, self.num_decoding_left_chunks = static_chunk_size, num_decoding_left_chunks
