"""Mel → waveform: a built-in Griffin-Lim vocoder, or a pluggable TorchScript / ONNX vocoder checkpoint.

The project's mel is CosyVoice's (:mod:`audiotune.tokenization.mel`): ``log(clamp(fb @ |STFT|, 1e-5))``
with a librosa Slaney filterbank, reflect padding of ``(n_fft - hop) / 2`` on each side and
``center=False``, so frame ``k`` covers samples ``[k·hop - pad, k·hop - pad + n_fft)`` and ``F``
frames stand for ``F · hop`` samples.

:class:`GriffinLimVocoder` inverts that without any trained weights: ``exp``, the filterbank's
non-negative least-squares inverse for the linear magnitude (``librosa.feature.inverse.mel_to_stft``),
then librosa's fast Griffin-Lim (Perraudin et al., momentum 0.99) on exactly that STFT framing
(``center=False``, the padding trimmed). It is intelligible but buzzy: good for
listening to training samples, not for a product; point ``flow.vocoder`` at a HiFT/HiFi-GAN
export for that.

A checkpoint vocoder maps ``mel [B, n_mels, T]`` float32 to ``wav [B, samples]`` (or
``[B, 1, samples]``): a TorchScript file (``.pt``, ``.jit``, ``.ts``, ``.torchscript``; loaded
with ``torch.jit.load``) or an ONNX file (``.onnx``; onnxruntime, first input and output).

:class:`HiftVocoder` is the real model's vocoder: a CosyVoice / Step-Audio-EditX release folder
(local or ``s3://``) holding the yaml with a ``hift:`` section and ``hift.pt``, built natively
(:mod:`audiotune.models.flow.native.hift`; nothing in the yaml is imported). Its sample rate, hop and
mel bins, and the yaml's own mel settings (``feat_extractor`` / ``mel_conf``), must be those of the
mels it is given. A BigVGAN vocoder (Step-Audio-EditX can use one) is refused by name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from audiotune.errors import ModelLoadError

log = logging.getLogger(__name__)

GRIFFIN_LIM = "griffin-lim"
TORCHSCRIPT_SUFFIXES = (".pt", ".jit", ".ts", ".torchscript")
ONNX_SUFFIXES = (".onnx",)
RELEASE_WEIGHTS = "hift.pt"
LOG_FLOOR = 1e-5


class VocoderError(ModelLoadError):
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
        s = _mel_settings(mel_cfg)
        self.sample_rate = int(s["sample_rate"])
        self.n_fft, self.hop_length = int(s["n_fft"]), int(s["hop_length"])
        self.win_length = int(s.get("win_length") or self.n_fft)
        self.n_mels = int(s["n_mels"])
        if s.get("center"):
            raise VocoderError("griffin-lim: only center=False mels (both CosyVoice presets) are supported")
        self.fmin, self.fmax = float(s.get("fmin") or 0.0), s.get("fmax")
        self.pad = (self.n_fft - self.hop_length) // 2
        self.n_iter, self.momentum, self.seed = n_iter, momentum, seed

    def magnitude(self, mel: np.ndarray) -> np.ndarray:
        """Linear STFT magnitude ``[..., n_freq, T]`` from log-mel ``[..., n_mels, T]`` (librosa's non-negative
        least-squares inverse of the Slaney filterbank)."""
        import librosa

        return librosa.feature.inverse.mel_to_stft(np.exp(mel), sr=self.sample_rate, n_fft=self.n_fft, power=1.0,
                                                   fmin=self.fmin, fmax=self.fmax, htk=False, norm="slaney")

    def __call__(self, mel: np.ndarray | torch.Tensor) -> np.ndarray:
        import librosa

        batch, single = _as_batch(mel)
        if batch.shape[1] != self.n_mels:
            raise VocoderError(f"griffin-lim: mel has {batch.shape[1]} bins, the vocoder {self.n_mels}")
        frames = batch.shape[-1]
        if frames == 0:
            out = np.zeros((batch.shape[0], 0), dtype=np.float32)
            return out[0] if single else out
        mag = self.magnitude(batch.numpy().astype(np.float64))
        # center=False as the mel was framed; the signal starts ``pad`` samples into the first frame
        y = np.stack([librosa.griffinlim(m, n_iter=self.n_iter, hop_length=self.hop_length,
                                         win_length=self.win_length, n_fft=self.n_fft, window="hann",
                                         center=False, momentum=self.momentum, init="random",
                                         random_state=self.seed) for m in mag])
        out = y[:, self.pad:self.pad + frames * self.hop_length].astype(np.float32)
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


class HiftVocoder:
    """A release's HiFT (F0 predictor → NSF source → iSTFT head); see :func:`load_release_vocoder`.

    The harmonic source draws random start phases and noise: each call seeds them from ``seed`` on a
    forked RNG, so the output is repeatable and the caller's RNG stream (a training run's) is untouched.

    Args:
        model: A loaded :class:`audiotune.models.flow.native.hift.HiFTGenerator`.
        seed: Seed of the excitation's random phases and noise.
    """

    def __init__(self, model: torch.nn.Module, seed: int = 0) -> None:
        self.model = model.eval()
        self.sample_rate, self.hop_length = int(model.sample_rate), int(model.hop_length)
        self.n_mels, self.seed = int(model.in_channels), seed

    def __call__(self, mel: np.ndarray | torch.Tensor) -> np.ndarray:
        batch, single = _as_batch(mel)
        if batch.shape[1] != self.n_mels:
            raise VocoderError(f"hift: mel has {batch.shape[1]} bins, the vocoder {self.n_mels}")
        if batch.shape[-1] == 0:
            out = np.zeros((batch.shape[0], 0), dtype=np.float32)
        else:
            param = next(self.model.parameters())
            with torch.random.fork_rng(devices=[param.device] if param.device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                with torch.inference_mode():
                    out = self.model(batch.to(param.device, param.dtype)).float().cpu().numpy()
        return out[0] if single else out


_RELEASE_MEL_KEYS = {  # our mel setting ← matcha mel_spectrogram argument (feat_extractor / mel_conf)
    "sample_rate": "sampling_rate", "n_fft": "n_fft", "hop_length": "hop_size", "win_length": "win_size",
    "n_mels": "num_mels", "fmin": "fmin", "fmax": "fmax", "center": "center",
}


def release_mel_settings(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Our mel settings from a parsed release yaml's ``feat_extractor`` (CosyVoice) or ``mel_conf``
    (Step-Audio-EditX) node, in the keys of a Tokens ``mel.json``; ``None`` when it has neither."""
    node = cfg.get("feat_extractor") or cfg.get("mel_conf")
    if node is None:
        return None
    kwargs = dict(getattr(node, "kwargs", node) or {})
    return {ours: kwargs[theirs] for ours, theirs in _RELEASE_MEL_KEYS.items() if theirs in kwargs}


