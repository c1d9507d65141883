"""ACE-Step 1.5 LoRA through diffusers: encode, train, resume and export with a tiny pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from audiotune.config import load_config
from tests.acestep_tiny import LATENT_DIM, music_folder, save_pipeline

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["acestep.num_samples=0", "acestep.train.log_every=1", "acestep.train.schedule=constant",
         "acestep.lora.r=4", "acestep.lora.alpha=8"]


def _cfg(*overrides: str):
    return load_config(None, ["tracking.enabled=false", "run.num_workers=1", "convert.sample_rate=8000",
                              "convert.val_fraction=0", *overrides])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_pipeline(tmp_path_factory.mktemp("acestep") / "base")


@pytest.fixture(scope="module")
def latents(base, tmp_path_factory) -> Path:
    from audiotune.stages.convert import convert
    from audiotune.stages.encode_acestep import encode_acestep

    root = tmp_path_factory.mktemp("acestep-data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = _cfg("convert.repeat_count=2")
    convert(cfg, source=str(music_folder(root / "songs")), output=str(root / "dataset"))
    encode_acestep(cfg, dataset=str(root / "dataset"), output=str(root / "latents"), base_model=str(base))
    torch.set_num_threads(threads)
    return root / "latents"


def _lora(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "lora" / "pytorch_lora_weights.safetensors"))


def test_encode_caches_latents_and_conditioning_once(latents, base):
    from audiotune.models.acestep.latents import INSTRUMENTAL, LatentSplit, read_shared

    manifest = json.loads((latents / "manifest.json").read_text())
    assert manifest["kind"] == "audiotune.acestep-latents" and manifest["splits"] == {"train": 3, "val": 0}
    assert manifest["latent_dim"] == LATENT_DIM and manifest["latents_per_second"] == 50.0
    split = LatentSplit(latents / "train")
    by_id = {e.id: (i, e) for i, e in enumerate(split.entries)}
    i, song0 = by_id["song0"]
    assert song0.repeat_count == 2 and song0.prompt == "pop, piano" and "la la 0" in song0.lyrics
    assert by_id["song1"][1].lyrics == INSTRUMENTAL
    lat, cond = split.tensors(i)
    assert lat.shape == (50, LATENT_DIM) and cond.shape[1] == 32 and song0.cond_len == cond.shape[0]
    shared = read_shared(latents)
    assert shared["silence_latent"].shape == (1, 50, LATENT_DIM) and shared["null_condition_emb"].shape == (1, 1, 32)


def test_lora_trains_only_adapters_and_loss_falls(latents, base, tmp_path):
    from audiotune.stages.train_acestep import train_acestep

    res = train_acestep(_cfg(*TRAIN, "acestep.train.max_steps=30", "acestep.train.lr=3e-3",
                             "acestep.timestep_sampling=turbo_schedule", "acestep.cfg_dropout=0"),
                        tokens=str(latents), output=str(tmp_path / "out"))
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 30 and sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["kind"] == "audiotune.acestep-lora" and manifest["steps"] == 30
    lora = _lora(tmp_path / "out")
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora} == {"to_q", "to_k", "to_v", "0"}
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    # only the adapters are in the checkpoint: the base weights never changed
    ckpt = Path(f"{tmp_path / 'out'}.checkpoints")
    saved = load_file(str(ckpt / "checkpoint-30" / "trainable.safetensors"))
    assert saved and all(".lora_" in k for k in saved)
    assert res.metrics["trainable_parameters"] == sum(v.numel() for v in lora.values())


def test_resume_is_exact(latents, tmp_path):
    from audiotune.stages.train_acestep import train_acestep

    common = [*TRAIN, "acestep.train.save_every=3", "acestep.cfg_dropout=0.5"]
    from audiotune.cli import main

    sets = [a for o in ("tracking.enabled=false", *common, "acestep.train.max_steps=6") for a in ("--set", o)]
    assert main(["train", "acestep", "--tokens", str(latents), "--output", str(tmp_path / "whole"), *sets]) == 0
    train_acestep(_cfg(*common, "acestep.train.max_steps=3"), tokens=str(latents), output=str(tmp_path / "half"))
    resume = f"acestep.train.resume={tmp_path}/half.checkpoints/checkpoint-3"
    train_acestep(_cfg(*common, "acestep.train.max_steps=6", resume), tokens=str(latents),
                  output=str(tmp_path / "resumed"))
    a, b = _lora(tmp_path / "whole"), _lora(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_exported_lora_loads_changes_the_output_and_fuses(latents, base, tmp_path):
    from audiotune.models.acestep.load import load_pipeline
    from audiotune.models.acestep.lora import load_into
    from audiotune.stages.train_acestep import train_acestep

    out = tmp_path / "out"
    train_acestep(_cfg(*TRAIN, "acestep.train.max_steps=4", "acestep.train.lr=1e-2", "acestep.fuse=true",
                       "acestep.num_samples=1", "acestep.sample_every=2", "acestep.sample.duration_s=0.4",
                       "acestep.sample.num_inference_steps=2"), tokens=str(latents), output=str(out))

    def render(pipe):
        return pipe(prompt="pop, piano", lyrics="la", audio_duration=0.4, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="latent").audios

    plain = render(load_pipeline(base))
    pipe = load_pipeline(base)
    load_into(pipe, out / "lora")
    with_lora = render(pipe)
    assert not torch.allclose(plain, with_lora, atol=1e-4)
    fused = render(load_pipeline(out / "pipeline"))
    torch.testing.assert_close(fused, with_lora, rtol=1e-4, atol=1e-4)


def test_a_folder_that_is_not_an_acestep_pipeline_is_refused(tmp_path):
    from audiotune.models.acestep import AceStepError
    from audiotune.models.acestep.load import check_folder

    with pytest.raises(AceStepError, match="model_index.json is missing"):
        check_folder(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(AceStepError, match="expected 'AceStepPipeline'"):
        check_folder(tmp_path)


def test_acestep_config_round_trips_through_json():
    from audiotune.config import AceStepStageConfig

    cfg = _cfg("acestep.lora.r=8", "acestep.fuse=true").acestep
    assert AceStepStageConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]


def test_pipeline_mode_acestep_runs_under_kfp_local(base, tmp_path, monkeypatch):
    """convert → encode → train → export of the corpus maker's music folder, the export loadable by diffusers."""
    import subprocess
    import sys

    from audiotune import sdk
    from audiotune.models.acestep.load import load_pipeline
    from audiotune.models.acestep.lora import load_into

    songs = tmp_path / "music"
    subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "examples" / "make_corpus.py"),
                    "--out", str(songs), "--music", "2", "--seconds", "1", "--sample-rate", "8000"], check=True,
                   capture_output=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"convert.source={songs}", "convert.format=acestep", "convert.sample_rate=8000",
                             "convert.val_fraction=0", "pipeline.mode=acestep", "pipeline.root=kfp",
                             "pipeline.retries=0", f"acestep.base_model={base}", "acestep.train.max_steps=2",
                             "acestep.num_samples=0", "acestep.lora.r=4"])
    run = sdk.run_local(cfg)
    export = Path(run.export_uri)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["kind"] == "audiotune.acestep-export" and manifest["steps"] == 2
    load_into(load_pipeline(base), export / "lora")


