"""The tokenize stage: a Dataset artifact → a Tokens artifact.

Recipe: read the Dataset → build the text tokenizer (the base model's, or trained
here) → build and fit the audio tokenizer → save both with the mel config under
``tokenizer/`` (:mod:`audiotune.tokenization.tokenizer_setup`) → per row, in parallel: text ids,
audio codes, prompt codes, target mel, speaker embedding → shards, quarantine, report
(:mod:`audiotune.tokenization.row_pass`) → publish → track.

The pipeline's fan-out (``pipeline.data_parallelism > 0``) runs the same two library steps, the set-up once
and the row pass per unit: :mod:`audiotune.stages.tokenize_units`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from contextlib import ExitStack
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from audiotune import artifacts, publish, storage, tracking
from audiotune.config import AudiotuneConfig, dump_config
from audiotune.data.schema import split_of
from audiotune.data.sources.base import BadRecord
from audiotune.data.workers import num_workers, stop_on_signals
from audiotune.errors import DataError
from audiotune.tokenization import features, row_pass, tokenizer_setup
from audiotune.tokenization.audio_tokenizers.base import CodesOutOfRange
from audiotune.tokenization.row_pass import TokenizeResult

log = logging.getLogger(__name__)


class TokenizeError(DataError):
    """The tokenize stage failed as a whole."""


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
        has_audio = ds_manifest is not None and ds_manifest.get("format") != "text"
        setup = tokenizer_setup.build(cfg, [ds_dir] if ds_dir else [], base_model, has_audio, staging / "tokenizer",
                                      moss=moss)
        total = sum(ds_manifest["splits"][s]["rows"] for s in ("train", "val")) if ds_manifest else 0
        setup_s = time.perf_counter() - start  # tokenizers built and fitted
        log.info("tokenizers ready in %.1f s", setup_s)
        pool = row_pass.audio_pool(stack, workers, total, setup.settings) if ds_dir else None
        with open(staging / "quarantine.jsonl", "w", encoding="utf-8") as quarantine, \
                tqdm(total=total, desc="tokenize", unit="row", mininterval=2.0) as bar:
            out = row_pass.open_outputs(staging, t.shard_max_rows, setup, quarantine)
            if ds_dir:
                row_pass.tokenize_folder(ds_dir, "", setup, t, out, pool, workers, bar)
            if moss:
                for split, item in _moss_rows(setup.audio_tok, cfg.convert.val_fraction):
                    total += 1
                    bar.update(1)
                    if isinstance(item, BadRecord):
                        out.reject(item)
                    else:
                        out.add(item, split)
        for w in out.writers.values():
            w.flush()
        row_pass.save_speaker_means(out.embeddings, setup.tok_dir)
        report = out.report
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
        audio_tok = setup.audio_tok
        report_dict = report.write(staging, dataset=dataset, text_tokenizer=setup.text_kind,
                                   audio_tokenizer=audio_tok.name if audio_tok else None, throughput=throughput,
                                   bad_fraction=round(bad_fraction, 6))
        tracker.log_metrics(row_pass.metrics(report_dict))
        for name in ("report.json", "length_histogram.png", "quarantine.jsonl"):
            tracker.log_artifact(staging / name)
        row_pass.check_bad_fraction(report, total, t.max_bad_fraction)
        manifest = artifacts.write_manifest(
            staging, artifacts.TOKENS, artifacts.TOKENS_VERSION,
            **row_pass.manifest_fields(setup, t, base_model, dataset, ds_manifest, moss),
            splits={s: {"rows": w.rows, "shards": w.shards} for s, w in out.writers.items()},
            quarantined=sum(report.reasons.values()), config=t.model_dump(mode="json"),
        )
        log.info("tokenized %d train / %d val rows in %.1f s (%.0fx real time; %.1f s building tokenizers)",
                 out.writers["train"].rows, out.writers["val"].rows, rows_s, throughput["audio_s_per_s"], setup_s)
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
