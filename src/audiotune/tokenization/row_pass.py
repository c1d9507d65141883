"""The tokenize stage's row pass: each Dataset row → Tokens rows (text ids, audio codes, mel, speaker features)
or a quarantined record, written to shards, with the report, the speaker embeddings and the manifest fields.

Shared by the one-task stage (:mod:`audiotune.stages.tokenize`) and the per-unit fan-out
(:mod:`audiotune.stages.tokenize_units`), which runs it on each unit's part and sums the parts' states
(:func:`report_state`, :func:`report_from_states`) into the report the one-task pass would have written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np

from audiotune.data.schema import SPLITS, ShardWriter, read_shard
from audiotune.data.sources.base import BadRecord
from audiotune.data.workers import WorkerPool, worker_pool
from audiotune.errors import DataError
from audiotune.tokenization import features
from audiotune.tokenization.report import TokenizeReport
from audiotune.tokenization.schema import TOKENS_COLUMNS, TOKENS_SCHEMA
from audiotune.tokenization.text import windows
from audiotune.tokenization.tokenizer_setup import TokenizerSetup, shards

log = logging.getLogger(__name__)

AUDIO_TASKS_NEED_TEXT = ("tts", "clone", "edit", "understand", "text")


class TooManyBadRows(DataError):
    """More rows were quarantined than ``tokenize.max_bad_fraction`` allows."""


@dataclass
class TokenizeResult:
    """What a tokenize stage published (the one-task stage or the fan-out's merge)."""

    output: str
    report: dict[str, Any]
    manifest: dict[str, Any]


@dataclass
class RowOutputs:
    """Where the row pass writes: shards per split, the report, the quarantine, the speaker embeddings.

    ``audio_durations`` holds the duration of every row with audio codes, in order, so that summed parts give
    the report's audio seconds exactly as one pass adds them.
    """

    writers: dict[str, ShardWriter]
    report: TokenizeReport
    quarantine: TextIO
    embeddings: list[tuple[str, np.ndarray]] = field(default_factory=list)
    audio_durations: list[float] = field(default_factory=list)

    def add(self, row: dict[str, Any], split: str) -> None:
        self.writers[split].add(row)
        self.report.add(row, split)
        if row.get("audio_codes") is not None:
            self.audio_durations.append(row["duration_s"] or 0.0)

    def reject(self, bad: BadRecord) -> None:
        self.report.reasons[bad.reason] += 1
        self.quarantine.write(json.dumps(dataclasses.asdict(bad), ensure_ascii=False) + "\n")


def open_outputs(staging: Path, shard_max_rows: int, setup: TokenizerSetup, quarantine: TextIO) -> RowOutputs:
    """Shard writers for ``train/`` and ``val/`` under ``staging`` and an empty report."""
    writers = {s: ShardWriter(staging / s, shard_max_rows, 256 * 2**20, schema=TOKENS_SCHEMA,
                              uncompressed=("mel", "whisper_mel")) for s in SPLITS}
    audio = setup.audio_tok
    report = TokenizeReport(audio.num_codebooks if audio else 0, audio.codebook_size if audio else None)
    return RowOutputs(writers, report, quarantine)


def text_rows(row: dict[str, Any], tok, t: Any) -> list[dict[str, Any]] | BadRecord:
    """Token ids of a row's texts (``t``: the tokenize config); text documents become context windows."""
    meta = json.loads(row.get("meta") or "{}")

    def ids(text: str | None) -> list[int] | None:
        return tok(text, add_special_tokens=False)["input_ids"] if text else None

    text_ids = ids(row.get("text")) or []
    if not text_ids and row["task"] in AUDIO_TASKS_NEED_TEXT:
        return BadRecord(origin=meta.get("origin", row["id"]), field="text", reason=features.EMPTY_TOKENS,
                         detail=f"{row['id']}: text {row.get('text')!r} tokenizes to nothing", id=row["id"])
    instruction = (meta.get("instruction") or meta.get("edit_type")) if row["task"] == "edit" else None
    if row["task"] == "music" and row.get("tags"):
        instruction = ", ".join(row["tags"])
    base = {
        "source_id": row["id"], "task": row["task"], "speaker": row.get("speaker"),
        "prompt_text_ids": ids(row.get("prompt_text")), "instruction_ids": ids(instruction),
        "duration_s": row.get("duration_s"), "repeat_count": int(meta.get("repeat_count", 1)),
        "meta": row.get("meta"),
    }
    if row["task"] != "text":
        return [{**base, "id": row["id"], "text_ids": text_ids, "num_text_tokens": len(text_ids)}]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    # the llm stage's text layout ends a window that does not end with eos with one: each window keeps room for
    # it, so that windows of tokenize.context_length fit llm.max_seq_len=context_length
    length = t.context_length - 1
    pieces = list(windows(text_ids + eos, length, min(t.stride, length - 1)))
    return [{**base, "id": row["id"] if len(pieces) == 1 else f"{row['id']}#{k}", "text_ids": w,
             "num_text_tokens": len(w)} for k, w in enumerate(pieces)]


def audio_pool(stack: ExitStack, workers: int, rows: int, settings: features.FeatureSettings) -> WorkerPool | None:
    """The stage's worker pool (stopped with the stage, see :mod:`audiotune.data.workers`), or None to work here."""
    if workers > 1 and rows >= 4:
        return stack.enter_context(worker_pool(workers, features.init_worker, (settings,)))
    features.init_worker(settings)
    return None


def _map_audio(rows: list[dict], pool: WorkerPool | None, workers: int) -> Iterator[Any]:
    """Each row's audio features (or BadRecord), in row order, computed on ``pool`` (None: in this process)."""
    if pool is None:
        yield from (features.audio_features(r) for r in rows)
        return
    yield from pool.imap(features.audio_features, rows, chunksize=max(1, min(8, len(rows) // (workers * 4))))


def tokenize_folder(folder: Path, where: str, setup: TokenizerSetup, t: Any, out: RowOutputs,
                    pool: WorkerPool | None, workers: int, progress: Any = None) -> None:
    """Tokenize every row of a folder's ``train/`` then ``val/`` shards into ``out`` (quarantined rows name
    ``where`` + split/shard); ``progress.update(1)`` per row when given."""
    for split in SPLITS:
        for shard in shards(folder, split):
            rows = read_shard(shard)
            for row, feats in zip(rows, _map_audio(rows, pool, workers), strict=True):
                if progress is not None:
                    progress.update(1)
                texts = text_rows(row, setup.text_tok, t)
                bad = feats if isinstance(feats, BadRecord) else texts if isinstance(texts, BadRecord) else None
                if bad is not None:
                    out.reject(dataclasses.replace(bad, detail=f"{where}{split}/{shard.name}: {bad.detail}"))
                    continue
                for item in texts:
                    item.update(feats)
                    item["speaker_index"] = setup.speakers.get(item["speaker"] or "<unk>", 0)
                    out.add(item, split)
                if feats.get("speaker_embedding") is not None:
                    out.embeddings.append((row.get("speaker") or "<unk>", np.asarray(feats["speaker_embedding"])))


def check_bad_fraction(report: TokenizeReport, total: int, limit: float) -> float:
    """The quarantined fraction of ``total`` input rows.

    Raises:
        TooManyBadRows: above ``limit`` (``tokenize.max_bad_fraction``), with the reasons.
    """
    bad = sum(report.reasons.values())
    fraction = bad / (total or 1)
    if fraction > limit:
        raise TooManyBadRows(
            f"{bad} of {total} rows were quarantined ({fraction:.1%}), above tokenize.max_bad_fraction={limit}: "
            + ", ".join(f"{k}: {v}" for k, v in report.reasons.most_common()))
    return fraction


def save_speaker_means(embeddings: list[tuple[str, np.ndarray]], tok_dir: Path) -> None:
    """The per-speaker mean embeddings (``speaker_embeddings.safetensors``), when any row had one."""
    if not embeddings:
        return
    from safetensors.numpy import save_file

    from audiotune.tokenization.speaker import mean_embeddings

    means = mean_embeddings(embeddings)
    save_file({k: np.asarray(v, dtype=np.float32) for k, v in means.items()},
              str(tok_dir / "speaker_embeddings.safetensors"))


def report_state(out: RowOutputs) -> dict[str, Any]:
    """What a unit's part keeps of its report (JSON), for :func:`report_from_states`."""
    r = out.report
    return {"rows": dict(r.rows), "reasons": dict(r.reasons), "lengths": r.lengths, "text_tokens": r.text_tokens,
            "audio_frames": r.audio_frames, "audio_durations": out.audio_durations,
            "code_counts": [[[int(k), v] for k, v in c.items()] for c in r.code_counts]}


def report_from_states(states: list[dict[str, Any]], num_codebooks: int, codebook_size: int | None
                       ) -> TokenizeReport:
    """One report from the units' states in order: what one pass over their rows would have counted."""
    report = TokenizeReport(num_codebooks, codebook_size)
    for s in states:
        report.rows.update(s["rows"])
        report.reasons.update(s["reasons"])
        report.lengths.extend(s["lengths"])
        report.text_tokens += s["text_tokens"]
        report.audio_frames += s["audio_frames"]
        for seconds in s["audio_durations"]:
            report.audio_seconds += seconds
        for counts, pairs in zip(report.code_counts, s["code_counts"], strict=False):
            counts.update(Counter(dict(pairs)))
    return report


def manifest_fields(setup: TokenizerSetup, t: Any, base_model: str | None, dataset: str | None,
                    ds_manifest: dict[str, Any] | None, moss: bool) -> dict[str, Any]:
    """The Tokens manifest's fields but the splits and the quarantined count."""
    audio = setup.audio_tok
    return dict(
        dataset=dataset, dataset_fingerprint=(ds_manifest or {}).get("fingerprint"),
        sample_rate=(ds_manifest or {}).get("sample_rate"), columns=TOKENS_COLUMNS,
        moss_path=t.audio_tokenizer.moss_path if moss else None,
        text_tokenizer={"kind": setup.text_kind, "base_model": base_model, "vocab_size": len(setup.text_tok)},
        audio_tokenizer=None if audio is None else {
            "type": audio.name, "num_codebooks": audio.num_codebooks,
            "codebook_size": audio.codebook_size, "token_rate": audio.token_rate,
            **(audio.manifest_fields() if hasattr(audio, "manifest_fields") else {}),
        },
        mel=setup.mel.to_dict(), speakers=len(setup.speakers), speaker_embedding=t.speaker.type,
    )


def metrics(report: dict[str, Any]) -> dict[str, float]:
    """The tracked figures of a written report."""
    out = {
        "rows_train": report["rows"]["train"], "rows_val": report["rows"]["val"],
        "rows_quarantined": report["rows"]["quarantined"], "audio_hours": report["audio_hours"],
        "text_tokens": report["text_tokens"], "audio_frames": report["audio_frames"],
        "audio_s_per_s": report["throughput"]["audio_s_per_s"],
        "audio_s_per_s_per_core": report["throughput"]["audio_s_per_s_per_core"],
    }
    if report["audio_tokens_per_second"]:
        out["audio_tokens_per_second"] = report["audio_tokens_per_second"]
    for k, usage in enumerate(report["codebook_usage"]):
        out[f"codebook{k}_used_fraction"] = usage["used_fraction"]
        out[f"codebook{k}_perplexity"] = usage["perplexity"]
    for key, value in report["sequence_length_percentiles"].items():
        out[f"seq_len_{key}"] = value
    return out
