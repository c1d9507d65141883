"""Conformer encoders of the CosyVoice family, with upstream's module names and arithmetic.

* :class:`ConformerEncoder` — CosyVoice-300M: linear input + relative positions, ``num_blocks``
  Conformer layers (pre- or post-norm, optional macaron feed-forward and convolution module),
  a final LayerNorm when pre-norm.
* :class:`UpsampleConformerEncoder` — CosyVoice2 / Step-Audio-EditX: the same front, a pre-lookahead
  convolution, ``num_blocks`` layers, a ×``stride`` upsampling convolution, a second linear input and
  ``num_up_blocks`` layers. Static chunk masks (``static_chunk_size``) are applied only when
  ``streaming`` is asked for, as upstream does (its non-streaming inference uses padding masks only).

:func:`build_encoder` reads a yaml ``encoder:`` node (upstream's constructor defaults for the keys it
omits) and refuses, naming it, any option this module does not implement.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from audiotune.models.flow.io import FlowLoadError
from audiotune.models.flow.native.attention import RelativePositionAttention, RelativePositionEncoding
from audiotune.models.flow.native.embedding import LinearInput
from audiotune.models.flow.native.options import read_options, require

__all__ = ["ACTIVATIONS", "CONFORMER", "UPSAMPLE_CONFORMER", "UPSAMPLE_CONFORMER_V2", "ConformerEncoder",
           "ConformerLayer", "ConvolutionModule", "FeedForward", "PreLookaheadLayer", "Upsample1D",
           "UpsampleConformerEncoder", "attention_mask", "build_encoder", "conformer_layers", "linear_input",
           "read_options", "require", "run_layers", "valid_mask"]

log = logging.getLogger(__name__)

ACTIVATIONS = {"hardtanh": nn.Hardtanh, "tanh": nn.Tanh, "relu": nn.ReLU, "selu": nn.SELU,
               "swish": nn.SiLU, "gelu": nn.GELU}


def valid_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """bool ``[B, length]``: True on the first ``lengths[b]`` positions."""
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]


def attention_mask(masks: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Padding mask ``[B, 1, T]``, or with ``chunk_size > 0`` the static chunk mask ``[B, T, T]``: position
    ``i`` sees every valid position before the end of its chunk. A row that would see nothing sees
    everything (upstream's guard; such rows are padding)."""
    if chunk_size <= 0:
        out = masks
    else:
        pos = torch.arange(masks.shape[-1], device=masks.device)
        chunk_end = (torch.div(pos, chunk_size, rounding_mode="trunc") + 1) * chunk_size
        out = masks & (pos[None, :] < chunk_end[:, None])[None]
    empty = out.sum(dim=-1) == 0
    if bool(empty.any()):
        out = out.clone()
        out[empty] = True
    return out


class FeedForward(nn.Module):
    """Position-wise feed-forward ``w_2(dropout(act(w_1 x)))``."""

    def __init__(self, idim: int, hidden_units: int, dropout_rate: float, activation: nn.Module) -> None:
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.activation = activation
        self.dropout = nn.Dropout(dropout_rate)
        self.w_2 = nn.Linear(hidden_units, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


class ConvolutionModule(nn.Module):
    """Conformer convolution: pointwise ×2 → GLU → depthwise (centred, or causal) → norm → act → pointwise.

    Args:
        channels: Width.
        kernel_size: Depthwise kernel (odd unless causal).
        activation: Activation after the norm.
        norm: ``batch_norm`` or ``layer_norm``.
        causal: Left padding only.
    """

    def __init__(self, channels: int, kernel_size: int, activation: nn.Module, norm: str = "batch_norm",
                 causal: bool = False) -> None:
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, 1)
        self.lorder = kernel_size - 1 if causal else 0
        padding = 0 if causal else (kernel_size - 1) // 2
        self.depthwise_conv = nn.Conv1d(channels, channels, kernel_size, padding=padding, groups=channels)
        self.use_layer_norm = norm == "layer_norm"
        self.norm = nn.LayerNorm(channels) if self.use_layer_norm else nn.BatchNorm1d(channels)
        self.pointwise_conv2 = nn.Conv1d(channels, channels, 1)
        self.activation = activation

    def forward(self, x: torch.Tensor, mask_pad: torch.Tensor) -> torch.Tensor:
        """``x [B, T, C]``, ``mask_pad`` bool ``[B, 1, T]`` → ``[B, T, C]`` (padding zeroed before and after)."""
        x = x.transpose(1, 2).masked_fill(~mask_pad, 0.0)
        if self.lorder:
            x = F.pad(x, (self.lorder, 0))
        x = self.depthwise_conv(F.glu(self.pointwise_conv1(x), dim=1))
        if self.use_layer_norm:
            x = self.activation(self.norm(x.transpose(1, 2))).transpose(1, 2)
        else:
            x = self.activation(self.norm(x))
        return self.pointwise_conv2(x).masked_fill(~mask_pad, 0.0).transpose(1, 2)


