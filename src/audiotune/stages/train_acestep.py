"""The ACE-Step stage: an ACE-Step Latents artifact + a diffusers ``AceStepPipeline`` → a LoRA artifact.

Recipe: read the Latents (``encode acestep``) → batches of cached songs (``repeat_count`` times each) →
the base pipeline's ``AceStepTransformer1DModel`` with a PEFT LoRA on its attention projections → the
engine (accelerate/DeepSpeed, checkpoints, exact resume, MLflow) with ACE-Step 1.5's flow-matching loss
and audio samples through ``AceStepPipeline`` with the current LoRA every N steps → the LoRA in diffusers'
format (``lora/pytorch_lora_weights.safetensors``, loaded by ``AceStepPipeline.load_lora_weights``), and
optionally the pipeline with the LoRA fused (``pipeline/``) → publish → track.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from audiotune import artifacts, publish, storage, tracking
from audiotune.config import AudiotuneConfig, dump_config
from audiotune.errors import TrainingError
from audiotune.train import checkpoints, output_lock
from audiotune.train.engine import Engine, decay_groups, make_accelerator, resolve_dtype, seed_everything
from audiotune.train.plots import loss_curve

log = logging.getLogger(__name__)

KIND = "audiotune.acestep-lora"
VERSION = 1
RESUME_FREE = ("base_model", "num_samples", "sample_every", "sample", "fuse", "overwrite", "max_seconds",
               "vocal_language", "max_text_length", "max_lyric_length")  # sampling and encoding settings


class TrainAceStepError(TrainingError):
    """The ACE-Step stage cannot start (bad inputs or settings)."""


@dataclass
class TrainResult:
    """What the stage produced (the same shape as the other training stages')."""

    output: str
    metrics: dict[str, Any]
    manifest: dict[str, Any] | None


def _setup_data(cfg: AudiotuneConfig, tokens_dir: Path, acc):
    from audiotune.models.acestep.batches import AceStepBatches
    from audiotune.models.acestep.latents import LatentSplit, read_shared

    shared = read_shared(tokens_dir)
    train, val = LatentSplit(tokens_dir / "train"), LatentSplit(tokens_dir / "val")
    if not len(train):
        raise TrainAceStepError(f"{tokens_dir}: the Latents hold no training song")
    size, seed = cfg.acestep.train.max_batch_size, cfg.run.seed
    train_data = AceStepBatches(train, shared, size, seed, acc.process_index, acc.num_processes)
    val_data = (AceStepBatches(val, shared, size, seed, acc.process_index, acc.num_processes, shuffle=False,
                               repeat=False) if len(val) else None)
    return train, val, train_data, val_data


def _setup_model(cfg: AudiotuneConfig, base_dir: Path, manifest: dict[str, Any], dtype: str):
    from audiotune.models.acestep.load import load_transformer
    from audiotune.models.acestep.lora import add_lora

    a = cfg.acestep
    transformer = load_transformer(base_dir, "bf16" if dtype == "bf16" else "fp32")
    dim = int(transformer.config.audio_acoustic_hidden_dim)
    if dim != int(manifest["latent_dim"]):
        raise TrainAceStepError(f"base model {base_dir}: latent dim {dim}, the Latents' latent_dim "
                                f"{manifest['latent_dim']} (encoded with another model)")
    trainable = add_lora(transformer, a.lora.r, a.lora.alpha, a.lora.dropout, a.lora.target_modules)
    if a.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer, trainable


def _timestep_mode(cfg: AudiotuneConfig, transformer) -> str:
    mode = cfg.acestep.timestep_sampling
    if mode == "auto":
        mode = "turbo_schedule" if transformer.config.is_turbo else "logit_normal"
    return mode


class _Sampler:
    """Renders ``num_samples`` prompts through ``AceStepPipeline`` around the transformer being trained."""

    def __init__(self, cfg: AudiotuneConfig, base_dir: Path, transformer, splits, dtype: str):
        from audiotune.models.acestep.load import load_pipeline

        a = cfg.acestep
        self.pipe = load_pipeline(base_dir, "bf16" if dtype == "bf16" else "fp32", transformer=transformer)
        self.pipe.to(transformer.device)
        entries = [e for split in splits for e in split.entries][: a.num_samples]
        self.prompts = [(e.id, e.prompt, e.lyrics) for e in entries]
        self.settings, self.seed = a.sample, cfg.run.seed

    def render(self, directory: Path, tag: str) -> list[Path]:
        import soundfile as sf

        directory.mkdir(parents=True, exist_ok=True)
        was_training = self.pipe.transformer.training
        self.pipe.transformer.eval()
        files = []
        s = self.settings
        for i, (row_id, prompt, lyrics) in enumerate(self.prompts):
            audio = self.pipe(prompt=prompt, lyrics=lyrics, audio_duration=s.duration_s,
                              num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                              shift=s.shift, generator=torch.Generator().manual_seed(self.seed + i)).audios
            path = directory / f"{tag}-{i:02d}-{row_id.replace('/', '_')}.wav"
            sf.write(path, audio[0].float().cpu().numpy().T, self.pipe.sample_rate)
            files.append(path)
        self.pipe.transformer.train(was_training)
        return files


def train_acestep(cfg: AudiotuneConfig, tokens: str, output: str, base_model: str | None = None) -> TrainResult:
    """Run the ACE-Step stage (every torchrun process calls this; rank 0 publishes).

    Args:
        cfg: The pipeline config; the ``acestep`` section drives this stage.
        tokens: URI of an ACE-Step Latents artifact (``encode acestep``).
        output: URI for the ACE-Step LoRA artifact.
        base_model: The ``AceStepPipeline`` folder (overrides ``acestep.base_model`` and the Latents' own).
    """
    from audiotune.models.acestep.latents import KIND as LATENTS_KIND
    from audiotune.models.acestep.latents import VERSION as LATENTS_VERSION
    from audiotune.models.acestep.objective import flow_matching_loss

    a, T = cfg.acestep, cfg.acestep.train
    manifest = artifacts.read_manifest(tokens, LATENTS_KIND, LATENTS_VERSION)
    base_model = base_model or a.base_model or manifest.get("base_model")
    if not base_model:
        raise TrainAceStepError("no ACE-Step base model: pass --base-model or set acestep.base_model")
    publish.require_missing_or_overwrite(output, a.overwrite, KIND, [tokens, base_model])
    dtype = resolve_dtype(T.dtype)
    acc = make_accelerator(T, dtype)
    if acc.is_main_process:
        log.info("train acestep: %s -> %s\n%s", tokens, output, dump_config(cfg))
    lease = output_lock.acquire(acc, [output], "acestep")  # released after publishing
    tokens_dir, base_dir = storage.local_copy(tokens), storage.local_copy(base_model)
    train, val, train_data, val_data = _setup_data(cfg, tokens_dir, acc)
    seed_everything(cfg.run.seed)
    transformer, trainable = _setup_model(cfg, base_dir, manifest, dtype)
    transformer.to(acc.device)
    mode = _timestep_mode(cfg, transformer)
    sampler = (_Sampler(cfg, base_dir, transformer, (val, train), dtype)
               if a.num_samples and acc.is_main_process and T.deepspeed.zero_stage != 3 else None)

    def loss_fn(model, batch):
        return flow_matching_loss(model, batch, mode=mode, mu=a.timestep_mu, sigma=a.timestep_sigma,
                                  cfg_dropout=a.cfg_dropout)

    with lease, tempfile.TemporaryDirectory(prefix="audiotune-acestep-") as tmp, \
            tracking.stage_run(cfg.tracking, "acestep") as tracker:
        tracker.log_params({"acestep": a.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json")})
        tracker.log_params({"data.train_songs": len(train), "data.val_songs": len(val), "model.trainable_parameters":
                            trainable, "model.timestep_sampling": mode})

        def on_step(state) -> None:
            if sampler is not None and state.step % a.sample_every == 0:
                for file in sampler.render(Path(tmp) / "samples", f"step-{state.step:06d}"):
                    tracker.log_artifact(file, "samples")

        engine = Engine(
            train=T, accelerator=acc, model=transformer,
            param_groups=decay_groups(list(transformer.named_parameters()), T.lr, T.weight_decay, "acestep"),
            loss_fn=loss_fn, train_data=train_data, val_data=val_data, output=output, tracker=tracker,
            work_dir=Path(tmp), seed=cfg.run.seed, on_step=on_step,
            identity=checkpoints.run_identity("acestep", a.model_dump(mode="json"), free=RESUME_FREE,
                                              seed=cfg.run.seed, timestep_sampling=mode,
                                              dataset_fingerprint=manifest.get("dataset_fingerprint")))
        engine.maybe_resume()
        state = engine.fit()
        gathered = acc.get_state_dict(engine.model)  # every process takes part (ZeRO-3 gathers the weights)
        metrics = _final_metrics(state, len(train), len(val), trainable)
        result = None
        if acc.is_main_process:
            tracker.log_metrics(tracking.final_metrics(metrics))
            result = _publish(cfg, acc.unwrap_model(engine.model), gathered, base_dir, output, state, metrics,
                              tracker, tokens=tokens, base_model=base_model, mode=mode)
        acc.wait_for_everyone()
    return TrainResult(output=output, metrics=metrics, manifest=result)


def _publish(cfg: AudiotuneConfig, transformer, gathered: dict, base_dir: Path, output: str, state,
             metrics: dict[str, Any], tracker, **fields: Any) -> dict[str, Any]:
    from audiotune.models.acestep.load import load_pipeline
    from audiotune.models.acestep.lora import fuse_and_save, lora_state, save_lora

    a = cfg.acestep
    with publish.publish_dir(output, overwrite=a.overwrite, kind=KIND) as staging:
        save_lora(transformer, staging / "lora", lora_state(transformer, gathered))
        if a.fuse:
            fuse_and_save(load_pipeline(base_dir), staging / "lora", staging / "pipeline")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (staging / "history.json").write_text(json.dumps(state.history, indent=1) + "\n")
        loss_curve(state.history, staging / "loss_curve.png")
        for name in ("loss_curve.png", "metrics.json"):
            tracker.log_artifact(staging / name)
        return artifacts.write_manifest(
            staging, KIND, VERSION, **fields, lora={**a.lora.model_dump(mode="json"), "format": "diffusers",
                                                     "path": "lora/pytorch_lora_weights.safetensors"},
            fused="pipeline" if a.fuse else None, checkpoints=checkpoints.checkpoints_uri(output),
            steps=state.step, metrics=metrics, config=a.model_dump(mode="json"))


def _final_metrics(state, train_songs: int, val_songs: int, trainable: int) -> dict[str, Any]:
    losses = [h["loss"] for h in state.history if "loss" in h]
    vals = [h["val_loss"] for h in state.history if "val_loss" in h]
    speeds = [h["samples_per_s"] for h in state.history if "samples_per_s" in h]
    return {"steps": state.step, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "val_loss": vals[-1] if vals else None,
            "best_val_loss": state.best_val_loss, "best_step": state.best_step,
            "songs_per_s": sum(speeds) / len(speeds) if speeds else None, "train_songs": train_songs,
            "val_songs": val_songs, "trainable_parameters": trainable}
