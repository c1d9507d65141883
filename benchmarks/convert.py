"""Convert-stage throughput: seconds of audio converted per wall-second per core.

Generates >= 10 minutes of 44.1 kHz stereo WAV (a JSONL manifest), converts it to
22.05 kHz mono with the convert stage, and, in the same run, with a plain
single-process loop doing only the essential work (decode, down-mix, soxr
resample, FLAC encode, one Parquet file) as the baseline.

    python -m benchmarks.convert [--minutes 10] [--workers 0] [--out benchmarks/results/convert.json]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import soxr

from audiotune.config import load_config
from audiotune.data.workers import num_workers
from audiotune.stages.convert import convert

log = logging.getLogger("benchmarks.convert")
SR_IN, SR_OUT = 44100, 22050


def make_corpus(root: Path, minutes: float, seed: int = 0) -> tuple[Path, float]:
    """Stereo 44.1 kHz WAVs of 2-12 s (speech-like harmonic tones) and a JSONL manifest."""
    rng = np.random.default_rng(seed)
    rows, total, i = [], 0.0, 0
    while total < minutes * 60:
        seconds = float(rng.uniform(2, 12))
        t = np.arange(int(seconds * SR_IN)) / SR_IN
        f0 = rng.uniform(100, 250)
        x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * 0.2
        x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.005 * rng.standard_normal(len(t))
        stereo = np.stack([x, 0.8 * x], axis=1).astype(np.float32)
        rel = f"wavs/b{i:05d}.wav"
        (root / "wavs").mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, stereo, SR_IN, subtype="PCM_16")
        rows.append(json.dumps({"id": f"b{i:05d}", "audio": rel, "text": f"utterance {i}", "speaker": f"s{i % 8}"}))
        total += len(t) / SR_IN
        i += 1
    (root / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    return root / "manifest.jsonl", total


def baseline(manifest: Path, out: Path) -> float:
    """The plain loop: one process, decode → mono → soxr → FLAC → one Parquet file."""
    start = time.perf_counter()
    ids, blobs = [], []
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        x, sr = sf.read(manifest.parent / row["audio"], dtype="float32", always_2d=True)
        y = soxr.resample(x.mean(axis=1), sr, SR_OUT, quality="HQ")
        buf = io.BytesIO()
        sf.write(buf, y, SR_OUT, format="FLAC", subtype="PCM_16")
        ids.append(row["id"])
        blobs.append(buf.getvalue())
    pq.write_table(pa.table({"id": ids, "audio": blobs}), out)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=0, help="0: one per core")
    parser.add_argument("--out", default="benchmarks/results/convert.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    workers = num_workers(args.workers)
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        manifest, audio_s = make_corpus(tmp / "src", args.minutes)
        log.info("corpus: %.1f min of 44.1 kHz stereo in %s", audio_s / 60, manifest.parent)
        base_s = baseline(manifest, tmp / "baseline.parquet")
        results = {}
        for w in sorted({1, workers}):
            cfg = load_config(None, ["tracking.enabled=false", f"run.num_workers={w}", "convert.val_fraction=0.05",
                                     "convert.max_duration_s=60", f"convert.sample_rate={SR_OUT}"])
            start = time.perf_counter()
            result = convert(cfg, source=str(manifest), output=str(tmp / f"ds-{w}"))
            elapsed = time.perf_counter() - start
            own = result.report["throughput"]  # read -> decode -> shards, as the stage reports it
            results[f"stage_{w}_workers"] = {
                "workers": w,
                "work_s": own["elapsed_s"],
                "audio_s_per_s": own["audio_s_per_s"],
                "audio_s_per_s_per_core": own["audio_s_per_s_per_core"],
                "end_to_end_wall_s": round(elapsed, 3),
                "end_to_end_audio_s_per_s_per_core": round(audio_s / elapsed / w, 1),
            }
    report = {
        "benchmark": "convert: 44.1 kHz stereo WAV -> 22.05 kHz mono FLAC in Parquet",
        "machine": {"cpus": workers, "python": sys.version.split()[0], "platform": platform.platform()},
        "audio_minutes": round(audio_s / 60, 2),
        "baseline_plain_loop_1_core": {"wall_s": round(base_s, 3), "audio_s_per_s": round(audio_s / base_s, 1)},
        **results,
        "target_audio_s_per_s_per_core": 300,
    }
    one = results["stage_1_workers"]
    report["stage_1_worker_vs_baseline"] = round(one["audio_s_per_s"] / report["baseline_plain_loop_1_core"]
                                                 ["audio_s_per_s"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if min(r["audio_s_per_s_per_core"] for r in results.values()) >= 300 else 1


if __name__ == "__main__":
    sys.exit(main())
