"""HiFT's neural-source-filter excitation: the mel → F0 predictor and the harmonic sine source.

HiFT (CosyVoice's vocoder, NSF + iSTFTNet) does not invert the mel alone: it first predicts a
pitch contour from the mel (:class:`ConvRNNF0Predictor`), turns it into a sum of harmonics at the
waveform rate (:class:`SourceModuleHnNSF`), and fuses the STFT of that excitation into every
upsampling stage of the generator (:mod:`audiotune.models.flow.native.hift`).

The harmonic source, for ``f0`` in Hz at the waveform rate and harmonics ``h = 1 .. H+1``:

* voiced where ``f0 > voiced_threshold``; a harmonic is ``sine_amp · sin(φ_h)`` there, plus
  Gaussian noise of std ``noise_std`` (voiced) or ``sine_amp / 3`` (unvoiced, where the sine is 0);
* the phase ``φ_h`` accumulates ``h · f0 / sample_rate`` turns per sample. Two ways exist upstream,
  and which one a release uses is part of its sound:

  - ``"cumsum"`` (CosyVoice-300M at 22.05 kHz): a running sum of the per-sample phase increment,
    wrapped to ``[0, 1)`` turns, with a random start phase per overtone (the fundamental starts at 0);
  - ``"interpolated"`` (CosyVoice2 at 24 kHz, Step-Audio-EditX): the per-sample increment (wrapped,
    plus the random start phase) is linearly resampled down to the frame rate, summed there, scaled
    back and linearly resampled up. The phase is smooth between frames and cheaper to integrate.

The merged excitation is ``tanh(Linear(H+1 → 1)(harmonics))``. The random start phases and noise
come from torch's global generator, as upstream; seed it for a repeatable waveform.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from audiotune.models.flow.native.weightnorm import WNConv1d

SINE_KINDS = ("cumsum", "interpolated")


class ConvRNNF0Predictor(nn.Module):
    """Mel ``[B, n_mels, T]`` → F0 ``[B, T]`` (Hz, non-negative): five weight-normalised
    ``kernel 3`` convolutions with ELU, then a per-frame linear layer and ``abs``.

    Module names follow upstream (``condnet.{0,2,4,6,8}`` are the convolutions, the odd
    indices their parameter-free ELUs; ``classifier``).

    Args:
        num_class: Outputs of the classifier (1: the F0 itself).
        in_channels: Mel bins.
        cond_channels: Width of the convolutions.
    """

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for k in range(5):
            layers += [WNConv1d(in_channels if k == 0 else cond_channels, cond_channels, 3, padding=1), nn.ELU()]
        self.num_class = num_class
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        hidden = self.condnet(mel).transpose(1, 2)
        return self.classifier(hidden).squeeze(-1).abs()


class SineGen(nn.Module):
    """Harmonic sines + noise from F0 at the waveform rate (no parameters); see the module docstring.

    Args:
        sample_rate: Waveform rate in Hz.
        harmonic_num: Overtones above the fundamental (``H``; ``H + 1`` sines in all).
        sine_amp: Amplitude of each sine.
        noise_std: Noise std in voiced samples.
        voiced_threshold: F0 (Hz) above which a sample is voiced.
        kind: ``"cumsum"`` or ``"interpolated"`` phase accumulation.
        upsample_scale: Waveform samples per mel frame (the ``"interpolated"`` kind's resampling factor).
    """

    def __init__(self, sample_rate: int, harmonic_num: int = 0, sine_amp: float = 0.1, noise_std: float = 0.003,
                 voiced_threshold: float = 0.0, kind: str = "cumsum", upsample_scale: int = 1) -> None:
        super().__init__()
        if kind not in SINE_KINDS:
            raise ValueError(f"sine source kind {kind!r}: expected one of {', '.join(SINE_KINDS)}")
        self.sample_rate, self.harmonic_num = sample_rate, harmonic_num
        self.sine_amp, self.noise_std, self.voiced_threshold = sine_amp, noise_std, voiced_threshold
        self.kind, self.upsample_scale = kind, upsample_scale

    def _start_phase(self, batch: int, device: torch.device) -> torch.Tensor:
        """Random start phase per overtone in turns ``[B, H+1]``; the fundamental's is 0."""
        start = torch.rand(batch, self.harmonic_num + 1, device=device)
        start[:, 0] = 0.0
        return start

    def _cumsum_phase(self, turns: torch.Tensor) -> torch.Tensor:
        """``turns`` ``[B, L, H+1]`` per sample → phase (radians) with a uniform random start."""
        wrapped = torch.cumsum(turns, dim=1) % 1.0
        start = (torch.rand(turns.shape[0], 1, turns.shape[2], device=turns.device) * 2.0 - 1.0) * math.pi
        start[:, :, 0] = 0.0
        return 2.0 * math.pi * wrapped + start

    def _interpolated_phase(self, turns: torch.Tensor) -> torch.Tensor:
        """``turns`` ``[B, L, H+1]`` → phase (radians) integrated at the frame rate, resampled linearly."""
        turns = turns % 1.0
        turns[:, 0, :] += self._start_phase(turns.shape[0], turns.device)
        scale = self.upsample_scale
        frames = F.interpolate(turns.transpose(1, 2), scale_factor=1.0 / scale, mode="linear")
        phase = torch.cumsum(frames, dim=2) * (2.0 * math.pi)
        return F.interpolate(phase * scale, scale_factor=scale, mode="linear").transpose(1, 2)

    @torch.no_grad()
    def forward(self, f0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``f0`` ``[B, L, 1]`` (Hz) → ``(sines [B, L, H+1], voiced [B, L, 1])``."""
        harmonics = torch.arange(1, self.harmonic_num + 2, device=f0.device, dtype=f0.dtype)
        turns = f0 * harmonics / self.sample_rate  # [B, L, H+1] turns per sample
        phase = self._cumsum_phase(turns) if self.kind == "cumsum" else self._interpolated_phase(turns)
        sines = self.sine_amp * torch.sin(phase)
        voiced = (f0 > self.voiced_threshold).to(sines.dtype)
        noise_amp = voiced * self.noise_std + (1.0 - voiced) * (self.sine_amp / 3.0)
        return sines * voiced + noise_amp * torch.randn_like(sines), voiced


class SourceModuleHnNSF(nn.Module):
    """The harmonic-plus-noise source: :class:`SineGen`, then ``tanh(Linear(H+1 → 1))``.

    Args:
        sample_rate: Waveform rate in Hz.
        upsample_scale: Waveform samples per mel frame.
        harmonic_num: Overtones above the fundamental.
        sine_amp: Sine amplitude (the yaml's ``nsf_alpha``).
        add_noise_std: Voiced noise std (``nsf_sigma``).
        voiced_threshold: Voicing threshold in Hz (``nsf_voiced_threshold``).
        kind: Phase accumulation, see :class:`SineGen`.
    """

    def __init__(self, sample_rate: int, upsample_scale: int, harmonic_num: int = 0, sine_amp: float = 0.1,
                 add_noise_std: float = 0.003, voiced_threshold: float = 0.0, kind: str = "cumsum") -> None:
        super().__init__()
        self.sine_amp = sine_amp
        self.l_sin_gen = SineGen(sample_rate, harmonic_num, sine_amp, add_noise_std, voiced_threshold, kind,
                                 upsample_scale)
        self.l_linear = nn.Linear(harmonic_num + 1, 1)
        self.l_tanh = nn.Tanh()

    def forward(self, f0: torch.Tensor) -> torch.Tensor:
        """``f0`` ``[B, L, 1]`` (Hz, waveform rate) → the excitation ``[B, L, 1]``."""
        sines, _ = self.l_sin_gen(f0)
        return self.l_tanh(self.l_linear(sines))
