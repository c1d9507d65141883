"""The tokenize stage fanned out over the convert units (``pipeline.data_parallelism > 0``).

Recipe:

1. :func:`prepare` runs once, after the convert merge: it builds every tokenizer from the units' parts in plan
   order (:func:`audiotune.tokenization.tokenizer_setup.build`): the text tokenizer, the speaker table and, for
   the built-in mel-kmeans tokenizer, the one codebook fit on a sample drawn across the units (each unit offers
   at most ``fit_max_frames / token_rate`` seconds of its rows, in the seeded order). It publishes a small set-up
   artifact: ``tokenizer/`` and ``setup.json`` (the units and their parts, the Dataset's fields, the fit).
2. :func:`tokenize_unit`, one task per unit, loads that set-up and runs the row pass
   (:mod:`audiotune.tokenization.row_pass`) over its convert part: shards, quarantine, speaker embeddings and
   ``part.json`` (the report's state and figures).
3. :func:`merge` assembles one Tokens artifact: the set-up's ``tokenizer/`` (plus the speaker means), the parts'
   shards renumbered in plan order, quarantines concatenated, reports summed, published atomically. Its rows,
   splits and tokenizers are those of the one-task stage (:mod:`audiotune.stages.tokenize`) on the merged Dataset.

:func:`tokenize_fanout` runs the three in this process, one unit after another (tests, figures).
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from audiotune import artifacts, publish, storage, tracking
from audiotune.config import AudiotuneConfig, dump_config
from audiotune.data import merge as merge_mod
from audiotune.data.schema import SPLITS
from audiotune.data.workers import num_workers, stop_on_signals
from audiotune.errors import DataError
from audiotune.tokenization import row_pass, tokenizer_setup
from audiotune.tokenization.row_pass import TokenizeResult

log = logging.getLogger(__name__)

SETUP = "audiotune.tokenizer_setup"
PART = "audiotune.tokens_part"
EMBEDDINGS_FILE = "embeddings.safetensors"


class TokenizeUnitsError(DataError):
    """The tokenize fan-out's inputs do not fit together (a part of another Dataset, a unit missing)."""


def _ordered(units: list[str], found: dict[str, Any], what: str, task: str) -> list[Any]:
    """``found`` (unit id → anything) in ``units`` order, every unit exactly once."""
    return merge_mod.in_unit_order(units, found, what, task, "the Dataset's units (another Dataset?)",
                                   error=TokenizeUnitsError)


def _convert_part(uri: str) -> dict[str, Any]:
    """The ``part.json`` of a convert part, local or on S3 (read alone: the part's shards stay where they are)."""
    if not storage.is_s3(uri):
        return merge_mod.read_part(Path(uri))
    try:
        return json.loads(storage.read_text(storage.join(uri, "part.json")))
    except (OSError, ValueError) as err:
        raise merge_mod.MergeError(f"{uri}: not a converted unit (part.json: {err})") from None