def test_objective_matches_the_pipelines_sampler():
    """The velocity the loss teaches (noise − x0 on x_t = t·noise + (1−t)·x0) takes the pipeline's own scheduler,
    stepping over the pipeline's schedule from pure noise, exactly to x0; the turbo table is that schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from audiotune.models.acestep.objective import sample_timesteps, turbo_schedule
    from tests.acestep_tiny import build_pipeline

    pipe = build_pipeline()
    table = pipe._get_timestep_schedule(num_inference_steps=8, shift=3.0)
    torch.testing.assert_close(turbo_schedule(), table)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    scheduler.set_timesteps(sigmas=table.tolist())
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 10, LATENT_DIM), torch.randn(2, 10, LATENT_DIM)
    x = noise
    for t in scheduler.timesteps:
        assert torch.allclose(x, t * noise + (1 - t) * x0, atol=1e-5)  # on the training path at every step
        x = scheduler.step(noise - x0, t, x, return_dict=False)[0]
    torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)
    drawn = sample_timesteps(256, "turbo_schedule", 0.0, 1.0, "cpu")
    assert set(drawn.tolist()) <= set(table.tolist())
    logit = sample_timesteps(4096, "logit_normal", -0.4, 1.0, "cpu")
    assert 0 < logit.min() and logit.max() < 1 and abs(torch.logit(logit).mean() + 0.4) < 0.1


def test_samples_render_through_the_pipeline_with_the_current_lora(latents, base, tmp_path):
    import soundfile as sf

    from audiotune.models.acestep.latents import LatentSplit
    from audiotune.models.acestep.load import load_transformer
    from audiotune.models.acestep.lora import add_lora
    from audiotune.stages.train_acestep import _Sampler

    transformer = load_transformer(base)
    add_lora(transformer, 4, 8, 0.0, ["to_q", "to_k", "to_v", "to_out.0"])
    cfg = _cfg("acestep.num_samples=1", "acestep.sample.duration_s=0.4", "acestep.sample.num_inference_steps=2")
    sampler = _Sampler(cfg, base, transformer, (LatentSplit(latents / "train"),), "fp32")
    assert sampler.pipe.transformer is transformer  # the weights being trained, not a copy
    before = sf.read(sampler.render(tmp_path, "a")[0])[0]
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    (path,) = sampler.render(tmp_path, "b")
    after, sr = sf.read(path)
    assert sr == 1600 and after.shape == before.shape == (640, 2) and not np.allclose(before, after)
