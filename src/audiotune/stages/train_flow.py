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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audiotune import artifacts, publish, storage, tracking
from audiotune.config import AudiotuneConfig, FlowStageConfig, dump_config
from audiotune.data.codes import check_flow_codes
from audiotune.errors import TrainingError
from audiotune.train import checkpoints, output_lock
from audiotune.train.engine import Engine, check_dropped, decay_groups, make_accelerator, resolve_dtype, seed_everything
from audiotune.train.flow_data import FlowBatches, FlowExamples, load_flow_examples
from audiotune.train.flow_export import export_flow_model, lora_targets, release_summary
from audiotune.train.objectives import flow_loss
from audiotune.train.plots import loss_curve

log = logging.getLogger(__name__)

MEL_FORMAT = "cosyvoice-log-mel"
MEL_FIELDS = ("sample_rate", "n_fft", "hop_length", "win_length", "n_mels", "fmin", "fmax", "center")
PRESET_N_MELS = 80
SPEAKER_TYPES = {"speaker-id": "id", "onnx": "embedding", "none": "none"}
FROM_BASE = "from_base"  # flow.preset: the architecture of the base flow's config.json
AUDIOTUNE_ARCH = "audiotune"  # flow.arch of our own flow model (== models.flow.native.fit.AUDIOTUNE)


class TrainFlowError(TrainingError):
    """The flow stage cannot start (bad inputs or settings)."""


@dataclass
class TrainResult:
    """What the stage produced (the same shape as the llm stage's)."""

    output: str
    metrics: dict[str, Any]
    manifest: dict[str, Any] | None


@dataclass
class TokensInfo:
    """What the flow needs to know about a Tokens artifact."""

    mel: dict[str, Any]
    codebook_size: int
    num_codebooks: int  # in the Tokens
    codebooks_used: int  # read by the flow
    token_rate: float
    speaker_type: str  # the Tokens' own name: speaker-id | onnx | none
    num_speakers: int
    code_stream: dict[str, Any] | None = None  # interleaved LM ids (Step-Audio-EditX): offsets, sizes, frame_rate

    @property
    def mel_frames_per_token(self) -> float:
        return self.mel["sample_rate"] / self.mel["hop_length"] / self.token_rate


def tokens_info(manifest: dict[str, Any], tokens: str, codebooks: str) -> TokensInfo:
    """Check that a Tokens manifest describes mels and codes a flow can train on.

    Raises:
        TrainFlowError: No mel settings, a foreign mel format, or no audio tokenizer.
    """
    mel = manifest.get("mel")
    if not mel:
        raise TrainFlowError(f"{tokens}: the Tokens carry no mel settings; re-tokenize with this audiotune "
                             "(tokenize writes target mels for the flow)")
    if mel.get("format", MEL_FORMAT) != MEL_FORMAT:
        raise TrainFlowError(f"{tokens}: mel format {mel.get('format')!r}; the flow trains on {MEL_FORMAT!r}")
    audio = manifest.get("audio_tokenizer")
    if not audio or not audio.get("codebook_size"):
        raise TrainFlowError(f"{tokens}: the Tokens have no audio codes (tokenize.audio_tokenizer.type is none or "
                             "the data is text only); the flow maps codes to mels")
    if not audio.get("token_rate"):
        raise TrainFlowError(f"{tokens}: the audio tokenizer has no token_rate; cannot align codes with mel frames")
    num = int(audio.get("num_codebooks") or 1)
    return TokensInfo(mel={k: mel.get(k) for k in MEL_FIELDS}, codebook_size=int(audio["codebook_size"]),
                      num_codebooks=num, codebooks_used=1 if codebooks == "first" else num,
                      token_rate=float(audio["token_rate"]),
                      speaker_type=str(manifest.get("speaker_embedding") or "none"),
                      num_speakers=int(manifest.get("speakers") or 0), code_stream=audio.get("code_stream"))


def speaker_spec(info: TokensInfo, tokens_dir: Path, train_ex: FlowExamples):
    from audiotune.models.flow import SpeakerSpec

    kind = SPEAKER_TYPES.get(info.speaker_type)
    if kind is None:
        raise TrainFlowError(f"Tokens speaker type {info.speaker_type!r} is not one of {sorted(SPEAKER_TYPES)}")
    if kind == "id":
        table = tokens_dir / "tokenizer" / "speakers.json"
        count = len(json.loads(table.read_text())) if table.is_file() else info.num_speakers
        return SpeakerSpec("id", num_speakers=max(count, int(train_ex.speaker_index.max(initial=0)) + 1))
    if kind == "embedding":
        if train_ex.speaker_embedding is None:
            raise TrainFlowError("the Tokens' speaker type is onnx but the rows carry no speaker_embedding")
        return SpeakerSpec("embedding", embedding_dim=int(train_ex.speaker_embedding.shape[1]))
    return SpeakerSpec("none")