class ConformerLayer(nn.Module):
    """One Conformer block: [macaron FF ½] → rel-pos self-attention → [convolution] → FF (½ if macaron)."""

    def __init__(self, size: int, self_attn: nn.Module, feed_forward: nn.Module, feed_forward_macaron: nn.Module | None,
                 conv_module: nn.Module | None, dropout_rate: float, normalize_before: bool) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.feed_forward_macaron = feed_forward_macaron
        self.conv_module = conv_module
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)
        if feed_forward_macaron is not None:
            self.norm_ff_macaron = nn.LayerNorm(size, eps=1e-12)
        self.ff_scale = 0.5 if feed_forward_macaron is not None else 1.0
        if conv_module is not None:
            self.norm_conv = nn.LayerNorm(size, eps=1e-12)
            self.norm_final = nn.LayerNorm(size, eps=1e-12)
        self.dropout = nn.Dropout(dropout_rate)
        self.normalize_before = normalize_before

    def _residual(self, x: torch.Tensor, norm: nn.Module, block, scale: float = 1.0) -> torch.Tensor:
        out = x + scale * self.dropout(block(norm(x) if self.normalize_before else x))
        return out if self.normalize_before else norm(out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor,
                mask_pad: torch.Tensor) -> torch.Tensor:
        """``x [B, T, C]``; ``mask`` for attention; ``mask_pad [B, 1, T]`` for the convolution."""
        if self.feed_forward_macaron is not None:
            x = self._residual(x, self.norm_ff_macaron, self.feed_forward_macaron, self.ff_scale)
        x = self._residual(x, self.norm_mha, lambda h: self.self_attn(h, mask, pos_emb))
        if self.conv_module is not None:
            if not self.normalize_before:  # upstream's conv module zeroes padding in place: post-norm, that is
                x = x.masked_fill(~mask_pad.transpose(1, 2), 0.0)  # the residual stream itself
            x = self._residual(x, self.norm_conv, lambda h: self.conv_module(h, mask_pad))
        x = self._residual(x, self.norm_ff, self.feed_forward, self.ff_scale)
        if self.conv_module is not None:
            x = self.norm_final(x)
        return x


def conformer_layers(count: int, size: int, heads: int, linear_units: int, dropout_rate: float,
                     attention_dropout_rate: float, activation: nn.Module, normalize_before: bool = True,
                     key_bias: bool = True, macaron_style: bool = False, use_cnn_module: bool = False,
                     cnn_module_kernel: int = 15, cnn_module_norm: str = "batch_norm",
                     causal: bool = False) -> nn.ModuleList:
    """``count`` :class:`ConformerLayer`\\ s with rel-pos attention (the activation module is shared, as upstream)."""
    def layer() -> ConformerLayer:
        return ConformerLayer(
            size, RelativePositionAttention(heads, size, attention_dropout_rate, key_bias),
            FeedForward(size, linear_units, dropout_rate, activation),
            FeedForward(size, linear_units, dropout_rate, activation) if macaron_style else None,
            ConvolutionModule(size, cnn_module_kernel, activation, cnn_module_norm, causal) if use_cnn_module else None,
            dropout_rate, normalize_before)
    return nn.ModuleList([layer() for _ in range(count)])


def linear_input(idim: int, odim: int, dropout_rate: float, positional_dropout_rate: float) -> LinearInput:
    """``input_layer: linear`` with ``pos_enc_layer_type: rel_pos_espnet``."""
    return LinearInput(idim, odim, dropout_rate, RelativePositionEncoding(odim, positional_dropout_rate))


