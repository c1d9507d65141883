"""Evaluation throughput: seconds of audio scored per CPU second (one core) by each metric plug-in.

Speech comes from espeak-ng (two voices: the "synthesized" one and the reference), so the figures are for real
speech lengths and every metric has a reference to compare with. Model loading is not counted.

    python -m benchmarks.evaluate [--utterances 12] [--out benchmarks/results/evaluate.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from audiotune.config import EvaluateConfig
from audiotune.evaluation.metrics import Sample, build_metrics

TEXTS = [
    "the quick brown fox jumps over the lazy dog", "she sells sea shells by the sea shore",
    "open the door and close the window", "my favourite colour is green",
    "please call stella and ask her to bring these things", "the weather is cold today",
    "we will meet again next tuesday morning", "turn left at the big red house", "i would like a cup of coffee",
    "the train leaves at seven o clock", "reading books makes me happy", "he plays the piano every evening",
]


def _speak(text: str, voice: str) -> tuple[np.ndarray, int]:
    out = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True).stdout
    wav, sr = sf.read(io.BytesIO(out), dtype="float32")
    return wav, sr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--utterances", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results/evaluate.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    metrics, skipped = build_metrics(EvaluateConfig(num_threads=1), None)
    pairs = [(t, _speak(t, "en-us"), _speak(t, "en+f4")) for t in (TEXTS * 4)[: args.utterances]]
    audio_s = sum(len(w) / sr for _, (w, sr), _ in pairs)
    results = {}
    for metric in metrics:
        samples = [Sample(text=t, wav=w, rate=sr, reference=ref) for t, (w, sr), ref in pairs]
        metric.score(samples[0])  # warm-up (first-call compilation, caches)
        started = time.process_time()
        for sample in samples:
            metric.score(sample)
        spent = time.process_time() - started
        results[metric.name] = {"audio_s_per_cpu_s": round(audio_s / spent, 2), "cpu_s": round(spent, 3)}
    report = {"utterances": len(pairs), "audio_s": round(audio_s, 2), "threads": 1, "skipped": skipped,
              "metrics": results, "cpu": platform.processor() or platform.machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
