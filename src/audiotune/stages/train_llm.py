"""The llm stage: a Tokens artifact (+ a base causal LM) → an LLM model artifact.

Recipe: read the Tokens → lay out the vocabulary → build the model (base or scratch
preset, audio rows appended) → LoRA or full → examples, token-budget batches,
packing → the engine (accelerate/DeepSpeed, checkpoints, exact resume) → save the
adapter or full model with the tokenizer, the base fingerprint and the metrics →
publish → track.
"""

from __future__ import annotations

import hashlib
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
from audiotune.errors import TrainingError
from audiotune.models.vocab import AudioVocab, audio_token_settings, vocab_for_tokens
from audiotune.tokenization.text import check_base_tokenizer
from audiotune.train import checkpoints, output_lock
from audiotune.train.engine import Engine, check_dropped, decay_groups, make_accelerator, resolve_dtype, seed_everything
from audiotune.train.kimi_batches import batches_class_for
from audiotune.train.objectives import llm_loss
from audiotune.train.plots import loss_curve

log = logging.getLogger(__name__)


class TrainLLMError(TrainingError):
    """The llm stage cannot start (bad inputs or settings)."""


@dataclass
class TrainResult:
    """What the stage produced."""

    output: str
    metrics: dict[str, Any]
    manifest: dict[str, Any] | None


def _vocab(tokens_dir: Path, manifest: dict[str, Any], cfg) -> tuple[Any, AudioVocab, int]:
    tokenizer = AutoTokenizer.from_pretrained(str(tokens_dir / "tokenizer"),
                                              trust_remote_code=cfg.llm.trust_remote_code)
    base_text_size = len(tokenizer)
    vocab = vocab_for_tokens(tokenizer, manifest.get("audio_tokenizer"), cfg.llm.audio_tokens,
                             cfg.llm.audio_token_offset, cfg.llm.prompt_format)
    return tokenizer, vocab, base_text_size


def _check_tokenizer(tokens: str, manifest: dict[str, Any], tokenizer, base_path: str,
                     trust_remote_code: bool = False) -> None:
    """A pretrained base must see the ids of its own tokenizer."""
    kind = (manifest.get("text_tokenizer") or {}).get("kind")
    try:
        base_tok = AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        if kind in ("bpe", "char"):
            raise TrainLLMError(f"{tokens} was tokenized with a {kind} tokenizer trained on the data, and the base "
                                f"model {base_path} has no tokenizer to check it against; re-run tokenize with "
                                f"--base-model {base_path}, or train from scratch (llm.init=scratch)") from None
        log.warning("base model %s has no tokenizer; cannot check it against the Tokens' tokenizer", base_path)
        return
    theirs, ours = base_tok.get_vocab(), tokenizer.get_vocab()
    differ = [t for t, i in theirs.items() if ours.get(t) != i]
    if differ:
        raise TrainLLMError(f"{tokens}: the Tokens' text tokenizer ({kind}) differs from the base model's "
                            f"({len(differ)} of {len(theirs)} tokens differ, e.g. {differ[:3]}); re-run tokenize "
                            f"with --base-model {base_path}")


def _fit_vocab(vocab: AudioVocab, base_path: Path, tokens: str) -> AudioVocab:
    """The vocabulary on the base's own ids, where its family fixes them (MOSS-TTSD: speech ids and pads from
    its config.json); unchanged otherwise."""
    from audiotune.models.families import family_for

    fit = getattr(family_for(base_path), "fit_vocab", None)
    return fit(vocab, base_path, tokens) if fit is not None else vocab


