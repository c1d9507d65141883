"""CosyVoice's supervised speech tokenizer (S3) as ONNX, run with onnxruntime on CPU.

v1 gives 50 codes per second from a 4096-entry codebook, v2 25 per second from 6561. The input
is the Whisper-style 128-bin log-mel of 16 kHz audio, exactly as the ``s3tokenizer`` package and
the CosyVoice frontend compute it. The model takes ``feats`` ``[1, 128, T]`` float32 and
``feats_length`` ``[1]`` int32 (passed by position, as the frontend does) and returns codes
``[1, T']``. It handles at most 30 s, so longer audio is split into 30 s chunks whose codes are
concatenated.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from audiotune.tokenization.audio_tokenizers.base import (
    AudioTokenizer,
    TokenizerError,
    resample,
    resampled_length,
)

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
N_FFT, HOP, N_MELS = 400, 160, 128
CHUNK_SAMPLES = 30 * SAMPLE_RATE
VERSIONS = {  # mel frames per code, codes per second, codebook size
    "v1": (2, 50.0, 4096),
    "v2": (4, 25.0, 6561),
}


@functools.lru_cache(maxsize=4)
def _mel_filters(n_mels: int) -> torch.Tensor:
    import librosa

    return torch.from_numpy(librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels).astype(np.float32))


def log_mel_spectrogram(wav16: np.ndarray, n_mels: int = N_MELS) -> np.ndarray:
    """Whisper's log-mel ``[n_mels, len // 160]`` float32 of 16 kHz audio (as ``s3tokenizer.log_mel_spectrogram``)."""
    x = torch.from_numpy(np.ascontiguousarray(wav16, dtype=np.float32))
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    power = spec[..., :-1].abs().square()
    log_spec = torch.clamp(_mel_filters(n_mels) @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).numpy()


class S3Tokenizer(AudioTokenizer):
    """The S3 speech tokenizer from an ONNX file (``speech_tokenizer_v1.onnx`` / ``speech_tokenizer_v2.onnx``).

    Args:
        onnx_path: Local path of the ONNX model.
        version: ``v1`` (50 Hz) or ``v2`` (25 Hz).
    """

    name = "s3tokenizer"
    sample_rate = SAMPLE_RATE
    num_codebooks = 1

    def __init__(self, onnx_path: str | Path, version: str = "v2"):
        if version not in VERSIONS:
            raise TokenizerError(f"tokenize.audio_tokenizer.s3_version={version!r}: expected one of {sorted(VERSIONS)}")
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise TokenizerError(f"tokenize.audio_tokenizer.onnx_path: {self.onnx_path} is not a file")
        self.version = version
        self.downsample, self.token_rate, self.codebook_size = VERSIONS[version]
        import onnxruntime
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        load_errors = (RuntimeError, ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.InvalidProtobuf,
                       ort_errors.InvalidGraph, ort_errors.NoSuchFile, ort_errors.NotImplemented)
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1
        try:
            self._session = onnxruntime.InferenceSession(
                str(self.onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except load_errors as err:
            raise TokenizerError(f"{self.onnx_path}: onnxruntime cannot load it: {err}") from err
        inputs = self._session.get_inputs()
        if len(inputs) != 2:
            raise TokenizerError(
                f"{self.onnx_path}: expected 2 inputs (feats, feats_length), found {[i.name for i in inputs]}"
            )
        self._input_names = [i.name for i in inputs]
        self._warned_length = False

    @classmethod
    def from_config(cls, cfg: Any, resolve_path: Callable[[str], Path] = Path) -> "S3Tokenizer":
        """From an ``AudioTokenizerConfig``; ``resolve_path`` turns ``onnx_path`` (maybe s3://) into a local file."""
        if not cfg.onnx_path:
            raise TokenizerError("tokenize.audio_tokenizer.onnx_path: required for type s3tokenizer")
        return cls(resolve_path(cfg.onnx_path), cfg.s3_version)

    def _chunk_frames(self, n16: int) -> int:
        mel_frames = n16 // HOP
        return math.ceil(mel_frames / self.downsample)

    def num_frames(self, n_samples: int, sample_rate: int) -> int:
        """Codes for ``n_samples``: per 30 s chunk ``ceil((samples // 160) / downsample)``."""
        n16 = resampled_length(n_samples, sample_rate, SAMPLE_RATE)
        full, tail = divmod(n16, CHUNK_SAMPLES)
        return full * self._chunk_frames(CHUNK_SAMPLES) + self._chunk_frames(tail)

    def _encode_chunk(self, wav16: np.ndarray) -> np.ndarray:
        feats = log_mel_spectrogram(wav16)[None]
        length = np.array([feats.shape[2]], dtype=np.int32)
        out = self._session.run(None, {self._input_names[0]: feats, self._input_names[1]: length})[0]
        return np.asarray(out).reshape(-1)

    def encode(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        """Codes ``[1, frames]`` int32; audio over 30 s is encoded in 30 s chunks and concatenated."""
        wav16 = resample(wav, sample_rate, SAMPLE_RATE)
        parts = []
        for start in range(0, len(wav16), CHUNK_SAMPLES):
            chunk = wav16[start:start + CHUNK_SAMPLES]
            expected = self._chunk_frames(len(chunk))
            if expected == 0:  # under one mel hop (10 ms): no frame, as in one whole-file mel
                continue
            codes = self._encode_chunk(chunk)
            if codes.size == 0:
                raise TokenizerError(
                    f"{self.onnx_path.name}: no codes for {len(chunk) / SAMPLE_RATE:.2f} s of audio "
                    f"at {start / SAMPLE_RATE:.1f} s (expected {expected})"
                )
            if codes.size != expected and not self._warned_length:
                log.warning("%s: %d codes for a chunk, %d expected", self.onnx_path.name, codes.size, expected)
                self._warned_length = True
            parts.append(codes)
        if not parts:
            return np.zeros((1, 0), dtype=np.int32)
        codes = np.concatenate(parts)
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise TokenizerError(
                f"{self.onnx_path.name}: codes in [{codes.min()}, {codes.max()}] outside [0, {self.codebook_size}); "
                f"is tokenize.audio_tokenizer.s3_version={self.version!r} right for this model?"
            )
        return codes.astype(np.int32)[None]

    def params(self) -> dict[str, Any]:
        return {"version": self.version, "onnx_file": self._saved_name()}

    def _saved_name(self) -> str:
        return f"speech_tokenizer_{self.version}.onnx"

    def _save_files(self, directory: Path) -> None:
        target = directory / self._saved_name()
        if target.resolve() != self.onnx_path.resolve():
            shutil.copyfile(self.onnx_path, target)

    @classmethod
    def _from_state(cls, directory: Path, params: dict[str, Any]) -> "S3Tokenizer":
        return cls(directory / params["onnx_file"], params["version"])
