"""The eval set: fixed utterances (text, optional voice prompt, optional reference recording, speaker), loaded from
a Dataset artifact's validation rows or from a JSONL, and fingerprinted so that two models are compared on the
same utterances.

A JSONL row is ``{"id", "text", "speaker", "prompt_wav", "prompt_text", "reference_wav"}`` (only ``text`` is
required; wav paths are relative to the JSONL's folder, local or s3://).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audiotune import artifacts, storage
from audiotune.evaluation import EvaluationError

log = logging.getLogger(__name__)

TASKS = ("tts", "clone")  # rows synthesized from text (edit rows need a source recording to edit)


@dataclass
class EvalItem:
    """One eval utterance. Audio is held as encoded file bytes (WAV/FLAC), decoded on use."""

    id: str
    text: str
    speaker: str | None = None
    prompt_text: str | None = None
    prompt_audio: bytes | None = None
    reference_audio: bytes | None = None

    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.id, self.text, self.speaker or "", self.prompt_text or ""):
            h.update(part.encode("utf-8") + b"\0")
        for blob in (self.prompt_audio, self.reference_audio):
            h.update(hashlib.sha256(blob).digest() if blob else b"-")
        return h.hexdigest()


@dataclass
class EvalSet:
    """The utterances, where they came from, and their fingerprint."""

    items: list[EvalItem]
    source: str
    uri: str = ""  # what evaluates the same set again (a Dataset artifact or the JSONL)
    fingerprint: str = ""
    overlap: int = 0
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.fingerprint:
            h = hashlib.sha256(b"audiotune-evalset-v1\0")
            for item in self.items:
                h.update(item.digest().encode())
            self.fingerprint = h.hexdigest()


def decode(blob: bytes, what: str) -> tuple[np.ndarray, int]:
    """Mono float32 samples and rate of encoded audio bytes."""
    import soundfile as sf

    try:
        wav, sr = sf.read(io.BytesIO(blob), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as err:
        raise EvaluationError(f"{what}: not readable audio ({err})") from None
    return wav.mean(axis=1), int(sr)


def dataset_of_export(export_manifest: dict[str, Any]) -> str | None:
    """The Dataset URI behind an export: export manifest → its Tokens → the Tokens' ``dataset``."""
    tokens = export_manifest.get("tokens")
    if not tokens:
        return None
    try:
        return artifacts.read_manifest(tokens, artifacts.TOKENS, artifacts.TOKENS_VERSION).get("dataset")
    except artifacts.ArtifactError as err:
        log.warning("the export's Tokens are not readable (%s): no Dataset to take eval rows from", err)
        return None


def _parquet_rows(dataset: str, split: str, columns: list[str]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    parts = sorted(f for f in storage.list_files(dataset) if f.startswith(f"{split}/") and f.endswith(".parquet"))
    for rel in parts:
        path = storage.local_copy(storage.join(dataset, rel)) if storage.is_s3(dataset) \
            else Path(dataset) / rel
        rows += pq.read_table(str(path), columns=columns).to_pylist()
    return rows


def from_dataset(dataset: str, limit: int) -> EvalSet:
    """The validation rows (tts and clone, with text) of a Dataset artifact, the first ``limit`` by id."""
    artifacts.read_manifest(dataset, artifacts.DATASET, artifacts.DATASET_VERSION)
    rows = _parquet_rows(dataset, "val", ["id", "task", "text", "speaker", "audio", "prompt_text", "prompt_audio"])
    rows = sorted((r for r in rows if r["task"] in TASKS and (r["text"] or "").strip()), key=lambda r: r["id"])
    if not rows:
        raise EvaluationError(f"{dataset}: no validation rows with text (tasks {', '.join(TASKS)}) to evaluate on; "
                              "give an eval set (--eval-set / evaluate.eval_set)")
    items = [EvalItem(id=r["id"], text=r["text"].strip(), speaker=r["speaker"],
                      prompt_text=r["prompt_text"] if r["task"] == "clone" else None,
                      prompt_audio=r["prompt_audio"] if r["task"] == "clone" else None,
                      reference_audio=r["audio"]) for r in rows[:limit]]
    return EvalSet(items, source=f"{dataset} (val)", uri=dataset)


def from_jsonl(uri: str, limit: int) -> EvalSet:
    """Rows of a JSONL eval set; wav paths relative to its folder."""
    try:
        lines = storage.read_text(uri).splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise EvaluationError(f"cannot read the eval set {uri}: {err}") from None
    base = uri.rsplit("/", 1)[0] if "/" in str(uri) else "."
    items, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvaluationError(f"{uri} line {number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not str(row.get("text") or "").strip():
            raise EvaluationError(f"{uri} line {number}: a row needs a non-empty 'text'")
        rid = str(row.get("id") or f"line{number:05d}")
        if rid in seen:
            raise EvaluationError(f"{uri} line {number}: id {rid!r} appears twice")
        seen.add(rid)
        if row.get("prompt_wav") and not row.get("prompt_text"):
            raise EvaluationError(f"{uri} line {number}: 'prompt_wav' needs its transcript in 'prompt_text'")

        items.append(EvalItem(id=rid, text=str(row["text"]).strip(), speaker=row.get("speaker"),
                              prompt_text=row.get("prompt_text"),
                              prompt_audio=_audio(uri, base, number, row, "prompt_wav"),
                              reference_audio=_audio(uri, base, number, row, "reference_wav")))
    if not items:
        raise EvaluationError(f"{uri}: the eval set has no rows")
    return EvalSet(sorted(items, key=lambda i: i.id)[:limit], source=uri, uri=uri)


def _audio(uri: str, base: str, number: int, row: dict[str, Any], key: str) -> bytes | None:
    """The bytes of a JSONL row's wav (``key``), its path relative to the JSONL's folder."""
    rel = row.get(key)
    if not rel:
        return None
    target = rel if storage.is_s3(rel) or Path(rel).is_absolute() else storage.join(base, rel)
    try:
        return storage.read_bytes(target)
    except OSError as err:
        raise EvaluationError(f"{uri} line {number}: {key} {rel!r} cannot be read ({err})") from None


def load_eval_set(uri: str | None, export_manifest: dict[str, Any], limit: int) -> EvalSet:
    """``uri`` (a Dataset artifact or a JSONL), else the validation rows of the export's Dataset."""
    if uri is None:
        dataset = dataset_of_export(export_manifest)
        if not dataset:
            raise EvaluationError("no eval set given and the export records no Dataset (manifest tokens → dataset); "
                                  "give --eval-set / evaluate.eval_set")
        return from_dataset(dataset, limit)
    if storage.exists(storage.join(uri, artifacts.MANIFEST)):
        return from_dataset(uri, limit)
    if not storage.exists(uri):
        raise EvaluationError(f"eval set {uri} does not exist (expected a Dataset artifact or a JSONL file)")
    return from_jsonl(uri, limit)


def count_overlap(eval_set: EvalSet, dataset: str | None) -> int:
    """Eval rows that are also training rows of ``dataset`` (same id, or same text and speaker)."""
    if not dataset:
        return 0
    try:
        train = _parquet_rows(dataset, "train", ["id", "text", "speaker"])
    except (OSError, artifacts.ArtifactError) as err:
        log.warning("cannot read the training rows of %s (%s): overlap not checked", dataset, err)
        return 0
    ids = {r["id"] for r in train}
    pairs = {((r["text"] or "").strip().lower(), r["speaker"]) for r in train}
    return sum(1 for i in eval_set.items if i.id in ids or (i.text.lower(), i.speaker) in pairs)