def prepare(cfg: AudiotuneConfig, dataset: str, parts: list[str], output: str,
            base_model: str | None = None) -> dict[str, Any]:
    """Build the tokenizers once from the convert ``parts`` of ``dataset`` and publish the set-up at ``output``.

    Args:
        cfg: The pipeline config (``tokenize``, ``run.seed``).
        dataset: The merged Dataset (only its manifest is read: units in plan order, fingerprint, format).
        parts: The convert parts (local or s3://), in any order. On S3 only their ``part.json``, the columns the
            set-up needs and the shards holding sampled rows are read (ranged GETs).
        output: Where the set-up artifact goes.
        base_model: Base model whose text tokenizer is used (overrides ``tokenize.base_model``).

    Returns:
        ``setup.json``: ``parts`` (their URIs in plan order: the items of the per-unit fan-out), ``units``,
        the Dataset's fields, the text and audio tokenizers, the fit (rows per unit).

    Raises:
        TokenizeUnitsError: a part that is not one of the Dataset's units, a unit without its part, parts whose
            fingerprints do not make the Dataset's, or a MOSS-TTSD import (one task only).
    """
    t = cfg.tokenize
    base_model = base_model or t.base_model
    log.info("tokenize set-up: %s (%d parts) -> %s\n%s", dataset, len(parts), output, dump_config(cfg))
    if t.audio_tokenizer.type == "precomputed" and t.audio_tokenizer.moss_path:
        raise TokenizeUnitsError("a MOSS-TTSD import (tokenize.audio_tokenizer.moss_path) reads no Dataset: run it "
                                 "in one task (pipeline.data_parallelism=0)")
    ds_manifest = artifacts.read_manifest(dataset, artifacts.DATASET, artifacts.DATASET_VERSION)
    units = ds_manifest.get("units")
    if not units:
        raise TokenizeUnitsError(f"{dataset}: its manifest lists no units (not written by the convert fan-out)")
    found = {}
    for uri in parts:
        info = _convert_part(uri)
        found[info["unit"]] = (uri, info)
    ordered = _ordered(units, found, "convert part", "convert_unit")
    fingerprint = hashlib.sha256()
    for _, info in ordered:
        fingerprint.update(info["fingerprint"].encode())
    if fingerprint.hexdigest() != ds_manifest.get("fingerprint"):
        raise TokenizeUnitsError(f"the {len(parts)} parts are not the ones {dataset} was merged from "
                                 "(their fingerprints differ from its manifest's)")
    start = time.perf_counter()
    with publish.publish_dir(output, overwrite=True, kind=SETUP) as staging:
        setup = tokenizer_setup.build(cfg, [uri for uri, _ in ordered], base_model,
                                      ds_manifest.get("format") != "text", staging / "tokenizer")
        described = {
            "kind": SETUP, **setup.describe(), "dataset": dataset, "base_model": base_model,
            "dataset_fields": {k: ds_manifest.get(k) for k in ("fingerprint", "sample_rate", "format")},
            "units": units, "parts": [uri for uri, _ in ordered], "elapsed_s": round(time.perf_counter() - start, 3),
        }
        (staging / tokenizer_setup.SETUP_FILE).write_text(json.dumps(described, indent=2, ensure_ascii=False) + "\n")
    log.info("tokenizers set up for %d units in %.1f s (fit: %s; %d bytes read from S3)", len(units),
             described["elapsed_s"], setup.fit, setup.s3_bytes_read)
    return described