def _same(a: Any, b: Any) -> bool:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a))) if numbers else a == b


def _check_mel_agreement(source: str, hift: HiftVocoder, release: dict[str, Any] | None,
                         settings: dict[str, Any]) -> None:
    """The vocoder's rate / hop / bins and the yaml's mel settings must be those of the given mels."""
    nyquist = float(settings["sample_rate"]) / 2
    pairs = [("sample_rate", hift.sample_rate, "hift sampling_rate"),
             ("hop_length", hift.hop_length, "hift prod(upsample_rates) * hop_len"),
             ("n_mels", hift.n_mels, "hift in_channels")]
    for key, value in (release or {}).items():
        pairs.append((key, value, f"yaml mel setting {_RELEASE_MEL_KEYS[key]}"))
    for key, theirs, what in pairs:
        ours = settings.get(key)
        if key == "win_length" and ours is None:
            ours = settings.get("n_fft")
        if key == "fmax":
            theirs = nyquist if theirs is None else theirs
            ours = nyquist if ours is None else ours
        if ours is None and key == "center":
            ours = False
        if not _same(theirs, ours):
            raise VocoderError(f"vocoder {source}: {what} is {theirs!r} but the mels have {key}={ours!r}; "
                               "use the vocoder of the release the mels follow (or matching tokenize.mel settings)")


def _release_files(spec: str) -> tuple[str, list[str]]:
    """The release folder a spec names (the folder itself, or its ``hift.pt``) and its top-level file names."""
    from audiotune import storage

    folder = spec.rstrip("/")
    if Path(folder).name == RELEASE_WEIGHTS:
        folder = folder[: -len(RELEASE_WEIGHTS)].rstrip("/") or "."
    names = [rel for rel in storage.list_files(folder) if "/" not in rel]
    return folder, names


