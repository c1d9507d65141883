"""The flow stage: a Tokens artifact (+ an optional base flow) → a Flow model artifact.

Recipe: read the Tokens and check they carry mels and codes the flow can use → flow examples
(mel-frame-budget batches) → build the model (size preset, or a strictly loaded base flow
whose mel, vocabulary and speaker setup must match the Tokens and whose tensors must match the
preset, unless ``flow.preset`` is ``from_base``; or a CosyVoice / Step-Audio-EditX release folder,
``flow.arch``, whose yaml's mel settings, vocabulary, token rate and x-vector size must match the
Tokens) → freeze the encoder / LoRA on
the estimator / EMA → the engine (accelerate/DeepSpeed, checkpoints, exact resume), with the
EMA update and periodic samples (mel PNG + Griffin-Lim WAV to MLflow) after each step → merge
LoRA, take the EMA weights → save ``config.json`` + ``model.safetensors`` (a release flow: ``flow.pt``
+ its yaml + ``hift.pt`` in the upstream layout, and ``model.safetensors``) with the metrics,
history, loss curve, samples and manifest → publish → track.

The checks and the model builder live in :mod:`audiotune.train.flow_setup` (the joint stage shares them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audiotune import artifacts, publish, storage
from audiotune.config import AudiotuneConfig
from audiotune.data.codes import check_flow_codes
from audiotune.train import checkpoints
from audiotune.train.engine import Engine, check_dropped, decay_groups, seed_everything
from audiotune.train.flow_data import FlowBatches, FlowExamples, load_flow_examples
from audiotune.train.flow_export import export_flow_model, lora_targets, release_summary
from audiotune.train.flow_setup import (
    AUDIOTUNE_ARCH,
    TokensInfo,
    TrainFlowError,
    build_flow_model,
    check_start,
    copy_speaker_files,
    drop_overlong,
    speaker_spec,
    tokens_info,
)
from audiotune.train.objectives import flow_loss
from audiotune.train.recipe import Run, fit, history_values, mean, publish_on_main, start_run, tracked, write_run_files

log = logging.getLogger(__name__)

SAMPLING_SETTINGS = ("num_samples", "sample_every", "vocoder", "sample")  # may change between resumes


@dataclass
class TrainResult:
    """What the stage produced (the same shape as the llm stage's)."""

    output: str
    metrics: dict[str, Any]
    manifest: dict[str, Any] | None


@dataclass
class _Inputs:
    tokens: str
    base_flow: str | None
    manifest: dict[str, Any]
    info: TokensInfo


@dataclass
class _Data:
    tokens_dir: Path
    train: FlowExamples
    val: FlowExamples
    dropped: int
    speaker: Any


@dataclass
class _Model:
    model: Any
    ema: Any
    trainable: int
    total: int


def train_flow(cfg: AudiotuneConfig, tokens: str, output: str, base_flow: str | None = None) -> TrainResult:
    """Run the flow stage (every torchrun process calls this; rank 0 publishes).

    Args:
        cfg: The pipeline config; the ``flow`` section drives this stage.
        tokens: URI of a Tokens artifact.
        output: URI for the Flow model artifact.
        base_flow: Starting flow URI (overrides ``flow.base_flow``).
    """
    inputs = _setup_inputs(cfg, tokens, output, base_flow or cfg.flow.base_flow)
    run = start_run(cfg, cfg.flow.train, [output], "flow", f"{tokens} -> {output}")  # lease released by tracked
    data = _setup_data(cfg, inputs)
    seed_everything(cfg.run.seed)
    built = _setup_model(cfg, inputs, data, run)
    batches = _setup_batches(cfg, data, run)
    renderer = _setup_samples(cfg, inputs, data, built, run)
    with tracked(cfg, run, "flow") as (tracker, work):
        _log_params(cfg, tracker, data, built)
        state, state_dict = _fit(cfg, run, inputs, built, batches, renderer, output, tracker, work)
        metrics = _final_metrics(state, data, built)
        manifest = publish_on_main(run, tracker, metrics, lambda: _publish(
            cfg, output, inputs, data, built, renderer, state, state_dict, metrics, tracker))
    return TrainResult(output=output, metrics=metrics, manifest=manifest)


def _setup_inputs(cfg: AudiotuneConfig, tokens: str, output: str, base_flow: str | None) -> _Inputs:
    """Refuse a bad start before any work: an output to keep, Tokens without mels or codes, settings that
    contradict the base flow."""
    F = cfg.flow
    publish.require_missing_or_overwrite(output, F.overwrite, artifacts.FLOW, [tokens, base_flow])
    manifest = artifacts.read_manifest(tokens, artifacts.TOKENS, artifacts.TOKENS_VERSION)
    info = tokens_info(manifest, tokens, F.codebooks)
    check_start(F, info, tokens, base_flow)
    return _Inputs(tokens=tokens, base_flow=base_flow, manifest=manifest, info=info)


def _setup_data(cfg: AudiotuneConfig, inputs: _Inputs) -> _Data:
    """The flow examples of both splits within the frame budget, and the speaker conditioning they need."""
    F, T, info, tokens = cfg.flow, cfg.flow.train, inputs.info, inputs.tokens
    tokens_dir = storage.local_copy(tokens)
    artifacts.verify_shards(tokens_dir, inputs.manifest, tokens)
    n_mels, codebooks = info.mel["n_mels"], F.codebooks
    train_ex, train_stats = load_flow_examples(tokens_dir / "train", n_mels, codebooks, info.num_codebooks)
    val_ex, _ = load_flow_examples(tokens_dir / "val", n_mels, codebooks, info.num_codebooks)
    train_ex, dropped = drop_overlong(train_ex, F.max_frames_in_batch, "train")
    val_ex, _ = drop_overlong(val_ex, F.max_frames_in_batch, "val")
    check_dropped(f"{tokens} train", len(train_ex) + dropped, dropped,
                  f"longer than flow.max_frames_in_batch={F.max_frames_in_batch} mel frames",
                  "flow.train.max_drop_fraction", T.max_drop_fraction, "raise flow.max_frames_in_batch")
    if not len(train_ex):
        raise TrainFlowError(f"{tokens}: no training utterance with a mel and codes within the frame budget "
                             f"({train_stats['rows']} rows; skipped {train_stats['skipped']}; {dropped} too long)")
    return _Data(tokens_dir=tokens_dir, train=train_ex, val=val_ex, dropped=dropped,
                 speaker=speaker_spec(info, tokens_dir, train_ex))


def _setup_model(cfg: AudiotuneConfig, inputs: _Inputs, data: _Data, run: Run) -> _Model:
    """The flow (checked against every code of the Tokens before training), its frozen encoder, LoRA and EMA."""
    from audiotune.models.flow import apply_lora, count_parameters, freeze_encoder
    from audiotune.train.ema import EMA

    F, base_flow = cfg.flow, inputs.base_flow
    model = build_flow_model(F, inputs.info, data.speaker, base_flow)
    check_flow_codes(data.tokens_dir, model.config, base_flow or f"flow.preset={F.preset}")  # before training
    if F.freeze_encoder:
        log.info("froze the encoder (%d parameters)", freeze_encoder(model))
    if F.lora.enabled:
        if not base_flow:
            log.warning("LoRA on a randomly initialised flow: only the adapters train (set flow.base_flow)")
        model = apply_lora(model, F.lora.r, F.lora.alpha, F.lora.dropout, lora_targets(model, F))
    trainable, total = count_parameters(model)
    log.info("flow parameters: %d trainable of %d", trainable, total)
    model.to(run.accelerator.device)
    ema = EMA(model, F.ema.decay) if F.ema.enabled else None
    return _Model(model=model, ema=ema, trainable=trainable, total=total)


def _setup_batches(cfg: AudiotuneConfig, data: _Data, run: Run) -> tuple[FlowBatches, FlowBatches | None]:
    F, T, acc = cfg.flow, cfg.flow.train, run.accelerator
    train_data = FlowBatches(data.train, F.max_frames_in_batch, T.max_batch_size, cfg.run.seed,
                             acc.process_index, acc.num_processes)
    val_data = (FlowBatches(data.val, F.max_frames_in_batch, T.max_batch_size, cfg.run.seed, acc.process_index,
                            acc.num_processes, shuffle=False, repeat=False) if len(data.val) else None)
    return train_data, val_data


def _setup_samples(cfg: AudiotuneConfig, inputs: _Inputs, data: _Data, built: _Model, run: Run):
    """The renderer of periodic samples (main process, ``flow.num_samples``); None when there is none."""
    from audiotune.models.vocoder import load_vocoder
    from audiotune.train.flow_samples import SampleRenderer

    F = cfg.flow
    vocoder = load_vocoder(F.vocoder, inputs.info.mel) if F.num_samples and run.accelerator.is_main_process else None
    if vocoder is None:
        return None
    renderer = SampleRenderer(data.val if len(data.val) else data.train, F.num_samples, vocoder,
                              F.sample.n_timesteps, F.sample.cfg_rate, cfg.run.seed, F.sample.temperature)
    if F.train.deepspeed.zero_stage == 3 and built.ema is None:
        log.warning("ZeRO-3 partitions the weights: no samples during training")
        return None
    return renderer


def _log_params(cfg: AudiotuneConfig, tracker, data: _Data, built: _Model) -> None:
    tracker.log_params({"flow": cfg.flow.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json")})
    tracker.log_params({"data.train_utterances": len(data.train), "data.val_utterances": len(data.val),
                        "data.train_frames": int(data.train.mel_lengths.sum()), "data.dropped_overlong": data.dropped,
                        "model.trainable_parameters": built.trainable, "model.total_parameters": built.total,
                        "model.preset": built.model.config.preset, "model.speaker": data.speaker.type})


def _fit(cfg: AudiotuneConfig, run: Run, inputs: _Inputs, built: _Model, batches, renderer, output: str, tracker,
         work: Path):
    """Train with the EMA update and periodic samples after each step; returns the final state and weights."""
    F, T, acc, ema = cfg.flow, cfg.flow.train, run.accelerator, built.ema
    engine: Engine | None = None

    def weights_of_ema():
        return ema.swapped(acc.unwrap_model(engine.model)) if ema is not None else contextlib.nullcontext()

    def on_step(state) -> None:
        if ema is not None:
            ema.update(acc.unwrap_model(engine.model))
        if renderer is not None and state.step % F.sample_every == 0:
            with weights_of_ema():
                files = renderer.render(acc.unwrap_model(engine.model), work / "samples", f"step-{state.step:06d}")
            for file in files:
                tracker.log_artifact(file, "samples")

    model = built.model
    engine = Engine(
        train=T, accelerator=acc, model=model,
        param_groups=decay_groups(list(model.named_parameters()), T.lr, T.weight_decay, "flow"),
        loss_fn=flow_loss, train_data=batches[0], val_data=batches[1], output=output, tracker=tracker,
        work_dir=work, seed=cfg.run.seed, on_step=on_step,
        eval_context=weights_of_ema if ema is not None else None,
        extra_state={"ema": ema} if ema is not None else None,
        # what a resumed checkpoint must share with this run (sample rendering may change in between)
        identity=checkpoints.run_identity(
            "flow", F.model_dump(mode="json"), free=SAMPLING_SETTINGS,
            seed=cfg.run.seed, dataset_fingerprint=inputs.manifest.get("dataset_fingerprint")),
    )
    return fit(engine)


def _publish(cfg: AudiotuneConfig, output: str, inputs: _Inputs, data: _Data, built: _Model, renderer, state,
             state_dict: dict, metrics: dict[str, Any], tracker) -> dict[str, Any]:
    """The Flow artifact: the weights (LoRA merged, EMA taken), final samples, speaker files, run files, manifest."""
    from audiotune.models.flow import count_parameters

    F, info, base_flow, config = cfg.flow, inputs.info, inputs.base_flow, built.model.config
    with publish.publish_dir(output, overwrite=F.overwrite, kind=artifacts.FLOW,
                             inputs=[inputs.tokens, base_flow]) as staging:
        export = export_flow_model(config, state_dict, F, built.ema, staging)
        if renderer is not None:
            for file in renderer.render(export, staging / "samples", "final"):
                tracker.log_artifact(file, "samples")
        copy_speaker_files(data.tokens_dir / "tokenizer", staging)
        write_run_files(staging, metrics, state.history, tracker)
        return artifacts.write_manifest(
            staging, artifacts.FLOW, artifacts.FLOW_VERSION,
            tokens=inputs.tokens, base_flow=base_flow, init="base_flow" if base_flow else "preset",
            preset=config.preset, arch=getattr(config, "arch", AUDIOTUNE_ARCH),
            release=release_summary(config), mel=info.mel,
            speaker={**dataclasses.asdict(data.speaker), "tokens_type": info.speaker_type},
            vocab=info.vocab(F.codebooks), lora={**F.lora.model_dump(mode="json"), "merged": F.lora.enabled},
            ema=F.ema.model_dump(mode="json"), sample=F.sample.model_dump(mode="json"),
            vocoder=F.vocoder, parameters=count_parameters(export)[1],
            checkpoints=checkpoints.checkpoints_uri(output), steps=state.step,
            dataset_fingerprint=inputs.manifest.get("dataset_fingerprint"), metrics=metrics,
            config=F.model_dump(mode="json"),
        )


def _final_metrics(state, data: _Data, built: _Model) -> dict[str, Any]:
    losses, vals = history_values(state.history, "loss"), history_values(state.history, "val_loss")
    return {
        "steps": state.step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "val_loss": vals[-1] if vals else None,
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "frames_per_s": mean(history_values(state.history, "tokens_per_s")),
        "train_utterances": len(data.train),
        "train_frames": int(data.train.mel_lengths.sum()),
        "val_utterances": len(data.val),
        "dropped_overlong": data.dropped,
        "trainable_parameters": built.trainable,
        "total_parameters": built.total,
    }
