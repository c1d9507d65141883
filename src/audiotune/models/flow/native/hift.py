"""HiFT, CosyVoice's mel → waveform vocoder (HiFTNet: neural source filter + iSTFTNet), built from the yaml.

One class covers the released variants, every size read from the yaml ``hift:`` node (upstream's
constructor defaults for keys it omits):

* CosyVoice-300M: 22.05 kHz, ``upsample_rates [8, 8]``, the ``"cumsum"`` sine source;
* CosyVoice2 and Step-Audio-EditX: 24 kHz, ``[8, 5, 3]``, the ``"interpolated"`` sine source
  (:mod:`audiotune.models.flow.native.source`).

:meth:`HiFTGenerator.decode` (mel + excitation → waveform):

1. the excitation's STFT (``n_fft``/``hop_len`` from ``istft_params``, periodic Hann, centred),
   real and imaginary parts stacked → ``[B, n_fft + 2, frames]``;
2. ``conv_pre`` (kernel 7) on the mel;
3. per upsampling stage ``i``: leaky ReLU, transposed conv ``ups[i]`` (the last stage padded by
   one reflected frame on the left), plus the excitation STFT brought to that rate by
   ``source_downs[i]`` (a strided conv) and ``source_resblocks[i]``; then the mean of the
   ``resblock_kernel_sizes`` residual blocks (Snake activations, weight-normalised dilated convs);
4. leaky ReLU (slope 0.01, as upstream), ``conv_post`` → ``n_fft + 2`` channels: the first
   ``n_fft/2 + 1`` are the log-magnitude (``exp``, clipped at 100), the rest go through ``sin``
   as the phase; inverse STFT; clamp to ``±audio_limit``.

:meth:`HiFTGenerator.inference` predicts F0 from the mel, repeats it to the waveform rate, makes
the harmonic excitation and decodes. The state dict has upstream's keys and shapes, with the
legacy weight-norm names (:mod:`audiotune.models.flow.native.weightnorm`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from audiotune.models.flow.io import FlowLoadError
from audiotune.models.flow.native.source import ConvRNNF0Predictor, SourceModuleHnNSF
from audiotune.models.flow.native.weightnorm import WNConv1d, WNConvTranspose1d

log = logging.getLogger(__name__)

# supported `hift:` classes → how the sine source accumulates phase ("by-rate": cumsum at 22.05 kHz)
HIFT_CLASSES = {
    "cosyvoice.hifigan.generator.HiFTGenerator": "by-rate",
    "stepvocoder.cosyvoice2.hifigan.generator.HiFTGenerator": "interpolated",
}
F0_CLASSES = ("cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor",
              "stepvocoder.cosyvoice2.hifigan.f0_predictor.ConvRNNF0Predictor")
HIFT_DEFAULTS: dict[str, Any] = {  # upstream HiFTGenerator.__init__ defaults
    "in_channels": 80, "base_channels": 512, "nb_harmonics": 8, "sampling_rate": 22050, "nsf_alpha": 0.1,
    "nsf_sigma": 0.003, "nsf_voiced_threshold": 10, "upsample_rates": [8, 8], "upsample_kernel_sizes": [16, 16],
    "istft_params": {"n_fft": 16, "hop_len": 4}, "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "source_resblock_kernel_sizes": [7, 11],
    "source_resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]], "lrelu_slope": 0.1, "audio_limit": 0.99,
    "f0_predictor": None,
}
F0_DEFAULTS: dict[str, Any] = {"num_class": 1, "in_channels": 80, "cond_channels": 512}


class Snake(nn.Module):
    """``x + sin²(α·x) / (α + 1e-9)`` with a learned per-channel ``alpha`` (linear scale), on ``[B, C, T]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """HiFi-GAN residual block: per dilation ``d``, ``x += conv(snake(conv_d(snake(x))))`` (same length)."""

    def __init__(self, channels: int, kernel_size: int, dilations: list[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(WNConv1d(channels, channels, kernel_size, dilation=d,
                                             padding=(kernel_size * d - d) // 2) for d in dilations)
        self.convs2 = nn.ModuleList(WNConv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2)
                                    for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2,
                                            strict=True):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class HiFTGenerator(nn.Module):
    """Mel ``[B, in_channels, T]`` → waveform ``[B, T · prod(upsample_rates) · hop_len]``.

    Arguments are upstream's (the yaml ``hift:`` keys); ``f0_predictor`` is a built
    :class:`ConvRNNF0Predictor` or ``None`` (then only :meth:`decode` works). ``sine_kind`` picks the
    excitation's phase accumulation (:class:`audiotune.models.flow.native.source.SineGen`).
    """

    def __init__(self, in_channels: int, base_channels: int, nb_harmonics: int, sampling_rate: int,
                 nsf_alpha: float, nsf_sigma: float, nsf_voiced_threshold: float, upsample_rates: list[int],
                 upsample_kernel_sizes: list[int], istft_params: dict[str, int], resblock_kernel_sizes: list[int],
                 resblock_dilation_sizes: list[list[int]], source_resblock_kernel_sizes: list[int],
                 source_resblock_dilation_sizes: list[list[int]], lrelu_slope: float, audio_limit: float,
                 f0_predictor: nn.Module | None, sine_kind: str) -> None:
        super().__init__()
        self.sample_rate, self.in_channels = int(sampling_rate), int(in_channels)
        self.n_fft, self.istft_hop = int(istft_params["n_fft"]), int(istft_params["hop_len"])
        self.lrelu_slope, self.audio_limit = float(lrelu_slope), float(audio_limit)
        self.num_kernels = len(resblock_kernel_sizes)
        self.upsample_rates = [int(u) for u in upsample_rates]
        self.hop_length = math.prod(self.upsample_rates) * self.istft_hop  # waveform samples per mel frame
        self.sine_kind = sine_kind
        self.m_source = SourceModuleHnNSF(self.sample_rate, self.hop_length, nb_harmonics, nsf_alpha, nsf_sigma,
                                          nsf_voiced_threshold, sine_kind)
        self.conv_pre = WNConv1d(in_channels, base_channels, 7, padding=3)
        widths = [base_channels // 2 ** i for i in range(len(self.upsample_rates) + 1)]
        stages = zip(self.upsample_rates, upsample_kernel_sizes, strict=True)
        self.ups = nn.ModuleList(WNConvTranspose1d(widths[i], widths[i + 1], k, u, padding=(k - u) // 2)
                                 for i, (u, k) in enumerate(stages))
        # the excitation STFT runs at the last stage's rate; stage i sees it downsampled by the rates after it
        down = [math.prod(self.upsample_rates[i + 1:]) for i in range(len(self.upsample_rates))]
        spec = self.n_fft + 2
        self.source_downs = nn.ModuleList(
            nn.Conv1d(spec, widths[i + 1], 1) if d == 1 else nn.Conv1d(spec, widths[i + 1], 2 * d, d, padding=d // 2)
            for i, d in enumerate(down))
        self.source_resblocks = nn.ModuleList(
            ResBlock(widths[i + 1], k, dil)
            for i, (k, dil) in enumerate(zip(source_resblock_kernel_sizes, source_resblock_dilation_sizes,
                                               strict=True)))
        self.resblocks = nn.ModuleList(ResBlock(widths[i + 1], k, dil) for i in range(len(self.ups))
                                       for k, dil in zip(resblock_kernel_sizes, resblock_dilation_sizes, strict=True))
        self.conv_post = WNConv1d(widths[-1], spec, 7, padding=3)
        self.f0_predictor = f0_predictor
        window = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64).to(torch.float32)
        self.register_buffer("stft_window", window, persistent=False)

    # ------------------------------------------------------------------------------------------ pieces
    def _stft(self, wav: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` → real and imaginary parts stacked, ``[B, n_fft + 2, L / hop + 1]``."""
        spec = torch.stft(wav, self.n_fft, self.istft_hop, self.n_fft, window=self.stft_window.to(wav.dtype),
                          return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        magnitude = magnitude.clamp(max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, self.n_fft, self.istft_hop, self.n_fft, window=self.stft_window.to(magnitude.dtype))

    def decode(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Mel ``x`` ``[B, in_channels, T]`` + excitation ``s`` ``[B, 1, T · hop_length]`` → ``[B, T · hop_length]``."""
        if s.shape[-1] != x.shape[-1] * self.hop_length:
            raise ValueError(f"hift.decode: the source has {s.shape[-1]} samples, the mel {x.shape[-1]} frames × "
                             f"{self.hop_length} = {x.shape[-1] * self.hop_length}")
        source = self._stft(s.squeeze(1))
        x = self.conv_pre(x)
        last = len(self.ups) - 1
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.lrelu_slope))
            if i == last:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](source))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            total = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))
        bins = self.n_fft // 2 + 1
        wav = self._istft(torch.exp(x[:, :bins]), torch.sin(x[:, bins:]))
        return wav.clamp(-self.audio_limit, self.audio_limit)

    def excitation(self, mel: torch.Tensor) -> torch.Tensor:
        """The NSF excitation ``[B, 1, T · hop_length]`` of a mel: predicted F0, repeated per sample, harmonics."""
        if self.f0_predictor is None:
            raise FlowLoadError("hift: the yaml gives no f0_predictor, so this HiFT can only decode a given source")
        f0 = self.f0_predictor(mel)  # [B, T] Hz
        f0 = f0.repeat_interleave(self.hop_length, dim=1)[:, :, None]  # nearest upsampling to the waveform rate
        return self.m_source(f0).transpose(1, 2)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Mel ``[B, in_channels, T]`` → waveform ``[B, T · hop_length]`` (F0 predictor → source → decode)."""
        return self.decode(mel, self.excitation(mel))

    @torch.inference_mode()
    def inference(self, mel: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without autograd."""
        return self.forward(mel)


# ---------------------------------------------------------------------------------------- yaml and files
def _arguments(node: Any, defaults: dict[str, Any], what: str) -> dict[str, Any]:
    kwargs = dict(getattr(node, "kwargs", {}) or {})
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown or getattr(node, "args", ()):
        extra = ", ".join(unknown) or "positional arguments"
        raise FlowLoadError(f"{what}: {node.cls} takes no {extra} (known: {', '.join(sorted(defaults))})")
    return {**defaults, **kwargs}


def build_f0_predictor(node: Any) -> ConvRNNF0Predictor:
    """The F0 predictor of a yaml ``hift.f0_predictor`` node (a ``New``).

    Raises:
        FlowLoadError: the class is not a supported ``ConvRNNF0Predictor``, or an argument is unknown.
    """
    cls = getattr(node, "cls", None)
    if cls not in F0_CLASSES:
        raise FlowLoadError(f"hift.f0_predictor: class {cls or type(node).__name__} is not supported "
                            f"(supported: {', '.join(F0_CLASSES)})")
    args = _arguments(node, F0_DEFAULTS, "hift.f0_predictor")
    return ConvRNNF0Predictor(int(args["num_class"]), int(args["in_channels"]), int(args["cond_channels"]))


def build_hift(node: Any) -> HiFTGenerator:
    """A :class:`HiFTGenerator` from the yaml ``hift:`` node (a ``hyperyaml.New``), randomly initialised.

    Raises:
        FlowLoadError: an unsupported class (BigVGAN is named as such), an unknown argument, or sizes
            that do not fit together.
    """
    cls = getattr(node, "cls", None)
    if cls is None:
        raise FlowLoadError(f"hift: expected a !new: HiFTGenerator node, got {type(node).__name__}")
    if cls.rsplit(".", 1)[-1].lower().startswith("bigvgan"):
        raise FlowLoadError(f"hift: {cls} is a BigVGAN vocoder, which is not supported; use the release's "
                            "HiFTGenerator (hift.pt)")
    if cls not in HIFT_CLASSES:
        raise FlowLoadError(f"hift: class {cls} is not supported (supported: {', '.join(HIFT_CLASSES)})")
    args = _arguments(node, HIFT_DEFAULTS, "hift")
    stages = len(args["upsample_rates"])
    for key in ("upsample_kernel_sizes", "source_resblock_kernel_sizes", "source_resblock_dilation_sizes"):
        if len(args[key]) != stages:
            raise FlowLoadError(f"hift.{key}: {len(args[key])} entries for {stages} upsample_rates "
                                f"{args['upsample_rates']}")
    if len(args["resblock_dilation_sizes"]) != len(args["resblock_kernel_sizes"]) or not args["resblock_kernel_sizes"]:
        raise FlowLoadError(f"hift.resblock_dilation_sizes: {len(args['resblock_dilation_sizes'])} entries for "
                            f"{len(args['resblock_kernel_sizes'])} resblock_kernel_sizes")
    istft = dict(args["istft_params"])
    if set(istft) != {"n_fft", "hop_len"}:
        raise FlowLoadError(f"hift.istft_params: expected n_fft and hop_len, got {sorted(istft)}")
    f0 = args.pop("f0_predictor")
    kind = HIFT_CLASSES[cls]
    if kind == "by-rate":  # CosyVoice picks its sine generator by rate: the original one at 22.05 kHz
        kind = "cumsum" if int(args["sampling_rate"]) == 22050 else "interpolated"
    return HiFTGenerator(**args, f0_predictor=None if f0 is None else build_f0_predictor(f0), sine_kind=kind)


def _from_other_layouts(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torch's parametrized weight-norm keys (``X.parametrizations.weight.original0/1``) to the
    legacy ``X.weight_g/v``, and split plain ``X.weight`` (weight norm removed) into ``g = ‖w‖``, ``v = w``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".parametrizations.weight.original0"):
            out[key[: -len("parametrizations.weight.original0")] + "weight_g"] = value
        elif key.endswith(".parametrizations.weight.original1"):
            out[key[: -len("parametrizations.weight.original1")] + "weight_v"] = value
        elif key.endswith(".weight") and key not in expected and key[:-len("weight")] + "weight_v" in expected:
            stem = key[:-len("weight")]
            out[stem + "weight_g"] = torch.norm_except_dim(value, 2, 0)
            out[stem + "weight_v"] = value
        else:
            out[key] = value
    return out


def load_hift_state(model: HiFTGenerator, state: dict[str, Any], source: str = "hift.pt") -> None:
    """Load a release ``hift.pt`` state dict into ``model`` strictly.

    The release's legacy ``weight_g`` / ``weight_v`` keys are the model's own parameter names;
    torch's parametrized names and plain ``weight`` (weight norm removed) are converted too.

    Raises:
        FlowLoadError: a non-tensor value, or missing / unexpected / mis-shaped tensors (all listed).
    """
    from audiotune.models.flow.io import load_state_dict_strict

    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FlowLoadError(f"{source}: expected a state dict of tensors (a HiFTGenerator's hift.pt)")
    expected = model.state_dict()
    state = _from_other_layouts(state, expected)
    load_state_dict_strict(model, {k: v.contiguous() for k, v in state.items()}, source)
    log.info("HiFT weights %s: %d tensors, %d Hz, %d samples per frame", source, len(state), model.sample_rate,
             model.hop_length)


def hift_state_dict(model: HiFTGenerator) -> dict[str, torch.Tensor]:
    """The state dict to ``torch.save`` as ``hift.pt``: upstream's keys, order and shapes (legacy
    weight-norm names), as contiguous CPU copies (a snapshot: later training does not change it)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def load_hift_file(model: HiFTGenerator, path: Any) -> None:
    """:func:`load_hift_state` from a ``hift.pt`` file (``torch.load(weights_only=True)``).

    Raises:
        FlowLoadError: the file is missing, truncated, holds non-tensor objects or does not fit.
    """
    import pickle
    import zipfile
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FlowLoadError(f"{path}: no such file (the release's HiFT weights)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise FlowLoadError(f"{path}: not a readable weights-only torch file ({str(err).splitlines()[0]})") from None
    load_hift_state(model, state, str(path))
