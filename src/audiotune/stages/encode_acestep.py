"""The ACE-Step encode stage: a Dataset (``convert --format acestep``) → an ACE-Step Latents artifact.

Recipe: read the Dataset → load the base ``AceStepPipeline`` (its VAE, text encoder, tokenizer and
condition encoder) → per music row: decode, resample to the VAE's rate and channels, VAE latents, caption
and lyric conditioning packed by the condition encoder → shards per split, with the silence latent and the
null condition shared → publish → track. Training then never runs the encoders again.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from audiotune import artifacts, publish, storage, tracking
from audiotune.config import AudiotuneConfig, dump_config
from audiotune.data.audio import decode_flac
from audiotune.errors import DataError

log = logging.getLogger(__name__)

COLUMNS = ["id", "task", "audio", "tags", "lyrics", "meta"]
SHOWN_IDS = 5


class EncodeAceStepError(DataError):
    """The Dataset holds nothing ACE-Step can train on."""


@dataclass
class EncodeResult:
    """What the stage produced."""

    output: str
    manifest: dict[str, Any]


def _rows(ds_dir: Path, split: str) -> Iterator[dict[str, Any]]:
    for shard in sorted((ds_dir / split).glob("part-*.parquet")):
        for batch in pq.ParquetFile(shard).iter_batches(columns=COLUMNS, batch_size=16):
            yield from batch.to_pylist()


def _encode_split(pipe, ds_dir: Path, split: str, staging: Path, a, skipped: dict[str, list[str]]) -> int:
    from audiotune.models.acestep.latents import INSTRUMENTAL, SplitWriter, encode_song, prompt_of, stereo_at

    writer = SplitWriter(staging / split)
    channels = int(pipe.vae.config.audio_channels)
    for row in _rows(ds_dir, split):
        if row["task"] != "music" or not row["audio"] or not row["tags"]:
            skipped.setdefault("not a music row with audio and tags", []).append(row["id"])
            continue
        try:
            wav, sr = decode_flac(row["audio"])
        except RuntimeError as err:
            skipped.setdefault(f"undecodable audio ({err})", []).append(row["id"])
            continue
        audio = stereo_at(wav, sr, pipe.sample_rate, channels, a.max_seconds)
        lyrics = (row["lyrics"] or "").strip() or INSTRUMENTAL
        prompt = prompt_of(row["tags"])
        latents, cond = encode_song(pipe, audio, prompt, lyrics, vocal_language=a.vocal_language,
                                    max_text_length=a.max_text_length, max_lyric_length=a.max_lyric_length)
        meta = json.loads(row["meta"]) if row["meta"] else {}
        writer.add(row["id"], latents, cond, repeat_count=int(meta.get("repeat_count", 1)), prompt=prompt,
                   lyrics=lyrics, duration_s=audio.shape[-1] / pipe.sample_rate)
    return writer.close()


def encode_acestep(cfg: AudiotuneConfig, dataset: str, output: str, base_model: str | None = None) -> EncodeResult:
    """Run the encode stage.

    Args:
        cfg: The pipeline config; the ``acestep`` section drives this stage.
        dataset: URI of a Dataset artifact (from ``convert --format acestep``).
        output: URI for the ACE-Step Latents artifact.
        base_model: A diffusers ``AceStepPipeline`` folder (overrides ``acestep.base_model``).

    Raises:
        EncodeAceStepError: No base model, or no music row to encode.
    """
    from audiotune.models.acestep import latents as L

    a = cfg.acestep
    base_model, ds_manifest = _setup_inputs(cfg, dataset, output, base_model)
    ds_dir = storage.local_copy(dataset)
    pipe, dtype = _setup_pipeline(cfg, base_model)
    start = time.perf_counter()
    skipped: dict[str, list[str]] = {}
    with tracking.stage_run(cfg.tracking, "encode_acestep") as tracker, \
            publish.publish_dir(output, overwrite=a.overwrite, kind=L.KIND, inputs=[dataset, base_model]) as staging:
        tracker.log_params({"acestep": a.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json")})
        counts = {split: _encode_split(pipe, ds_dir, split, staging, a, skipped) for split in ("train", "val")}
        _check_encoded(dataset, counts, skipped)
        _write_shared(pipe, staging)
        seconds = time.perf_counter() - start
        metrics = {"train_songs": counts["train"], "val_songs": counts["val"],
                   "skipped": sum(len(v) for v in skipped.values()), "seconds": seconds}
        tracker.log_metrics({k: float(v) for k, v in metrics.items()})
        manifest = artifacts.write_manifest(
            staging, L.KIND, L.VERSION, dataset=dataset, base_model=base_model,
            dataset_fingerprint=ds_manifest.get("fingerprint"), splits=counts, skipped={k: len(v) for k, v in
                                                                                         skipped.items()},
            latent_dim=int(pipe.transformer.config.audio_acoustic_hidden_dim),
            latents_per_second=pipe.latents_per_second, sample_rate=pipe.sample_rate, dtype=dtype,
            is_turbo=bool(pipe.is_turbo), metrics=metrics, config=a.model_dump(mode="json"))
    log.info("encoded %d train and %d val songs in %.1f s", counts["train"], counts["val"], seconds)
    return EncodeResult(output=output, manifest=manifest)


def _setup_inputs(cfg: AudiotuneConfig, dataset: str, output: str, base_model: str | None) -> tuple[str, dict]:
    """The base model and the Dataset's manifest; no base, or an output to keep, refused before any work."""
    from audiotune.models.acestep.latents import KIND

    a = cfg.acestep
    base_model = base_model or a.base_model
    if not base_model:
        raise EncodeAceStepError("no ACE-Step base model: pass --base-model or set acestep.base_model")
    publish.require_missing_or_overwrite(output, a.overwrite, KIND, [dataset, base_model])
    ds_manifest = artifacts.read_manifest(dataset, artifacts.DATASET, artifacts.DATASET_VERSION)
    log.info("encode acestep: %s -> %s\n%s", dataset, output, dump_config(cfg))
    return base_model, ds_manifest


