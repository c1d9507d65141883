"""Metric plug-ins. Each declares the rate it takes and the languages it serves, loads its weights by path (no
download at run time) and scores one utterance into named values; a metric that cannot load is skipped with
one line (:class:`~audiotune.evaluation.MetricUnavailable`), and the gate refuses to decide on it.

Values (per utterance): ``dnsmos_sig/bak/ovrl/p808``; ``sim``; ``wer`` or ``cer`` (+ ``transcript``); ``mcd``
(dB, DTW-aligned mel cepstra); ``f0_rmse`` (Hz, frames voiced in both) and ``voicing_error``; ``duration_ratio``,
``empty``, ``truncated``, ``max_length``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from audiotune.evaluation import MetricUnavailable

log = logging.getLogger(__name__)

EMPTY_S = 0.05  # shorter than this, or silent, is an empty output
CHAR_S = 0.04   # without a reference: fewer seconds than this per character is a truncated output
N_MELS = 80     # mel bands of the cepstra of MCD and of the DTW alignment


@dataclass
class Sample:
    """One synthesized utterance and what it is compared with; ``audio(rate)`` resamples once per rate."""

    text: str
    wav: np.ndarray
    rate: int
    reference: tuple[np.ndarray, int] | None = None
    prompt: tuple[np.ndarray, int] | None = None
    hit_max_length: bool = False
    _cache: dict = field(default_factory=dict)

    @staticmethod
    def _at(wav: np.ndarray, sr: int, rate: int) -> np.ndarray:
        import soxr

        wav = np.asarray(wav, dtype=np.float32)
        return wav if sr == rate or not wav.size else soxr.resample(wav, sr, rate, quality="HQ").astype(np.float32)

    def audio(self, rate: int) -> np.ndarray:
        if ("syn", rate) not in self._cache:
            self._cache[("syn", rate)] = self._at(self.wav, self.rate, rate)
        return self._cache[("syn", rate)]

    def ref(self, rate: int, prompt_if_none: bool = False) -> np.ndarray | None:
        source = self.reference or (self.prompt if prompt_if_none else None)
        if source is None:
            return None
        key = ("ref" if self.reference else "prompt", rate)
        if key not in self._cache:
            self._cache[key] = self._at(source[0], source[1], rate)
        return self._cache[key]

    @property
    def empty(self) -> bool:
        return self.wav.size < EMPTY_S * self.rate or float(np.sqrt(np.mean(self.wav ** 2))) < 1e-4


class Metric:
    """A metric plug-in: ``name``, input ``rate``, ``languages`` (empty: any), ``note`` for the card."""

    name: str = ""
    rate: int = 16000
    languages: tuple[str, ...] = ()
    note: str = ""

    def score(self, sample: Sample) -> dict[str, Any]:
        raise NotImplementedError


class Dnsmos(Metric):
    """DNSMOS P.835 (SIG/BAK/OVRL) and P.808, the ONNX models shipped in speechmos (or a folder given)."""

    name, rate, note = "dnsmos", 16000, "DNSMOS P.835 + P.808 (speechmos ONNX)"

    def __init__(self, folder: str | None, num_threads: int = 1) -> None:
        try:
            import onnxruntime as ort
            from speechmos import dnsmos
        except ImportError:
            raise MetricUnavailable("speechmos is not installed (pip install speechmos)") from None
        from audiotune import storage

        root = str(storage.local_copy(folder)) if folder else os.path.join(os.path.dirname(dnsmos.__file__),
                                                                          "dnsmos_models")
        paths = [os.path.join(root, f) for f in ("sig_bak_ovr.onnx", "model_v8.onnx")]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise MetricUnavailable(f"DNSMOS weights missing: {', '.join(missing)}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = num_threads
        self.model = dnsmos.DNSMOS.__new__(dnsmos.DNSMOS)  # its scoring, our sessions (threads bounded)
        self.model.primary_model_path = paths[0]
        self.model.onnx_sess = ort.InferenceSession(paths[0], options, providers=["CPUExecutionProvider"])
        self.model.p808_onnx_sess = ort.InferenceSession(paths[1], options, providers=["CPUExecutionProvider"])

    def score(self, sample: Sample) -> dict[str, Any]:
        if sample.empty:
            return {}
        out = self.model(np.clip(sample.audio(self.rate), -1, 1), self.rate, False)
        return {f"dnsmos_{k}": float(out[f"{k}_mos"]) for k in ("sig", "bak", "ovrl", "p808")}


class Similarity(Metric):
    """Speaker similarity: cosine of embeddings of the output and the reference (else the voice prompt)."""

    name, rate = "sim", 16000

    def __init__(self, model_path: str | None, num_threads: int = 1) -> None:
        from audiotune.evaluation.speaker import build_encoder

        self.encoder = build_encoder(model_path, num_threads)
        self.note = self.encoder.note

    def score(self, sample: Sample) -> dict[str, Any]:
        from audiotune.evaluation.speaker import cosine

        ref = sample.ref(self.rate, prompt_if_none=True)
        if ref is None or sample.empty:
            return {}
        return {"sim": cosine(self.encoder(sample.audio(self.rate)), self.encoder(ref))}


class ErrorRate(Metric):
    """WER (en) / CER (zh) of an ASR transcript of the output against the eval text (jiwer)."""

    name, rate, languages = "wer", 16000, ("en", "zh")

    def __init__(self, asr_path: str | None, language: str, num_threads: int = 1) -> None:
        try:
            import jiwer  # noqa: F401
        except ImportError:
            raise MetricUnavailable("jiwer is not installed (pip install jiwer)") from None
        from audiotune.evaluation.asr import build_asr

        self.language = language
        self.asr = build_asr(asr_path, language, num_threads)
        self.note = self.asr.note
        self.key = "cer" if language == "zh" else "wer"

    def score(self, sample: Sample) -> dict[str, Any]:
        from audiotune.evaluation.asr import error_rate

        transcript = "" if sample.empty else self.asr(sample.audio(self.rate))
        return {self.key: error_rate(sample.text, transcript, self.language), "transcript": transcript}


def _cepstra(wav: np.ndarray, rate: int) -> np.ndarray:
    import librosa

    mfcc = librosa.feature.mfcc(y=wav, sr=rate, n_mfcc=25, n_fft=1024, hop_length=256, n_mels=N_MELS)
    return mfcc[1:].T  # c0 (energy) left out, as MCD does: [frames, 24]


def _align(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import librosa

    _, path = librosa.sequence.dtw(X=a.T, Y=b.T, metric="euclidean")
    return path[::-1]


class CepstralDistortion(Metric):
    """Mel-cepstral distortion (dB) to the reference recording, frames aligned by DTW (no weights)."""

    name, rate, note = "mcd", 16000, "MCD on 24 mel cepstra (c0 excluded), DTW-aligned"

    def score(self, sample: Sample) -> dict[str, Any]:
        ref = sample.ref(self.rate)
        if ref is None or sample.empty:
            return {}
        a, b = _cepstra(sample.audio(self.rate), self.rate), _cepstra(ref, self.rate)
        path = _align(a, b)
        diff = a[path[:, 0]] - b[path[:, 1]]
        # librosa's cepstra: an orthonormal DCT of a dB mel spectrum (20·log10|X|). A true cepstrum c (natural log)
        # is that / (20/ln 10 · sqrt(2·N_MELS)); MCD = 10/ln 10 · sqrt(2·Σ Δc²) then is 0.5 · sqrt(Σ Δ² / N_MELS)
        return {"mcd": float(np.mean(0.5 * np.sqrt(np.sum(diff ** 2, axis=1) / N_MELS)))}


class Pitch(Metric):
    """F0 RMSE (Hz, frames voiced in both) and voicing decision error against the reference (pYIN, DTW)."""

    name, rate, note = "f0", 16000, "pYIN F0 (60-500 Hz, half-semitone bins), DTW-aligned on mel cepstra"

    def score(self, sample: Sample) -> dict[str, Any]:
        import librosa

        ref = sample.ref(self.rate)
        if ref is None or sample.empty:
            return {}
        syn = sample.audio(self.rate)
        # half-semitone pitch bins, 40 thresholds: ~60x faster than pYIN's defaults, F0 within a few Hz
        tracks = [librosa.pyin(w, fmin=60, fmax=500, sr=self.rate, frame_length=1024, hop_length=256,
                               resolution=0.5, n_thresholds=40)[:2] for w in (syn, ref)]
        path = _align(_cepstra(syn, self.rate), _cepstra(ref, self.rate))
        n = min(len(tracks[0][0]), len(tracks[1][0]))
        path = path[(path[:, 0] < n) & (path[:, 1] < n)] if n else path[:0]
        if not len(path):
            return {}
        (f_a, v_a), (f_b, v_b) = tracks
        va, vb = v_a[path[:, 0]], v_b[path[:, 1]]
        both = va & vb
        rmse = float(np.sqrt(np.mean((f_a[path[both, 0]] - f_b[path[both, 1]]) ** 2))) if both.any() else np.nan
        return {"f0_rmse": rmse, "voicing_error": float(np.mean(va != vb))}


class Duration(Metric):
    """Duration ratio to the reference and the "gibberish" flags: empty, truncated, max-length outputs."""

    name, note = "duration", "duration ratio; empty / truncated / max-length flags"

    def __init__(self, truncated_ratio: float) -> None:
        self.truncated_ratio = truncated_ratio

    def score(self, sample: Sample) -> dict[str, Any]:
        seconds = sample.wav.size / sample.rate
        ref = sample.reference
        ratio = seconds / (ref[0].size / ref[1]) if ref is not None and ref[0].size else np.nan
        short = ratio < self.truncated_ratio if np.isfinite(ratio) else seconds < CHAR_S * len(sample.text)
        empty = sample.empty
        return {"seconds": seconds, "duration_ratio": ratio, "empty": float(empty),
                "truncated": float(bool(short) and not empty), "max_length": float(sample.hit_max_length)}


def build_metrics(cfg, speaker_model: str | None) -> tuple[list[Metric], dict[str, str]]:
    """The metrics ``cfg.metrics`` names (``cfg``: :class:`~audiotune.config.EvaluateConfig`) and the reasons of
    those skipped."""
    makers = {
        "dnsmos": lambda: Dnsmos(cfg.dnsmos_model, cfg.num_threads),
        "sim": lambda: Similarity(speaker_model, cfg.num_threads),
        "wer": lambda: ErrorRate(cfg.asr_model, cfg.language, cfg.num_threads),
        "mcd": CepstralDistortion, "f0": Pitch, "duration": lambda: Duration(cfg.truncated_ratio),
    }
    metrics, skipped = [], {}
    for name in cfg.metrics:
        try:
            metric = makers[name]()
        except MetricUnavailable as err:
            skipped[name] = str(err)
            log.warning("metric %s skipped: %s", name, err)
            continue
        if metric.languages and cfg.language not in metric.languages:
            skipped[name] = f"not for language {cfg.language}"
            log.warning("metric %s skipped: not for language %s", name, cfg.language)
            continue
        metrics.append(metric)
    return metrics, skipped
