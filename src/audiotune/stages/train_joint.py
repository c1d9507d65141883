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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from audiotune import artifacts, publish, storage, tracking
from audiotune.config import AudiotuneConfig, dump_config
from audiotune.data.codes import check_flow_codes
from audiotune.errors import TrainingError
from audiotune.models.vocab import AudioVocab
from audiotune.stages.train_flow import TrainFlowError, check_flow_fits, speaker_spec, tokens_info
from audiotune.stages.train_llm import write_llm_files
from audiotune.train import checkpoints, output_lock
from audiotune.train.engine import Engine, check_dropped, decay_groups, make_accelerator, resolve_dtype, seed_everything
from audiotune.train.flow_export import export_flow_model, lora_targets
from audiotune.train.joint import JointBatches, JointLoss, JointModel, pair_examples
from audiotune.train.plots import loss_curve

log = logging.getLogger(__name__)


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
    from audiotune.models.flow import apply_lora, freeze_encoder, load_flow
    from audiotune.models.lm import count_parameters, load_trained
    from audiotune.train.ema import EMA
    from audiotune.train.flow_data import load_flow_examples
    from audiotune.train.llm_data import load_examples

    J, T, L, F = cfg.joint, cfg.joint.train, cfg.llm, cfg.flow
    if not J.enabled:
        raise TrainJointError("joint.train.epochs is 0, which turns the joint stage off: nothing to train")
    for out, kind, other in ((llm_output, artifacts.LLM, flow_output), (flow_output, artifacts.FLOW, llm_output)):
        publish.require_missing_or_overwrite(out, J.overwrite, kind, [tokens, llm, flow, other])
    tokens_manifest = artifacts.read_manifest(tokens, artifacts.TOKENS, artifacts.TOKENS_VERSION)
    llm_manifest = artifacts.read_manifest(llm, artifacts.LLM, artifacts.LLM_VERSION)
    flow_manifest = artifacts.read_manifest(flow, artifacts.FLOW, artifacts.FLOW_VERSION)
    dtype = resolve_dtype(T.dtype)
    acc = make_accelerator(T, dtype)
    lease = output_lock.acquire(acc, [llm_output, flow_output], "joint")  # released after publishing
    if acc.is_main_process:
        log.info("train joint: %s + %s + %s -> %s, %s\n%s", tokens, llm, flow, llm_output, flow_output,
                 dump_config(cfg))
    tokens_dir, llm_dir = storage.local_copy(tokens), storage.local_copy(llm)
    artifacts.verify_shards(tokens_dir, tokens_manifest, tokens)
    vocab = AudioVocab.from_dict(llm_manifest["vocab"])
    _check_tokens(tokens, tokens_dir, llm_dir, vocab, tokens_manifest)
    codebooks = (flow_manifest.get("vocab") or {}).get("codebooks", F.codebooks)
    try:
        info = tokens_info(tokens_manifest, tokens, codebooks)
    except TrainFlowError as err:
        raise TrainJointError(str(err)) from None
    base_path = resolve_base(llm_manifest, llm, J.base_model)

    # data: the LLM's examples and the flow's of the same rows
    layout, max_len = llm_manifest["config"]["layout"], llm_manifest["config"]["max_seq_len"]
    llm_train, llm_stats = load_examples(tokens_dir / "train", vocab, layout, max_len, "drop", repeat=False)
    llm_val, _ = load_examples(tokens_dir / "val", vocab, layout, max_len, "drop", repeat=False)
    flow_train, _ = load_flow_examples(tokens_dir / "train", info.mel["n_mels"], codebooks, info.num_codebooks)
    flow_val, _ = load_flow_examples(tokens_dir / "val", info.mel["n_mels"], codebooks, info.num_codebooks)
    pairs, pair_stats = pair_examples(llm_train, flow_train, F.max_frames_in_batch)
    val_pairs, _ = pair_examples(llm_val, flow_val, F.max_frames_in_batch)
    check_dropped(f"{tokens} train", llm_stats["rows"], llm_stats["dropped_overlong"] + pair_stats["too_long_for_flow"],
                  f"longer than the llm artifact's max_seq_len={max_len} or flow.max_frames_in_batch="
                  f"{F.max_frames_in_batch}", "joint.train.max_drop_fraction", T.max_drop_fraction,
                  "raise flow.max_frames_in_batch or train the llm with a longer max_seq_len")
    if not pairs:
        raise TrainJointError(f"{tokens}: no row has both an LLM sequence (layout {layout!r}) and a flow example "
                              f"({pair_stats})")
    log.info("joint examples: %s", pair_stats)

    # models
    seed_everything(cfg.run.seed)
    flow_model = load_flow(flow)
    try:
        speaker = speaker_spec(info, tokens_dir, flow_train)
        check_flow_fits(flow_model.config, info, speaker, flow)
    except TrainFlowError as err:
        raise TrainJointError(str(err)) from None
    check_flow_codes(tokens_dir, flow_model.config, flow)  # every code the flow reads inside its codebook
    load_dtype = torch.bfloat16 if (dtype == "bf16" and llm_manifest.get("mode") == "lora") else torch.float32
    llm_model, _ = load_trained(llm_dir, base_path, load_dtype, trainable=True)
    if F.freeze_encoder:
        freeze_encoder(flow_model)
    if F.lora.enabled:
        flow_model = apply_lora(flow_model, F.lora.r, F.lora.alpha, F.lora.dropout, lora_targets(flow_model, F))
    model = JointModel(llm_model, flow_model)
    model.to(acc.device)
    ema = EMA(flow_model, F.ema.decay) if F.ema.enabled else None
    groups = (decay_groups(list(llm_model.named_parameters()), L.train.lr * J.lr_scale, T.weight_decay, "llm")
              + decay_groups(list(flow_model.named_parameters()), F.train.lr * J.lr_scale, T.weight_decay, "flow"))
    trainable, total = count_parameters(model)

    train_data = JointBatches(llm_train, flow_train, pairs, vocab, T.batch_tokens, F.max_frames_in_batch,
                              T.max_batch_size, cfg.run.seed, acc.process_index, acc.num_processes)
    val_data = (JointBatches(llm_val, flow_val, val_pairs, vocab, T.batch_tokens, F.max_frames_in_batch,
                             T.max_batch_size, cfg.run.seed, acc.process_index, acc.num_processes, shuffle=False)
                if val_pairs else None)
    loss_fn = JointLoss(vocab, J.w_llm, J.w_flow, J.flow_condition)

    with lease, tempfile.TemporaryDirectory(prefix="audiotune-joint-") as tmp, \
            tracking.stage_run(cfg.tracking, "joint") as tracker:
        tracker.log_params({"joint": J.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json"),
                            "inputs": {"tokens": tokens, "llm": llm, "flow": flow}})
        tracker.log_params({"data.pairs": len(pairs), "data.val_pairs": len(val_pairs),
                            "data.llm_only": pair_stats["llm_only"], "data.flow_only": pair_stats["flow_only"],
                            "model.trainable_parameters": trainable, "model.total_parameters": total,
                            **{f"optimizer.{g['name']}.lr": g["lr"] for g in groups}})
        engine: Engine | None = None

        def on_step(state) -> None:
            if ema is not None:
                ema.update(acc.unwrap_model(engine.model).flow)

        def ema_weights():
            return ema.swapped(acc.unwrap_model(engine.model).flow) if ema is not None else contextlib.nullcontext()

        engine = Engine(train=T, accelerator=acc, model=model, param_groups=groups, loss_fn=loss_fn,
                        train_data=train_data, val_data=val_data, output=llm_output, tracker=tracker,
                        work_dir=Path(tmp), seed=cfg.run.seed, on_step=on_step,
                        eval_context=ema_weights if ema is not None else None,
                        extra_state={"ema": ema} if ema is not None else None,
                        identity=checkpoints.run_identity(  # what a resumed checkpoint must share with this run
                            "joint", J.model_dump(mode="json"), seed=cfg.run.seed, llm=llm, flow=flow,
                            dataset_fingerprint=tokens_manifest.get("dataset_fingerprint"),
                            llm_lr=cfg.llm.train.lr, flow_lr=cfg.flow.train.lr))
        engine.maybe_resume()
        state = engine.fit()
        state_dict = acc.get_state_dict(engine.model)
        metrics = _final_metrics(state, pair_stats, len(val_pairs))
        manifests: dict[str, Any] = {"llm": None, "flow": None}
        if acc.is_main_process:
            tracker.log_metrics(tracking.final_metrics(metrics))
            joint_info = {"tokens": tokens, "llm": llm, "flow": flow, "steps": state.step,
                          "config": J.model_dump(mode="json"), "metrics": metrics}
            unwrapped = acc.unwrap_model(engine.model)
            llm_state = {k[len("llm."):]: v for k, v in state_dict.items() if k.startswith("llm.")}
            flow_state = {k[len("flow."):]: v for k, v in state_dict.items() if k.startswith("flow.")}
            with publish.publish_dir(llm_output, overwrite=J.overwrite, kind=artifacts.LLM,
                                     inputs=[tokens, llm, flow, flow_output]) as staging:
                tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), trust_remote_code=False)
                base_fp = json.loads((llm_dir / "base_fingerprint.json").read_text())
                write_llm_files(staging, unwrapped.llm, llm_state, llm_manifest["mode"], tokenizer, vocab, base_fp,
                                metrics, state.history, tracker)
                fields = {k: v for k, v in llm_manifest.items()
                          if k not in ("kind", "schema_version", "created_at", "audiotune_version")}
                fields["metrics"] = {**fields.get("metrics", {}), "val_loss": metrics["val_loss_llm"],
                                     "steps_joint": state.step}
                manifests["llm"] = artifacts.write_manifest(
                    staging, artifacts.LLM, artifacts.LLM_VERSION,
                    **{**fields, "checkpoints": checkpoints.checkpoints_uri(llm_output), "joint": joint_info})
            with publish.publish_dir(flow_output, overwrite=J.overwrite, kind=artifacts.FLOW,
                                     inputs=[tokens, llm, flow, llm_output]) as staging:
                export_flow_model(flow_model.config, flow_state, F, ema, staging)
                for name in ("speakers.json", "speaker_embeddings.safetensors", "mel.json"):
                    source = storage.local_copy(flow) / name
                    if source.is_file():
                        (staging / name).write_bytes(source.read_bytes())
                (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
                (staging / "history.json").write_text(json.dumps(state.history, indent=1) + "\n")
                loss_curve(state.history, staging / "loss_curve.png")
                fields = {k: v for k, v in flow_manifest.items()
                          if k not in ("kind", "schema_version", "created_at", "audiotune_version")}
                fields["lora"] = {**F.lora.model_dump(mode="json"), "merged": F.lora.enabled}
                fields["metrics"] = {**fields.get("metrics", {}), "val_loss": metrics["val_loss_flow"],
                                     "steps_joint": state.step}
                fields["speaker"] = {**dataclasses.asdict(speaker), "tokens_type": info.speaker_type}
                manifests["flow"] = artifacts.write_manifest(
                    staging, artifacts.FLOW, artifacts.FLOW_VERSION,
                    **{**fields, "checkpoints": checkpoints.checkpoints_uri(llm_output), "joint": joint_info})
        acc.wait_for_everyone()
    return JointResult(llm_output=llm_output, flow_output=flow_output, metrics=metrics,
                       llm_manifest=manifests["llm"], flow_manifest=manifests["flow"])


def _final_metrics(state, pair_stats: dict[str, int], val_pairs: int) -> dict[str, Any]:
    def values(key: str) -> list[float]:
        return [h[key] for h in state.history if key in h]

    losses, vals = values("loss"), values("val_loss")
    return {
        "steps": state.step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "final_loss_llm": (values("loss_llm") or [None])[-1],
        "final_loss_flow": (values("loss_flow") or [None])[-1],
        "val_loss": vals[-1] if vals else None,
        "val_loss_llm": (values("val_loss_llm") or [None])[-1],
        "val_loss_flow": (values("val_loss_flow") or [None])[-1],
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "tokens_per_s": sum(values("tokens_per_s")) / len(values("tokens_per_s")) if values("tokens_per_s") else None,
        "train_pairs": pair_stats["pairs"],
        "val_pairs": val_pairs,
    }