def _load_setup(cfg: AudiotuneConfig, setup_uri: str) -> tuple[tokenizer_setup.TokenizerSetup, dict[str, Any]]:
    folder = storage.local_copy(setup_uri)
    try:
        described = json.loads((folder / tokenizer_setup.SETUP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TokenizeUnitsError(f"{setup_uri}: not a tokenizer set-up ({tokenizer_setup.SETUP_FILE}: {err})") from None
    return tokenizer_setup.load(cfg, folder / "tokenizer", described), described


def _peak_rss() -> int:
    """This process's peak RSS in bytes: ``VmHWM`` where Linux gives it (``ru_maxrss`` keeps the high-water mark
    of the process that exec'ed this one, e.g. a parent that spawned it), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tokenize_unit(cfg: AudiotuneConfig, setup_uri: str, part_uri: str, output: str) -> dict[str, Any]:
    """Tokenize one convert part with the set-up's tokenizers into a Tokens part at ``output``: ``train/``,
    ``val/`` shards, ``quarantine.jsonl``, speaker embeddings and ``part.json`` (report state, figures).

    Raises:
        TokenizeUnitsError: the part's unit is not one the set-up was built for.
    """
    t = cfg.tokenize
    setup, described = _load_setup(cfg, setup_uri)
    folder = storage.local_copy(part_uri)
    info = merge_mod.read_part(folder)
    unit = info["unit"]
    if unit not in described["units"]:
        raise TokenizeUnitsError(f"{part_uri}: unit {unit!r} is not one of the set-up's {len(described['units'])} "
                                 "units (a part of another Dataset?)")
    total = sum(info["splits"][s]["rows"] for s in SPLITS)
    workers = min(num_workers(cfg.run.num_workers), max(1, total))
    with stop_on_signals("tokenize unit"), publish.publish_dir(output, overwrite=True, kind=PART) as staging, \
            ExitStack() as stack:
        start = time.perf_counter()
        pool = row_pass.audio_pool(stack, workers, total, setup.settings)
        with open(staging / "quarantine.jsonl", "w", encoding="utf-8") as quarantine:
            out = row_pass.open_outputs(staging, t.shard_max_rows, setup, quarantine)
            row_pass.tokenize_folder(folder, f"unit {unit}: ", setup, t, out, pool, workers)
        for w in out.writers.values():
            w.flush()
        if out.embeddings:
            from safetensors.numpy import save_file

            save_file({"embeddings": np.stack([e for _, e in out.embeddings]).astype(np.float32)},
                      str(staging / EMBEDDINGS_FILE))
        elapsed = time.perf_counter() - start
        part = {
            "kind": PART, "unit": unit, "input_rows": total, "report": row_pass.report_state(out),
            "embedding_speakers": [s for s, _ in out.embeddings],
            "splits": {s: {"rows": w.rows, "shards": w.shards} for s, w in out.writers.items()},
            "shard_files": artifacts.shard_files(staging),  # the merge copies them with these checksums
            "figures": {"elapsed_s": round(elapsed, 3), "workers": workers, "rows": total,
                        "audio_s": round(out.report.audio_seconds, 3),
                        "peak_rss_bytes": _peak_rss()},
        }
        (staging / "part.json").write_text(json.dumps(part, ensure_ascii=False) + "\n")
    log.info("unit %s: %d rows tokenized, %d quarantined in %.1f s", unit, total,
             sum(out.report.reasons.values()), elapsed)
    return part


def _embeddings(folder: Path, info: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    if not info["embedding_speakers"]:
        return []
    from safetensors.numpy import load_file

    stacked = load_file(str(folder / EMBEDDINGS_FILE))["embeddings"]
    return list(zip(info["embedding_speakers"], stacked, strict=True))


def _throughput(figures: list[dict[str, Any]], audio_seconds: float, setup_s: float) -> dict[str, Any]:
    """Summed unit figures: ``audio_s_per_s`` is per unit-second (one unit after another), the per-core figure
    divides by each unit's workers."""
    unit_s = sum(f["elapsed_s"] for f in figures) or 1e-9
    core_s = sum(f["elapsed_s"] * f["workers"] for f in figures) or 1e-9
    return {"units": len(figures), "unit_elapsed_s": round(unit_s, 3), "tokenizer_setup_s": setup_s,
            "audio_s_per_s": round(audio_seconds / unit_s, 2),
            "audio_s_per_s_per_core": round(audio_seconds / core_s, 2),
            "rows_per_s": round(sum(f["rows"] for f in figures) / unit_s, 2),
            "peak_rss_bytes": max((f["peak_rss_bytes"] for f in figures), default=0)}


def merge(cfg: AudiotuneConfig, setup_uri: str, parts: list[str], output: str) -> TokenizeResult:
    """Assemble the units' Tokens parts into one Tokens artifact at ``output``, published atomically.

    Raises:
        TokenizeUnitsError: a unit without its part, or a part of another set-up.
        TooManyBadRows: more than ``tokenize.max_bad_fraction`` of the rows were quarantined.
    """
    t = cfg.tokenize
    setup, described = _load_setup(cfg, setup_uri)
    dataset, base_model = described["dataset"], described["base_model"]
    publish.require_missing_or_overwrite(output, t.overwrite, artifacts.TOKENS, [dataset, base_model])
    found = {}
    work = Path(tempfile.mkdtemp(prefix="audiotune-merge-"))
    for uri in parts:  # their small files only: shards on S3 are copied server side at publish
        folder, shards = merge_mod.fetch_part(uri, work)
        info = merge_mod.read_part(folder)
        found[info["unit"]] = (folder, shards, info)
    ordered = _ordered(described["units"], found, "tokenized part", "tokenize_unit")
    with tracking.stage_run(cfg.tracking, "tokenize") as tracker, \
            publish.publish_dir(output, overwrite=t.overwrite, kind=artifacts.TOKENS,
                                inputs=[dataset, base_model]) as staging:
        tracker.log_params({"tokenize": t.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json")})
        shutil.copytree(setup.tok_dir, staging / "tokenizer")
        splits: dict[str, dict[str, Any]] = {s: {"rows": 0, "shards": []} for s in SPLITS}
        files: list[dict[str, Any]] = []
        embeddings: list[tuple[str, np.ndarray]] = []
        with open(staging / "quarantine.jsonl", "w", encoding="utf-8") as quarantine:
            for folder, shards, info in ordered:
                merge_mod.place_shards(shards, info, staging, splits, files)
                with open(folder / "quarantine.jsonl", encoding="utf-8") as f:
                    shutil.copyfileobj(f, quarantine)
                embeddings.extend(_embeddings(folder, info))
        row_pass.save_speaker_means(embeddings, staging / "tokenizer")
        audio = setup.audio_tok
        report = row_pass.report_from_states([info["report"] for _, _, info in ordered], audio.num_codebooks if audio
                                             else 0, audio.codebook_size if audio else None)
        total = sum(info["input_rows"] for _, _, info in ordered)
        quarantined = sum(report.reasons.values())
        throughput = _throughput([info["figures"] for _, _, info in ordered], report.audio_seconds,
                                 described["elapsed_s"])
        report_dict = report.write(staging, dataset=dataset, text_tokenizer=setup.text_kind,
                                   audio_tokenizer=audio.name if audio else None, throughput=throughput,
                                   bad_fraction=round(quarantined / (total or 1), 6), units=len(ordered),
                                   fit=described["fit"])
        tracker.log_metrics(row_pass.metrics(report_dict) | {"units": len(ordered)})
        for name in ("report.json", "length_histogram.png", "quarantine.jsonl"):
            tracker.log_artifact(staging / name)
        row_pass.check_bad_fraction(report, total, t.max_bad_fraction)
        manifest = artifacts.write_manifest(
            staging, artifacts.TOKENS, artifacts.TOKENS_VERSION,
            **row_pass.manifest_fields(setup, t, base_model, dataset, described["dataset_fields"], moss=False),
            splits=splits, quarantined=quarantined, config=t.model_dump(mode="json"), units=described["units"],
            shard_files=sorted(files, key=lambda e: e["path"]),
        )
    shutil.rmtree(work, ignore_errors=True)
    log.info("published tokens %s from %d units: %d train / %d val rows", output, len(ordered),
             splits["train"]["rows"], splits["val"]["rows"])
    return TokenizeResult(output=output, report=report_dict, manifest=manifest)


def tokenize_fanout(cfg: AudiotuneConfig, dataset: str, parts: list[str], output: str,
                    base_model: str | None = None, workdir: str | None = None) -> TokenizeResult:
    """Set up, tokenize every unit (here, one after another) and merge: the pipeline's fan-out in one process."""
    own = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="audiotune-tokenize-fanout-"))
    try:
        described = prepare(cfg, dataset, parts, str(root / "setup"), base_model)
        done = []
        for k, part in enumerate(described["parts"]):
            done.append(str(root / "tokens-parts" / f"{k:05d}"))
            tokenize_unit(cfg, str(root / "setup"), part, done[-1])
        return merge(cfg, str(root / "setup"), done, output)
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
