"""The joint stage: an LLM artifact + a Flow artifact + their Tokens → both artifacts, trained together.

Recipe: read the three inputs and check they belong together (Tokens vocabulary = the LLM's, the
flow's mel and codes = the Tokens', the LoRA base = the one trained on) → reload the LLM (its adapter
still trainable) and the flow → one module, two parameter groups at lr × ``joint.lr_scale`` → paired
examples, batches within both budgets → the engine (one checkpoint covers both models, exact resume)
with loss ``w_llm·L_llm + w_flow·L_flow`` → write both artifacts in their own stages' layouts →
publish → track.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoTokenizer

from audiotune import artifacts, publish, storage
from audiotune.config import AudiotuneConfig
from audiotune.data.codes import check_flow_codes
from audiotune.errors import TrainingError
from audiotune.models.vocab import AudioVocab
from audiotune.train import checkpoints
from audiotune.train.engine import Engine, check_dropped, decay_groups, seed_everything
from audiotune.train.flow_export import export_flow_model, lora_targets
from audiotune.train.flow_setup import (
    TokensInfo,
    TrainFlowError,
    check_flow_fits,
    copy_speaker_files,
    speaker_spec,
    tokens_info,
)
from audiotune.train.joint import JointBatches, JointLoss, JointModel, pair_examples
from audiotune.train.llm_export import write_llm_files
from audiotune.train.recipe import Run, fit, history_values, mean, publish_on_main, start_run, tracked, write_run_files

log = logging.getLogger(__name__)

MANIFEST_OWN = ("kind", "schema_version", "created_at", "audiotune_version")  # written anew, not carried over


class TrainJointError(TrainingError):
    """The joint stage cannot start (inputs that do not belong together, or nothing to train)."""


@dataclass
class JointResult:
    """What the stage produced: both artifacts and the run's metrics."""

    llm_output: str
    flow_output: str
    metrics: dict[str, Any]
    llm_manifest: dict[str, Any] | None
    flow_manifest: dict[str, Any] | None


@dataclass
class _Inputs:
    tokens: str
    llm: str
    flow: str
    tokens_manifest: dict[str, Any]
    llm_manifest: dict[str, Any]
    flow_manifest: dict[str, Any]
    tokens_dir: Path | None = None
    llm_dir: Path | None = None
    vocab: AudioVocab | None = None
    info: TokensInfo | None = None
    base_path: str | None = None


@dataclass
class _Data:
    llm_train: list
    llm_val: list
    flow_train: Any
    flow_val: Any
    pairs: list
    val_pairs: list
    pair_stats: dict[str, int]


@dataclass
class _Model:
    model: JointModel
    ema: Any
    groups: list[dict[str, Any]]
    trainable: int
    total: int
    speaker: Any


def train_joint(cfg: AudiotuneConfig, tokens: str, llm: str, flow: str, llm_output: str,
                flow_output: str) -> JointResult:
    """Run the joint stage (every torchrun process calls this; rank 0 publishes).

    Args:
        cfg: The pipeline config; ``joint`` drives this stage, ``llm`` / ``flow`` give each model's settings.
        tokens: URI of the Tokens artifact both models were trained on.
        llm: URI of an LLM model artifact.
        flow: URI of a Flow model artifact.
        llm_output: URI for the jointly trained LLM artifact.
        flow_output: URI for the jointly trained Flow artifact.
    """
    inputs = _read_inputs(cfg, tokens, llm, flow, llm_output, flow_output)
    run = start_run(cfg, cfg.joint.train, [llm_output, flow_output], "joint",  # lease released by tracked
                    f"{tokens} + {llm} + {flow} -> {llm_output}, {flow_output}")
    inputs = _setup_inputs(cfg, inputs)
    data = _setup_data(cfg, inputs)
    seed_everything(cfg.run.seed)
    built = _setup_model(cfg, inputs, data, run)
    with tracked(cfg, run, "joint") as (tracker, work):
        _log_params(cfg, inputs, data, built, tracker)
        state, state_dict = _fit(cfg, run, inputs, data, built, llm_output, tracker, work)
        metrics = _final_metrics(state, data.pair_stats, len(data.val_pairs))
        manifests = publish_on_main(run, tracker, metrics, lambda: _publish(
            cfg, run, inputs, built, state, state_dict, metrics, tracker, llm_output, flow_output))
    manifests = manifests or {"llm": None, "flow": None}
    return JointResult(llm_output=llm_output, flow_output=flow_output, metrics=metrics,
                       llm_manifest=manifests["llm"], flow_manifest=manifests["flow"])


