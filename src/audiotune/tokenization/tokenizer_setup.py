"""The tokenize stage's set-up, done once per Tokens artifact: the text tokenizer (the base model's, or trained
on the train texts), the audio tokenizer (fitted when it learns from data), the mel, Whisper and speaker tables,
all saved under one ``tokenizer/`` folder that the row pass (:mod:`audiotune.tokenization.row_pass`) loads.

The Dataset is read as a list of *folders* in order, each holding ``train/`` and ``val/`` Parquet shards: one
folder for the one-task stage (the Dataset), the convert units' parts in plan order for the fan-out (local, or S3
prefixes read column by column, see :mod:`audiotune.tokenization.dataset_columns`). Their rows in that order are
the Dataset's rows, so both build the same tokenizers.

The codebook fit sample is the seeded key order of the train rows' ids (:func:`fit_key`), taken until it holds
``fit_max_frames / token_rate`` seconds. A folder offers only the prefix of its own key order up to that many
seconds (:func:`fit_candidates`): the rows the whole Dataset's choice takes from one folder are always within
that prefix, so choosing among the folders' candidates (:func:`choose_fit_rows`) is the one-folder choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from audiotune import storage
from audiotune.config import AudiotuneConfig
from audiotune.data.audio import UndecodableAudio, decode_flac
from audiotune.data.schema import SPLITS
from audiotune.errors import DataError
from audiotune.tokenization import features
from audiotune.tokenization.dataset_columns import ColumnReader
from audiotune.tokenization.text import build_text_tokenizer

log = logging.getLogger(__name__)

SETUP_FILE = "setup.json"


class TokenizerSetupError(DataError):
    """The tokenizers cannot be set up from the config (a setting missing)."""


@dataclass
class TokenizerSetup:
    """The built (or loaded) tokenizers and what the row pass needs from them.

    Attributes:
        tok_dir: The ``tokenizer/`` folder they are saved in.
        text_tok: The text tokenizer.
        text_kind: ``base``, ``bpe`` or ``char``.
        audio_tok: The audio tokenizer; None for text-only data.
        mel: The target mel extractor.
        speakers: Speaker name → index.
        settings: What a worker process loads (:class:`features.FeatureSettings`).
        fit: The codebook fit: ``rows``, ``seconds``, ``rows_per_folder``, ``elapsed_s`` (empty when none ran).
    """

    tok_dir: Path
    text_tok: Any
    text_kind: str
    audio_tok: Any
    mel: Any
    speakers: dict[str, int]
    settings: features.FeatureSettings
    fit: dict[str, Any] = field(default_factory=dict)
    s3_bytes_read: int = 0

    def describe(self) -> dict[str, Any]:
        """The JSON-able part (``setup.json`` of the fan-out's set-up artifact)."""
        return {"text_kind": self.text_kind, "text_vocab_size": len(self.text_tok), "speakers": len(self.speakers),
                "audio_tokenizer": self.audio_tok.name if self.audio_tok else None, "fit": self.fit,
                "s3_bytes_read": self.s3_bytes_read}


def shards(folder: Path, split: str) -> list[Path]:
    """A folder's Parquet shards of ``split``, in order."""
    return sorted((Path(folder) / split).glob("part-*.parquet"))


def iter_rows(folders: list, split: str, columns: list[str], reader: ColumnReader | None = None
              ) -> Iterator[dict[str, Any]]:
    """``columns`` of every row of ``split`` across ``folders`` (local or S3), in order."""
    reader = reader or ColumnReader()
    for folder in folders:
        for shard in reader.shards(folder, split):
            yield from reader.read(shard, columns)


def train_texts(folders: list, reader: ColumnReader | None = None) -> Iterator[str]:
    """Every piece of train text a trained text tokenizer must cover."""
    for row in iter_rows(folders, "train", ["text", "prompt_text", "lyrics", "tags", "meta"], reader):
        for key in ("text", "prompt_text", "lyrics"):
            if row.get(key):
                yield row[key]
        if row.get("tags"):
            yield ", ".join(row["tags"])
        meta = json.loads(row.get("meta") or "{}")
        for key in ("edit_type", "instruction"):
            if meta.get(key):
                yield str(meta[key])


def fit_key(seed: int, row_id: str) -> str:
    """A row's place in the seeded fit order (a hash of the seed and the id)."""
    return hashlib.sha256(f"{seed}\0{row_id}".encode()).hexdigest()[:16]


def seconds_prefix(rows: list[tuple[str, str, float]], max_seconds: float) -> list[tuple[str, str, float]]:
    """``(key, id, seconds)`` rows in key order, up to the one that brings them to ``max_seconds``."""
    out, total = [], 0.0
    for row in sorted(rows):
        if total >= max_seconds:
            break
        out.append(row)
        total += row[2]
    return out


def fit_candidates(folder: Any, max_seconds: float, seed: int, reader: ColumnReader | None = None
                   ) -> list[tuple[str, str, float]]:
    """A folder's train rows (``(key, id, seconds)``, rows without a duration never) in key order, up to the one
    that brings them to ``max_seconds``: all that :func:`choose_fit_rows` can take from this folder."""
    return seconds_prefix([(fit_key(seed, r["id"]), r["id"], float(r["duration_s"]))
                           for r in iter_rows([folder], "train", ["id", "duration_s"], reader) if r["duration_s"]],
                          max_seconds)


def choose_fit_rows(candidates: list[tuple[str, str, float]], max_seconds: float) -> list[str]:
    """The ids of the fit sample, in key order, until they hold ``max_seconds``."""
    return [row_id for _, row_id, _ in seconds_prefix(candidates, max_seconds)]


def fit_sample(folders: list, max_seconds: float, seed: int, reader: ColumnReader | None = None
               ) -> tuple[list[tuple[np.ndarray, int]], dict]:
    """The decoded fit sample across ``folders`` (in key order) and where it came from (``rows_per_folder``); only
    the shards that hold a chosen row have their audio read."""
    reader = reader or ColumnReader()
    per_folder = [fit_candidates(f, max_seconds, seed, reader) for f in folders]
    chosen = choose_fit_rows([c for cands in per_folder for c in cands], max_seconds)
    rank = {row_id: k for k, row_id in enumerate(chosen)}
    picked, counts = [], []
    for folder in folders:
        found = []
        for shard in reader.shards(folder, "train"):
            if any(r["id"] in rank for r in reader.read(shard, ["id"])):
                found.extend(r for r in reader.read(shard, ["id", "audio"]) if r["id"] in rank)
        counts.append(len(found))
        picked.extend(found)
    picked.sort(key=lambda r: rank[r["id"]])
    sample = []
    for r in picked:
        try:
            sample.append(decode_flac(r["audio"]))
        except UndecodableAudio as err:  # the row pass quarantines it, naming shard and row
            log.warning("row %s left out of the codebook fit: %s", r["id"], err)
    seconds = sum(len(w) / sr for w, sr in sample)
    return sample, {"rows": len(sample), "seconds": round(seconds, 3), "rows_per_folder": counts,
                    "candidates_per_folder": [len(c) for c in per_folder]}


def _audio_tokenizer(cfg: AudiotuneConfig, folders: list, tok_dir: Path, reader: ColumnReader) -> tuple[Any, dict]:
    """Build, fit (when it learns from data) and save the audio tokenizer."""
    from audiotune.tokenization.audio_tokenizers import build_audio_tokenizer

    t = cfg.tokenize
    tokenizer = build_audio_tokenizer(t.audio_tokenizer, resolve_path=lambda uri: str(storage.local_copy(uri)))
    fit: dict[str, Any] = {}
    if getattr(tokenizer, "fitted", True) is False:  # learns its codebook from this data
        seconds = t.audio_tokenizer.fit_max_frames / t.audio_tokenizer.token_rate
        sample, fit = fit_sample(folders, seconds, cfg.run.seed, reader)
        started = time.perf_counter()
        by_rate: dict[int, list[np.ndarray]] = {}
        for wav, sr in sample:
            by_rate.setdefault(sr, []).append(wav)
        for sr, wavs in by_rate.items():
            tokenizer.fit(wavs, sr, cfg.run.seed)
        fit["elapsed_s"] = round(time.perf_counter() - started, 3)
        log.info("fitted %s on %d utterances (%s per folder) in %.1f s", tokenizer.name, len(sample),
                 fit["rows_per_folder"], fit["elapsed_s"])
    tokenizer.save(tok_dir / "audio")
    return tokenizer, fit


def _settings(cfg: AudiotuneConfig, tok_dir: Path) -> features.FeatureSettings:
    t = cfg.tokenize
    speaker_model = None
    if t.speaker.type == "onnx":
        if not t.speaker.onnx_path:
            raise TokenizerSetupError("tokenize.speaker.type is 'onnx' but tokenize.speaker.onnx_path is not set")
        speaker_model = str(storage.local_copy(t.speaker.onnx_path))
    return features.FeatureSettings(
        tokenizer_dir=str(tok_dir), speaker_model=speaker_model, align_tolerance=t.align_tolerance,
        codes_field=t.audio_tokenizer.codes_field, vocab_size=t.audio_tokenizer.vocab_size,
        whisper=t.whisper.model_dump(exclude={"enabled"}) if t.whisper.enabled else None,
    )


def build(cfg: AudiotuneConfig, folders: list, base_model: str | None, has_audio: bool, tok_dir: Path,
          moss: bool = False) -> TokenizerSetup:
    """Build every tokenizer from the Dataset ``folders`` (in order) and save them into ``tok_dir``.

    Args:
        cfg: The pipeline config (``tokenize``, ``run.seed``, ``llm.trust_remote_code``).
        folders: The Dataset's folders (local paths or S3 prefixes), in row order (empty for a MOSS-TTSD import).
        base_model: Base model URI whose text tokenizer is used, or None.
        has_audio: Whether the Dataset has audio (else no audio tokenizer).
        tok_dir: The (new) folder to save into.
        moss: A MOSS-TTSD import (the base model's text tokenizer, the precomputed codes).
    """
    from audiotune.tokenization.mel import MelExtractor
    from audiotune.tokenization.speaker import speaker_table

    t = cfg.tokenize
    reader = ColumnReader()
    tok_dir.mkdir(parents=True, exist_ok=True)
    text_tok, text_kind = build_text_tokenizer("base" if moss else t.text_tokenizer, base_model,
                                               train_texts(folders, reader), t.vocab_size, cfg.llm.trust_remote_code,
                                               (t.max_base_tokenizer_mb, t.max_base_vocab))
    text_tok.save_pretrained(str(tok_dir))
    audio_tok, fit = (None, {})
    if (has_audio or moss) and t.audio_tokenizer.type != "none":
        audio_tok, fit = _audio_tokenizer(cfg, folders, tok_dir, reader)
    mel = MelExtractor.from_config(t.mel)
    (tok_dir / "mel.json").write_text(json.dumps(mel.to_dict(), indent=2) + "\n")
    speakers = speaker_table(r["speaker"] for s in SPLITS for r in iter_rows(folders, s, ["speaker"], reader))
    (tok_dir / "speakers.json").write_text(json.dumps(speakers, indent=2, ensure_ascii=False) + "\n")
    settings = _settings(cfg, tok_dir)
    if t.whisper.enabled:
        (tok_dir / "whisper.json").write_text(json.dumps(settings.whisper, indent=2) + "\n")
    return TokenizerSetup(tok_dir, text_tok, text_kind, audio_tok, mel, speakers, settings, fit, reader.s3_bytes_read)


def load(cfg: AudiotuneConfig, tok_dir: Path, described: dict[str, Any]) -> TokenizerSetup:
    """The set-up saved in ``tok_dir`` by :func:`build` (``described``: its :meth:`TokenizerSetup.describe`)."""
    from transformers import AutoTokenizer

    from audiotune.tokenization.audio_tokenizers import load_audio_tokenizer
    from audiotune.tokenization.mel import MelExtractor

    text_tok = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=cfg.llm.trust_remote_code)
    audio_tok = load_audio_tokenizer(tok_dir / "audio") if (tok_dir / "audio").exists() else None
    mel = MelExtractor.from_dict(json.loads((tok_dir / "mel.json").read_text()))
    speakers = json.loads((tok_dir / "speakers.json").read_text(encoding="utf-8"))
    return TokenizerSetup(tok_dir, text_tok, described["text_kind"], audio_tok, mel, speakers,
                          _settings(cfg, tok_dir), described.get("fit", {}))