def run_layers(layers: nn.ModuleList, xs: torch.Tensor, masks: torch.Tensor, pos_emb: torch.Tensor,
               chunk_size: int) -> torch.Tensor:
    """The layers over ``xs`` with the padding (or static chunk) mask."""
    att_mask = attention_mask(masks, chunk_size)
    for layer in layers:
        xs = layer(xs, att_mask, pos_emb, masks)
    return xs


class _EncoderFront(nn.Module):
    """What both encoders start and end with: the linear input (key ``embed``) and, pre-norm, a final LayerNorm
    (key ``after_norm``); ``static_chunk_size`` for chunked attention."""

    def __init__(self, input_size: int, output_size: int, dropout_rate: float, positional_dropout_rate: float,
                 normalize_before: bool, static_chunk_size: int) -> None:
        super().__init__()
        self._output_size = output_size
        self.embed = linear_input(input_size, output_size, dropout_rate, positional_dropout_rate)
        self.normalize_before = normalize_before
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)
        self.static_chunk_size = static_chunk_size

    def output_size(self) -> int:
        return self._output_size

    def _final(self, xs: torch.Tensor) -> torch.Tensor:
        return self.after_norm(xs) if self.normalize_before else xs


class ConformerEncoder(_EncoderFront):
    """CosyVoice-300M's token encoder (keys ``embed.*``, ``after_norm.*``, ``encoders.N.*``).

    Args:
        input_size: Input channels.
        output_size: Model width.
        num_blocks: Conformer layers.
        static_chunk_size: Chunked attention when > 0 (always applied, as upstream's BaseEncoder does).
        dropout_rate, positional_dropout_rate: Dropouts of the input layer.
        normalize_before: Pre-norm (and a final LayerNorm).
        **layer_options: Passed to :func:`conformer_layers`.
    """

    def __init__(self, input_size: int, output_size: int, num_blocks: int, dropout_rate: float,
                 positional_dropout_rate: float, normalize_before: bool = True, static_chunk_size: int = 0,
                 **layer_options) -> None:
        super().__init__(input_size, output_size, dropout_rate, positional_dropout_rate, normalize_before,
                         static_chunk_size)
        self.encoders = conformer_layers(num_blocks, output_size, dropout_rate=dropout_rate,
                                         normalize_before=normalize_before, **layer_options)

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``xs [B, T, input_size]`` → ``([B, T, output_size], masks bool [B, 1, T])``."""
        masks = valid_mask(xs_lens, xs.shape[1])[:, None]
        xs, pos_emb = self.embed(xs)
        xs = run_layers(self.encoders, xs, masks, pos_emb, self.static_chunk_size)
        return self._final(xs), masks


class PreLookaheadLayer(nn.Module):
    """Look-ahead convolution: right-pad ``pre_lookahead_len``, conv (k = len+1) → leaky ReLU → left-pad 2,
    conv (k = 3) back to ``in_channels``, plus the input (keys ``conv1``, ``conv2``)."""

    def __init__(self, in_channels: int, channels: int, pre_lookahead_len: int) -> None:
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(in_channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, in_channels, kernel_size=3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[B, T, C]`` → ``[B, T, C]``."""
        x = F.pad(inputs.transpose(1, 2), (0, self.pre_lookahead_len))
        x = F.leaky_relu(self.conv1(x))
        x = self.conv2(F.pad(x, (self.conv2.kernel_size[0] - 1, 0)))
        return x.transpose(1, 2) + inputs


