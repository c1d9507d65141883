"""Pluggable audio tokenizers: audio (or codes in the source) → discrete codes ``[codebooks, frames]``.

``build_audio_tokenizer(cfg)`` makes the one named by ``tokenize.audio_tokenizer.type``;
``load_audio_tokenizer(directory)`` reads one back from the Tokens artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from audiotune.tokenization.audio_tokenizers.base import (
    AudioTokenizer,
    CodesOutOfRange,
    RowError,
    TokenizerError,
    read_state,
)
from audiotune.tokenization.audio_tokenizers.mel_kmeans import MelKMeansTokenizer
from audiotune.tokenization.audio_tokenizers.precomputed import PrecomputedTokenizer, iter_moss_shards
from audiotune.tokenization.audio_tokenizers.s3tokenizer import S3Tokenizer

REGISTRY: dict[str, type[AudioTokenizer]] = {
    MelKMeansTokenizer.name: MelKMeansTokenizer,
    S3Tokenizer.name: S3Tokenizer,
    PrecomputedTokenizer.name: PrecomputedTokenizer,
}

__all__ = [
    "REGISTRY", "AudioTokenizer", "CodesOutOfRange", "MelKMeansTokenizer", "PrecomputedTokenizer", "RowError",
    "S3Tokenizer", "TokenizerError", "build_audio_tokenizer", "iter_moss_shards", "load_audio_tokenizer",
]


def build_audio_tokenizer(cfg: Any, resolve_path: Callable[[str], Path] = Path) -> AudioTokenizer:
    """The tokenizer an ``AudioTokenizerConfig`` names (unfitted for mel-kmeans).

    Args:
        cfg: ``tokenize.audio_tokenizer``.
        resolve_path: Turns a configured URI (``onnx_path``, ``moss_path``) into a local path,
            e.g. ``audiotune.storage.local_copy`` for ``s3://`` URIs.

    Raises:
        TokenizerError: ``type`` is ``none`` (no audio codes) or unknown, or the model cannot be loaded.
    """
    if cfg.type == MelKMeansTokenizer.name:
        return MelKMeansTokenizer.from_config(cfg)
    if cfg.type == S3Tokenizer.name:
        return S3Tokenizer.from_config(cfg, resolve_path)
    if cfg.type == PrecomputedTokenizer.name:
        return PrecomputedTokenizer.from_config(cfg, resolve_path)
    raise TokenizerError(
        f"tokenize.audio_tokenizer.type={cfg.type!r}: no audio tokenizer to build (expected one of {sorted(REGISTRY)})"
    )


def load_audio_tokenizer(directory: str | Path) -> AudioTokenizer:
    """The tokenizer saved in ``directory`` (its ``audio_tokenizer.json`` names the type)."""
    directory = Path(directory)
    kind = read_state(directory)["type"]
    if kind not in REGISTRY:
        raise TokenizerError(f"{directory}: unknown audio tokenizer type {kind!r} (known: {sorted(REGISTRY)})")
    return REGISTRY[kind].load(directory)
