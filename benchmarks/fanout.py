"""Data fan-out figures: convert throughput per core with 1, 2 and 4 units converted at once (one process each,
as one pod each), peak spool disk and RSS per unit, and S3 bytes read against the corpus size; with
``--tokenize``, the tokenize fan-out on the same units (the set-up once, then one process per unit).

    python -m benchmarks.fanout [--rows 96] [--seconds 3] [--units 1,2,4] [--tokenize]
                                [--out benchmarks/results/fanout.json]

Units run as concurrent processes with ``run.num_workers=1`` (a pod of one core). The S3 figures need a
running S3 endpoint in ``AWS_ENDPOINT_URL`` (e.g. ``moto_server``) and ``--bucket``; without it they are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from audiotune.config import load_config
from audiotune.stages import convert_units, tokenize_units

log = logging.getLogger(__name__)


def _corpus(root: Path, rows: int, seconds: float, sr: int = 44100) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(rows):
        t = np.arange(int(seconds * sr)) / sr
        wav = 0.3 * np.sin(2 * np.pi * (150 + i % 50) * t) + 0.01 * rng.standard_normal(len(t))
        (root / "wavs").mkdir(parents=True, exist_ok=True)
        sf.write(root / "wavs" / f"u{i:05d}.wav", np.stack([wav, wav * 0.8], 1).astype(np.float32), sr)
        lines.append(json.dumps({"id": f"u{i:05d}", "audio": f"wavs/u{i:05d}.wav", "text": f"row {i}"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


def _unit(cfg_overrides: list[str], plan_dir: str, unit_id: str, out: str, queue) -> None:
    cfg = load_config(None, cfg_overrides)
    queue.put(convert_units.convert_unit(cfg, plan_dir, unit_id, out)["figures"])


def _tokenize_unit(cfg_overrides: list[str], setup: str, part: str, out: str, queue) -> None:
    cfg = load_config(None, cfg_overrides)
    queue.put(tokenize_units.tokenize_unit(cfg, setup, part, out)["figures"])


def _tokenize(overrides: list[str], plan_dir: str, units: int, work: Path) -> dict:
    """Merge the converted parts, set the tokenizers up once, tokenize the units at once (one process each)."""
    cfg = load_config(None, overrides)
    parts = sorted(str(p) for p in (work / f"parts-{units}").iterdir())
    dataset = str(work / f"dataset-{units}")
    convert_units.merge(cfg, plan_dir, parts, dataset)
    started = time.perf_counter()
    described = tokenize_units.prepare(cfg, dataset, parts, str(work / f"setup-{units}"))
    setup_s = time.perf_counter() - started
    figures, wall = _in_processes(_tokenize_unit, [
        (overrides, str(work / f"setup-{units}"), part, str(work / f"tokens-{units}" / f"{k:03d}"))
        for k, part in enumerate(described["parts"])])
    rows, audio_s = sum(f["rows"] for f in figures), sum(f["audio_s"] for f in figures)
    cores = min(len(figures), len(os.sched_getaffinity(0)))
    return {"units": len(figures), "setup_s": round(setup_s, 2), "fit_rows": described["fit"].get("rows"),
            "wall_s": round(wall, 2), "rows_per_s": round(rows / wall, 1),
            "rows_per_s_per_core": round(rows / wall / cores, 1),
            "in_unit_rows_per_s": round(rows / sum(f["elapsed_s"] for f in figures), 1),
            "audio_s_per_s": round(audio_s / wall, 1),
            "in_unit_audio_s_per_s": round(audio_s / sum(f["elapsed_s"] for f in figures), 1),
            "peak_rss_mb_per_unit": round(max(f["peak_rss_bytes"] for f in figures) / 2**20, 1)}


def _in_processes(target, args: list[tuple]) -> tuple[list[dict], float]:
    """Run ``target(*a, queue)`` for every ``a`` in its own spawned process at once: the figures each puts on the
    queue, and the wall time of them all."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, queue)) for a in args]
    start = time.perf_counter()
    for p in procs:
        p.start()
    figures = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return figures, time.perf_counter() - start


def _fanout(source: str, units: int, rows: int, work: Path, extra: list[str]) -> dict:
    overrides = ["tracking.enabled=false", "run.num_workers=1", f"convert.unit_max_rows={-(-rows // units)}", *extra]
    cfg = load_config(None, overrides)
    plan_dir = str(work / f"plan-{units}")
    planned = convert_units.plan(cfg, plan_dir, source)
    figures, wall = _in_processes(_unit, [(overrides, plan_dir, u["id"], str(work / f"parts-{units}" / u["id"]))
                                          for u in planned["units"]])
    audio_s = rows * ARGS.seconds
    cores = min(len(figures), len(os.sched_getaffinity(0)))
    if ARGS.tokenize and not extra:
        TOKENIZE.append(_tokenize(overrides, plan_dir, units, work))
        print(json.dumps(TOKENIZE[-1]))
    # wall_s includes starting each unit's process (imports, ~2-3 s), as a pod's start would
    return {"units": len(figures), "wall_s": round(wall, 2), "audio_s_per_s": round(audio_s / wall, 1),
            "audio_s_per_s_per_core": round(audio_s / wall / cores, 1), "cores_used": cores,
            "in_unit_audio_s_per_s_per_core": round(audio_s / sum(f["elapsed_s"] for f in figures), 1),
            "source_bytes": planned["source_bytes"],
            "s3_bytes_read": sum(f["s3_bytes_read"] for f in figures),
            "peak_spool_bytes_per_unit": max(f["peak_spool_bytes"] for f in figures),
            "peak_local_disk_bytes_per_unit": max(f["peak_spool_bytes"] + f["output_bytes"] for f in figures),
            "peak_rss_mb_per_unit": round(max(f["peak_rss_bytes"] for f in figures) / 2**20, 1)}


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--bucket", default=None, help="s3://bucket on AWS_ENDPOINT_URL for the streaming figures")
    parser.add_argument("--cap", type=int, default=4 * 2**20, help="convert.max_local_disk_bytes for the S3 run")
    parser.add_argument("--units", default="1,2,4", help="units at once, comma-separated")
    parser.add_argument("--tokenize", action="store_true", help="also the tokenize fan-out on the local units")
    parser.add_argument("--out", default=None)
    ARGS = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {"rows": ARGS.rows, "seconds_per_row": ARGS.seconds, "cores": len(os.sched_getaffinity(0)),
               "local": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = _corpus(work / "src", ARGS.rows, ARGS.seconds)
        for units in (int(u) for u in ARGS.units.split(",")):
            results["local"].append(_fanout(str(manifest), units, ARGS.rows, work, []))
            print(json.dumps(results["local"][-1]))
        if ARGS.bucket:
            from audiotune import storage

            storage.upload_dir(work / "src", f"{ARGS.bucket}/corpus")
            results["s3"] = _fanout(f"{ARGS.bucket}/corpus/manifest.jsonl", 2, ARGS.rows, work / "s3",
                                    [f"convert.max_local_disk_bytes={ARGS.cap}"])
            results["s3"]["cap_bytes"] = ARGS.cap
            print(json.dumps(results["s3"]))
    if TOKENIZE:
        results["tokenize"] = TOKENIZE
    if ARGS.out:
        Path(ARGS.out).write_text(json.dumps(results, indent=1) + "\n")


ARGS = argparse.Namespace(seconds=3.0, tokenize=False)
TOKENIZE: list[dict] = []

if __name__ == "__main__":
    main()
