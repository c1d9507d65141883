"""Two processes (torchrun, gloo on CPU) under DeepSpeed ZeRO-2 and ZeRO-3 follow the one-process run.

The reference is one process with ``grad_accum=2``: it steps on the same pairs of batches that two
ranks take together (one batch per rank, ``max_batch_size=1`` so an epoch splits evenly).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 10
COMMON = ["tracking.enabled=false", "llm.layout=tts", f"llm.train.max_steps={STEPS}", "llm.train.log_every=1",
          "llm.train.lr=1e-2", "llm.train.schedule=constant", "llm.train.eval_every=1000",
          "llm.train.save_every=5", "llm.train.keep_last=3", "llm.train.max_batch_size=1", "llm.lora.dropout=0"]
# PEFT's trainable-token rows gather under ZeRO-3 on CUDA only, so the CPU run of LoRA + ZeRO-3 trains
# adapters alone (text layout: no new audio rows needed).
MODES = {"full": ["llm.mode=full"], "lora": ["llm.mode=lora", "llm.lora.train_new_tokens=false", "llm.layout=text"]}


def _train(tokens: Path, base: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = [*COMMON, *extra]
    cmd = [sys.executable, "-m", "audiotune.cli", "train", "llm", "--tokens", str(tokens), "--base-model", str(base),
           "--output", str(out), *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "history.json").read_text()) if "loss" in h]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    file = out / "adapter_model.safetensors"
    return load_file(str(file if file.exists() else out / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(llm_tokens, llm_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("one-process")
    for mode, sets in MODES.items():
        _train(llm_tokens, llm_base, root / mode, *sets, "llm.train.grad_accum=2")
    return {mode: root / mode for mode in MODES}


@pytest.mark.parametrize("zero, mode", [(2, "full"), (3, "full"), (3, "lora")])
def test_two_process_zero_follows_the_one_process_trajectory(llm_tokens, llm_base, reference, tmp_path, zero,
                                                            mode):
    out = tmp_path / "ds"
    proc = _train(llm_tokens, llm_base, out, *MODES[mode], "llm.train.nproc_per_node=2",
                  f"llm.train.deepspeed.zero_stage={zero}")
    assert "launching 2 processes" in proc.stderr
    assert (Path(f"{out}.checkpoints") / f"checkpoint-{STEPS}" / "deepspeed").is_dir()  # DeepSpeed really ran
    ref, got = _losses(reference[mode]), _losses(out)
    assert len(ref) == len(got) == STEPS
    for step, (a, b) in enumerate(zip(ref, got, strict=True), start=1):
        assert abs(a - b) <= 1e-3 * abs(a), (step, ref, got)
    # the artifact is a plain adapter / model (ZeRO-3 gathers 16-bit weights on save), same as one process's
    a, b = _weights(reference[mode]), _weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        # Adam turns reduction-order noise in near-zero gradients into full-size steps on a few rarely seen rows,
        # so compare in bulk: the weights are gathered and complete (not empty ZeRO-3 partitions) and agree.
        diff = (a[key].float() - b[key].float()).abs().mean()
        assert diff <= 1e-2 * a[key].float().abs().mean() + 1e-7, (key, float(diff))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "audiotune.llm" and manifest["steps"] == STEPS


def test_zero2_resumes_exactly_from_a_mid_run_checkpoint(llm_tokens, llm_base, tmp_path):
    """Optimizer partitions, schedule, RNG and data position come back: steps 6-10 replay bit for bit."""
    zero = ["llm.train.nproc_per_node=2", "llm.train.deepspeed.zero_stage=2", *MODES["full"]]
    whole = tmp_path / "whole"
    _train(llm_tokens, llm_base, whole, *zero)
    mid = Path(f"{whole}.checkpoints") / "checkpoint-5"
    assert (mid / "manifest.json").exists() and (mid / "deepspeed").is_dir()
    resumed = tmp_path / "resumed"
    # another run's DeepSpeed checkpoint (DeepSpeed unpickles it): this test wrote it, so it is trusted
    proc = _train(llm_tokens, llm_base, resumed, *zero, f"llm.train.resume={mid}", "llm.train.trust_checkpoint=true")
    assert "resumed from" in proc.stderr
    assert _losses(resumed) == _losses(whole)  # the history of steps 1-5 comes from the checkpoint
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_reaches_the_workers_through_torchrun_and_they_checkpoint_together(llm_tokens, llm_base, tmp_path):
    """``audiotune train`` relaunched itself under torchrun: a SIGTERM to it stops both workers at one step with
    one checkpoint of both ranks, the command exits 143, and a rerun resumes from that checkpoint."""
    out, log_file = tmp_path / "ddp", tmp_path / "ddp.log"
    ckpts = Path(f"{out}.checkpoints")
    sets = [*COMMON, *MODES["full"], "llm.train.nproc_per_node=2", "llm.train.save_every=4"]
    cmd = [sys.executable, "-m", "audiotune.cli", "train", "llm", "--tokens", str(llm_tokens), "--base-model",
           str(llm_base), "--output", str(out), *[a for s in [*sets, "llm.train.max_steps=500"] for a in ("--set", s)]]
    with open(log_file, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 300
        while not (ckpts / "checkpoint-4" / "manifest.json").exists() or "step 5/500" not in log_file.read_text():
            assert proc.poll() is None, log_file.read_text()[-4000:]
            assert time.time() < deadline, log_file.read_text()[-4000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    stderr = log_file.read_text()
    assert proc.returncode == 143, stderr[-4000:]
    stopped = re.findall(r"stopped by SIGTERM at step (\d+); checkpoint (\S+) written", stderr)
    assert len(stopped) == 2 and len(set(stopped)) == 1, stderr[-4000:]  # both workers, at the same step
    step = int(stopped[0][0])
    assert step > 4 and stopped[0][1] == str(ckpts / f"checkpoint-{step}")
    assert {p.name for p in (ckpts / f"checkpoint-{step}").glob("rng_state_*.safetensors")} == {
        "rng_state_0.safetensors", "rng_state_1.safetensors"}
    assert not out.exists()
    resumed = _train(llm_tokens, llm_base, out, *sets, f"llm.train.max_steps={step + 2}")  # may run longer
    assert f"resumed from {ckpts / f'checkpoint-{step}'} at step {step}" in resumed.stderr
    assert json.loads((out / "manifest.json").read_text())["steps"] == step + 2
