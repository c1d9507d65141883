"""The tokenize stage: a Dataset artifact → a Tokens artifact.

Recipe: read the Dataset → build the text tokenizer (the base model's, or trained
here) → build and fit the audio tokenizer → save both with the mel config under
``tokenizer/`` → per row, in parallel: text ids, audio codes, prompt codes, target
mel, speaker embedding → shards, quarantine, report → publish → track.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from audiotune import artifacts, publish, storage, tracking
from audiotune.config import AudiotuneConfig, TokenizeConfig, dump_config
from audiotune.data.audio import UndecodableAudio, decode_flac
from audiotune.data.schema import ShardWriter, read_shard, split_of
from audiotune.data.sources.base import BadRecord
from audiotune.data.workers import WorkerPool, num_workers, stop_on_signals, worker_pool
from audiotune.errors import DataError
from audiotune.tokenization import features
from audiotune.tokenization.audio_tokenizers.base import CodesOutOfRange
from audiotune.tokenization.report import TokenizeReport
from audiotune.tokenization.schema import TOKENS_COLUMNS, TOKENS_SCHEMA
from audiotune.tokenization.text import build_text_tokenizer, windows

log = logging.getLogger(__name__)

AUDIO_TASKS_NEED_TEXT = ("tts", "clone", "edit", "understand", "text")


class TokenizeError(DataError):
    """The tokenize stage failed as a whole."""


@dataclass
class TokenizeResult:
    """What the stage produced."""

    output: str
    report: dict[str, Any]
    manifest: dict[str, Any]


def _shards(ds_dir: Path, split: str) -> list[Path]:
    return sorted((ds_dir / split).glob("part-*.parquet"))


def _iter_column_rows(ds_dir: Path, split: str, columns: list[str]) -> Iterator[dict[str, Any]]:
    for shard in _shards(ds_dir, split):
        yield from read_shard(shard, columns)


def _texts(ds_dir: Path) -> Iterator[str]:
    """Every piece of train text a trained tokenizer must cover."""
    for row in _iter_column_rows(ds_dir, "train", ["text", "prompt_text", "lyrics", "tags", "meta"]):
        for key in ("text", "prompt_text", "lyrics"):
            if row.get(key):
                yield row[key]
        if row.get("tags"):
            yield ", ".join(row["tags"])
        meta = json.loads(row.get("meta") or "{}")
        for key in ("edit_type", "instruction"):
            if meta.get(key):
                yield str(meta[key])


def _fit_sample(ds_dir: Path, max_seconds: float, seed: int) -> list[tuple[np.ndarray, int]]:
    """A seeded random sample of train audio (up to ``max_seconds``) to fit a codebook on."""
    rows = [r for r in _iter_column_rows(ds_dir, "train", ["id", "duration_s"]) if r["duration_s"]]
    random.Random(seed).shuffle(rows)
    chosen, total = {}, 0.0
    for rank, row in enumerate(rows):
        if total >= max_seconds:
            break
        chosen[row["id"]] = rank
        total += row["duration_s"]
    picked = [r for r in _iter_column_rows(ds_dir, "train", ["id", "audio"]) if r["id"] in chosen]
    picked.sort(key=lambda r: chosen[r["id"]])
    sample = []
    for r in picked:
        try:
            sample.append(decode_flac(r["audio"]))
        except UndecodableAudio as err:  # the row pass quarantines it, naming shard and row
            log.warning("row %s left out of the codebook fit: %s", r["id"], err)
    return sample


def _build_audio_tokenizer(t: TokenizeConfig, ds_dir: Path, has_audio: bool, seed: int, tok_dir: Path):
    """Build, fit (when it learns from data) and save the audio tokenizer; None for text-only data."""
    if not has_audio or t.audio_tokenizer.type == "none":
        return None
    from audiotune.tokenization.audio_tokenizers import build_audio_tokenizer

    tokenizer = build_audio_tokenizer(t.audio_tokenizer, resolve_path=lambda uri: str(storage.local_copy(uri)))
    if getattr(tokenizer, "fitted", True) is False:  # learns its codebook from this data
        seconds = t.audio_tokenizer.fit_max_frames / t.audio_tokenizer.token_rate
        sample = _fit_sample(ds_dir, seconds, seed)
        started = time.perf_counter()
        by_rate: dict[int, list[np.ndarray]] = {}
        for wav, sr in sample:
            by_rate.setdefault(sr, []).append(wav)
        for sr, wavs in by_rate.items():
            tokenizer.fit(wavs, sr, seed)
        log.info("fitted %s on %d utterances in %.1f s", tokenizer.name, len(sample), time.perf_counter() - started)
    tokenizer.save(tok_dir / "audio")
    return tokenizer


def _text_rows(row: dict[str, Any], tok, t: TokenizeConfig) -> list[dict[str, Any]] | BadRecord:
    """Token ids of a row's texts; text documents become context windows."""
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


