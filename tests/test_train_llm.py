"""The llm stage on tiny models: learning per layout, LoRA on new audio rows, exact resume, bad input."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audiotune.artifacts import ArtifactError
from audiotune.config import load_config
from audiotune.stages.train_llm import TrainLLMError, train_llm
from tests.helpers import LLM_TOKENIZE, save_tiny_base

FAST = ["tracking.enabled=false", "run.num_workers=1", "llm.train.log_every=1", "llm.train.eval_every=1000",
        "llm.train.save_every=1000", "llm.train.batch_tokens=2048", "llm.train.warmup_ratio=0",
        "llm.train.schedule=constant"]


def _cfg(*overrides: str):
    return load_config(None, [*FAST, *overrides])


@pytest.fixture
def tokens(llm_tokens) -> Path:
    return llm_tokens


@pytest.fixture
def base_model(llm_base) -> Path:
    return llm_base


@pytest.mark.parametrize("layout", ["tts", "clone", "understand", "text"])
def test_full_training_from_scratch_learns_each_layout(tokens, tmp_path, layout):
    res = train_llm(_cfg("llm.init=scratch", "llm.preset=tiny-llama", "llm.mode=full", f"llm.layout={layout}",
                         "llm.train.lr=3e-3", "llm.train.max_steps=40"),
                    tokens=str(tokens), output=str(tmp_path / "llm"))
    assert res.metrics["final_loss"] < 0.6 * res.metrics["first_loss"], res.metrics
    manifest = json.loads((tmp_path / "llm" / "manifest.json").read_text())
    assert manifest["kind"] == "audiotune.llm" and manifest["steps"] == 40


def _starting_model(cfg, tokens: Path, base: Path):
    """The model the llm stage starts from, rebuilt with the stage's own steps and seed: the new rows that
    resizing the embedding draws at random (mean resizing) come out the same."""
    from audiotune.artifacts import TOKENS, TOKENS_VERSION, read_manifest
    from audiotune.models.lm import build_lm
    from audiotune.stages.train_llm import _vocab
    from audiotune.train.engine import seed_everything

    _, vocab, base_text_size = _vocab(tokens, read_manifest(str(tokens), TOKENS, TOKENS_VERSION), cfg)
    seed_everything(cfg.run.seed)
    model, info = build_lm(cfg.llm, vocab, base, torch.float32, base_text_size)
    return model, info, vocab


def _token_rows(adapter: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    (key,) = [k for k in adapter if f"{module}.token_adapter.trainable_tokens_delta" in k]
    return adapter[key]


def test_lora_trains_new_audio_rows_and_freezes_the_base(tokens, base_model, tmp_path):
    from audiotune.models.lm import load_trained
    from audiotune.train.llm_data import load_examples

    cfg = _cfg("llm.mode=lora", "llm.lora.r=8", "llm.train.lr=1e-2", "llm.train.max_steps=40", "llm.layout=tts")
    res = train_llm(cfg, tokens=str(tokens), output=str(tmp_path / "lora"), base_model=str(base_model))
    assert res.metrics["final_loss"] < 0.7 * res.metrics["first_loss"], res.metrics
    out = tmp_path / "lora"
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    start, info, vocab = _starting_model(cfg, tokens, base_model)
    rows = json.loads((out / "manifest.json").read_text())["embedding_rows"]  # codes + markers, padded to 64
    assert rows == info["embedding_rows"] and rows >= vocab.audio_offset + vocab.codebook_size and rows % 64 == 0
    new_ids = info["new_token_ids"]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k or "trainable_tokens_delta" in k for k in adapter), sorted(adapter)[:5]
    trained_emb, trained_head = _token_rows(adapter, "embed_tokens"), _token_rows(adapter, "lm_head")
    start_emb = start.get_input_embeddings().weight.detach()[new_ids]
    start_head = start.get_output_embeddings().weight.detach()[new_ids]
    assert start.get_output_embeddings().weight is not start.get_input_embeddings().weight  # an untied head

    # Rows no input contains get no gradient: AdamW only decays them, by (1 - lr · weight_decay) a step. That they
    # match the rebuilt start exactly so shows the reference is the run's real start, not a fresh random draw.
    examples, _ = load_examples(tokens / "train", vocab, "tts", cfg.llm.max_seq_len, cfg.llm.overlong)
    seen = {int(i) for e in examples for i in e.input_ids}
    unseen = [k for k, i in enumerate(new_ids) if i not in seen]
    used = [k for k, i in enumerate(new_ids) if i in seen]
    assert unseen and used, (len(unseen), len(used))
    decay = (1 - cfg.llm.train.lr * cfg.llm.train.weight_decay) ** 40
    assert torch.allclose(trained_emb[unseen], start_emb[unseen] * decay, rtol=1e-5, atol=1e-8)
    # the rows the data uses learned, in the input embedding and in the output head (every row: softmax)
    assert ((trained_emb[used] - start_emb[used] * decay).abs().amax(dim=1) > 1e-3).all()
    assert ((trained_head - start_head * decay).abs().amax(dim=1) > 1e-3).all()

    # the checkpoint holds only adapter weights and new rows: nothing else was trainable; the base rows are untouched
    ckpts = checkpoints_of(out)
    trainable = load_file(str(ckpts[-1] / "trainable.safetensors"))
    assert trainable and all("lora_" in k or "trainable_tokens_delta" in k for k in trainable), sorted(trainable)[:5]
    merged = load_trained(out, base_model)[0].merge_and_unload()
    base_rows = info["base_vocab_size"]
    for name in ("get_input_embeddings", "get_output_embeddings"):
        got, ref = getattr(merged, name)().weight, getattr(start, name)().weight
        assert torch.equal(got[:base_rows], ref[:base_rows]), name  # bit-identical
        assert torch.allclose(got[new_ids], trained_emb if name == "get_input_embeddings" else trained_head)
    merged_state = merged.state_dict()
    frozen = {k: v for k, v in start.state_dict().items() if not any(m in k for m in ("proj", "embed", "lm_head"))}
    assert frozen and all(torch.equal(merged_state[k], v) for k, v in frozen.items())  # the norms: untouched


def checkpoints_of(output: Path) -> list[Path]:
    """The complete checkpoints of ``output``, oldest first."""
    from audiotune.train.checkpoints import list_complete

    return [Path(uri) for _, uri in list_complete(f"{output}.checkpoints")]


@pytest.mark.parametrize("layout", ["clone", "understand", "text"])
def test_lora_learns_each_layout(tokens, base_model, tmp_path, layout):
    res = train_llm(_cfg("llm.mode=lora", "llm.lora.r=8", "llm.lora.dropout=0", "llm.train.lr=1e-2",
                         "llm.train.max_steps=30", f"llm.layout={layout}"), tokens=str(tokens),
                    output=str(tmp_path / "lora"), base_model=str(base_model))
    assert res.metrics["final_loss"] < 0.7 * res.metrics["first_loss"], res.metrics


def test_lora_on_a_tied_llama_base_keeps_only_adapter_weights(tokens, tmp_path):
    base = save_tiny_base(tokens, tmp_path / "llama", arch="llama", tie=True)
    res = train_llm(_cfg("llm.mode=lora", "llm.train.lr=1e-2", "llm.train.max_steps=20", "llm.layout=tts"),
                    tokens=str(tokens), output=str(tmp_path / "lora"), base_model=str(base))
    assert res.metrics["final_loss"] < 0.8 * res.metrics["first_loss"], res.metrics
    keys = load_file(str(tmp_path / "lora" / "adapter_model.safetensors")).keys()
    assert keys and all("lora_" in k or "trainable_tokens_delta" in k for k in keys), sorted(keys)[:5]


@pytest.fixture(scope="module")
def tokens_3cb(llm_tokens, tmp_path_factory) -> Path:
    """The same corpus with 3 residual codebooks per frame (MOSS-TTSD style multi-codebook)."""
    from audiotune.stages.tokenize import tokenize

    out = tmp_path_factory.mktemp("tok3") / "tok"
    tokenize(load_config(None, [*LLM_TOKENIZE, "tokenize.audio_tokenizer.num_codebooks=3"]),
             dataset=str(llm_tokens.parent / "ds"), output=str(out))
    return out


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_multicodebook_model_learns_and_reloads(tokens_3cb, llm_base, tmp_path, mode):
    from audiotune.models.lm import load_trained

    init = ["llm.init=scratch", "llm.preset=tiny-qwen2"] if mode == "full" else ["llm.mode=lora"]
    res = train_llm(_cfg(*init, "llm.layout=tts", "llm.train.lr=5e-3", "llm.train.max_steps=30",
                         "llm.codebook_weights=[3,2,1]"), tokens=str(tokens_3cb), output=str(tmp_path / "m"),
                    base_model=None if mode == "full" else str(llm_base))
    assert res.metrics["final_loss"] < 0.7 * res.metrics["first_loss"], res.metrics
    history = json.loads((tmp_path / "m" / "history.json").read_text())
    assert {"loss_codebook0", "loss_codebook1", "loss_codebook2"} <= set(history[-1])
    model, manifest = load_trained(tmp_path / "m", None if mode == "full" else llm_base)
    assert manifest["vocab"]["num_codebooks"] == 3 and len(model.codebook_heads) == 2


def _weights(path: Path) -> dict[str, torch.Tensor]:
    file = path / "adapter_model.safetensors"
    return load_file(str(file if file.exists() else path / "model.safetensors"))


SAVE_EVERY = 8  # periodic checkpoints of the 24 steps of the resume runs
# one intra-op thread in the child (OMP_NUM_THREADS) and in this process (the ``one_thread`` fixture): the killed
# child's steps and this process's are compared bit for bit
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _resume_sets(*extra: str) -> list[str]:
    return [*FAST, "llm.mode=lora", "llm.layout=tts", "llm.train.max_steps=24", f"llm.train.save_every={SAVE_EVERY}",
            "llm.train.lr=5e-3", "llm.lora.dropout=0.1", *extra]


def _cli(out: Path, tokens: Path, base: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "audiotune.cli", "train", "llm", "--tokens", str(tokens), "--base-model",
            str(base), "--output", str(out), *[a for s in _resume_sets(*extra) for a in ("--set", s)]]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120, text: str | None = None) -> None:
    """Until ``path`` exists (and contains ``text``), while ``proc`` runs."""
    deadline = time.time() + timeout
    while not path.exists() or (text is not None and text not in path.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared" + (f" with {text!r}" if text else "")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(llm_tokens, llm_base, tmp_path_factory) -> Path:
    """The 24 steps without a stop, run in this process on one thread (as the killed children run them)."""
    whole = tmp_path_factory.mktemp("whole") / "whole"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_llm(load_config(None, _resume_sets()), tokens=str(llm_tokens), output=str(whole),
                  base_model=str(llm_base))
    finally:
        torch.set_num_threads(threads)
    return whole


def _resume_and_compare(out: Path, tokens: Path, base: Path, whole: Path, caplog) -> str:
    """Rerun the stopped run in this process (the same settings and output): it resumes from the newest complete
    checkpoint, and its weights equal the uninterrupted run's bit for bit. Returns the rerun's log."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="audiotune"):
        train_llm(load_config(None, _resume_sets()), tokens=str(tokens), output=str(out), base_model=str(base))
    a, b = _weights(whole), _weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    return caplog.text