def check_release_fits(release, info: TokensInfo, speaker, base_flow: str) -> None:
    """A release flow (its yaml's settings) must agree with the Tokens; each mismatch names both values.

    Raises:
        TrainFlowError: Listing every setting that differs (mel, vocabulary, token rate, x-vector size).
    """
    from audiotune.models.flow.native.fit import release_mismatches

    problems = release_mismatches(release, info.mel, info.codebook_size, info.codebooks_used, info.token_rate,
                                  info.mel_frames_per_token, speaker.type, speaker.embedding_dim, info.code_stream)
    if problems:
        raise TrainFlowError(f"base flow {base_flow} ({release.arch}) does not fit the Tokens: " + "; ".join(problems))


def check_flow_fits(config, info: TokensInfo, speaker, base_flow: str) -> None:
    """A base flow must agree with the Tokens on everything its weights depend on."""
    if getattr(config, "release", None) is not None:
        return check_release_fits(config.release, info, speaker, base_flow)
    problems = []
    base_mel = config.mel or {}
    for key in MEL_FIELDS:
        if key in base_mel and base_mel[key] != info.mel.get(key):
            problems.append(f"mel.{key}: base {base_mel[key]!r}, Tokens {info.mel.get(key)!r}")
    if config.n_mels != info.mel["n_mels"]:
        problems.append(f"n_mels: base {config.n_mels}, Tokens {info.mel['n_mels']}")
    if config.codebook_size != info.codebook_size:
        problems.append(f"codebook_size: base {config.codebook_size}, Tokens {info.codebook_size}")
    if config.num_codebooks != info.codebooks_used:
        problems.append(f"codebooks read: base {config.num_codebooks}, Tokens give {info.codebooks_used} "
                        "(see flow.codebooks)")
    if abs(config.mel_frames_per_token - info.mel_frames_per_token) > 1e-6:
        problems.append(f"mel frames per token: base {config.mel_frames_per_token:.4f}, Tokens "
                        f"{info.mel_frames_per_token:.4f} (another token rate)")
    if dataclasses.asdict(config.speaker) != dataclasses.asdict(speaker):
        problems.append(f"speaker conditioning: base {dataclasses.asdict(config.speaker)}, Tokens "
                        f"{dataclasses.asdict(speaker)}")
    if problems:
        raise TrainFlowError(f"base flow {base_flow} does not fit the Tokens: " + "; ".join(problems))


def check_preset_fits(preset_model, base_model, preset: str, base_flow: str) -> None:
    """A base flow must have the preset's architecture: the same settings (dropout aside) and the same tensors.

    Raises:
        TrainFlowError: Listing the architecture settings that differ and the missing, unexpected and
            mis-shaped tensors.
    """
    from audiotune.models.flow import PRESETS, state_dict_problems

    def arch(config) -> dict[str, Any]:
        out = {f"encoder.{k}": v for k, v in dataclasses.asdict(config.encoder).items() if k != "dropout"}
        out.update({f"estimator.{k}": v for k, v in dataclasses.asdict(config.estimator).items() if k != "dropout"})
        return {**out, "regulator_layers": config.regulator_layers}

    ours, theirs = arch(preset_model.config), arch(base_model.config)
    settings = [f"{k}: checkpoint {theirs[k]!r}, preset {ours[k]!r}" for k in ours if ours[k] != theirs[k]]
    problems = ([f"architecture: {'; '.join(settings)}"] if settings else []) + \
        state_dict_problems(preset_model, base_model.state_dict())
    if problems:
        name = base_model.config.preset
        fix = f"flow.preset={name} (the checkpoint's preset) or " if name in PRESETS and name != preset else ""
        raise TrainFlowError(f"base flow {base_flow} (preset {name!r}) does not match flow.preset={preset!r}: "
                             + "; ".join(problems) + f". Set {fix}flow.preset={FROM_BASE} to take the architecture "
                             "from the checkpoint's config.json")


