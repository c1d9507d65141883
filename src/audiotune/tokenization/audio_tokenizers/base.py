"""What every audio tokenizer is: audio in, discrete codes out as ``[codebooks, frames]`` int32.

A tokenizer's state lives in a directory: ``audio_tokenizer.json`` (its type and parameters)
plus safetensors or copied model files. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from audiotune.errors import DataError

STATE_FILE = "audio_tokenizer.json"
FORMAT_VERSION = 1


class TokenizerError(DataError):
    """The audio tokenizer cannot be built, loaded, fitted or run."""


class RowError(TokenizerError):
    """One row cannot be tokenized (bad or out-of-range codes): the stage quarantines the row."""


class CodesOutOfRange(RowError):
    """Codes lie outside ``[0, vocab_size)``.

    Attributes:
        low: The smallest code in the row.
        high: The largest code in the row.
        vocab_size: The allowed size.
    """

    def __init__(self, low: int, high: int, vocab_size: int, where: str = "codes"):
        self.low, self.high, self.vocab_size = low, high, vocab_size
        super().__init__(
            f"{where}: codes range over [{low}, {high}] but must lie in [0, {vocab_size}) "
            "(tokenize.audio_tokenizer.vocab_size)"
        )


def resample(wav: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 audio at ``target_rate`` (soxr, high quality); unchanged when the rates agree."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise TokenizerError(f"expected mono audio [samples], got shape {wav.shape}")
    if sample_rate == target_rate:
        return wav
    import soxr

    return soxr.resample(wav, sample_rate, target_rate).astype(np.float32, copy=False)


def resampled_length(n_samples: int, sample_rate: int, target_rate: int) -> int:
    """The number of samples :func:`resample` returns (soxr rounds the exact length to nearest)."""
    if sample_rate == target_rate:
        return n_samples
    return int(math.floor(n_samples * target_rate / sample_rate + 0.5))


class AudioTokenizer:
    """Base class: turns mono audio into codes ``[num_codebooks, frames]`` (int32).

    Attributes:
        name: Registry key, also written as ``type`` in ``audio_tokenizer.json``.
        sample_rate: The input rate the tokenizer works at (other rates are resampled with soxr).
        num_codebooks: Codebooks per frame.
        codebook_size: Codes per codebook; every code lies in ``[0, codebook_size)``.
        token_rate: Frames per second of audio.
    """

    name: str = ""
    sample_rate: int = 16000
    num_codebooks: int = 1
    codebook_size: int = 0
    token_rate: float = 0.0

    def fit(self, wavs: Iterable[np.ndarray], sample_rate: int, seed: int) -> None:
        """Fit the tokenizer on training audio (a no-op for pretrained tokenizers)."""

    def encode(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        """Codes of one utterance, int32 ``[num_codebooks, frames]``."""
        raise NotImplementedError

    def num_frames(self, n_samples: int, sample_rate: int) -> int:
        """How many frames :meth:`encode` returns for ``n_samples`` samples at ``sample_rate``."""
        return int(math.floor(n_samples * self.token_rate / sample_rate + 1e-9))

    # -- state -----------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """JSON-serialisable parameters written to ``audio_tokenizer.json``."""
        return {}

    def _save_files(self, directory: Path) -> None:
        """Write tensors / model files next to ``audio_tokenizer.json``."""

    @classmethod
    def _from_state(cls, directory: Path, params: dict[str, Any]) -> "AudioTokenizer":
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write the tokenizer's state into ``directory`` (created if missing)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_files(directory)
        state = {"type": self.name, "format_version": FORMAT_VERSION, "params": self.params()}
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "AudioTokenizer":
        """Load a tokenizer of this class from a directory written by :meth:`save`."""
        directory = Path(directory)
        state = read_state(directory)
        if state["type"] != cls.name:
            raise TokenizerError(f"{directory / STATE_FILE}: holds a {state['type']!r} tokenizer, not {cls.name!r}")
        return cls._from_state(directory, state["params"])


def read_state(directory: Path) -> dict[str, Any]:
    """The parsed ``audio_tokenizer.json`` of ``directory``, checked for type and version."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise TokenizerError(f"{path}: missing; not an audio tokenizer directory")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(state, dict) or "type" not in state or not isinstance(state.get("params"), dict):
        raise TokenizerError(f"{path}: expected an object with 'type' and 'params'")
    if state.get("format_version") != FORMAT_VERSION:
        raise TokenizerError(
            f"{path}: format_version {state.get('format_version')!r}, this audiotune reads {FORMAT_VERSION}"
        )
    return state
