"""Two processes (torchrun, gloo on CPU) under DeepSpeed ZeRO-2 follow the one-process flow run.

The reference is one process with ``grad_accum=2``: it steps on the same pairs of batches that two
ranks take together (one utterance per batch, ``max_batch_size=1``, and an even number of training
utterances, so every epoch splits evenly). Each utterance's time step, noise, prompt and dropout come
from its own seed, so they are the same wherever it lands; with torch's global RNG the second rank
would draw what the reference's second micro-batch does not, and the losses would part at step 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from audiotune.config import load_config
from audiotune.stages.train_flow import train_flow

STEPS = 10
COMMON = ["tracking.enabled=false", "run.num_workers=1", "flow.preset=tiny", f"flow.train.max_steps={STEPS}",
          "flow.train.log_every=1", "flow.train.lr=3e-3", "flow.train.schedule=constant", "flow.train.warmup_ratio=0",
          "flow.train.eval_every=1000", "flow.train.save_every=1000", "flow.train.max_batch_size=1",
          "flow.max_frames_in_batch=2000", "flow.num_samples=1", "flow.sample_every=1000",
          "flow.vocoder=griffin-lim:2"]


# the in-process reference on one intra-op thread, as the torchrun processes (OMP_NUM_THREADS=1)
pytestmark = pytest.mark.usefixtures("one_thread")


def _history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


def test_two_process_zero2_follows_the_one_process_trajectory(llm_tokens, tmp_path):
    reference = tmp_path / "one"
    train_flow(load_config(None, [*COMMON, "flow.train.grad_accum=2"]), tokens=str(llm_tokens),
               output=str(reference))
    out = tmp_path / "zero2"
    sets = [*COMMON, "flow.train.nproc_per_node=2", "flow.train.deepspeed.zero_stage=2"]
    cmd = [sys.executable, "-m", "audiotune.cli", "train", "flow", "--tokens", str(llm_tokens), "--output", str(out),
           *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "launching 2 processes" in proc.stderr
    assert (Path(f"{out}.checkpoints") / f"checkpoint-{STEPS}" / "deepspeed").is_dir()  # DeepSpeed really ran

    ref, got = _history(reference), _history(out)
    ref_loss, got_loss = [h["loss"] for h in ref if "loss" in h], [h["loss"] for h in got if "loss" in h]
    assert len(ref_loss) == len(got_loss) == STEPS
    assert len(set(ref_loss)) == STEPS  # the losses move: a trajectory, not a constant
    for step, (a, b) in enumerate(zip(ref_loss, got_loss, strict=True), start=1):
        assert abs(a - b) <= 1e-3 * abs(a), (step, ref_loss, got_loss)
    # validation (one utterance per rank against both in one process) agrees as well
    ref_val, got_val = [h["val_loss"] for h in ref if "val_loss" in h], [h["val_loss"] for h in got if "val_loss" in h]
    assert len(ref_val) == len(got_val) == 1 and got_val[0] == pytest.approx(ref_val[0], rel=1e-3)

    # rank 0 published a complete, plain flow with the same weights as the one-process run
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        diff = (a[key].float() - b[key].float()).abs().mean()
        assert diff <= 1e-2 * a[key].float().abs().mean() + 1e-6, (key, float(diff))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "audiotune.flow" and manifest["steps"] == STEPS
    assert (out / "samples" / "final-0.wav").is_file()