def resolve_arch(F: FlowStageConfig, base_flow: str | None) -> str:
    """``flow.arch`` made concrete (:func:`audiotune.models.flow.native.fit.resolve_arch`).

    Raises:
        TrainFlowError: An arch that contradicts the base flow (naming both), or an upstream arch without a
            release folder to take its sizes from.
    """
    from audiotune.models.flow.native.fit import resolve_arch as resolve

    arch, problem = resolve(F.arch, base_flow)
    if problem:
        raise TrainFlowError(problem)
    return arch


def _build_release(F: FlowStageConfig, info: TokensInfo, speaker, base_flow: str):
    """A release folder's flow, strictly loaded and checked against the Tokens."""
    from audiotune.models.flow.native.adapter import load_release_flow

    model = load_release_flow(base_flow, prompt_prob=F.prompt_prob, prompt_max_fraction=F.prompt_max_fraction,
                              n_timesteps=F.sample.n_timesteps, cfg_rate=F.sample.cfg_rate,
                              code_stream=info.code_stream)
    check_release_fits(model.config.release, info, speaker, base_flow)
    if F.preset != "base":
        log.info("flow.preset=%s is not used: the %s flow's sizes come from its yaml", F.preset, model.config.arch)
    model.config.mel = dict(info.mel)
    return model


def _build_model(F: FlowStageConfig, info: TokensInfo, speaker, base_flow: str | None):
    """The flow to train: a preset from random weights, a strictly loaded base flow (checked against the
    preset unless ``flow.preset`` is ``from_base``), or a release folder's flow (``flow.arch``)."""
    from audiotune.models.flow import PRESETS, FlowModel, load_flow

    if resolve_arch(F, base_flow) != AUDIOTUNE_ARCH:
        return _build_release(F, info, speaker, base_flow)

    overrides = dict(sigma_min=F.sigma_min, cfg_dropout=F.cfg_dropout, prompt_prob=F.prompt_prob,
                     prompt_max_fraction=F.prompt_max_fraction, n_timesteps=F.sample.n_timesteps,
                     cfg_rate=F.sample.cfg_rate)
    data = dict(codebook_size=info.codebook_size, num_codebooks=info.codebooks_used,
                mel_frames_per_token=info.mel_frames_per_token, speaker=speaker, mel=dict(info.mel), **overrides)
    if not base_flow:
        return FlowModel(PRESETS[F.preset](n_mels=PRESET_N_MELS, **data))
    model = load_flow(base_flow)
    check_flow_fits(model.config, info, speaker, base_flow)
    if F.preset == FROM_BASE:
        model.config = dataclasses.replace(model.config, mel=dict(info.mel), **overrides)
        return model
    preset = FlowModel(PRESETS[F.preset](n_mels=model.config.n_mels, **data))
    check_preset_fits(preset, model, F.preset, base_flow)
    preset.load_state_dict(model.state_dict(), strict=True)
    return preset


def _drop_overlong(examples: FlowExamples, budget: int, split: str) -> tuple[FlowExamples, int]:
    keep = examples.mel_lengths <= budget
    dropped = int((~keep).sum())
    if dropped:
        log.warning("%s: %d utterances longer than flow.max_frames_in_batch=%d mel frames dropped (e.g. %s)",
                    split, dropped, budget, ", ".join(np.asarray(examples.ids)[~keep][:5]))
        examples = examples.subset(keep)
    return examples, dropped