def _audio_pool(stack: ExitStack, workers: int, rows: int, settings: features.FeatureSettings) -> WorkerPool | None:
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


def tokenize(cfg: AudiotuneConfig, dataset: str | None, output: str, base_model: str | None = None) -> TokenizeResult:
    """Run the tokenize stage.

    Args:
        cfg: The pipeline config; the ``tokenize`` section drives this stage.
        dataset: URI of a Dataset artifact (local or s3://). May be None only for a MOSS-TTSD
            import (``audio_tokenizer.moss_path``), whose shards carry text ids and codes.
        output: URI for the Tokens artifact.
        base_model: Base model URI whose tokenizer to use (overrides ``tokenize.base_model``).
    """
    t = cfg.tokenize
    base_model = base_model or t.base_model
    log.info("tokenize: %s -> %s\n%s", dataset, output, dump_config(cfg))
    moss = t.audio_tokenizer.type == "precomputed" and bool(t.audio_tokenizer.moss_path)
    if dataset is None and not moss:
        raise TokenizeError("no Dataset given: pass --dataset (only a MOSS-TTSD import reads none)")
    if moss and not base_model:
        raise TokenizeError("a MOSS-TTSD import needs --base-model: its shards hold that model's text ids")
    publish.require_missing_or_overwrite(output, t.overwrite, artifacts.TOKENS, [dataset, base_model])
    ds_manifest = artifacts.read_manifest(dataset, artifacts.DATASET, artifacts.DATASET_VERSION) if dataset else None
    workers = num_workers(cfg.run.num_workers)
    # on SIGTERM / SIGINT every block below unwinds: the pool stops first, then the staging folder goes
    with stop_on_signals("tokenize"), tempfile.TemporaryDirectory(prefix="audiotune-tokenize-"), \
            tracking.stage_run(cfg.tracking, "tokenize") as tracker, \
            publish.publish_dir(output, overwrite=t.overwrite, kind=artifacts.TOKENS,
                                inputs=[dataset, base_model]) as staging, ExitStack() as stack:
        start = time.perf_counter()
        tracker.log_params({"tokenize": t.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json")})
        ds_dir = storage.local_copy(dataset) if dataset else None
        if ds_dir is not None:
            artifacts.verify_shards(ds_dir, ds_manifest, dataset)
        tok_dir = staging / "tokenizer"
        tok_dir.mkdir(parents=True)

        texts = _texts(ds_dir) if ds_dir else iter(())
        text_tok, text_kind = build_text_tokenizer("base" if moss else t.text_tokenizer, base_model, texts,
                                                   t.vocab_size, cfg.llm.trust_remote_code,
                                                   (t.max_base_tokenizer_mb, t.max_base_vocab))
        text_tok.save_pretrained(str(tok_dir))
        has_audio = ds_manifest is not None and ds_manifest.get("format") != "text"
        audio_tok = _build_audio_tokenizer(t, ds_dir, has_audio or moss, cfg.run.seed, tok_dir)
        from audiotune.tokenization.mel import MelExtractor
        from audiotune.tokenization.speaker import speaker_table

        mel_x = MelExtractor.from_config(t.mel)
        (tok_dir / "mel.json").write_text(json.dumps(mel_x.to_dict(), indent=2) + "\n")
        speakers = speaker_table(r["speaker"] for s in ("train", "val") if ds_dir
                                 for r in _iter_column_rows(ds_dir, s, ["speaker"]))
        (tok_dir / "speakers.json").write_text(json.dumps(speakers, indent=2, ensure_ascii=False) + "\n")
        speaker_model = None
        if t.speaker.type == "onnx":
            if not t.speaker.onnx_path:
                raise TokenizeError("tokenize.speaker.type is 'onnx' but tokenize.speaker.onnx_path is not set")
            speaker_model = str(storage.local_copy(t.speaker.onnx_path))
        settings = features.FeatureSettings(
            tokenizer_dir=str(tok_dir), speaker_model=speaker_model, align_tolerance=t.align_tolerance,
            codes_field=t.audio_tokenizer.codes_field, vocab_size=t.audio_tokenizer.vocab_size,
            whisper=t.whisper.model_dump(exclude={"enabled"}) if t.whisper.enabled else None,
        )
        if t.whisper.enabled:
            (tok_dir / "whisper.json").write_text(json.dumps(settings.whisper, indent=2) + "\n")

        report = TokenizeReport(audio_tok.num_codebooks if audio_tok else 0,
                                audio_tok.codebook_size if audio_tok else None)
        writers = {s: ShardWriter(staging / s, t.shard_max_rows, 256 * 2**20, schema=TOKENS_SCHEMA,
                                  uncompressed=("mel", "whisper_mel")) for s in ("train", "val")}
        embeddings: list[tuple[str, np.ndarray]] = []
        total = sum(ds_manifest["splits"][s]["rows"] for s in ("train", "val")) if ds_manifest else 0
        setup_s = time.perf_counter() - start  # tokenizers built and fitted
        log.info("tokenizers ready in %.1f s", setup_s)
        pool = _audio_pool(stack, workers, total, settings) if ds_dir else None
        with open(staging / "quarantine.jsonl", "w", encoding="utf-8") as quarantine, \
                tqdm(total=total, desc="tokenize", unit="row", mininterval=2.0) as bar:
            for split in ("train", "val") if ds_dir else ():
                for shard in _shards(ds_dir, split):
                    rows = read_shard(shard)
                    for row, feats in zip(rows, _map_audio(rows, pool, workers), strict=True):
                        bar.update(1)
                        texts = _text_rows(row, text_tok, t)
                        bad = feats if isinstance(feats, BadRecord) else texts if isinstance(texts, BadRecord) else None
                        if bad is not None:
                            bad = dataclasses.replace(bad, detail=f"{split}/{shard.name}: {bad.detail}")
                            report.reasons[bad.reason] += 1
                            quarantine.write(json.dumps(dataclasses.asdict(bad), ensure_ascii=False) + "\n")
                            continue
                        for out in texts:
                            out.update(feats)
                            out["speaker_index"] = speakers.get(out["speaker"] or "<unk>", 0)
                            writers[split].add(out)
                            report.add(out, split)
                        if feats.get("speaker_embedding") is not None:
                            embeddings.append((row.get("speaker") or "<unk>", np.asarray(feats["speaker_embedding"])))
            if moss:
                for split, item in _moss_rows(audio_tok, cfg.convert.val_fraction):
                    total += 1
                    bar.update(1)
                    if isinstance(item, BadRecord):
                        report.reasons[item.reason] += 1
                        quarantine.write(json.dumps(dataclasses.asdict(item), ensure_ascii=False) + "\n")
                    else:
                        writers[split].add(item)
                        report.add(item, split)
        for w in writers.values():
            w.flush()
        _save_speaker_means(embeddings, tok_dir)
        elapsed = time.perf_counter() - start
        rows_s = elapsed - setup_s
        bad_fraction = sum(report.reasons.values()) / (total or 1)
        throughput = {  # rows: the per-row work; end_to_end adds building and fitting the tokenizers
            "elapsed_s": round(elapsed, 3), "tokenizer_setup_s": round(setup_s, 3), "rows_s": round(rows_s, 3),
            "workers": workers,
            "audio_s_per_s": round(report.audio_seconds / rows_s, 2),
            "audio_s_per_s_per_core": round(report.audio_seconds / rows_s / workers, 2),
            "end_to_end_audio_s_per_s": round(report.audio_seconds / elapsed, 2),
            "rows_per_s": round(total / rows_s, 2),
        }
        report_dict = report.write(staging, dataset=dataset, text_tokenizer=text_kind,
                                   audio_tokenizer=audio_tok.name if audio_tok else None, throughput=throughput,
                                   bad_fraction=round(bad_fraction, 6))
        tracker.log_metrics(_metrics(report_dict))
        for name in ("report.json", "length_histogram.png", "quarantine.jsonl"):
            tracker.log_artifact(staging / name)
        if bad_fraction > t.max_bad_fraction:
            raise TokenizeError(
                f"{sum(report.reasons.values())} of {total} rows were quarantined ({bad_fraction:.1%}), above "
                f"tokenize.max_bad_fraction={t.max_bad_fraction}: "
                + ", ".join(f"{k}: {v}" for k, v in report.reasons.most_common())
            )
        manifest = artifacts.write_manifest(
            staging, artifacts.TOKENS, artifacts.TOKENS_VERSION,
            dataset=dataset, dataset_fingerprint=(ds_manifest or {}).get("fingerprint"),
            sample_rate=(ds_manifest or {}).get("sample_rate"), columns=TOKENS_COLUMNS,
            moss_path=t.audio_tokenizer.moss_path if moss else None,
            text_tokenizer={"kind": text_kind, "base_model": base_model, "vocab_size": len(text_tok)},
            audio_tokenizer=None if audio_tok is None else {
                "type": audio_tok.name, "num_codebooks": audio_tok.num_codebooks,
                "codebook_size": audio_tok.codebook_size, "token_rate": audio_tok.token_rate,
                **(audio_tok.manifest_fields() if hasattr(audio_tok, "manifest_fields") else {}),
            },
            mel=mel_x.to_dict(), speakers=len(speakers), speaker_embedding=t.speaker.type,
            splits={s: {"rows": w.rows, "shards": w.shards} for s, w in writers.items()},
            quarantined=sum(report.reasons.values()), config=t.model_dump(mode="json"),
        )
        log.info("tokenized %d train / %d val rows in %.1f s (%.0fx real time; %.1f s building tokenizers)",
                 writers["train"].rows, writers["val"].rows, rows_s, throughput["audio_s_per_s"], setup_s)
    return TokenizeResult(output=output, report=report_dict, manifest=manifest)


def _moss_rows(audio_tok, val_fraction: float) -> Iterator[tuple[str, dict[str, Any] | BadRecord]]:
    """Rows of MOSS-TTSD shards (text ids + 8-codebook codes, no audio), split by a hash of their id."""
    for record in audio_tok.moss_records():
        rid = record["source"]
        if "error" in record:
            err = record["error"]
            reason = features.CODES_OUT_OF_RANGE if isinstance(err, CodesOutOfRange) else features.INVALID_CODES
            yield "train", BadRecord(origin=rid, field="codes", reason=reason, detail=str(err), id=rid)
            continue
        codes = np.asarray(record["codes"], dtype=np.int32)
        text_ids = [int(x) for x in np.asarray(record["text_ids"]).reshape(-1)]
        yield split_of(rid, val_fraction), {
            "id": rid, "source_id": rid, "task": "tts", "speaker": None, "speaker_index": 0,
            "text_ids": text_ids, "prompt_text_ids": None, "instruction_ids": None,
            "audio_codes": codes.tolist(), "prompt_codes": None, "mel": None, "mel_frames": None,
            "speaker_embedding": None, "num_text_tokens": len(text_ids), "num_audio_frames": int(codes.shape[1]),
            "duration_s": float(codes.shape[1] / audio_tok.token_rate), "repeat_count": 1,
            "meta": json.dumps({"origin": rid}),
        }


def _save_speaker_means(embeddings: list[tuple[str, np.ndarray]], tok_dir: Path) -> None:
    if not embeddings:
        return
    from safetensors.numpy import save_file

    from audiotune.tokenization.speaker import mean_embeddings

    means = mean_embeddings(embeddings)
    save_file({k: np.asarray(v, dtype=np.float32) for k, v in means.items()},
              str(tok_dir / "speaker_embeddings.safetensors"))


def _metrics(report: dict[str, Any]) -> dict[str, float]:
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