@pytest.mark.usefixtures("one_thread")
def test_sigterm_checkpoints_the_step_it_stops_at_exits_143_and_resumes_from_there(tokens, base_model,
                                                                                   uninterrupted, tmp_path, caplog):
    out = tmp_path / "cut"
    ckpts = Path(f"{out}.checkpoints")
    log_file = tmp_path / "cut.log"
    with open(log_file, "w") as err:
        proc = subprocess.Popen(_cli(out, tokens, base_model), stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        _wait_for(ckpts / f"checkpoint-{SAVE_EVERY}" / "manifest.json", proc)
        _wait_for(log_file, proc, text=f"step {SAVE_EVERY + 1}/24")  # past the periodic checkpoint
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    stderr = log_file.read_text()
    assert proc.returncode == 143, stderr[-4000:]
    assert not out.exists()
    stopped = re.search(r"audiotune train llm: stopped by SIGTERM at step (\d+); checkpoint (\S+) written", stderr)
    assert stopped, stderr[-4000:]
    step = int(stopped.group(1))
    assert step > SAVE_EVERY and step % SAVE_EVERY, step  # its own checkpoint, not a periodic one
    assert stopped.group(2) == str(ckpts / f"checkpoint-{step}")
    assert [p.name for p in checkpoints_of(out)] == [f"checkpoint-{SAVE_EVERY}", f"checkpoint-{step}"]
    resumed = _resume_and_compare(out, tokens, base_model, uninterrupted, caplog)
    assert f"resumed from {ckpts / f'checkpoint-{step}'} at step {step}" in resumed


@pytest.mark.usefixtures("one_thread")
def test_sigkill_then_resume_from_the_last_periodic_checkpoint_equals_an_uninterrupted_run(tokens, base_model,
                                                                                          uninterrupted, tmp_path,
                                                                                          caplog):
    out = tmp_path / "cut"
    proc = subprocess.Popen(_cli(out, tokens, base_model), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV)
    _wait_for(Path(f"{out}.checkpoints") / f"checkpoint-{SAVE_EVERY}" / "manifest.json", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    resumed = _resume_and_compare(out, tokens, base_model, uninterrupted, caplog)
    assert "resumed from" in resumed and "taking over the lease" in resumed  # the killed child's lease


def test_resume_refuses_a_checkpoint_written_with_other_settings(tokens, base_model, tmp_path):
    from audiotune.train.checkpoints import CheckpointMismatch

    common = ["llm.mode=lora", "llm.layout=tts", "llm.train.save_every=2"]
    train_llm(_cfg(*common, "llm.train.max_steps=2"), tokens=str(tokens), output=str(tmp_path / "a"),
              base_model=str(base_model))
    resume = f"llm.train.resume={tmp_path}/a.checkpoints/checkpoint-2"
    for changed, named in (("llm.train.lr=1e-3", r"llm\.train\.lr: checkpoint 0\.0002, now 0\.001"),
                           ("run.seed=1", r"seed: checkpoint 0, now 1")):
        with pytest.raises(CheckpointMismatch, match=named):
            train_llm(_cfg(*common, "llm.train.max_steps=4", resume, changed), tokens=str(tokens),
                      output=str(tmp_path / "b"), base_model=str(base_model))
    # what a resume may change: the length of the run, the cadence of checkpoints
    res = train_llm(_cfg(*common, "llm.train.max_steps=4", "llm.train.save_every=3", resume), tokens=str(tokens),
                    output=str(tmp_path / "c"), base_model=str(base_model))
    assert res.metrics["steps"] == 4 and not (tmp_path / "b").exists()


def test_bad_inputs_fail_before_training(tokens, base_model, tmp_path):
    with pytest.raises(ArtifactError):
        train_llm(_cfg("llm.init=scratch"), tokens=str(tokens.parent / "ds"), output=str(tmp_path / "a"))
    with pytest.raises(TrainLLMError, match="no base model"):
        train_llm(_cfg(), tokens=str(tokens), output=str(tmp_path / "b"))
    from audiotune.models.lm import ModelError

    with pytest.raises((ModelError, FileNotFoundError)):
        train_llm(_cfg(), tokens=str(tokens), output=str(tmp_path / "c"), base_model=str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="q_proj"):
        train_llm(_cfg("llm.lora.target_modules=[attn_qkv]"), tokens=str(tokens), output=str(tmp_path / "d"),
                  base_model=str(base_model))
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 4}))
    from audiotune.train.deepspeed import DeepSpeedConfigError

    with pytest.raises(DeepSpeedConfigError, match="gradient_accumulation_steps"):
        train_llm(_cfg("llm.init=scratch", f"llm.train.deepspeed.config_file={ds_json}"), tokens=str(tokens),
                  output=str(tmp_path / "e"))
    for name in "abcde":
        assert not (tmp_path / name).exists()