@contextlib.contextmanager
def _as_joint_error() -> Iterator[None]:
    """A flow check's refusal, as this stage's error."""
    try:
        yield
    except TrainFlowError as err:
        raise TrainJointError(str(err)) from None


def resolve_base(llm_manifest: dict[str, Any], llm: str, override: str | None) -> str | None:
    """The local base model of a LoRA artifact, checked against the fingerprint recorded at training."""
    from audiotune.models.fingerprint import fingerprint_checkpoint, fingerprint_mismatch

    if llm_manifest.get("mode") != "lora":
        return None
    uri = override or llm_manifest.get("base_model")
    if not uri:
        raise TrainJointError(f"{llm} is a LoRA adapter without a recorded base model; set joint.base_model")
    local = storage.local_copy(uri)
    problems = fingerprint_mismatch(llm_manifest.get("base_fingerprint") or {}, fingerprint_checkpoint(local))
    if problems:
        raise TrainJointError(f"base model {uri} is not the one {llm} was trained on: " + "; ".join(problems[:4]))
    return str(local)


def _check_tokens(tokens: str, tokens_dir: Path, llm_dir: Path, vocab: AudioVocab, manifest: dict) -> None:
    audio = manifest.get("audio_tokenizer") or {}
    if int(audio.get("codebook_size") or 0) != vocab.codebook_size or \
            int(audio.get("num_codebooks") or 1) < vocab.num_codebooks:
        raise TrainJointError(f"{tokens}: audio codes ({audio.get('num_codebooks')} × {audio.get('codebook_size')}) "
                              f"differ from the LLM's ({vocab.num_codebooks} × {vocab.codebook_size})")
    ours = AutoTokenizer.from_pretrained(str(tokens_dir / "tokenizer"), trust_remote_code=False).get_vocab()
    theirs = AutoTokenizer.from_pretrained(str(llm_dir), trust_remote_code=False).get_vocab()
    differ = [t for t, i in ours.items() if theirs.get(t) != i]
    if differ:
        raise TrainJointError(f"{tokens}: text tokenizer differs from the LLM's ({len(differ)} tokens, e.g. "
                              f"{differ[:3]}): the joint stage needs the Tokens the LLM was trained on")


def _read_inputs(cfg: AudiotuneConfig, tokens: str, llm: str, flow: str, llm_output: str,
                 flow_output: str) -> _Inputs:
    """Refuse a bad start before any work (the stage off, an output to keep); read the three manifests."""
    J = cfg.joint
    if not J.enabled:
        raise TrainJointError("joint.train.epochs is 0, which turns the joint stage off: nothing to train")
    for out, kind, other in ((llm_output, artifacts.LLM, flow_output), (flow_output, artifacts.FLOW, llm_output)):
        publish.require_missing_or_overwrite(out, J.overwrite, kind, [tokens, llm, flow, other])
    return _Inputs(tokens=tokens, llm=llm, flow=flow,
                   tokens_manifest=artifacts.read_manifest(tokens, artifacts.TOKENS, artifacts.TOKENS_VERSION),
                   llm_manifest=artifacts.read_manifest(llm, artifacts.LLM, artifacts.LLM_VERSION),
                   flow_manifest=artifacts.read_manifest(flow, artifacts.FLOW, artifacts.FLOW_VERSION))