def _setup_pipeline(cfg: AudiotuneConfig, base_model: str):
    """The base ``AceStepPipeline`` (its encoders) on the GPU when there is one, and its dtype."""
    from audiotune.models.acestep.load import load_pipeline
    from audiotune.train.engine import resolve_dtype

    base_dir = storage.local_copy(base_model)
    dtype = resolve_dtype(cfg.acestep.train.dtype)
    pipe = load_pipeline(base_dir, dtype)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    return pipe, dtype


def _check_encoded(dataset: str, counts: dict[str, int], skipped: dict[str, list[str]]) -> None:
    """Log the skipped rows by reason; no training song is an error."""
    for reason, ids in skipped.items():
        log.warning("%d rows skipped: %s (e.g. %s)", len(ids), reason, ", ".join(ids[:SHOWN_IDS]))
    if not counts["train"]:
        raise EncodeAceStepError(f"{dataset}: no music row with audio and tags in train "
                                 f"({sum(len(v) for v in skipped.values())} skipped); convert an ACE-Step "
                                 "folder (NAME.wav + NAME_prompt.txt) with convert --format acestep")


def _write_shared(pipe, staging: Path) -> None:
    """The silence latent (as long as the longest song) and the null condition, shared by every song."""
    from audiotune.models.acestep import latents as L

    longest = max(e.frames for s in ("train", "val") for e in L.LatentSplit(staging / s).entries)
    silence = pipe.condition_encoder.silence_latent
    reps = math.ceil(longest / silence.shape[1])
    save_file({"silence_latent": silence.repeat(1, reps, 1)[:, :longest].float().cpu().contiguous(),
               "null_condition_emb": pipe.condition_encoder.null_condition_emb.detach().float().cpu()},
              str(staging / L.SHARED))
