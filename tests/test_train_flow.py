"""The flow stage on the tiny preset: freezing, LoRA, EMA, refusals before training, CLI end to end, exact resume.

Two processes (torchrun, DeepSpeed ZeRO-2) against the one-process run: tests/test_train_flow_distributed.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from audiotune.artifacts import ArtifactError
from audiotune.config import load_config
from audiotune.models.flow import EstimatorConfig, SpeakerSpec, load_flow, save_flow, tiny
from audiotune.stages.convert import convert
from audiotune.stages.tokenize import tokenize
from audiotune.stages.train_flow import TrainFlowError, train_flow
from examples.make_corpus import make_corpus

FAST = ["tracking.enabled=false", "run.num_workers=1", "flow.preset=tiny", "flow.train.log_every=1",
        "flow.train.eval_every=1000", "flow.train.save_every=1000", "flow.train.schedule=constant",
        "flow.train.warmup_ratio=0", "flow.train.lr=3e-3", "flow.max_frames_in_batch=2000", "flow.num_samples=0"]
MEL_FPS = 22050 / 256


# tiny models gain nothing from a second intra-op thread; on a busy 2-core box spinning threads stall
pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(*overrides: str):
    return load_config(None, [*FAST, *overrides])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    """12 synthetic utterances of 2 speakers; 32 mel-kmeans codes at a quarter of the mel frame rate."""
    root = tmp_path_factory.mktemp("flow")
    manifest = make_corpus(root / "corpus", n_speakers=2, utts_per_speaker=6, backend="synth", seed=3, mandarin=False)
    cfg = load_config(None, ["tracking.enabled=false", "run.num_workers=1", "convert.val_fraction=0.25",
                             "tokenize.vocab_size=300", "tokenize.audio_tokenizer.codebook_size=32",
                             f"tokenize.audio_tokenizer.token_rate={MEL_FPS / 4}",
                             "tokenize.audio_tokenizer.fit_max_frames=3000"])
    convert(cfg, source=str(manifest), output=str(root / "ds"))
    tokenize(cfg, dataset=str(root / "ds"), output=str(root / "tok"))
    return root / "tok"


@pytest.fixture(scope="module")
def base_flow(tokens, tmp_path_factory) -> Path:
    """A Flow artifact trained a few steps from the tiny preset: the starting point of the fine-tunes."""
    out = tmp_path_factory.mktemp("base") / "flow"
    train_flow(_cfg("flow.train.max_steps=4"), tokens=str(tokens), output=str(out))
    return out


def test_freeze_encoder_leaves_the_encoder_bit_identical(tokens, base_flow, tmp_path):
    res = train_flow(_cfg("flow.freeze_encoder=true", "flow.train.max_steps=6"), tokens=str(tokens),
                     output=str(tmp_path / "f"), base_flow=str(base_flow))
    before, after = _weights(base_flow), _weights(tmp_path / "f")
    assert before.keys() == after.keys()
    encoder = [k for k in before if k.startswith("encoder.")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("estimator."))
    assert res.manifest["init"] == "base_flow" and res.metrics["trainable_parameters"] < \
        res.metrics["total_parameters"]


def test_lora_trains_only_adapters_and_exports_a_merged_flow(tokens, base_flow, tmp_path):
    out = tmp_path / "lora"
    res = train_flow(_cfg("flow.lora.enabled=true", "flow.lora.r=4", "flow.lora.target_modules=[to_q,to_v,proj_in]",
                          "flow.train.max_steps=6", "flow.train.lr=1e-2"), tokens=str(tokens), output=str(out),
                     base_flow=str(base_flow))
    before, after = _weights(base_flow), _weights(out)
    assert before.keys() == after.keys()  # a plain flow: LoRA merged
    targets = (".to_q.", ".to_v.", ".proj_in.")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("estimator.") and any(t in k for t in targets) for k in changed)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert res.metrics["trainable_parameters"] == sum(v.numel() for v in adapter.values())
    load_flow(out)  # strict: the artifact is a plain flow model


def test_ema_weights_differ_from_the_raw_weights_and_are_saved(tokens, tmp_path):
    out = tmp_path / "ema"
    res = train_flow(_cfg("flow.ema.enabled=true", "flow.ema.decay=0.9", "flow.train.max_steps=10"),
                     tokens=str(tokens), output=str(out))
    assert res.metrics["final_loss"] < res.metrics["first_loss"]
    checkpoint = Path(f"{out}.checkpoints") / "checkpoint-10"
    raw = load_file(str(checkpoint / "trainable.safetensors"))
    ema = load_file(str(checkpoint / "ema.safetensors"))
    saved = _weights(out)
    params = [k[len("shadow."):] for k in ema if k.startswith("shadow.")]
    assert params and all(torch.equal(saved[k], ema[f"shadow.{k}"]) for k in params)
    assert any(not torch.equal(saved[k], raw[k]) for k in params)


def _copy(tokens: Path, dest: Path, manifest_edit=None, drop_mels: bool = False) -> Path:
    shutil.copytree(tokens, dest)
    if manifest_edit:
        manifest = json.loads((dest / "manifest.json").read_text())
        manifest_edit(manifest)
        (dest / "manifest.json").write_text(json.dumps(manifest))
    if drop_mels:
        for shard in (dest / "train").glob("part-*.parquet"):
            table = pq.read_table(shard)
            index = table.schema.get_field_index("mel")
            table = table.set_column(index, table.schema.field("mel"), pa.nulls(len(table), pa.binary()))
            pq.write_table(table, shard)
        from audiotune.artifacts import shard_files

        manifest = json.loads((dest / "manifest.json").read_text())
        manifest["shard_files"] = shard_files(dest)  # the rewritten shards, as a tokenize run would list them
        (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_bad_inputs_are_refused_before_training(tokens, tmp_path):
    def other_mel(m):
        m["mel"]["n_mels"] = 100

    cases = [
        (_copy(tokens, tmp_path / "t1", other_mel), TrainFlowError, "100 bins"),
        (_copy(tokens, tmp_path / "t2", lambda m: m.pop("mel")), TrainFlowError, "no mel settings"),
        (_copy(tokens, tmp_path / "t3", drop_mels=True), TrainFlowError, "no_mel"),
        (tokens.parent / "ds", ArtifactError, "audiotune.dataset"),
    ]
    for k, (source, error, match) in enumerate(cases):
        with pytest.raises(error, match=match):
            train_flow(_cfg(), tokens=str(source), output=str(tmp_path / f"out{k}"))
    mismatched = tmp_path / "base5"
    save_flow(tiny(codebook_size=32, mel_frames_per_token=4.0, speaker=SpeakerSpec("id", 5)), mismatched)
    with pytest.raises(TrainFlowError, match="speaker conditioning"):
        train_flow(_cfg(), tokens=str(tokens), output=str(tmp_path / "out9"), base_flow=str(mismatched))
    assert not list(tmp_path.glob("out*"))  # nothing written, not even checkpoints


def test_a_base_flow_must_match_the_preset_unless_the_preset_is_from_base(tokens, tmp_path):
    """A base flow of another architecture is refused before training, naming what differs; from_base takes it."""
    custom = tmp_path / "custom"
    torch.manual_seed(0)
    save_flow(tiny(codebook_size=32, mel_frames_per_token=4.0, speaker=SpeakerSpec("id", 3), preset="custom",
                   estimator=EstimatorConfig(channels=(32,), n_blocks=1, num_mid_blocks=2, heads=2, head_dim=16)),
              custom)
    refused = tmp_path / "refused"
    with pytest.raises(TrainFlowError) as err:
        train_flow(_cfg("flow.train.max_steps=1"), tokens=str(tokens), output=str(refused), base_flow=str(custom))
    message = str(err.value)
    assert "(preset 'custom') does not match flow.preset='tiny'" in message and "from_base" in message
    for expected in ("estimator.channels: checkpoint (32,), preset (64,)", "estimator.num_mid_blocks: checkpoint 2",
                     "unexpected keys: estimator.mid.1.", "shape mismatches: estimator."):
        assert expected in message, message
    assert not refused.exists() and not Path(f"{refused}.checkpoints").exists()

    res = train_flow(_cfg("flow.preset=from_base", "flow.train.max_steps=2"), tokens=str(tokens),
                     output=str(tmp_path / "taken"), base_flow=str(custom))
    taken = load_flow(tmp_path / "taken")
    assert taken.config.estimator.channels == (32,) and taken.config.estimator.num_mid_blocks == 2
    assert res.manifest["preset"] == "custom" and res.manifest["init"] == "base_flow"
    with pytest.raises(TrainFlowError, match="from_base' takes the architecture from a base flow, but there is none"):
        train_flow(_cfg("flow.preset=from_base"), tokens=str(tokens), output=str(tmp_path / "none"))


def _cli_args(out: Path, tokens: Path, *extra: str) -> list[str]:
    sets = [*FAST, "flow.train.max_steps=24", "flow.train.save_every=8", "flow.ema.enabled=true",
            "flow.ema.decay=0.9", "flow.train.eval_every=12", "flow.num_samples=1", "flow.sample_every=12",
            "flow.vocoder=griffin-lim:4", *extra]
    return ["train", "flow", "--tokens", str(tokens), "--output", str(out), *[a for s in sets for a in ("--set", s)]]


def _cli_in_process(argv: list[str], capsys, caplog) -> tuple[str, str]:
    """``audiotune <argv>`` in this process (exit code 0 asserted); its stdout, and its log."""
    from audiotune.cli import main as cli_main

    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="audiotune"):
        code = cli_main(argv)
    out, err = capsys.readouterr()
    assert code == 0, (err + caplog.text)[-4000:]
    return out, caplog.text


# one intra-op thread: the tiny model gains nothing from more, a busy 2-core CI box stalls spinning threads, and
# the killed child's steps are compared bit for bit with this process's (one thread too: ``one_thread``)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_cli_writes_a_complete_flow_and_a_killed_run_resumes_exactly(tokens, tmp_path, capsys, caplog):
    """The command line in this process for the whole run and the rerun; the killed run in a child (SIGKILL)."""
    whole = tmp_path / "whole"
    stdout, _ = _cli_in_process(_cli_args(whole, tokens), capsys, caplog)
    assert json.loads(stdout.strip().splitlines()[-1])["output"] == str(whole)
    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["kind"] == "audiotune.flow" and manifest["schema_version"] == 1 and manifest["steps"] == 24
    assert manifest["mel"]["n_mels"] == 80 and manifest["vocab"]["codebook_size"] == 32
    assert manifest["speaker"]["type"] == "id" and manifest["speaker"]["num_speakers"] == 3
    for name in ("config.json", "model.safetensors", "metrics.json", "history.json", "loss_curve.png",
                 "speakers.json", "samples/final-0.png", "samples/final-0.wav"):
        assert (whole / name).is_file(), name
    metrics = json.loads((whole / "metrics.json").read_text())
    assert metrics["frames_per_s"] > 0 and metrics["val_loss"] is not None
    model = load_flow(whole)
    assert model.config.preset == "tiny" and model.config.mel["hop_length"] == 256

    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "audiotune.cli", *_cli_args(out, tokens)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    _wait_for(Path(f"{out}.checkpoints") / "checkpoint-8" / "manifest.json", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0 and not out.exists()
    _, log = _cli_in_process(_cli_args(out, tokens), capsys, caplog)
    assert "resumed from" in log
    a, b = _weights(whole), _weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_refuses_a_flow_checkpoint_written_with_other_settings(tokens, tmp_path):
    from audiotune.train.checkpoints import CheckpointMismatch

    common = ["flow.train.save_every=2", "flow.ema.enabled=false"]
    train_flow(_cfg(*common, "flow.train.max_steps=2"), tokens=str(tokens), output=str(tmp_path / "a"))
    resume = f"flow.train.resume={tmp_path}/a.checkpoints/checkpoint-2"
    with pytest.raises(CheckpointMismatch, match=r"flow\.train\.lr: checkpoint 0\.003, now 0\.001"):
        train_flow(_cfg(*common, "flow.train.max_steps=4", resume, "flow.train.lr=1e-3"), tokens=str(tokens),
                   output=str(tmp_path / "b"))
    # sample rendering and the length of the run may change on resume
    res = train_flow(_cfg(*common, "flow.train.max_steps=3", resume, "flow.num_samples=1", "flow.sample_every=3"),
                     tokens=str(tokens), output=str(tmp_path / "c"))
    assert res.metrics["steps"] == 3 and not (tmp_path / "b").exists()