class Upsample1D(nn.Module):
    """Nearest ×``scale_factor`` upsampling, left-pad ``2·stride``, conv (k = ``2·stride+1``, key ``conv``)."""

    def __init__(self, channels: int, out_channels: int, stride: int = 2, scale_factor: float | None = None) -> None:
        super().__init__()
        self.stride = stride
        self.scale_factor = float(stride if scale_factor is None else scale_factor)
        self.conv = nn.Conv1d(channels, out_channels, stride * 2 + 1)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, T]`` → ``([B, C', T·scale], lengths·stride)``."""
        x = F.interpolate(inputs, scale_factor=self.scale_factor, mode="nearest")
        return self.conv(F.pad(x, (self.stride * 2, 0))), lengths * self.stride


class UpsampleConformerEncoder(_EncoderFront):
    """CosyVoice2's ``UpsampleConformerEncoder`` and Step-Audio-EditX's ``UpsampleConformerEncoderV2``.

    Keys: ``embed``, ``after_norm``, ``pre_lookahead_layer``, ``encoders``, ``up_layer``, ``up_embed``,
    ``up_encoders``. The two upstream classes differ only in which sizes are fixed: CosyVoice2 fixes
    512 channels for the look-ahead and upsampling layers, look-ahead 3, stride 2 and 4 up blocks;
    the V2 reads them from its arguments. The builders pass them in.

    Args:
        input_size: Input channels (of both linear input layers).
        output_size: Model width.
        num_blocks, num_up_blocks: Layers before and after the upsampling.
        lookahead_channels: Hidden channels of the pre-lookahead convolution.
        pre_lookahead_len: Future frames seen by the pre-lookahead convolution.
        up_stride, up_scale_factor: Upsampling stride (length factor) and interpolation factor.
        static_chunk_size: Token-rate chunk for streaming attention (×stride after upsampling).
        dropout_rate, positional_dropout_rate, normalize_before: As :class:`ConformerEncoder`.
        **layer_options: Passed to :func:`conformer_layers`.
    """

    def __init__(self, input_size: int, output_size: int, num_blocks: int, num_up_blocks: int, lookahead_channels: int,
                 pre_lookahead_len: int, up_stride: int, up_scale_factor: float, dropout_rate: float,
                 positional_dropout_rate: float, normalize_before: bool = True, static_chunk_size: int = 0,
                 **layer_options) -> None:
        super().__init__(input_size, output_size, dropout_rate, positional_dropout_rate, normalize_before,
                         static_chunk_size)
        self.pre_lookahead_layer = PreLookaheadLayer(output_size, lookahead_channels, pre_lookahead_len)
        layers = dict(dropout_rate=dropout_rate, normalize_before=normalize_before, **layer_options)
        self.encoders = conformer_layers(num_blocks, output_size, **layers)
        self.up_layer = Upsample1D(output_size, output_size, up_stride, up_scale_factor)
        self.up_embed = linear_input(input_size, output_size, dropout_rate, positional_dropout_rate)
        self.up_encoders = conformer_layers(num_up_blocks, output_size, **layers)

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor,
                streaming: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``xs [B, T, input_size]`` → ``([B, T·stride, output_size], masks bool [B, 1, T·stride])``."""
        chunk = self.static_chunk_size if streaming else 0
        masks = valid_mask(xs_lens, xs.shape[1])[:, None]
        xs, pos_emb = self.embed(xs)
        xs = self.pre_lookahead_layer(xs)
        xs = run_layers(self.encoders, xs, masks, pos_emb, chunk)
        xs, xs_lens = self.up_layer(xs.transpose(1, 2).contiguous(), xs_lens)
        xs = xs.transpose(1, 2).contiguous()
        masks = valid_mask(xs_lens, xs.shape[1])[:, None]
        xs, pos_emb = self.up_embed(xs)
        xs = run_layers(self.up_encoders, xs, masks, pos_emb, chunk * self.up_layer.stride)
        return self._final(xs), masks


# ---- building from a release yaml node ---------------------------------------------------------------------------

CONFORMER = "cosyvoice.transformer.encoder.ConformerEncoder"
UPSAMPLE_CONFORMER = "cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder"
UPSAMPLE_CONFORMER_V2 = "stepvocoder.cosyvoice2.transformer.upsample_encoder_v2.UpsampleConformerEncoderV2"

# Upstream's constructor defaults (ConformerEncoder and UpsampleConformerEncoder share them).
_CONFORMER_DEFAULTS: dict[str, Any] = dict(
    output_size=256, attention_heads=4, linear_units=2048, num_blocks=6, dropout_rate=0.1,
    positional_dropout_rate=0.1, attention_dropout_rate=0.0, input_layer="conv2d", pos_enc_layer_type="rel_pos",
    normalize_before=True, static_chunk_size=0, use_dynamic_chunk=False, global_cmvn=None,
    use_dynamic_left_chunk=False, positionwise_conv_kernel_size=1, macaron_style=True,
    selfattention_layer_type="rel_selfattn", activation_type="swish", use_cnn_module=True, cnn_module_kernel=15,
    causal=False, cnn_module_norm="batch_norm", key_bias=True, gradient_checkpointing=False)
_V2_DEFAULTS: dict[str, Any] = dict(
    output_size=256, input_layer="linear", pre_lookahead_len=3, num_blocks=6, num_up_blocks=4, up_stride=2,
    up_scale_factor=2, attention_heads=4, pos_enc_layer_type="rel_pos_espnet", selfattention_layer_type="rel_selfattn",
    key_bias=True, linear_units=2048, dropout_rate=0.1, positional_dropout_rate=0.1, attention_dropout_rate=0.0,
    normalize_before=True, activation_type="swish")
# CosyVoice2's UpsampleConformerEncoder fixes these instead of reading them.
_COSYVOICE2_FIXED = dict(lookahead_channels=512, pre_lookahead_len=3, up_stride=2, up_scale_factor=2.0, num_up_blocks=4)


def _layer_options(node, o: dict[str, Any]) -> dict[str, Any]:
    require(node, o, "input_layer", ("linear",))
    require(node, o, "pos_enc_layer_type", ("rel_pos_espnet",))
    require(node, o, "selfattention_layer_type", ("rel_selfattn",))
    require(node, o, "activation_type", tuple(ACTIVATIONS))
    layer = dict(heads=o["attention_heads"], linear_units=o["linear_units"],
                 attention_dropout_rate=o["attention_dropout_rate"], activation=ACTIVATIONS[o["activation_type"]](),
                 key_bias=bool(o["key_bias"]))
    if node.cls == UPSAMPLE_CONFORMER_V2:
        return layer
    for key in ("use_dynamic_chunk", "global_cmvn"):
        require(node, o, key, (False, None))
    require(node, o, "cnn_module_norm", ("batch_norm", "layer_norm"))
    if o["use_cnn_module"] and not o["causal"] and o["cnn_module_kernel"] % 2 == 0:
        raise FlowLoadError(f"{node.cls}: cnn_module_kernel={o['cnn_module_kernel']} must be odd unless causal")
    return dict(layer, macaron_style=bool(o["macaron_style"]), use_cnn_module=bool(o["use_cnn_module"]),
                cnn_module_kernel=o["cnn_module_kernel"], cnn_module_norm=o["cnn_module_norm"],
                causal=bool(o["causal"]))


def build_encoder(node) -> ConformerEncoder | UpsampleConformerEncoder:
    """The encoder of a yaml ``encoder:`` node (one of :data:`CONFORMER`, :data:`UPSAMPLE_CONFORMER`,
    :data:`UPSAMPLE_CONFORMER_V2`).

    Raises:
        FlowLoadError: another class, or an option value this module does not implement (named).
    """
    if node.cls == UPSAMPLE_CONFORMER_V2:
        o = read_options(node, _V2_DEFAULTS, required=("input_size",), extra_ok=True)
        fixed = dict(lookahead_channels=o["output_size"], pre_lookahead_len=o["pre_lookahead_len"],
                     up_stride=o["up_stride"], up_scale_factor=float(o["up_scale_factor"]),
                     num_up_blocks=o["num_up_blocks"])
    elif node.cls in (CONFORMER, UPSAMPLE_CONFORMER):
        o = read_options(node, _CONFORMER_DEFAULTS, required=("input_size",))
        fixed = dict(_COSYVOICE2_FIXED)
    else:
        raise FlowLoadError(f"encoder class {node.cls} is not supported (supported: {CONFORMER}, "
                            f"{UPSAMPLE_CONFORMER}, {UPSAMPLE_CONFORMER_V2})")
    common = dict(input_size=o["input_size"], output_size=o["output_size"], num_blocks=o["num_blocks"],
                  dropout_rate=o["dropout_rate"], positional_dropout_rate=o["positional_dropout_rate"],
                  normalize_before=bool(o["normalize_before"]), **_layer_options(node, o))
    if node.cls == CONFORMER:
        return ConformerEncoder(static_chunk_size=int(o["static_chunk_size"]), **common)
    if node.cls == UPSAMPLE_CONFORMER and o["output_size"] != fixed["lookahead_channels"]:
        raise FlowLoadError(f"{node.cls}: output_size={o['output_size']} is not supported: upstream fixes 512 channels "
                            f"in its pre-lookahead and upsampling layers")
    return UpsampleConformerEncoder(static_chunk_size=int(o.get("static_chunk_size", 0)), **fixed, **common)
