"""Flow-stage throughput: frame-budget batching vs a fixed-batch padded baseline, one run, same model and data.

Both variants train the same flow (same size, same seed) with the stage's engine and loss on the same
utterances (durations uniform in 1-10 s, 22.05 kHz / hop 256 mels: ~86 frames per second):

- ``frame_budget``: the stage's batching (:class:`audiotune.train.flow_data.FlowBatches`), at most
  ``--budget`` padded mel frames per batch (longest × count), length grouped;
- ``fixed_batch_random``: the usual baseline, ``--batch-size`` utterances per batch in random order,
  padded to the longest. The budget defaults to the baseline's mean padded frames per batch, so a step
  costs about the same in both and only the padding differs.

Reported per variant: valid (non-padding) mel frames/s, the padded fraction, peak memory (each variant in
its own process, so the peaks do not mix). Then the measured speedup (ratio of valid frames/s) and the
padding bound: the speedup that removing every padded frame of the baseline would give if time were
linear in padded frames, ``1 / (1 - pad_baseline)``, and, as reference, what the budget batches' own
residual padding leaves of it, ``(1 - pad_budget) / (1 - pad_baseline)``. Target: the measured ratio
within 10% of the bound. Finally the
parameter counts of the ``tiny`` and ``base`` presets.

    python -m benchmarks.train_flow [--size bench|tiny|base] [--utterances 384] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("benchmarks.train_flow")

FRAMES_PER_S = 22050 / 256
TOKEN_RATE = 25.0
N_MELS, CODEBOOK = 80, 1024


def make_examples(n: int, seed: int = 0):
    """``n`` utterances of 1-10 s: random mels and codes, the shapes of real Tokens rows."""
    from audiotune.train.flow_data import rows_to_examples

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        seconds = float(rng.uniform(1.0, 10.0))
        frames = int(seconds * FRAMES_PER_S)
        codes = int(np.ceil(seconds * TOKEN_RATE))
        rows.append({"id": f"u{i}", "mel": rng.standard_normal((frames, N_MELS), dtype=np.float32).tobytes(),
                     "mel_frames": frames, "audio_codes": [rng.integers(0, CODEBOOK, codes).tolist()],
                     "speaker_index": int(rng.integers(1, 9)), "repeat_count": 1})
    examples, _ = rows_to_examples(rows, N_MELS, "all")
    return examples


def make_model(size: str):
    from audiotune.models.flow import FlowModel, SpeakerSpec
    from audiotune.models.flow.config import PRESETS, EncoderConfig, EstimatorConfig, FlowConfig

    data = dict(n_mels=N_MELS, codebook_size=CODEBOOK, num_codebooks=1,
                mel_frames_per_token=FRAMES_PER_S / TOKEN_RATE, speaker=SpeakerSpec(type="id", num_speakers=9))
    torch.manual_seed(0)
    if size in PRESETS:
        return FlowModel(PRESETS[size](**data))
    # "bench": between tiny and base, so a CPU step is compute-bound and takes about a second
    return FlowModel(FlowConfig(
        encoder=EncoderConfig(dim=128, layers=2, heads=4, ff_dim=512, dropout=0.0),
        estimator=EstimatorConfig(channels=(128, 128), n_blocks=1, num_mid_blocks=2, heads=4, head_dim=32),
        regulator_layers=2, preset="bench", **data))


class FixedRandomBatches:
    """The baseline: ``batch_size`` utterances per batch in a random order (the engine's BatchSource)."""

    def __init__(self, examples, batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed

    def batches(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.examples))
        return [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]

    def collate(self, indices: list[int]):
        return self.examples.collate(indices)


def padded_fraction(examples, batches: list[list[int]]) -> tuple[int, int]:
    """(valid frames, padded frames incl. valid) over the batches."""
    lengths = examples.mel_lengths
    valid = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return valid, padded


def run_variant(variant: str, args) -> dict:
    """Train one epoch of one variant with the stage's engine; times every step after the warm-up."""
    from audiotune.config import TrainSettings
    from audiotune.train.engine import Engine, decay_groups, make_accelerator
    from audiotune.train.flow_data import FlowBatches
    from audiotune.train.objectives import flow_loss

    torch.set_num_threads(args.threads)
    examples = make_examples(args.utterances)
    baseline = FixedRandomBatches(examples, args.batch_size, seed=0)
    budget = args.budget or int(np.mean([examples.mel_lengths[b].max() * len(b) for b in baseline.batches(0)]))
    data = baseline if variant == "fixed_batch_random" else FlowBatches(examples, budget, 10_000, seed=0)
    batches = data.batches(0)
    model = make_model(args.size)
    train = TrainSettings(lr=1e-4, max_steps=len(batches), log_every=10_000, eval_every=10_000,
                          save_every=10_000, resume="never", dtype="fp32", warmup_ratio=0.0)
    acc = make_accelerator(train, "fp32")
    times: list[float] = []

    class Clocked:
        def batches(self, epoch):  # noqa: ARG002
            return batches

        def collate(self, indices):
            times.append(time.perf_counter())
            return data.collate(indices)

    class NoTracker:
        def log_metrics(self, *a, **k):
            pass

    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(train=train, accelerator=acc, model=model,
                        param_groups=decay_groups(list(model.named_parameters()), 1e-4, 0.01, "flow"),
                        loss_fn=flow_loss, train_data=Clocked(), val_data=None, output=str(Path(tmp) / "out"),
                        tracker=NoTracker(), work_dir=Path(tmp), seed=0)
        engine.save_checkpoint = lambda: None  # throughput only
        engine.fit()
        times.append(time.perf_counter())
    warm = args.warmup
    valid, padded = padded_fraction(examples, batches[warm:])
    elapsed = times[-1] - times[warm]
    return {"name": variant, "batches": len(batches), "timed_batches": len(batches) - warm,
            "mean_batch_size": round(len(examples) / len(batches), 2), "frame_budget": budget,
            "valid_frames": valid, "padded_frames": padded, "padded_fraction": round(1 - valid / padded, 4),
            "seconds": round(elapsed, 3), "valid_frames_per_s": round(valid / elapsed, 1),
            "all_frames_per_s": round(padded / elapsed, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def preset_sizes() -> dict:
    from audiotune.models.flow import count_parameters

    return {name: count_parameters(make_model(name))[1] for name in ("tiny", "base")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="bench", choices=("bench", "tiny", "base"))
    parser.add_argument("--utterances", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16, help="Baseline utterances per batch.")
    parser.add_argument("--budget", type=int, default=0, help="Frame budget (default: baseline's mean).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: one variant, JSON out
    parser.add_argument("--out", default="benchmarks/results/train_flow.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return 0

    results = {}
    for variant in ("fixed_batch_random", "frame_budget"):  # each in its own process: separate peaks
        cmd = [sys.executable, "-m", "benchmarks.train_flow", "--variant", variant, "--size", args.size,
               "--utterances", str(args.utterances), "--batch-size", str(args.batch_size),
               "--budget", str(args.budget), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        log.info("%s: %s", variant, results[variant])
    base, ours = results["fixed_batch_random"], results["frame_budget"]
    ratio = ours["valid_frames_per_s"] / base["valid_frames_per_s"]
    bound = 1 / (1 - base["padded_fraction"])  # every padded frame of the baseline removed, time ∝ frames
    summary = {
        "speedup_measured": round(ratio, 3),
        "padding_bound 1/(1-pad_baseline)": round(bound, 3),
        "bound_with_residual_padding (1-pad_budget)/(1-pad_baseline)": round(
            (1 - ours["padded_fraction"]) / (1 - base["padded_fraction"]), 3),
        "measured_over_bound": round(ratio / bound, 3),
        "target": "measured speedup within 10% of the padding bound",
        "met": bool(abs(ratio / bound - 1) <= 0.1),
    }
    out = {"benchmark": "flow stage: frame-budget batching vs fixed-batch padded baseline in random order",
           "machine": {"cpus": torch.get_num_threads(), "device": "cpu", "python": platform.python_version(),
                       "platform": platform.platform()},
           "model": args.size, "parameters": {args.size: sum(p.numel() for p in make_model(args.size).parameters())},
           "preset_parameters": preset_sizes(), "utterances": args.utterances, "durations_s": [1.0, 10.0],
           "command": "python -m benchmarks.train_flow " + " ".join(sys.argv[1:]),
           "results": results, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    log.info("summary: %s", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