def _setup_inputs(cfg: AudiotuneConfig, inputs: _Inputs) -> _Inputs:
    """Fetch the Tokens and the LLM and check they belong together: vocabulary, mels and codes, the LoRA base."""
    tokens = inputs.tokens
    tokens_dir, llm_dir = storage.local_copy(tokens), storage.local_copy(inputs.llm)
    artifacts.verify_shards(tokens_dir, inputs.tokens_manifest, tokens)
    vocab = AudioVocab.from_dict(inputs.llm_manifest["vocab"])
    _check_tokens(tokens, tokens_dir, llm_dir, vocab, inputs.tokens_manifest)
    with _as_joint_error():
        info = tokens_info(inputs.tokens_manifest, tokens, _codebooks(cfg, inputs))
    return dataclasses.replace(inputs, tokens_dir=tokens_dir, llm_dir=llm_dir, vocab=vocab, info=info,
                               base_path=resolve_base(inputs.llm_manifest, inputs.llm, cfg.joint.base_model))


def _codebooks(cfg: AudiotuneConfig, inputs: _Inputs) -> str:
    """The codebooks the flow reads: as it was trained (its manifest), else ``flow.codebooks``."""
    return (inputs.flow_manifest.get("vocab") or {}).get("codebooks", cfg.flow.codebooks)


def _setup_data(cfg: AudiotuneConfig, inputs: _Inputs) -> _Data:
    """The LLM's examples and the flow's of the same rows, paired."""
    from audiotune.train.flow_data import load_flow_examples
    from audiotune.train.llm_data import load_examples

    F, T, tokens_dir, info, vocab = cfg.flow, cfg.joint.train, inputs.tokens_dir, inputs.info, inputs.vocab
    layout, max_len = inputs.llm_manifest["config"]["layout"], inputs.llm_manifest["config"]["max_seq_len"]
    codebooks = _codebooks(cfg, inputs)
    llm_train, llm_stats = load_examples(tokens_dir / "train", vocab, layout, max_len, "drop", repeat=False)
    llm_val, _ = load_examples(tokens_dir / "val", vocab, layout, max_len, "drop", repeat=False)
    flow_train, _ = load_flow_examples(tokens_dir / "train", info.mel["n_mels"], codebooks, info.num_codebooks)
    flow_val, _ = load_flow_examples(tokens_dir / "val", info.mel["n_mels"], codebooks, info.num_codebooks)
    pairs, pair_stats = pair_examples(llm_train, flow_train, F.max_frames_in_batch)
    val_pairs, _ = pair_examples(llm_val, flow_val, F.max_frames_in_batch)
    check_dropped(f"{inputs.tokens} train", llm_stats["rows"],
                  llm_stats["dropped_overlong"] + pair_stats["too_long_for_flow"],
                  f"longer than the llm artifact's max_seq_len={max_len} or flow.max_frames_in_batch="
                  f"{F.max_frames_in_batch}", "joint.train.max_drop_fraction", T.max_drop_fraction,
                  "raise flow.max_frames_in_batch or train the llm with a longer max_seq_len")
    if not pairs:
        raise TrainJointError(f"{inputs.tokens}: no row has both an LLM sequence (layout {layout!r}) and a flow "
                              f"example ({pair_stats})")
    log.info("joint examples: %s", pair_stats)
    return _Data(llm_train=llm_train, llm_val=llm_val, flow_train=flow_train, flow_val=flow_val, pairs=pairs,
                 val_pairs=val_pairs, pair_stats=pair_stats)


def _setup_model(cfg: AudiotuneConfig, inputs: _Inputs, data: _Data, run: Run) -> _Model:
    """The flow (checked against the Tokens) and the LLM (its adapter trainable) as one module, two groups."""
    from audiotune.models.flow import apply_lora, freeze_encoder, load_flow
    from audiotune.models.lm import count_parameters, load_trained
    from audiotune.train.ema import EMA

    J, T, L, F, flow = cfg.joint, cfg.joint.train, cfg.llm, cfg.flow, inputs.flow
    flow_model = load_flow(flow)
    with _as_joint_error():
        speaker = speaker_spec(inputs.info, inputs.tokens_dir, data.flow_train)
        check_flow_fits(flow_model.config, inputs.info, speaker, flow)
    check_flow_codes(inputs.tokens_dir, flow_model.config, flow)  # every code the flow reads inside its codebook
    lora = inputs.llm_manifest.get("mode") == "lora"
    load_dtype = torch.bfloat16 if (run.dtype == "bf16" and lora) else torch.float32
    llm_model, _ = load_trained(inputs.llm_dir, inputs.base_path, load_dtype, trainable=True)
    if F.freeze_encoder:
        freeze_encoder(flow_model)
    if F.lora.enabled:
        flow_model = apply_lora(flow_model, F.lora.r, F.lora.alpha, F.lora.dropout, lora_targets(flow_model, F))
    model = JointModel(llm_model, flow_model)
    model.to(run.accelerator.device)
    ema = EMA(flow_model, F.ema.decay) if F.ema.enabled else None
    groups = (decay_groups(list(llm_model.named_parameters()), L.train.lr * J.lr_scale, T.weight_decay, "llm")
              + decay_groups(list(flow_model.named_parameters()), F.train.lr * J.lr_scale, T.weight_decay, "flow"))
    trainable, total = count_parameters(model)
    return _Model(model=model, ema=ema, groups=groups, trainable=trainable, total=total, speaker=speaker)