def test_overlong_sequences_are_dropped_or_truncated_and_counted(tokens, tmp_path):
    base = ["llm.init=scratch", "llm.preset=tiny-qwen2", "llm.mode=full", "llm.layout=tts", "llm.train.max_steps=1"]
    full = train_llm(_cfg(*base), tokens=str(tokens), output=str(tmp_path / "all")).metrics
    assert full["dropped_overlong"] == full["truncated"] == full["val_dropped_overlong"] == 0
    short = ["llm.max_seq_len=80", "llm.train.max_drop_fraction=1"]  # shorter than most tts sequences of the corpus
    dropped = train_llm(_cfg(*base, *short, "llm.overlong=drop"), tokens=str(tokens),
                        output=str(tmp_path / "drop")).metrics
    assert 0 < dropped["dropped_overlong"] < dropped["train_sequences"] and dropped["truncated"] == 0
    assert dropped["val_dropped_overlong"] > 0
    cut = train_llm(_cfg(*base, *short, "llm.overlong=truncate"), tokens=str(tokens),
                    output=str(tmp_path / "cut")).metrics
    assert cut["truncated"] == dropped["dropped_overlong"] and cut["dropped_overlong"] == 0
    assert cut["val_truncated"] == dropped["val_dropped_overlong"]
    manifest = json.loads((tmp_path / "drop" / "manifest.json").read_text())
    assert manifest["metrics"]["dropped_overlong"] == dropped["dropped_overlong"]
