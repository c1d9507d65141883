"""Speaker conditioning for the flow decoder: a speaker-id table and CAM++-style ONNX embeddings.

``tokenize.speaker.type`` chooses:

- ``none``: no speaker features;
- ``speaker-id``: an index per speaker (:func:`speaker_table`) into a table the flow learns;
- ``onnx``: an utterance embedding from a CAM++-style ONNX model (:class:`OnnxSpeakerEmbedder`),
  fed the 80-bin Kaldi fbank (kaldi-native-fbank) with mean normalisation, as CosyVoice's frontend
  computes it (:func:`audiotune.tokenization.fbank.campplus_features`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from audiotune.tokenization.fbank import FRAME_LENGTH, SAMPLE_RATE, campplus_features

log = logging.getLogger(__name__)

UNK_SPEAKER = "<unk>"


class SpeakerEmbedder:
    """Turns a mono waveform into one fixed-size speaker vector.

    Attributes:
        dim: Length of the vectors returned.
        sample_rate: Rate the model works at; other rates are resampled.
    """

    dim: int
    sample_rate: int = SAMPLE_RATE

    def __call__(self, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """The embedding ``[dim]`` float32 of ``wav`` (mono, at ``sample_rate``)."""
        raise NotImplementedError


class OnnxSpeakerEmbedder(SpeakerEmbedder):
    """A CAM++-style ONNX speaker model run with onnxruntime on one CPU thread.

    The model takes fbank features ``[1, frames, n_mels]`` float32 (its first input) and its first
    output, flattened, is the embedding.

    Args:
        path: Local path of the ``.onnx`` file.
        num_threads: onnxruntime intra-op threads (the tokenize stage parallelises across processes).
    """

    def __init__(self, path: str | Path, num_threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"speaker model {self.path} does not exist (tokenize.speaker.onnx_path)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        if len(inp.shape) != 3:
            raise ValueError(f"speaker model {self.path}: input {inp.name!r} has shape {inp.shape}; expected "
                             "[batch, frames, n_mels] fbank features")
        self.n_mels = inp.shape[2] if isinstance(inp.shape[2], int) else 80
        self.dim = self._output_dim()
        log.info("speaker model %s: input %r [1, frames, %d], %d-dim embedding", self.path, self.input_name,
                 self.n_mels, self.dim)

    def _output_dim(self) -> int:
        shape = self.session.get_outputs()[0].shape
        dims = shape[1:] if len(shape) > 1 else shape  # drop the batch axis
        if dims and all(isinstance(d, int) and d > 0 for d in dims):
            return math.prod(dims)
        rng = np.random.default_rng(0)
        return int(self(0.1 * rng.standard_normal(SAMPLE_RATE).astype(np.float32)).shape[0])

    def features(self, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """The model input ``[1, frames, n_mels]``: 16 kHz, mean-normalised Kaldi fbank.

        Audio shorter than one 25 ms frame is zero-padded to one frame.
        """
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim != 1:
            raise ValueError(f"speaker embedding: expected a mono 1-D waveform, got shape {wav.shape}")
        if sample_rate != SAMPLE_RATE:
            import soxr

            wav = soxr.resample(wav, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
        if len(wav) < FRAME_LENGTH:
            wav = np.pad(wav, (0, FRAME_LENGTH - len(wav)))
        return campplus_features(wav, num_mel_bins=self.n_mels)[None]

    def __call__(self, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: self.features(wav, sample_rate)})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)


def build_speaker_embedder(cfg: Any, local_model_path: str | Path | None = None) -> SpeakerEmbedder | None:
    """The embedder ``tokenize.speaker`` asks for, or ``None`` for ``none`` and ``speaker-id``.

    Args:
        cfg: A :class:`audiotune.config.SpeakerConfig`.
        local_model_path: A local copy of ``cfg.onnx_path`` (the stage downloads ``s3://`` URIs);
            when not given, ``cfg.onnx_path`` itself must be a local path.
    """
    if cfg.type in ("none", "speaker-id"):
        return None
    if cfg.type != "onnx":
        raise ValueError(f"tokenize.speaker.type={cfg.type!r}: expected one of none, speaker-id, onnx")
    path = local_model_path or cfg.onnx_path
    if not path:
        raise ValueError("tokenize.speaker.type is 'onnx' but tokenize.speaker.onnx_path is not set")
    if str(path).startswith("s3://"):
        raise ValueError(f"tokenize.speaker.onnx_path={path!r} is remote: pass a local copy "
                         "(audiotune.storage.local_copy) as local_model_path")
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenize.speaker.onnx_path: speaker model {path} does not exist")
    return OnnxSpeakerEmbedder(path)


def speaker_table(speakers: Iterable[str | None]) -> dict[str, int]:
    """Speaker name → index: ``"<unk>"`` is 0 (also for ``None`` and ``""``), the rest sorted from 1."""
    names = sorted({s for s in speakers if s and s != UNK_SPEAKER})
    table = {UNK_SPEAKER: 0}
    table.update({name: k for k, name in enumerate(names, start=1)})
    return table


def mean_embeddings(pairs: Iterable[tuple[str | None, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-speaker mean of utterance embeddings, float32, keyed in sorted order.

    The mean is raw (not L2-normalised), so a consumer that wants unit vectors normalises it
    itself. ``None`` or ``""`` speakers pool under ``"<unk>"``.

    Raises:
        ValueError: embeddings of different lengths.
    """
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    dim = None
    for speaker, emb in pairs:
        vec = np.asarray(emb, dtype=np.float64).reshape(-1)
        if dim is None:
            dim = len(vec)
        elif len(vec) != dim:
            raise ValueError(f"speaker {speaker!r}: embedding has {len(vec)} values, earlier ones had {dim}")
        key = speaker or UNK_SPEAKER
        sums[key] = sums[key] + vec if key in sums else vec.copy()
        counts[key] = counts.get(key, 0) + 1
    return {key: (sums[key] / counts[key]).astype(np.float32) for key in sorted(sums)}
