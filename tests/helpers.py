"""Small audio and corpus builders shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf


def tone(seconds: float, sr: int, channels: int = 1, freq: float = 220.0, amp: float = 0.3,
         seed: int = 0) -> np.ndarray:
    """A harmonic tone with a little noise; shape (frames,) or (frames, channels)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    x = amp * (np.sin(2 * np.pi * freq * t) + 0.3 * np.sin(2 * np.pi * 2 * freq * t))
    x = x + 0.01 * rng.standard_normal(len(t))
    x = x.astype(np.float32)
    if channels > 1:
        x = np.stack([x * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1)
    return x


def write_audio(path: Path, seconds: float = 1.0, sr: int = 22050, channels: int = 1, fmt: str | None = None,
                seed: int = 0, freq: float = 220.0) -> Path:
    """Write a tone to ``path`` (format from the extension unless ``fmt``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if fmt is None and path.suffix.lower() == ".mp3":
        fmt = "MP3"
    if fmt:
        kwargs["format"] = fmt
    sf.write(path, tone(seconds, sr, channels, freq=freq, seed=seed), sr, **kwargs)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw str/bytes lines) as a JSONL file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode() + b"\n")
            else:
                f.write(json.dumps(row).encode() + b"\n")
    return path


def good_corpus(root: Path, n: int, sr: int = 22050, start: int = 0) -> Path:
    """A plain JSONL corpus of ``n`` good rows (ids utt00000 ...), returns the manifest path."""
    rows = []
    for i in range(start, start + n):
        rel = f"wavs/utt{i:05d}.wav"
        write_audio(root / rel, seconds=0.5 + (i % 5) * 0.2, sr=sr, seed=i, freq=150 + 10 * (i % 7))
        rows.append({"id": f"utt{i:05d}", "audio": rel, "text": f"sentence number {i}", "speaker": f"spk{i % 3}"})
    return write_jsonl(root / "manifest.jsonl", rows)


LLM_TOKENIZE = ["tracking.enabled=false", "convert.val_fraction=0.2", "tokenize.vocab_size=300",
                "tokenize.audio_tokenizer.codebook_size=32", "tokenize.audio_tokenizer.fit_max_frames=3000"]


def save_tiny_base(tokens: Path, path: Path, arch: str = "qwen2", tie: bool = False) -> Path:
    """A tiny random causal LM saved as a 'pretrained' base whose vocabulary is the Tokens' text tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokens / "tokenizer"))
    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=tie, initializer_range=0.2)  # logits not stuck near 0
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def release_tokens(root: Path, folder: Path, n: int = 6, speaker_dim: int | None = None,
                   token_rate: float | None = None, seed: int = 0) -> Path:
    """A Tokens artifact built to fit a kit flow folder: its mel settings, vocabulary, token rate and x-vector
    size (precomputed codes, random mels and x-vectors), unless one of them is overridden."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audiotune.models.flow.native.release import load_release

    _, info = load_release(folder)
    mel = {"format": "cosyvoice-log-mel", **info.mel}
    rate = token_rate or info.token_rate
    per_token = mel["sample_rate"] / mel["hop_length"] / rate
    dim = speaker_dim or info.spk_embed_dim
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", 2)):
        rows = []
        for i in range(count):
            codes = int(rng.integers(6, 12))
            frames = int(round(codes * per_token))
            rows.append({"id": f"{split}{i}", "audio_codes": [rng.integers(0, info.vocab_size, codes).tolist()],
                         "mel": rng.standard_normal((frames, info.n_mels)).astype("<f4").tobytes(),
                         "mel_frames": frames, "speaker_index": 0, "repeat_count": 1,
                         "speaker_embedding": rng.standard_normal(dim).astype(np.float32).tolist()})
        (root / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / split / "part-00000.parquet")
    manifest = {"kind": "audiotune.tokens", "schema_version": 1, "mel": mel, "speakers": 1,
                "speaker_embedding": "onnx", "dataset_fingerprint": "test",
                "audio_tokenizer": {"type": "precomputed", "num_codebooks": 1, "codebook_size": info.vocab_size,
                                    "token_rate": rate}}
    from audiotune.artifacts import shard_files

    manifest["shard_files"] = shard_files(root)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root
