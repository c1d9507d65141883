"""Mel → waveform: a built-in Griffin-Lim vocoder, or a pluggable TorchScript / ONNX vocoder checkpoint.

The project's mel is CosyVoice's (:mod:`audiotune.tokenization.mel`): ``log(clamp(fb @ |STFT|, 1e-5))``
with a librosa Slaney filterbank, reflect padding of ``(n_fft - hop) / 2`` on each side and
``center=False``, so frame ``k`` covers samples ``[k·hop - pad, k·hop - pad + n_fft)`` and ``F``
frames stand for ``F · hop`` samples.

:class:`GriffinLimVocoder` inverts that without any trained weights: ``exp``, the filterbank's
pseudo-inverse (clamped at zero) for the linear magnitude, then fast Griffin-Lim (Perraudin et
al., momentum 0.99) on exactly that STFT framing (overlap-add done with ``fold``, so the analysis
and synthesis frames line up sample for sample). It is intelligible but buzzy: good for
listening to training samples, not for a product; point ``flow.vocoder`` at a HiFT/HiFi-GAN
export for that.

A checkpoint vocoder maps ``mel [B, n_mels, T]`` float32 to ``wav [B, samples]`` (or
``[B, 1, samples]``): a TorchScript file (``.pt``, ``.jit``, ``.ts``, ``.torchscript``; loaded
with ``torch.jit.load``) or an ONNX file (``.onnx``; onnxruntime, first input and output).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

GRIFFIN_LIM = "griffin-lim"
TORCHSCRIPT_SUFFIXES = (".pt", ".jit", ".ts", ".torchscript")
ONNX_SUFFIXES = (".onnx",)
LOG_FLOOR = 1e-5


class VocoderError(Exception):
    """A vocoder spec or checkpoint that cannot be used."""


class Vocoder(Protocol):
    """Turns log-mels into audio at :attr:`sample_rate`."""

    sample_rate: int
    hop_length: int

    def __call__(self, mel: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[n_mels, T]`` → ``[samples]``, or ``[B, n_mels, T]`` → ``[B, samples]`` (float32)."""
        ...


def _mel_settings(mel_cfg: Any) -> dict[str, Any]:
    """A dict of mel settings from a Tokens ``mel.json`` dict, a ``MelConfig`` or a ``MelExtractor``."""
    if isinstance(mel_cfg, dict):
        return dict(mel_cfg)
    if hasattr(mel_cfg, "resolved"):
        return mel_cfg.resolved()
    if hasattr(mel_cfg, "to_dict"):
        return mel_cfg.to_dict()
    raise VocoderError(f"mel settings: expected a dict, MelConfig or MelExtractor, got {type(mel_cfg).__name__}")


def _as_batch(mel: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, bool]:
    x = torch.as_tensor(np.asarray(mel) if not isinstance(mel, torch.Tensor) else mel).detach().float().cpu()
    if x.dim() == 2:
        return x[None], True
    if x.dim() != 3:
        raise VocoderError(f"vocoder: mel must be [n_mels, T] or [B, n_mels, T], got {tuple(x.shape)}")
    return x, False


class GriffinLimVocoder:
    """Griffin-Lim inversion of the CosyVoice log-mel; see the module docstring.

    Args:
        mel_cfg: The mel settings (``sample_rate``, ``n_fft``, ``hop_length``, ``win_length``,
            ``n_mels``, ``fmin``, ``fmax``).
        n_iter: Griffin-Lim iterations.
        momentum: Fast Griffin-Lim momentum (0 gives plain Griffin-Lim).
        seed: Seed of the initial phases (output is deterministic).
    """

    def __init__(self, mel_cfg: Any, n_iter: int = 32, momentum: float = 0.99, seed: int = 0) -> None:
        import librosa

        s = _mel_settings(mel_cfg)
        self.sample_rate = int(s["sample_rate"])
        self.n_fft, self.hop_length = int(s["n_fft"]), int(s["hop_length"])
        self.win_length = int(s.get("win_length") or self.n_fft)
        self.n_mels = int(s["n_mels"])
        if s.get("center"):
            raise VocoderError("griffin-lim: only center=False mels (both CosyVoice presets) are supported")
        self.pad = (self.n_fft - self.hop_length) // 2
        self.n_iter, self.momentum, self.seed = n_iter, momentum, seed
        fb = librosa.filters.mel(sr=self.sample_rate, n_fft=self.n_fft, n_mels=self.n_mels,
                                 fmin=float(s.get("fmin") or 0.0), fmax=s.get("fmax"), htk=False, norm="slaney")
        self.inverse = torch.from_numpy(np.linalg.pinv(fb).astype(np.float32))  # [n_freq, n_mels]
        window = torch.hann_window(self.win_length)
        left = (self.n_fft - self.win_length) // 2
        self.window = F.pad(window, (left, self.n_fft - self.win_length - left))  # as torch.stft pads it

    def magnitude(self, mel: torch.Tensor) -> torch.Tensor:
        """Linear STFT magnitude ``[B, n_freq, T]`` from log-mel ``[B, n_mels, T]``."""
        return (self.inverse @ mel.exp()).clamp(min=0.0)

    def _stft(self, y: torch.Tensor) -> torch.Tensor:
        return torch.stft(y, self.n_fft, self.hop_length, window=self.window, center=False, return_complex=True)

    def _istft(self, spec: torch.Tensor, envelope: torch.Tensor) -> torch.Tensor:
        frames = torch.fft.irfft(spec, n=self.n_fft, dim=1) * self.window[None, :, None]  # [B, n_fft, T]
        length = (spec.shape[-1] - 1) * self.hop_length + self.n_fft
        y = F.fold(frames, (1, length), (1, self.n_fft), stride=(1, self.hop_length))[:, 0, 0]
        return y / envelope

    def __call__(self, mel: np.ndarray | torch.Tensor) -> np.ndarray:
        batch, single = _as_batch(mel)
        if batch.shape[1] != self.n_mels:
            raise VocoderError(f"griffin-lim: mel has {batch.shape[1]} bins, the vocoder {self.n_mels}")
        frames = batch.shape[-1]
        if frames == 0:
            out = np.zeros((batch.shape[0], 0), dtype=np.float32)
            return out[0] if single else out
        with torch.inference_mode():
            mag = self.magnitude(batch)
            ones = torch.ones(1, self.n_fft, frames)
            length = (frames - 1) * self.hop_length + self.n_fft
            envelope = F.fold(ones * self.window.square()[None, :, None], (1, length), (1, self.n_fft),
                              stride=(1, self.hop_length))[:, 0, 0].clamp(min=1e-8)
            gen = torch.Generator().manual_seed(self.seed)
            angles = torch.exp(2j * torch.pi * torch.rand(mag.shape, generator=gen))
            previous = torch.zeros_like(angles)
            for _ in range(self.n_iter):
                rebuilt = self._stft(self._istft(mag * angles, envelope))
                angles = rebuilt - (self.momentum / (1 + self.momentum)) * previous
                angles = angles / angles.abs().clamp(min=1e-16)
                previous = rebuilt
            y = self._istft(mag * angles, envelope)[:, self.pad:self.pad + frames * self.hop_length]
        out = y.numpy().astype(np.float32)
        return out[0] if single else out