def _log_params(cfg: AudiotuneConfig, inputs: _Inputs, data: _Data, built: _Model, tracker) -> None:
    tracker.log_params({"joint": cfg.joint.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json"),
                        "inputs": {"tokens": inputs.tokens, "llm": inputs.llm, "flow": inputs.flow}})
    tracker.log_params({"data.pairs": len(data.pairs), "data.val_pairs": len(data.val_pairs),
                        "data.llm_only": data.pair_stats["llm_only"], "data.flow_only": data.pair_stats["flow_only"],
                        "model.trainable_parameters": built.trainable, "model.total_parameters": built.total,
                        **{f"optimizer.{g['name']}.lr": g["lr"] for g in built.groups}})


def _fit(cfg: AudiotuneConfig, run: Run, inputs: _Inputs, data: _Data, built: _Model, llm_output: str, tracker,
         work: Path):
    """Train both models with the flow's EMA update after each step; returns the final state and weights."""
    J, T, F, acc, ema, vocab = cfg.joint, cfg.joint.train, cfg.flow, run.accelerator, built.ema, inputs.vocab
    seed, rank, world = cfg.run.seed, acc.process_index, acc.num_processes
    train_data = JointBatches(data.llm_train, data.flow_train, data.pairs, vocab, T.batch_tokens,
                              F.max_frames_in_batch, T.max_batch_size, seed, rank, world)
    val_data = (JointBatches(data.llm_val, data.flow_val, data.val_pairs, vocab, T.batch_tokens,
                             F.max_frames_in_batch, T.max_batch_size, seed, rank, world, shuffle=False)
                if data.val_pairs else None)
    engine: Engine | None = None

    def on_step(state) -> None:
        if ema is not None:
            ema.update(acc.unwrap_model(engine.model).flow)

    def ema_weights():
        return ema.swapped(acc.unwrap_model(engine.model).flow) if ema is not None else contextlib.nullcontext()

    engine = Engine(train=T, accelerator=acc, model=built.model, param_groups=built.groups,
                    loss_fn=JointLoss(vocab, J.w_llm, J.w_flow, J.flow_condition),
                    train_data=train_data, val_data=val_data, output=llm_output, tracker=tracker,
                    work_dir=work, seed=seed, on_step=on_step,
                    eval_context=ema_weights if ema is not None else None,
                    extra_state={"ema": ema} if ema is not None else None,
                    identity=checkpoints.run_identity(  # what a resumed checkpoint must share with this run
                        "joint", J.model_dump(mode="json"), seed=seed, llm=inputs.llm, flow=inputs.flow,
                        dataset_fingerprint=inputs.tokens_manifest.get("dataset_fingerprint"),
                        llm_lr=cfg.llm.train.lr, flow_lr=cfg.flow.train.lr))
    return fit(engine)


