"""The llm stage on tiny models: learning per layout, LoRA on new audio rows, exact resume, bad input."""

from __future__ import annotations

import json
import os
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


def test_lora_trains_new_audio_rows_and_freezes_the_base(tokens, base_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = train_llm(_cfg("llm.mode=lora", "llm.lora.r=8", "llm.train.lr=1e-2", "llm.train.max_steps=40",
                         "llm.layout=tts"), tokens=str(tokens), output=str(tmp_path / "lora"),
                    base_model=str(base_model))
    assert res.metrics["final_loss"] < 0.7 * res.metrics["first_loss"], res.metrics
    out = tmp_path / "lora"
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    vocab = json.loads((out / "vocab.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(str(base_model))
    base_vocab = base.get_input_embeddings().weight.shape[0]
    rows = json.loads((out / "manifest.json").read_text())["embedding_rows"]  # codes + markers, padded to 64
    assert rows >= vocab["audio_offset"] + vocab["codebook_size"] and rows % 64 == 0
    base.resize_token_embeddings(rows)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = PeftModel.from_pretrained(base, str(out))
    merged = loaded.merge_and_unload()
    emb = merged.get_input_embeddings().weight
    new_rows = slice(base_vocab, vocab["audio_offset"] + vocab["codebook_size"])
    assert not torch.allclose(emb[new_rows], reference["model.embed_tokens.weight"][new_rows])
    assert torch.equal(emb[:base_vocab], reference["model.embed_tokens.weight"][:base_vocab])
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter)


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


def _cli(out: Path, tokens: Path, base: Path, *extra: str) -> list[str]:
    sets = [*FAST, "llm.mode=lora", "llm.layout=tts", "llm.train.max_steps=24", "llm.train.save_every=4",
            "llm.train.lr=5e-3", "llm.lora.dropout=0.1", *extra]
    return [sys.executable, "-m", "audiotune.cli", "train", "llm", "--tokens", str(tokens), "--base-model",
            str(base), "--output", str(out), *[a for s in sets for a in ("--set", s)]]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL])
def test_interrupt_then_resume_equals_an_uninterrupted_run(tokens, base_model, tmp_path, kill):
    whole = tmp_path / "whole"
    subprocess.run(_cli(whole, tokens, base_model), check=True, capture_output=True, timeout=300)
    out = tmp_path / "cut"
    proc = subprocess.Popen(_cli(out, tokens, base_model, "llm.train.lr=5e-3"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _wait_for(Path(f"{out}.checkpoints") / "checkpoint-8" / "manifest.json", proc)
    os.kill(proc.pid, kill)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not out.exists()
    resumed = subprocess.run(_cli(out, tokens, base_model), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    a, b = _weights(whole), _weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


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
