"""The joint stage: scaled learning rates per model, the weighted loss, exact resume, predicted codes, bad input."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from audiotune.config import ConfigError, load_config
from audiotune.stages.train_flow import train_flow
from audiotune.stages.train_joint import TrainJointError, train_joint
from audiotune.stages.train_llm import train_llm
from audiotune.train.joint import predicted_codes

BASE = ["tracking.enabled=false", "run.num_workers=1", "flow.preset=tiny", "flow.num_samples=0",
        "flow.max_frames_in_batch=3000", "llm.layout=tts", "llm.lora.dropout=0"]
JOINT = [*BASE, "joint.train.epochs=1", "joint.train.log_every=1", "joint.train.eval_every=1000",
         "joint.train.save_every=1000", "joint.train.schedule=constant", "llm.train.lr=1e-2", "flow.train.lr=2e-3"]


@pytest.fixture(scope="module")
def inputs(llm_tokens, llm_base, tmp_path_factory) -> SimpleNamespace:
    """A LoRA LLM and a tiny flow, each briefly trained on the same Tokens."""
    root = tmp_path_factory.mktemp("joint-inputs")
    cfg = load_config(None, [*BASE, "llm.train.max_steps=6", "flow.train.max_steps=6", "llm.train.log_every=2",
                             "flow.train.log_every=2", "llm.train.lr=1e-2", "flow.train.lr=1e-3"])
    train_llm(cfg, tokens=str(llm_tokens), output=str(root / "llm"), base_model=str(llm_base))
    train_flow(cfg, tokens=str(llm_tokens), output=str(root / "flow"))
    return SimpleNamespace(tokens=llm_tokens, llm=root / "llm", flow=root / "flow", base=llm_base)


def _run(inputs, out: Path, *extra: str):
    cfg = load_config(None, [*JOINT, *extra])
    return train_joint(cfg, tokens=str(inputs.tokens), llm=str(inputs.llm), flow=str(inputs.flow),
                       llm_output=str(out / "llm"), flow_output=str(out / "flow"))


def test_joint_trains_both_with_scaled_rates_and_the_weighted_loss(inputs, tmp_path):
    # not the defaults (0.4, 0.6, 0.1), and weights that do not sum to 1: a setting left unread shows
    res = _run(inputs, tmp_path, "joint.train.max_steps=4", "joint.lr_scale=0.5", "joint.w_llm=0.3",
               "joint.w_flow=0.9")
    history = [h for h in json.loads((tmp_path / "llm" / "history.json").read_text()) if "loss" in h]
    assert len(history) == 4
    rates = {"llm": 1e-2 * 0.5, "flow": 2e-3 * 0.5}
    for h in history:
        groups = {k[len("lr."):] for k in h if k.startswith("lr.")}
        assert {"llm.decay", "flow.decay", "flow.no_decay"} <= groups, groups  # the flow's biases and norms
        for group in groups:  # decayed and not decayed alike: the model's own rate × lr_scale
            assert h[f"lr.{group}"] == pytest.approx(rates[group.split(".")[0]]), group
        assert h["loss"] == pytest.approx(0.3 * h["loss_llm"] + 0.9 * h["loss_flow"], rel=1e-5)
    assert res.metrics["val_loss_llm"] is not None and res.metrics["val_loss_flow"] is not None
    # both artifacts in their own stages' layouts, the LLM still a LoRA adapter, both changed by the joint steps
    llm_manifest = json.loads((tmp_path / "llm" / "manifest.json").read_text())
    flow_manifest = json.loads((tmp_path / "flow" / "manifest.json").read_text())
    assert llm_manifest["kind"] == "audiotune.llm" and llm_manifest["mode"] == "lora"
    assert flow_manifest["kind"] == "audiotune.flow" and llm_manifest["joint"]["steps"] == 4
    before = load_file(str(inputs.llm / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "llm" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    from audiotune.models.flow import load_flow

    a, b = load_flow(inputs.flow).state_dict(), load_flow(tmp_path / "flow").state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_llm_predicted_condition_feeds_the_flow_the_llms_guesses(inputs, tmp_path):
    _run(inputs, tmp_path, "joint.train.max_steps=2", "joint.flow_condition=llm_predicted")
    history = [h for h in json.loads((tmp_path / "llm" / "history.json").read_text()) if "loss" in h]
    assert all(h["flow_codes_from_data"] == 0 for h in history)  # every tts row had its codes predicted


def test_predicted_codes_take_the_argmax_over_code_logits_at_target_positions():
    from audiotune.models.vocab import IGNORE_INDEX as I  # noqa: N811
    from audiotune.models.vocab import AudioVocab

    vocab = AudioVocab(text_vocab_size=10, special_ids={}, codebook_size=4, num_codebooks=1, audio_offset=10,
                       pad_id=0, eos_id=1)
    labels = torch.tensor([[I, I, 12, 13, 3, I]])  # two target codes at positions 2 and 3, then a text token
    logits = torch.full((1, 6, 14), -5.0)
    logits[0, 1, 10 + 1] = 5.0  # position 1 predicts position 2: code 1
    logits[0, 2, 3] = 9.0  # a text id is the overall argmax at position 2 ...
    logits[0, 2, 10 + 3] = 5.0  # ... but among code ids it is code 3
    codes = torch.tensor([[[2, 3, 0]]])
    predicted, kept = predicted_codes(SimpleNamespace(logits=logits), labels, vocab, codes, torch.tensor([2]))
    assert predicted.tolist() == [[[1, 3, 0]]] and kept == 0
    _, kept = predicted_codes(SimpleNamespace(logits=logits), labels, vocab, codes, torch.tensor([3]))
    assert kept == 1  # frame counts disagree: the data's codes stay


def _resume_sets() -> list[str]:
    return [*JOINT, "joint.train.max_steps=12", "joint.train.save_every=4"]


def _cli(inputs, out: Path) -> list[str]:
    return [sys.executable, "-m", "audiotune.cli", "train", "joint", "--tokens", str(inputs.tokens), "--llm",
            str(inputs.llm), "--flow", str(inputs.flow), "--output", str(out),
            *[a for s in _resume_sets() for a in ("--set", s)]]


def _in_process(inputs, out: Path) -> None:
    """What ``audiotune train joint --output out`` runs, in this process."""
    train_joint(load_config(None, _resume_sets()), tokens=str(inputs.tokens), llm=str(inputs.llm),
                flow=str(inputs.flow), llm_output=str(out / "llm"), flow_output=str(out / "flow"))


@pytest.mark.usefixtures("one_thread")
def test_killed_joint_run_resumes_exactly(inputs, tmp_path, caplog):
    """The killed run in a child (SIGKILL after its first periodic checkpoint, one thread); the uninterrupted run
    and the rerun that resumes in this process, on one thread too: the weights are compared bit for bit."""
    whole = tmp_path / "whole"
    _in_process(inputs, whole)
    out = tmp_path / "cut"
    proc = subprocess.Popen(_cli(inputs, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    marker = out / "llm.checkpoints" / "checkpoint-4" / "manifest.json"
    deadline = time.time() + 200
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (out / "llm").exists()
    with caplog.at_level(logging.INFO, logger="audiotune"):
        _in_process(inputs, out)
    assert "resumed from" in caplog.text
    for name, file in (("llm", "adapter_model.safetensors"), ("flow", "model.safetensors")):
        a, b = load_file(str(whole / name / file)), load_file(str(out / name / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_zero3_with_the_flow_ema_is_refused_by_the_config():
    """The EMA needs whole flow weights on every process; ZeRO-3 partitions them."""
    ema_zero3 = [*JOINT, "joint.train.max_steps=2", "flow.ema.enabled=true", "joint.train.deepspeed.zero_stage=3"]
    with pytest.raises(ConfigError, match="joint.train.deepspeed.zero_stage=3 with flow.ema.enabled=true"):
        load_config(None, ema_zero3)
    load_config(None, [*ema_zero3[:-1], "joint.train.deepspeed.zero_stage=2"])  # ZeRO-2 keeps whole weights
    load_config(None, [*ema_zero3[:-2], "joint.train.deepspeed.zero_stage=3"])  # ZeRO-3 without the EMA


def test_bad_inputs_are_refused_before_training(inputs, tmp_path, llm_tokens):
    with pytest.raises(ConfigError, match="both 0"):
        load_config(None, ["joint.w_llm=0", "joint.w_flow=0"])
    with pytest.raises(ConfigError, match="joint.w_flow"):
        load_config(None, ["joint.w_flow=-0.5"])
    with pytest.raises(TrainJointError, match="nothing to train"):
        train_joint(load_config(None, [*BASE, "joint.train.epochs=0", "joint.train.max_steps=2"]),
                    tokens=str(inputs.tokens), llm=str(inputs.llm), flow=str(inputs.flow),
                    llm_output=str(tmp_path / "a"), flow_output=str(tmp_path / "b"))
    # Tokens whose mels the flow was not trained on
    from audiotune.stages.tokenize import tokenize
    from tests.helpers import LLM_TOKENIZE

    other = tmp_path / "tok-24k"
    tokenize(load_config(None, [*LLM_TOKENIZE, "tokenize.mel.preset=cosyvoice2"]),
             dataset=str(llm_tokens.parent / "ds"), output=str(other))
    with pytest.raises(TrainJointError, match="mel"):
        train_joint(load_config(None, [*JOINT, "joint.train.max_steps=1"]), tokens=str(other), llm=str(inputs.llm),
                    flow=str(inputs.flow), llm_output=str(tmp_path / "c"), flow_output=str(tmp_path / "d"))
    # a LoRA whose base changed since training
    changed = tmp_path / "base-changed"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(inputs.base))
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    model.save_pretrained(str(changed))
    AutoTokenizer.from_pretrained(str(inputs.base)).save_pretrained(str(changed))
    with pytest.raises(TrainJointError, match="not the one"):
        train_joint(load_config(None, [*JOINT, "joint.train.max_steps=1", f"joint.base_model={changed}"]),
                    tokens=str(inputs.tokens), llm=str(inputs.llm), flow=str(inputs.flow),
                    llm_output=str(tmp_path / "e"), flow_output=str(tmp_path / "f"))
    assert not any((tmp_path / n).exists() for n in "abcdef")