def _publish(cfg: AudiotuneConfig, run: Run, inputs: _Inputs, built: _Model, state, state_dict: dict,
             metrics: dict[str, Any], tracker, llm_output: str, flow_output: str) -> dict[str, Any]:
    """Both artifacts in their own stages' layouts, each manifest carrying its input's fields and the joint run."""
    joint = {"tokens": inputs.tokens, "llm": inputs.llm, "flow": inputs.flow, "steps": state.step,
             "config": cfg.joint.model_dump(mode="json"), "metrics": metrics}
    unwrapped = run.accelerator.unwrap_model(built.model)
    llm_state = {k[len("llm."):]: v for k, v in state_dict.items() if k.startswith("llm.")}
    flow_state = {k[len("flow."):]: v for k, v in state_dict.items() if k.startswith("flow.")}
    outputs = (llm_output, flow_output)
    return {"llm": _publish_llm(cfg, inputs, unwrapped.llm, llm_state, state, metrics, tracker, outputs, joint),
            "flow": _publish_flow(cfg, inputs, built, flow_state, state, metrics, outputs, joint)}


def _carried(manifest: dict[str, Any], val_loss: float | None, state) -> dict[str, Any]:
    """An input artifact's manifest fields, its metrics updated with the joint run's."""
    fields = {k: v for k, v in manifest.items() if k not in MANIFEST_OWN}
    fields["metrics"] = {**fields.get("metrics", {}), "val_loss": val_loss, "steps_joint": state.step}
    return fields


def _publish_llm(cfg: AudiotuneConfig, inputs: _Inputs, llm_model, llm_state: dict, state, metrics: dict[str, Any],
                 tracker, outputs: tuple[str, str], joint: dict[str, Any]) -> dict[str, Any]:
    (llm_output, flow_output), llm_dir = outputs, inputs.llm_dir
    with publish.publish_dir(llm_output, overwrite=cfg.joint.overwrite, kind=artifacts.LLM,
                             inputs=[inputs.tokens, inputs.llm, inputs.flow, flow_output]) as staging:
        tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), trust_remote_code=False)
        base_fp = json.loads((llm_dir / "base_fingerprint.json").read_text())
        write_llm_files(staging, llm_model, llm_state, inputs.llm_manifest["mode"], tokenizer, inputs.vocab,
                        base_fp, metrics, state.history, tracker)
        fields = _carried(inputs.llm_manifest, metrics["val_loss_llm"], state)
        return artifacts.write_manifest(
            staging, artifacts.LLM, artifacts.LLM_VERSION,
            **{**fields, "checkpoints": checkpoints.checkpoints_uri(llm_output), "joint": joint})


def _publish_flow(cfg: AudiotuneConfig, inputs: _Inputs, built: _Model, flow_state: dict, state,
                  metrics: dict[str, Any], outputs: tuple[str, str], joint: dict[str, Any]) -> dict[str, Any]:
    (llm_output, flow_output), F = outputs, cfg.flow
    with publish.publish_dir(flow_output, overwrite=cfg.joint.overwrite, kind=artifacts.FLOW,
                             inputs=[inputs.tokens, inputs.llm, inputs.flow, llm_output]) as staging:
        export_flow_model(built.model.flow.config, flow_state, F, built.ema, staging)
        copy_speaker_files(storage.local_copy(inputs.flow), staging)
        write_run_files(staging, metrics, state.history)  # logged to MLflow with the LLM's
        fields = _carried(inputs.flow_manifest, metrics["val_loss_flow"], state)
        fields["lora"] = {**F.lora.model_dump(mode="json"), "merged": F.lora.enabled}
        fields["speaker"] = {**dataclasses.asdict(built.speaker), "tokens_type": inputs.info.speaker_type}
        return artifacts.write_manifest(
            staging, artifacts.FLOW, artifacts.FLOW_VERSION,
            **{**fields, "checkpoints": checkpoints.checkpoints_uri(llm_output), "joint": joint})


def _final_metrics(state, pair_stats: dict[str, int], val_pairs: int) -> dict[str, Any]:
    def last(key: str) -> float | None:
        return (history_values(state.history, key) or [None])[-1]

    losses = history_values(state.history, "loss")
    return {
        "steps": state.step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "final_loss_llm": last("loss_llm"),
        "final_loss_flow": last("loss_flow"),
        "val_loss": last("val_loss"),
        "val_loss_llm": last("val_loss_llm"),
        "val_loss_flow": last("val_loss_flow"),
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "tokens_per_s": mean(history_values(state.history, "tokens_per_s")),
        "train_pairs": pair_stats["pairs"],
        "val_pairs": val_pairs,
    }