def train_flow(cfg: AudiotuneConfig, tokens: str, output: str, base_flow: str | None = None) -> TrainResult:
    """Run the flow stage (every torchrun process calls this; rank 0 publishes).

    Args:
        cfg: The pipeline config; the ``flow`` section drives this stage.
        tokens: URI of a Tokens artifact.
        output: URI for the Flow model artifact.
        base_flow: Starting flow URI (overrides ``flow.base_flow``).
    """
    from audiotune.models.flow import apply_lora, count_parameters, freeze_encoder
    from audiotune.models.vocoder import load_vocoder
    from audiotune.train.ema import EMA
    from audiotune.train.flow_samples import SampleRenderer

    F, T = cfg.flow, cfg.flow.train
    base_flow = base_flow or F.base_flow
    publish.require_missing_or_overwrite(output, F.overwrite, artifacts.FLOW, [tokens, base_flow])
    manifest = artifacts.read_manifest(tokens, artifacts.TOKENS, artifacts.TOKENS_VERSION)
    info = tokens_info(manifest, tokens, F.codebooks)
    resolve_arch(F, base_flow)  # an arch that contradicts the base: refused before anything else
    if not base_flow and F.preset == FROM_BASE:
        raise TrainFlowError(f"flow.preset={FROM_BASE!r} takes the architecture from a base flow, but there is none "
                             "(set flow.base_flow or --base-flow, or a preset: tiny, base)")
    if not base_flow and info.mel["n_mels"] != PRESET_N_MELS:
        raise TrainFlowError(f"{tokens}: the Tokens' mels have {info.mel['n_mels']} bins; flow preset {F.preset!r} "
                             f"decodes {PRESET_N_MELS} (tokenize.mel.n_mels), or start from a base_flow built for them")
    dtype = resolve_dtype(T.dtype)
    acc = make_accelerator(T, dtype)
    lease = output_lock.acquire(acc, [output], "flow")  # released after publishing
    if acc.is_main_process:
        log.info("train flow: %s -> %s\n%s", tokens, output, dump_config(cfg))
    tokens_dir = storage.local_copy(tokens)
    artifacts.verify_shards(tokens_dir, manifest, tokens)

    n_mels, codebooks = info.mel["n_mels"], F.codebooks
    train_ex, train_stats = load_flow_examples(tokens_dir / "train", n_mels, codebooks, info.num_codebooks)
    val_ex, val_stats = load_flow_examples(tokens_dir / "val", n_mels, codebooks, info.num_codebooks)
    train_ex, dropped = _drop_overlong(train_ex, F.max_frames_in_batch, "train")
    val_ex, _ = _drop_overlong(val_ex, F.max_frames_in_batch, "val")
    check_dropped(f"{tokens} train", len(train_ex) + dropped, dropped,
                  f"longer than flow.max_frames_in_batch={F.max_frames_in_batch} mel frames",
                  "flow.train.max_drop_fraction", T.max_drop_fraction, "raise flow.max_frames_in_batch")
    if not len(train_ex):
        raise TrainFlowError(f"{tokens}: no training utterance with a mel and codes within the frame budget "
                             f"({train_stats['rows']} rows; skipped {train_stats['skipped']}; {dropped} too long)")
    speaker = speaker_spec(info, tokens_dir, train_ex)

    seed_everything(cfg.run.seed)
    model = _build_model(F, info, speaker, base_flow)
    check_flow_codes(tokens_dir, model.config, base_flow or f"flow.preset={F.preset}")  # before training
    if F.freeze_encoder:
        log.info("froze the encoder (%d parameters)", freeze_encoder(model))
    if F.lora.enabled:
        if not base_flow:
            log.warning("LoRA on a randomly initialised flow: only the adapters train (set flow.base_flow)")
        model = apply_lora(model, F.lora.r, F.lora.alpha, F.lora.dropout, lora_targets(model, F))
    trainable, total = count_parameters(model)
    log.info("flow parameters: %d trainable of %d", trainable, total)
    model.to(acc.device)
    ema = EMA(model, F.ema.decay) if F.ema.enabled else None

    train_data = FlowBatches(train_ex, F.max_frames_in_batch, T.max_batch_size, cfg.run.seed,
                             acc.process_index, acc.num_processes)
    val_data = (FlowBatches(val_ex, F.max_frames_in_batch, T.max_batch_size, cfg.run.seed, acc.process_index,
                            acc.num_processes, shuffle=False, repeat=False) if len(val_ex) else None)
    vocoder = load_vocoder(F.vocoder, info.mel) if F.num_samples and acc.is_main_process else None
    renderer = (SampleRenderer(val_ex if len(val_ex) else train_ex, F.num_samples, vocoder, F.sample.n_timesteps,
                               F.sample.cfg_rate, cfg.run.seed, F.sample.temperature)
                if vocoder is not None else None)
    if renderer is not None and T.deepspeed.zero_stage == 3 and ema is None:
        log.warning("ZeRO-3 partitions the weights: no samples during training")
        renderer = None

    with lease, tempfile.TemporaryDirectory(prefix="audiotune-flow-") as tmp, \
            tracking.stage_run(cfg.tracking, "flow") as tracker:
        tracker.log_params({"flow": F.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json")})
        tracker.log_params({"data.train_utterances": len(train_ex), "data.val_utterances": len(val_ex),
                            "data.train_frames": int(train_ex.mel_lengths.sum()), "data.dropped_overlong": dropped,
                            "model.trainable_parameters": trainable, "model.total_parameters": total,
                            "model.preset": model.config.preset, "model.speaker": speaker.type})
        engine: Engine | None = None

        def weights_of_ema():
            return ema.swapped(acc.unwrap_model(engine.model)) if ema is not None else contextlib.nullcontext()

        def on_step(state) -> None:
            if ema is not None:
                ema.update(acc.unwrap_model(engine.model))
            if renderer is not None and state.step % F.sample_every == 0:
                with weights_of_ema():
                    files = renderer.render(acc.unwrap_model(engine.model), Path(tmp) / "samples",
                                            f"step-{state.step:06d}")
                for file in files:
                    tracker.log_artifact(file, "samples")

        engine = Engine(
            train=T, accelerator=acc, model=model,
            param_groups=decay_groups(list(model.named_parameters()), T.lr, T.weight_decay, "flow"),
            loss_fn=flow_loss, train_data=train_data, val_data=val_data, output=output, tracker=tracker,
            work_dir=Path(tmp), seed=cfg.run.seed, on_step=on_step,
            eval_context=weights_of_ema if ema is not None else None,
            extra_state={"ema": ema} if ema is not None else None,
            # what a resumed checkpoint must share with this run (sample rendering may change in between)
            identity=checkpoints.run_identity(
                "flow", F.model_dump(mode="json"), free=("num_samples", "sample_every", "vocoder", "sample"),
                seed=cfg.run.seed, dataset_fingerprint=manifest.get("dataset_fingerprint")),
        )
        engine.maybe_resume()
        state = engine.fit()
        state_dict = acc.get_state_dict(engine.model)
        metrics = _final_metrics(state, train_ex, val_ex, dropped, trainable, total)
        result_manifest = None
        if acc.is_main_process:
            tracker.log_metrics(tracking.final_metrics(metrics))
            with publish.publish_dir(output, overwrite=F.overwrite, kind=artifacts.FLOW,
                                     inputs=[tokens, base_flow]) as staging:
                export = export_flow_model(model.config, state_dict, F, ema, staging)
                if renderer is not None:
                    for file in renderer.render(export, staging / "samples", "final"):
                        tracker.log_artifact(file, "samples")
                for name in ("speakers.json", "speaker_embeddings.safetensors", "mel.json"):
                    if (tokens_dir / "tokenizer" / name).is_file():
                        shutil.copy2(tokens_dir / "tokenizer" / name, staging / name)
                (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
                (staging / "history.json").write_text(json.dumps(state.history, indent=1) + "\n")
                loss_curve(state.history, staging / "loss_curve.png")
                for name in ("loss_curve.png", "metrics.json"):
                    tracker.log_artifact(staging / name)
                result_manifest = artifacts.write_manifest(
                    staging, artifacts.FLOW, artifacts.FLOW_VERSION,
                    tokens=tokens, base_flow=base_flow, init="base_flow" if base_flow else "preset",
                    preset=model.config.preset, arch=getattr(model.config, "arch", AUDIOTUNE_ARCH),
                    release=release_summary(model.config), mel=info.mel,
                    speaker={**dataclasses.asdict(speaker), "tokens_type": info.speaker_type},
                    vocab={"codebook_size": info.codebook_size, "num_codebooks": info.num_codebooks,
                           "codebooks": F.codebooks, "codebooks_read": info.codebooks_used,
                           "token_rate": info.token_rate, "mel_frames_per_token": info.mel_frames_per_token},
                    lora={**F.lora.model_dump(mode="json"), "merged": F.lora.enabled},
                    ema=F.ema.model_dump(mode="json"), sample=F.sample.model_dump(mode="json"),
                    vocoder=F.vocoder, parameters=count_parameters(export)[1],
                    checkpoints=checkpoints.checkpoints_uri(output), steps=state.step,
                    dataset_fingerprint=manifest.get("dataset_fingerprint"), metrics=metrics,
                    config=F.model_dump(mode="json"),
                )
        acc.wait_for_everyone()
    return TrainResult(output=output, metrics=metrics, manifest=result_manifest)


def _final_metrics(state, train_ex: FlowExamples, val_ex: FlowExamples, dropped: int, trainable: int,
                   total: int) -> dict[str, Any]:
    losses = [h["loss"] for h in state.history if "loss" in h]
    vals = [h["val_loss"] for h in state.history if "val_loss" in h]
    speeds = [h["tokens_per_s"] for h in state.history if "tokens_per_s" in h]
    return {
        "steps": state.step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "val_loss": vals[-1] if vals else None,
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "frames_per_s": sum(speeds) / len(speeds) if speeds else None,
        "train_utterances": len(train_ex),
        "train_frames": int(train_ex.mel_lengths.sum()),
        "val_utterances": len(val_ex),
        "dropped_overlong": dropped,
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