class TorchScriptVocoder:
    """A TorchScript vocoder: ``module(mel [B, n_mels, T]) -> wav``."""

    def __init__(self, path: Path, sample_rate: int, hop_length: int) -> None:
        try:
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as err:
            raise VocoderError(f"{path}: not a loadable TorchScript vocoder ({err})") from None
        self.sample_rate, self.hop_length = sample_rate, hop_length

    def __call__(self, mel: np.ndarray | torch.Tensor) -> np.ndarray:
        batch, single = _as_batch(mel)
        with torch.inference_mode():
            wav = self.module(batch)
        out = _flatten_wav(torch.as_tensor(wav).float().numpy(), batch.shape[0])
        return out[0] if single else out


class OnnxVocoder:
    """An ONNX vocoder run with onnxruntime (CPU, or CUDA when available): first input → first output."""

    def __init__(self, path: Path, sample_rate: int, hop_length: int) -> None:
        import onnxruntime as ort

        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as err:  # onnxruntime raises its own untyped errors for bad files  # noqa: BLE001
            raise VocoderError(f"{path}: not a loadable ONNX vocoder ({err})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.sample_rate, self.hop_length = sample_rate, hop_length

    def __call__(self, mel: np.ndarray | torch.Tensor) -> np.ndarray:
        batch, single = _as_batch(mel)
        wav = self.session.run(None, {self.input_name: batch.numpy()})[0]
        out = _flatten_wav(np.asarray(wav, dtype=np.float32), batch.shape[0])
        return out[0] if single else out


def _flatten_wav(wav: np.ndarray, batch: int) -> np.ndarray:
    if wav.ndim == 3 and wav.shape[1] == 1:
        wav = wav[:, 0]
    if wav.ndim == 1 and batch == 1:
        wav = wav[None]
    if wav.ndim != 2 or wav.shape[0] != batch:
        raise VocoderError(f"vocoder returned shape {wav.shape}; expected [batch, samples] or [batch, 1, samples]")
    return wav.astype(np.float32, copy=False)


def load_vocoder(spec: str | None, mel_cfg: Any) -> Vocoder:
    """The vocoder a spec names.

    Args:
        spec: ``None`` or ``"griffin-lim"`` (built in; ``"griffin-lim:64"`` sets the iterations),
            or a local path / ``s3://`` URI of a TorchScript (``.pt``, ``.jit``, ``.ts``,
            ``.torchscript``) or ONNX (``.onnx``) vocoder for this mel configuration.
        mel_cfg: The mel settings the mels were computed with (a Tokens ``mel.json`` dict, a
            ``MelConfig`` or a ``MelExtractor``); give the sample rate and hop.

    Raises:
        VocoderError: An unknown spec, or a checkpoint that cannot be loaded.
        FileNotFoundError: The checkpoint does not exist.
    """
    settings = _mel_settings(mel_cfg)
    if spec is None or spec == GRIFFIN_LIM or spec.startswith(GRIFFIN_LIM + ":"):
        n_iter = 32
        if spec and ":" in spec:
            try:
                n_iter = int(spec.split(":", 1)[1])
            except ValueError:
                raise VocoderError(f"vocoder {spec!r}: expected griffin-lim:<iterations>") from None
        return GriffinLimVocoder(settings, n_iter=n_iter)
    from audiotune import storage

    suffix = Path(spec).suffix.lower()
    if suffix not in TORCHSCRIPT_SUFFIXES + ONNX_SUFFIXES:
        raise VocoderError(f"vocoder {spec!r}: expected 'griffin-lim' or a TorchScript "
                           f"({', '.join(TORCHSCRIPT_SUFFIXES)}) or ONNX (.onnx) file")
    path = storage.local_copy(spec)
    if not Path(path).is_file():
        raise FileNotFoundError(f"vocoder {spec} does not exist")
    sample_rate, hop = int(settings["sample_rate"]), int(settings["hop_length"])
    vocoder = (OnnxVocoder if suffix in ONNX_SUFFIXES else TorchScriptVocoder)(Path(path), sample_rate, hop)
    log.info("vocoder %s (%d Hz)", spec, sample_rate)
    return vocoder
