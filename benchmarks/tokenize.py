"""Tokenize-stage throughput: seconds of audio tokenized (mel-kmeans codes + target mel) per wall-second per core.

Builds a Dataset of >= 10 minutes of 22.05 kHz speech-like audio with the convert
stage, then tokenizes it with the tokenize stage, and, in the same run, with a
plain single-process loop doing only the essential per-row work (FLAC decode,
codes with the same fitted tokenizer, target mel) as the baseline.

    python -m benchmarks.tokenize [--minutes 10] [--workers 0] [--out benchmarks/results/tokenize.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from audiotune.config import load_config
from audiotune.data.audio import decode_flac
from audiotune.data.workers import num_workers
from audiotune.stages.convert import convert
from audiotune.stages.tokenize import tokenize
from audiotune.tokenization.audio_tokenizers import load_audio_tokenizer
from audiotune.tokenization.mel import MelExtractor
from benchmarks.convert import make_corpus  # the same corpus as the convert benchmark

log = logging.getLogger("benchmarks.tokenize")


def baseline(ds: Path, tok_dir: Path) -> float:
    """One process: decode → codes → mel per row, nothing else."""
    torch.set_num_threads(1)
    tokenizer = load_audio_tokenizer(tok_dir / "audio")
    mel = MelExtractor.from_dict(json.loads((tok_dir / "mel.json").read_text()))
    start = time.perf_counter()
    for split in ("train", "val"):
        for shard in sorted((ds / split).glob("part-*.parquet")):
            for row in pq.read_table(shard, columns=["audio"]).to_pylist():
                wav, sr = decode_flac(row["audio"])
                tokenizer.encode(wav, sr)
                mel(wav)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=0, help="0: one per core")
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--out", default="benchmarks/results/tokenize.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    workers = num_workers(args.workers)
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        tmp = Path(tmp)
        manifest, audio_s = make_corpus(tmp / "src", args.minutes)
        common = ["tracking.enabled=false", "convert.max_duration_s=60", f"run.num_workers={workers}",
                  f"tokenize.audio_tokenizer.codebook_size={args.codebook_size}"]
        convert(load_config(None, common), source=str(manifest), output=str(tmp / "ds"))
        results = {}
        for w in sorted({1, workers}):
            cfg = load_config(None, [*common, f"run.num_workers={w}"])
            start = time.perf_counter()
            res = tokenize(cfg, dataset=str(tmp / "ds"), output=str(tmp / f"tok-{w}"))
            wall = time.perf_counter() - start
            own = res.report["throughput"]
            results[f"stage_{w}_workers"] = {
                "workers": w,
                "rows_s": own["rows_s"],
                "audio_s_per_s": own["audio_s_per_s"],
                "audio_s_per_s_per_core": own["audio_s_per_s_per_core"],
                "tokenizer_setup_s (BPE + k-means fit, once per corpus)": own["tokenizer_setup_s"],
                "end_to_end_wall_s": round(wall, 3),
                "end_to_end_audio_s_per_s_per_core": round(audio_s / wall / w, 1),
            }
        base_s = baseline(tmp / "ds", tmp / f"tok-{workers}" / "tokenizer")
    report = {
        "benchmark": "tokenize: mel-kmeans codes (k-means fit included) + CosyVoice-300M target mel",
        "machine": {"cpus": workers, "python": sys.version.split()[0], "platform": platform.platform()},
        "audio_minutes": round(audio_s / 60, 2),
        "codebook_size": args.codebook_size,
        "baseline_plain_loop_1_core_no_fit": {"wall_s": round(base_s, 3), "audio_s_per_s": round(audio_s / base_s, 1)},
        **results,
        "target_audio_s_per_s_per_core": 200,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if min(r["audio_s_per_s_per_core"] for r in results.values()) >= 200 else 1


if __name__ == "__main__":
    sys.exit(main())