def load_release_vocoder(spec: str, mel_cfg: Any, device: str | None = None) -> HiftVocoder:
    """The HiFT of a release folder (local or ``s3://``; its ``hift.pt`` may be named instead).

    The folder needs one yaml with a ``hift:`` section and ``hift.pt``; only those two are fetched.
    It runs on ``device``; by default the current CUDA device when there is one (a full-size HiFT
    is several times slower than real time on a few CPU cores), else the CPU.

    Raises:
        VocoderError: no yaml with ``hift:``, several, no ``hift.pt``, a BigVGAN or other unsupported
            vocoder class, weights that do not fit (listed), or mel settings that disagree (both named).
    """
    from audiotune import storage
    from audiotune.models.flow.io import FlowLoadError
    from audiotune.models.flow.native.hift import build_hift, load_hift_file
    from audiotune.models.flow.native.hyperyaml import ReleaseYamlError, load_release_yaml

    settings = _mel_settings(mel_cfg)
    folder, names = _release_files(spec)
    sections = ("hift", "feat_extractor", "mel_conf")
    found = []
    try:
        for name in sorted(n for n in names if n.endswith((".yaml", ".yml"))):
            cfg = load_release_yaml(storage.local_copy(storage.join(folder, name)), sections=sections)
            if "hift" in cfg:
                found.append((name, cfg))
        if len(found) != 1:
            raise VocoderError(f"vocoder {spec}: expected one yaml with a hift: section in {folder}, found "
                               f"{', '.join(n for n, _ in found) or 'none'}")
        if RELEASE_WEIGHTS not in names:
            raise VocoderError(f"vocoder {spec}: {folder} has {found[0][0]} but no {RELEASE_WEIGHTS}")
        model = build_hift(found[0][1]["hift"])
        load_hift_file(model, storage.local_copy(storage.join(folder, RELEASE_WEIGHTS)))
    except (FlowLoadError, ReleaseYamlError) as err:
        raise VocoderError(f"vocoder {spec}: {err}") from None
    vocoder = HiftVocoder(model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    _check_mel_agreement(spec, vocoder, release_mel_settings(found[0][1]), settings)
    log.info("vocoder %s: HiFT from %s (%d Hz, %d samples per frame)", spec, found[0][0], vocoder.sample_rate,
             vocoder.hop_length)
    return vocoder


def _is_release(spec: str) -> bool:
    """Whether a vocoder spec names a release folder (or its ``hift.pt``) rather than a checkpoint file."""
    from audiotune import storage

    if Path(spec.rstrip("/")).name == RELEASE_WEIGHTS:
        folder, names = _release_files(spec)
        return any(n.endswith((".yaml", ".yml")) for n in names)
    if not storage.is_s3(spec):
        return Path(spec).is_dir()
    return Path(spec).suffix.lower() not in TORCHSCRIPT_SUFFIXES + ONNX_SUFFIXES


def load_vocoder(spec: str | None, mel_cfg: Any) -> Vocoder:
    """The vocoder a spec names.

    Args:
        spec: ``None`` or ``"griffin-lim"`` (built in; ``"griffin-lim:64"`` sets the iterations),
            or a local path / ``s3://`` URI of a CosyVoice / Step-Audio-EditX release folder (yaml
            with ``hift:`` + ``hift.pt``; see :func:`load_release_vocoder`), or of a TorchScript
            (``.pt``, ``.jit``, ``.ts``, ``.torchscript``) or ONNX (``.onnx``) vocoder for this mel configuration.
        mel_cfg: The mel settings the mels were computed with (a Tokens ``mel.json`` dict, a
            ``MelConfig`` or a ``MelExtractor``); give the sample rate and hop.

    Raises:
        VocoderError: An unknown spec, a BigVGAN, a checkpoint or release folder that cannot be
            loaded, or a release vocoder whose mel settings differ from ``mel_cfg``.
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

    if Path(spec.rstrip("/")).name.lower().startswith("bigvgan"):
        raise VocoderError(f"vocoder {spec!r}: BigVGAN vocoders are not supported; give the release folder "
                           "with its HiFT (yaml hift: + hift.pt)")
    if _is_release(spec):
        return load_release_vocoder(spec, settings)
    suffix = Path(spec).suffix.lower()
    if suffix not in TORCHSCRIPT_SUFFIXES + ONNX_SUFFIXES:
        raise VocoderError(f"vocoder {spec!r}: expected 'griffin-lim', a release folder (yaml with hift: + "
                           f"hift.pt) or a TorchScript ({', '.join(TORCHSCRIPT_SUFFIXES)}) or ONNX (.onnx) file")
    path = storage.local_copy(spec)
    if not Path(path).is_file():
        raise FileNotFoundError(f"vocoder {spec} does not exist")
    sample_rate, hop = int(settings["sample_rate"]), int(settings["hop_length"])
    vocoder = (OnnxVocoder if suffix in ONNX_SUFFIXES else TorchScriptVocoder)(Path(path), sample_rate, hop)
    log.info("vocoder %s (%d Hz)", spec, sample_rate)
    return vocoder
