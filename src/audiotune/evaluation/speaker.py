"""Speaker encoders for SIM: a CAM++-style ONNX model (what the Tokens use), else resemblyzer's bundled encoder.

resemblyzer's weights (``pretrained.pt``, a 3-layer LSTM d-vector model on 40-bin log-mel partials of 1.6 s)
ship inside the package; they are loaded here with ``weights_only=True`` into a small module of the same shape,
without importing resemblyzer itself (its VAD import needs ``pkg_resources``). Its SIM is a d-vector cosine:
not comparable with the WavLM-based SIM of papers.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch

from audiotune.evaluation import MetricUnavailable

log = logging.getLogger(__name__)

RATE = 16000
N_MELS, WIN, HOP, PARTIAL = 40, 400, 160, 160  # 25 ms windows, 10 ms hop, 160-frame (1.6 s) partials


class _DVector(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(N_MELS, 256, 3, batch_first=True)
        self.linear = torch.nn.Linear(256, 256)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        embeds = torch.relu(self.linear(hidden[-1]))
        return embeds / embeds.norm(dim=1, keepdim=True).clamp_min(1e-8)


class ResemblyzerEncoder:
    """resemblyzer's d-vector encoder; the utterance embedding is the normalised mean of its partials'."""

    name = "resemblyzer"
    note = "resemblyzer d-vector cosine (not comparable to WavLM SIM)"

    def __init__(self, num_threads: int = 1) -> None:
        spec = importlib.util.find_spec("resemblyzer")
        weights = Path(spec.submodule_search_locations[0]) / "pretrained.pt" if spec else None
        if weights is None or not weights.is_file():
            raise MetricUnavailable("resemblyzer is not installed (pip install resemblyzer): no speaker encoder")
        state = torch.load(weights, map_location="cpu", weights_only=True)["model_state"]
        self.model = _DVector()
        # strict: every weight of the module is in the file (the GE2E loss's similarity scale is not used)
        self.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")}, strict=True)
        self.model.eval()
        self.threads = num_threads

    def _mels(self, wav: np.ndarray) -> np.ndarray:
        import librosa

        power = float(np.mean(wav ** 2)) if wav.size else 0.0
        if power > 0:  # to -30 dBFS, as the encoder was trained
            wav = wav * 10 ** ((-30 - 10 * np.log10(power)) / 20)
        mel = librosa.feature.melspectrogram(y=wav, sr=RATE, n_fft=WIN, hop_length=HOP, n_mels=N_MELS)
        return mel.astype(np.float32).T  # [frames, 40]

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        mel = self._mels(np.asarray(wav, dtype=np.float32))
        if len(mel) < PARTIAL:
            mel = np.concatenate([mel, np.zeros((PARTIAL - len(mel), N_MELS), np.float32)])
        starts = list(range(0, len(mel) - PARTIAL + 1, PARTIAL // 2)) or [0]
        partials = torch.from_numpy(np.stack([mel[s:s + PARTIAL] for s in starts]))
        with torch.no_grad():
            previous = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                embeds = self.model(partials).mean(0)
            finally:
                torch.set_num_threads(previous)
        return (embeds / embeds.norm().clamp_min(1e-8)).numpy()


class CamppEncoder:
    """A CAM++-style ONNX speaker model (the one ``tokenize.speaker.onnx_path`` names)."""

    name = "campplus"
    note = "CAM++ ONNX embedding cosine"

    def __init__(self, path: str, num_threads: int = 1) -> None:
        from audiotune import storage
        from audiotune.tokenization.speaker import OnnxSpeakerEmbedder

        try:
            local = storage.local_copy(path)
        except OSError as err:
            raise MetricUnavailable(f"speaker model {path} is missing ({err})") from None
        if not Path(local).is_file():
            raise MetricUnavailable(f"speaker model {path} is missing")
        self.embedder = OnnxSpeakerEmbedder(local, num_threads=num_threads)

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        return np.asarray(self.embedder(wav, RATE), dtype=np.float32).reshape(-1)


def build_encoder(path: str | None, num_threads: int = 1):
    """The CAM++ ONNX encoder at ``path`` when given, else resemblyzer's."""
    return CamppEncoder(path, num_threads) if path else ResemblyzerEncoder(num_threads)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