def train_llm(cfg: AudiotuneConfig, tokens: str, output: str, base_model: str | None = None) -> TrainResult:
    """Run the llm stage (every torchrun process calls this; rank 0 publishes).

    Args:
        cfg: The pipeline config; the ``llm`` section drives this stage.
        tokens: URI of a Tokens artifact.
        output: URI for the LLM model artifact.
        base_model: Base model URI (overrides ``llm.base_model``).
    """
    from audiotune.models.fingerprint import fingerprint_model
    from audiotune.models.lm import apply_lora, build_lm, check_base_dir, count_parameters
    from audiotune.train.llm_data import load_examples, resolve_packing

    L, T = cfg.llm, cfg.llm.train
    base_model = base_model or L.base_model
    if L.init == "pretrained" and not base_model:
        raise TrainLLMError("llm.init is 'pretrained' but no base model was given (--base-model or llm.base_model); "
                            "use llm.init=scratch to train from a size preset")
    publish.require_missing_or_overwrite(output, L.overwrite, artifacts.LLM, [tokens, base_model])
    manifest = artifacts.read_manifest(tokens, artifacts.TOKENS, artifacts.TOKENS_VERSION)
    try:  # Tokens of LM ids (tokenize.audio_tokenizer.codebook_offsets) say where the audio ids live
        mode, offset = audio_token_settings(manifest.get("audio_tokenizer"), L.audio_tokens, L.audio_token_offset)
    except ValueError as err:
        raise TrainLLMError(f"{tokens}: {err}") from None
    if (mode, offset) != (L.audio_tokens, L.audio_token_offset):
        L = L.model_copy(update={"audio_tokens": mode, "audio_token_offset": offset})
        cfg = cfg.model_copy(update={"llm": L})
    dtype = resolve_dtype(T.dtype)
    acc = make_accelerator(T, dtype)
    lease = output_lock.acquire(acc, [output], "llm")  # released after publishing
    if acc.is_main_process:
        log.info("train llm: %s -> %s\n%s", tokens, output, dump_config(cfg))
    tokens_dir = storage.local_copy(tokens)
    artifacts.verify_shards(tokens_dir, manifest, tokens)
    tokenizer, vocab, base_text_size = _vocab(tokens_dir, manifest, cfg)
    base_path = str(storage.local_copy(base_model)) if L.init == "pretrained" else None
    if base_path is not None:
        check_base_dir(Path(base_path))
        check_base_tokenizer(Path(base_path), base_model, cfg.tokenize.max_base_tokenizer_mb,
                             cfg.tokenize.max_base_vocab)
        _check_tokenizer(tokens, manifest, tokenizer, base_path, L.trust_remote_code)
        vocab = _fit_vocab(vocab, Path(base_path), tokens)

    seed_everything(cfg.run.seed)
    load_dtype = torch.bfloat16 if (dtype == "bf16" and L.mode == "lora") else torch.float32
    model, info = build_lm(L, vocab, base_path, load_dtype, base_text_size)
    base_fp = info.get("fingerprint") or fingerprint_model(model)
    if L.mode == "lora":
        model = apply_lora(model, L.lora, info["new_token_ids"])
    trainable, total = count_parameters(model)
    log.info("parameters: %d trainable of %d", trainable, total)

    own_examples = getattr(model, "load_examples", None)  # a model fed more than ids (Kimi-Audio) lays out its own
    packing = False if own_examples else resolve_packing(T.packing, info["attn_implementation"])
    load = own_examples or load_examples
    train_ex, train_stats = load(tokens_dir / "train", vocab, L.layout, L.max_seq_len, L.overlong)
    val_ex, val_stats = load(tokens_dir / "val", vocab, L.layout, L.max_seq_len, L.overlong, repeat=False)
    for split, stats in (("train", train_stats), ("val", val_stats)):
        check_dropped(f"{tokens} {split}", stats["rows"], stats["dropped_overlong"],
                      f"longer than llm.max_seq_len={L.max_seq_len}", "llm.train.max_drop_fraction",
                      T.max_drop_fraction, "raise llm.max_seq_len, set llm.overlong=truncate")
    if not train_ex:
        raise TrainLLMError(f"{tokens}: no training sequences for layout {L.layout!r} ({train_stats})")
    batches = batches_class_for(train_ex)  # Kimi-Audio's two-stream examples have batches of their own
    train_data = batches(train_ex, vocab, T, cfg.run.seed, acc.process_index, acc.num_processes, packing)
    val_data = batches(val_ex, vocab, T, cfg.run.seed, acc.process_index, acc.num_processes, packing,
                       shuffle=False) if val_ex else None

    with lease, tempfile.TemporaryDirectory(prefix="audiotune-llm-") as tmp, \
            tracking.stage_run(cfg.tracking, "llm") as tracker:
        tracker.log_params({"llm": L.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json")})
        tracker.log_params({"data.train_sequences": len(train_ex), "data.val_sequences": len(val_ex),
                            "data.packing": packing, "model.trainable_parameters": trainable,
                            "model.total_parameters": total, "data.dropped_overlong": train_stats.get(
                                "dropped_overlong", 0), "data.truncated": train_stats.get("truncated", 0)})
        engine = Engine(
            train=T, accelerator=acc, model=model,
            param_groups=decay_groups(list(model.named_parameters()), T.lr, T.weight_decay, "llm"),
            loss_fn=getattr(model, "loss_fn", llm_loss), train_data=train_data, val_data=val_data, output=output,
            tracker=tracker,
            work_dir=Path(tmp), seed=cfg.run.seed, identity=_identity(cfg, manifest, base_fp),
        )
        engine.maybe_resume()
        state = engine.fit()
        state_dict = acc.get_state_dict(engine.model)
        result_manifest = None
        metrics = _final_metrics(state, train_stats, val_stats)
        if acc.is_main_process:
            tracker.log_metrics(tracking.final_metrics(metrics))
            with publish.publish_dir(output, overwrite=L.overwrite, kind=artifacts.LLM,
                                     inputs=[tokens, base_model]) as staging:
                write_llm_files(staging, acc.unwrap_model(engine.model), state_dict, L.mode, tokenizer, vocab,
                                base_fp, metrics, state.history, tracker)
                result_manifest = artifacts.write_manifest(
                    staging, artifacts.LLM, artifacts.LLM_VERSION,
                    tokens=tokens, base_model=base_model, init=L.init, preset=L.preset if L.init == "scratch" else None,
                    mode=L.mode, base_fingerprint=base_fp, vocab=vocab.to_dict(), packing=packing,
                    embedding_rows=info["embedding_rows"], base_vocab_size=info["base_vocab_size"],
                    new_token_ids=len(info["new_token_ids"]), attn_implementation=info["attn_implementation"],
                    trainable_parameters=trainable, total_parameters=total,
                    checkpoints=checkpoints.checkpoints_uri(output), steps=state.step,
                    dataset_fingerprint=manifest.get("dataset_fingerprint"), metrics=metrics,
                    config=L.model_dump(mode="json"),
                )
        acc.wait_for_everyone()
    return TrainResult(output=output, metrics=metrics, manifest=result_manifest)


def _identity(cfg: AudiotuneConfig, manifest: dict[str, Any], base_fp: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint's run must share with this one to be resumed: the llm settings (the base by its
    fingerprint rather than its URI), the seed, the Tokens (their dataset and how it was tokenized)."""
    tokens = {k: manifest.get(k) for k in ("text_tokenizer", "audio_tokenizer", "splits", "config")}
    return checkpoints.run_identity(
        "llm", cfg.llm.model_dump(mode="json"), free=("base_model",), seed=cfg.run.seed,
        dataset_fingerprint=manifest.get("dataset_fingerprint"), base_checksum=base_fp.get("checksum"),
        tokens=hashlib.blake2b(json.dumps(tokens, sort_keys=True).encode(), digest_size=16).hexdigest(),
    )


def write_llm_files(staging: Path, model, state_dict: dict, mode: str, tokenizer, vocab: AudioVocab,
                    base_fp: dict[str, Any], metrics: dict[str, Any], history: list[dict], tracker) -> None:
    """Everything of an LLM model artifact but its manifest: the adapter (LoRA) or full model in Hugging Face
    layout, the tokenizer with the segment markers, the vocabulary layout, the base fingerprint, metrics,
    history and loss curve (the last two also logged to the stage's MLflow run)."""
    save_kwargs = {"save_embedding_layers": False} if mode == "lora" else {}
    model.save_pretrained(str(staging), state_dict=state_dict, **save_kwargs)
    tokenizer.save_pretrained(str(staging))
    (staging / "vocab.json").write_text(json.dumps(vocab.to_dict(), indent=2) + "\n")
    (staging / "base_fingerprint.json").write_text(json.dumps(base_fp, indent=2) + "\n")
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (staging / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    loss_curve(history, staging / "loss_curve.png")
    tracker.log_artifact(staging / "loss_curve.png")
    tracker.log_artifact(staging / "metrics.json")


def _final_metrics(state, train_stats: dict, val_stats: dict) -> dict[str, Any]:
    losses = [h["loss"] for h in state.history if "loss" in h]
    vals = [h["val_loss"] for h in state.history if "val_loss" in h]
    return {
        "steps": state.step,
        "tokens_per_s": _mean([h["tokens_per_s"] for h in state.history if "tokens_per_s" in h]),
        "samples_per_s": _mean([h["samples_per_s"] for h in state.history if "samples_per_s" in h]),
        "peak_memory_mb": max((h["peak_memory_mb"] for h in state.history if "peak_memory_mb" in h), default=None),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "val_loss": vals[-1] if vals else None,
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "train_sequences": train_stats.get("rows"),
        "dropped_overlong": train_stats.get("dropped_overlong", 0),
        "truncated": train_stats.get("truncated", 0),
        "val_sequences": val_stats.get("rows"),
        "val_dropped_overlong": val_stats.get("dropped_overlong", 0),
        "val_truncated": val_stats.get("truncated", 0),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
