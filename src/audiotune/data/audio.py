"""Audio decoding, down-mixing, resampling, silence handling and FLAC encoding.

Decoding uses soundfile (libsndfile: WAV, FLAC, MP3, OGG); resampling uses soxr.
Errors come out as :class:`AudioError` with a quarantine reason and a sentence
naming the file.
"""

from __future__ import annotations

import io
import os

import numpy as np
import soundfile as sf
import soxr

from audiotune.data import reasons
from audiotune.errors import DataError


class AudioError(DataError):
    """Audio that cannot be used; ``reason`` is a quarantine reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class UndecodableAudio(AudioError, RuntimeError):
    """Stored audio bytes (a Dataset row's FLAC) that libsndfile cannot decode, or that hold no samples.

    Also a RuntimeError, as the ``soundfile`` error it replaces, so callers that caught that still do.
    """


def _wav_shortfall(path: str) -> int:
    """Bytes missing from a RIFF/WAVE file's ``data`` chunk (libsndfile silently reads what is there)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return 0
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk = f.read(8)
            length = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"data":
                if length in (0, 0xFFFFFFFF):  # streaming writers leave the size unset
                    return 0
                return max(0, pos + 8 + length - size)
            pos += 8 + length + (length & 1)
    return 0


def load_audio(path: str, target_sr: int, max_seconds: float | None = None) -> np.ndarray:
    """Decode ``path`` to float32 mono at ``target_sr``.

    Args:
        path: WAV, FLAC, MP3 or OGG file.
        target_sr: Sample rate of the result; the audio is resampled (soxr, HQ) when it differs.
        max_seconds: Refuse a file whose header declares a longer duration, before decoding it: what a
            worker holds in memory is bounded by this duration, not by the file.

    Returns:
        A 1-D float32 array: the mean of the channels.

    Raises:
        AudioError: missing file, undecodable or truncated data, no samples, or (``too_long``) a
            header duration above ``max_seconds``.
    """
    if not os.path.isfile(path):
        raise AudioError(reasons.MISSING_AUDIO, f"{path}: audio file does not exist")
    try:
        with sf.SoundFile(path) as f:
            declared = f.frames
            sr = f.samplerate
            if max_seconds is not None and declared > 0 and declared / sr > max_seconds:
                raise AudioError(reasons.TOO_LONG, f"{path}: {declared / sr:.2f} s (from the header) is longer "
                                 f"than {max_seconds:g} s; not decoded")
            data = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as err:
        raise AudioError(reasons.UNDECODABLE_AUDIO, f"{path}: cannot decode audio ({err})") from None
    missing = _wav_shortfall(path) if path.lower().endswith((".wav", ".wave")) else 0
    if missing > 0:
        raise AudioError(
            reasons.UNDECODABLE_AUDIO, f"{path}: truncated WAV ({missing} bytes of the data chunk are missing)"
        )
    if declared > 0 and len(data) < declared * 0.98 and declared - len(data) > 1024:
        raise AudioError(
            reasons.UNDECODABLE_AUDIO,
            f"{path}: truncated audio (header declares {declared} frames, {len(data)} decoded)",
        )
    if data.size == 0:
        raise AudioError(reasons.EMPTY_AUDIO, f"{path}: audio has no samples")
    mono = _downmix(data)
    if not np.isfinite(mono).all():
        raise AudioError(reasons.UNDECODABLE_AUDIO, f"{path}: audio contains NaN or infinite samples")
    if sr != target_sr:
        mono = soxr.resample(mono, sr, target_sr, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _downmix(data: np.ndarray) -> np.ndarray:
    """Average the channels of [frames, channels].

    Adds channel columns one by one: ~2x faster than ``mean(axis=1)`` and, unlike a
    BLAS mat-vec, single-threaded, so worker processes do not oversubscribe cores.
    """
    if data.shape[1] == 1:
        return data[:, 0]
    mono = data[:, 0].copy()
    for c in range(1, data.shape[1]):
        mono += data[:, c]
    mono *= 1.0 / data.shape[1]
    return mono


def peak_dbfs(wav: np.ndarray) -> float:
    """Peak level in dB relative to full scale (-inf for digital silence)."""
    peak = float(np.max(np.abs(wav))) if wav.size else 0.0
    return 20.0 * np.log10(peak) if peak > 0 else float("-inf")


def is_silent(wav: np.ndarray, threshold_db: float) -> bool:
    """True when the peak level is below ``threshold_db`` dBFS."""
    return peak_dbfs(wav) < threshold_db


def trim_silence(wav: np.ndarray, sr: int, top_db: float = 40.0, frame_ms: float = 20.0,
                 margin_ms: float = 20.0) -> np.ndarray:
    """Cut leading and trailing frames more than ``top_db`` quieter than the loudest frame.

    Args:
        wav: Mono float signal.
        sr: Its sample rate.
        top_db: Frames whose RMS is more than this many dB below the loudest frame's count as silence.
        frame_ms: Frame length for the RMS.
        margin_ms: Audio kept on each side of the first and last loud frame.

    Returns:
        A view of ``wav``; never empty unless ``wav`` is (all-zero input comes back whole).
    """
    frame = max(1, int(sr * frame_ms / 1000))
    n = -(-len(wav) // frame)  # the last, partial frame counts too
    if n <= 1:
        return wav
    padded = np.zeros(n * frame, dtype=np.float64)
    padded[: len(wav)] = wav
    power = np.mean(padded.reshape(n, frame) ** 2, axis=1)
    db = 10 * np.log10(power + 1e-20)
    loud = np.flatnonzero(db > db.max() - top_db)
    margin = int(sr * margin_ms / 1000)
    start = max(0, int(loud[0]) * frame - margin)
    end = min(len(wav), (int(loud[-1]) + 1) * frame + margin)
    return wav[start:end]


def encode_flac(wav: np.ndarray, sr: int) -> bytes:
    """16-bit FLAC bytes of a mono float signal (clipped to [-1, 1])."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1.0, 1.0), sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """Decode FLAC (or any soundfile format) bytes to float32 mono and its sample rate.

    Raises:
        UndecodableAudio: the bytes are not audio, are cut short or corrupt, or hold no samples (one line,
            with libsndfile's reason; also a RuntimeError).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UndecodableAudio(reasons.UNDECODABLE_AUDIO, f"stored audio is a {type(data).__name__}, not bytes")
    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as err:
        why = getattr(err, "error_string", None) or str(err)  # without libsndfile's "Error opening <BytesIO at 0x..>"
        raise UndecodableAudio(reasons.UNDECODABLE_AUDIO,
                               f"stored audio ({len(data)} bytes) cannot be decoded: {why.strip()}") from err
    if wav.shape[0] == 0:
        raise UndecodableAudio(reasons.EMPTY_AUDIO, f"stored audio ({len(data)} bytes) holds no samples")
    return _downmix(wav), sr
