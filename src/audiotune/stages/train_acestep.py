"""The ACE-Step stage: an ACE-Step Latents artifact + a diffusers ``AceStepPipeline`` → a LoRA artifact.

Recipe: read the Latents (``encode acestep``) → batches of cached songs (``repeat_count`` times each) →
the base pipeline's ``AceStepTransformer1DModel`` with a PEFT LoRA on its attention projections → the
engine (accelerate/DeepSpeed, checkpoints, exact resume, MLflow) with ACE-Step 1.5's flow-matching loss
and audio samples through ``AceStepPipeline`` with the current LoRA every N steps → the LoRA in diffusers'
format (``lora/pytorch_lora_weights.safetensors``, loaded by ``AceStepPipeline.load_lora_weights``), and
optionally the pipeline with the LoRA fused (``pipeline/``) → publish → track.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from audiotune import artifacts, publish, storage
from audiotune.config import AudiotuneConfig
from audiotune.errors import TrainingError
from audiotune.models.acestep.lora import KIND, VERSION
from audiotune.train import checkpoints
from audiotune.train.engine import Engine, decay_groups, seed_everything
from audiotune.train.recipe import Run, fit, history_values, mean, publish_on_main, start_run, tracked, write_run_files

log = logging.getLogger(__name__)
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
    manifest, base_model = _read_inputs(cfg, tokens, output, base_model)
    run = start_run(cfg, cfg.acestep.train, [output], "acestep", f"{tokens} -> {output}")  # released by tracked
    tokens_dir, base_dir = storage.local_copy(tokens), storage.local_copy(base_model)
    train, val, train_data, val_data = _setup_data(cfg, tokens_dir, run.accelerator)
    seed_everything(cfg.run.seed)
    transformer, trainable = _setup_model(cfg, base_dir, manifest, run.dtype)
    transformer.to(run.accelerator.device)
    mode = _timestep_mode(cfg, transformer)
    sampler = (_Sampler(cfg, base_dir, transformer, (val, train), run.dtype)
               if cfg.acestep.num_samples and run.accelerator.is_main_process
               and cfg.acestep.train.deepspeed.zero_stage != 3 else None)
    with tracked(cfg, run, "acestep") as (tracker, work):
        tracker.log_params({"acestep": cfg.acestep.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json")})
        tracker.log_params({"data.train_songs": len(train), "data.val_songs": len(val), "model.trainable_parameters":
                            trainable, "model.timestep_sampling": mode})
        engine = _engine(cfg, run, transformer, (train_data, val_data), mode, sampler, manifest, output, tracker, work)
        state, gathered = fit(engine)
        metrics = _final_metrics(state, len(train), len(val), trainable)
        result = publish_on_main(run, tracker, metrics, lambda: _publish(
            cfg, run.accelerator.unwrap_model(engine.model), gathered, base_dir, output, state, metrics, tracker,
            tokens=tokens, base_model=base_model, mode=mode))
    return TrainResult(output=output, metrics=metrics, manifest=result)


def _read_inputs(cfg: AudiotuneConfig, tokens: str, output: str, base_model: str | None) -> tuple[dict, str]:
    """The Latents' manifest and the base model to train on; an output to keep is refused before any work."""
    from audiotune.models.acestep.latents import KIND as LATENTS_KIND
    from audiotune.models.acestep.latents import VERSION as LATENTS_VERSION

    a = cfg.acestep
    manifest = artifacts.read_manifest(tokens, LATENTS_KIND, LATENTS_VERSION)
    base_model = base_model or a.base_model or manifest.get("base_model")
    if not base_model:
        raise TrainAceStepError("no ACE-Step base model: pass --base-model or set acestep.base_model")
    publish.require_missing_or_overwrite(output, a.overwrite, KIND, [tokens, base_model])
    return manifest, base_model


def _engine(cfg: AudiotuneConfig, run: Run, transformer, batches, mode: str, sampler, manifest: dict[str, Any],
            output: str, tracker, work: Path) -> Engine:
    """The engine with ACE-Step's flow-matching loss and periodic samples through the pipeline."""
    from audiotune.models.acestep.objective import flow_matching_loss

    a, T = cfg.acestep, cfg.acestep.train

    def loss_fn(model, batch):
        return flow_matching_loss(model, batch, mode=mode, mu=a.timestep_mu, sigma=a.timestep_sigma,
                                  cfg_dropout=a.cfg_dropout)

    def on_step(state) -> None:
        if sampler is not None and state.step % a.sample_every == 0:
            for file in sampler.render(work / "samples", f"step-{state.step:06d}"):
                tracker.log_artifact(file, "samples")

    return Engine(
        train=T, accelerator=run.accelerator, model=transformer,
        param_groups=decay_groups(list(transformer.named_parameters()), T.lr, T.weight_decay, "acestep"),
        loss_fn=loss_fn, train_data=batches[0], val_data=batches[1], output=output, tracker=tracker,
        work_dir=work, seed=cfg.run.seed, on_step=on_step,
        identity=checkpoints.run_identity("acestep", a.model_dump(mode="json"), free=RESUME_FREE,
                                          seed=cfg.run.seed, timestep_sampling=mode,
                                          dataset_fingerprint=manifest.get("dataset_fingerprint")))


def _publish(cfg: AudiotuneConfig, transformer, gathered: dict, base_dir: Path, output: str, state,
             metrics: dict[str, Any], tracker, **fields: Any) -> dict[str, Any]:
    from audiotune.models.acestep.load import load_pipeline
    from audiotune.models.acestep.lora import fuse_and_save, lora_state, save_lora

    a = cfg.acestep
    with publish.publish_dir(output, overwrite=a.overwrite, kind=KIND) as staging:
        save_lora(transformer, staging / "lora", lora_state(transformer, gathered))
        if a.fuse:
            fuse_and_save(load_pipeline(base_dir), staging / "lora", staging / "pipeline")
        write_run_files(staging, metrics, state.history, tracker)
        return artifacts.write_manifest(
            staging, KIND, VERSION, **fields, lora={**a.lora.model_dump(mode="json"), "format": "diffusers",
                                                     "path": "lora/pytorch_lora_weights.safetensors"},
            fused="pipeline" if a.fuse else None, checkpoints=checkpoints.checkpoints_uri(output),
            steps=state.step, metrics=metrics, config=a.model_dump(mode="json"))


def _final_metrics(state, train_songs: int, val_songs: int, trainable: int) -> dict[str, Any]:
    losses, vals = history_values(state.history, "loss"), history_values(state.history, "val_loss")
    return {"steps": state.step, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "val_loss": vals[-1] if vals else None,
            "best_val_loss": state.best_val_loss, "best_step": state.best_step,
            "songs_per_s": mean(history_values(state.history, "samples_per_s")), "train_songs": train_songs,
            "val_songs": val_songs, "trainable_parameters": trainable}
