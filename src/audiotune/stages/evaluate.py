"""The evaluate stage: an Export → an Eval artifact, as TTS papers evaluate (seed-tts-eval's protocol).

Recipe: read the export and the eval set (fixed, fingerprinted; overlap with the training rows counted) →
load the metric plug-ins (a metric without its weights is skipped with one line) → synthesize every utterance
(a failure is a row, counted, never dropped) and score it → per-utterance Parquet, summary with 95% bootstrap
intervals, card table, plots, WAVs with transcripts → publish the Eval (the export stays immutable) → MLflow:
metrics and artifacts, and the registered version gets the eval metrics and the card table (registered now when
the export was not).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audiotune import artifacts, publish, storage, tracking
from audiotune.config import AudiotuneConfig, dump_config
from audiotune.evaluation import EvaluationError
from audiotune.evaluation.evalset import EvalItem, EvalSet, count_overlap, dataset_of_export, decode, load_eval_set
from audiotune.evaluation.metrics import Metric, Sample, build_metrics
from audiotune.evaluation.report import card_table, plot_histograms, summarize, write_table

log = logging.getLogger(__name__)

PLOTTED = ["wer", "cer", "sim", "dnsmos_ovrl", "mcd", "f0_rmse", "duration_ratio"]


@dataclass
class EvalResult:
    """What the stage produced."""

    output: str
    summary: dict[str, dict[str, float]]
    manifest: dict[str, Any]
    registered_version: str | None

    def means(self) -> dict[str, float]:
        return {k: v["mean"] for k, v in self.summary.items() if math.isfinite(v["mean"])}


def evaluate(cfg: AudiotuneConfig, model: str, output: str, eval_set: str | None = None,
             register: bool = True) -> EvalResult:
    """Run the evaluate stage.

    Args:
        cfg: The pipeline config; the ``evaluate`` section drives this stage (``export.synthesis`` how it speaks).
        model: URI of the Export.
        output: URI of the Eval artifact (local path or s3://).
        eval_set: A Dataset artifact or JSONL (default ``evaluate.eval_set``, else the export's validation rows).
        register: Record the metrics on the registered version (``export.registered_model_name``).
    """
    E = cfg.evaluate
    publish.require_missing_or_overwrite(output, E.overwrite, artifacts.EVAL, inputs=[model])
    export_manifest = artifacts.read_manifest(model, artifacts.EXPORT, artifacts.EXPORT_VERSION)
    log.info("evaluate: model=%s eval_set=%s -> %s\n%s", model, eval_set or E.eval_set, output, dump_config(cfg))
    items = _setup_data(cfg, export_manifest, eval_set or E.eval_set)
    metrics, skipped = build_metrics(E, E.speaker_model or _tokens_speaker_model(export_manifest))
    with tempfile.TemporaryDirectory(prefix="audiotune-eval-") as tmp:
        work = Path(tmp)
        rows, timing = _run(cfg, storage.local_copy(model), items.items, metrics, work)
        summary = summarize(rows, E.bootstrap, E.seed)
        manifest = _publish(cfg, output, model, export_manifest, items, rows, summary, metrics, skipped, timing,
                            work)
        version = _track(cfg, output, model, export_manifest, manifest, summary, work) if register else None
    log.info("evaluated %s on %d utterances (%d failed):\n%s", model, len(rows), manifest["failures"],
             manifest["card"])
    return EvalResult(output=output, summary=summary, manifest=manifest, registered_version=version)


# ------------------------------------------------------------------------------------------------------ inputs
def _setup_data(cfg: AudiotuneConfig, export_manifest: dict[str, Any], uri: str | None) -> EvalSet:
    items = load_eval_set(uri, export_manifest, cfg.evaluate.max_utterances)
    items.overlap = count_overlap(items, dataset_of_export(export_manifest))
    if items.overlap:
        message = (f"eval set {items.source}: {items.overlap} of its {len(items.items)} utterances are training rows "
                   "of the model (same id, or same text and speaker)")
        if cfg.evaluate.forbid_overlap:
            raise EvaluationError(message + " (evaluate.forbid_overlap is on)")
        log.warning("%s: its scores flatter the model", message)
    log.info("eval set %s: %d utterances, fingerprint %s", items.source, len(items.items), items.fingerprint[:12])
    return items


def _tokens_speaker_model(export_manifest: dict[str, Any]) -> str | None:
    """The CAM++ ONNX model the Tokens were made with (``tokenize.speaker.onnx_path``), if any."""
    tokens = export_manifest.get("tokens")
    if not tokens:
        return None
    try:
        manifest = artifacts.read_manifest(tokens, artifacts.TOKENS, artifacts.TOKENS_VERSION)
    except artifacts.ArtifactError:
        return None
    speaker = (manifest.get("config") or {}).get("speaker") or {}
    return speaker.get("onnx_path") if speaker.get("type") == "onnx" else None


# ------------------------------------------------------------------------------------------------------ scoring
def _run(cfg: AudiotuneConfig, package: Path, items: list[EvalItem], metrics: list[Metric],
         work: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Synthesize and score every item; returns the rows and per-metric (seconds of audio, seconds spent)."""
    from audiotune.export.synthesis import SynthesisError, Synthesizer, write_wav

    try:
        synth = Synthesizer(package, cfg.export.synthesis)
    except SynthesisError as err:
        raise EvaluationError(f"cannot evaluate {package}: {err}") from None
    settings = cfg.export.synthesis
    timing = {m.name: {"audio_s": 0.0, "cpu_s": 0.0} for m in metrics}
    timing["synthesis"] = {"audio_s": 0.0, "cpu_s": 0.0}
    rows = []
    for k, item in enumerate(items):
        row: dict[str, Any] = {"id": item.id, "text": item.text, "speaker": item.speaker, "failed": 0.0}
        prompt = None
        started = time.process_time()
        try:
            if item.prompt_audio:
                prompt = work / "prompts" / f"{k:05d}.wav"
                prompt.parent.mkdir(exist_ok=True)
                prompt.write_bytes(item.prompt_audio)
            speech = synth.synthesize(item.text, prompt_wav=prompt, prompt_text=item.prompt_text,
                                      speaker=item.speaker if prompt is None and _known(synth, item.speaker) else None,
                                      seed=cfg.evaluate.seed + k)
        except (SynthesisError, RuntimeError, ValueError) as err:
            log.warning("utterance %s failed to synthesize: %s", item.id, err)
            rows.append({**row, "failed": 1.0, "bad": 1.0, "error": str(err)[:500]})
            continue
        timing["synthesis"]["cpu_s"] += time.process_time() - started
        timing["synthesis"]["audio_s"] += speech.seconds
        wav_rel = f"wavs/{item.id}.wav"
        write_wav(work / "eval" / wav_rel, speech)
        row.update({"wav": wav_rel, "frames": int(speech.codes.shape[1])})
        rows.append(_score(row, _sample(synth, settings, item, speech), metrics, timing, speech.seconds))
    return rows, timing


def _sample(synth, settings, item: EvalItem, speech) -> Sample:
    """What the metrics score: the speech, its text, reference and prompt audio, and whether it hit the length
    limit (``export.synthesis``: max_audio_s, max_token_text_ratio)."""
    text_ids = synth.tokenizer(item.text, add_special_tokens=False)["input_ids"]
    longest = max(1, min(int(settings.max_audio_s * synth.token_rate),
                         int(settings.max_token_text_ratio * len(text_ids))))
    return Sample(text=item.text, wav=np.asarray(speech.wav, np.float32), rate=speech.sample_rate,
                  reference=decode(item.reference_audio, f"{item.id} reference") if item.reference_audio else None,
                  prompt=decode(item.prompt_audio, f"{item.id} prompt") if item.prompt_audio else None,
                  hit_max_length=int(speech.codes.shape[1]) >= longest)


def _score(row: dict[str, Any], sample: Sample, metrics: list[Metric], timing: dict[str, dict[str, float]],
           seconds: float) -> dict[str, Any]:
    """``row`` with every metric's scores and its ``bad`` flag; each metric's time added to ``timing``."""
    for metric in metrics:
        started = time.process_time()
        row.update(metric.score(sample))
        timing[metric.name]["cpu_s"] += time.process_time() - started
        timing[metric.name]["audio_s"] += seconds
    row["bad"] = float(any(row.get(f, 0.0) for f in ("empty", "truncated", "max_length")))
    return row


def _known(synth, speaker: str | None) -> bool:
    """Whether the flow knows ``speaker`` by name (else the synthesizer's default voice)."""
    from audiotune.export.synthesis import SynthesisError

    if speaker is None:
        return False
    try:
        synth._speaker(speaker)
    except (SynthesisError, OSError):  # not one of the flow's speakers: the default voice
        return False
    return True


# ------------------------------------------------------------------------------------------------------ publish
def _publish(cfg: AudiotuneConfig, output: str, model: str, export_manifest: dict[str, Any], items: EvalSet,
             rows: list[dict[str, Any]], summary: dict[str, dict[str, float]], metrics: list[Metric],
             skipped: dict[str, str], timing: dict[str, dict[str, float]], work: Path) -> dict[str, Any]:
    out = work / "eval"
    out.mkdir(exist_ok=True)
    (out / "plots").mkdir(exist_ok=True)
    write_table(rows, out / "utterances.parquet")
    with open(out / "transcripts.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: r.get(k) for k in ("id", "text", "transcript", "wer", "cer", "wav", "error")
                                if r.get(k) is not None}, ensure_ascii=False) + "\n")
    plot_histograms(rows, PLOTTED, out / "plots" / "histograms.png")
    notes = {m.name: m.note for m in metrics if m.note}
    card = card_table(summary, notes, skipped, items.fingerprint, len(rows))
    (out / "card.md").write_text(card)
    try:  # the export's own model card with the eval table: what the registered version's card says
        export_card = storage.read_text(storage.join(model, "README.md"))
    except OSError:
        export_card = f"# {export_manifest.get('name') or 'model'}\n"
    (out / "model_card.md").write_text(export_card.rstrip() + "\n\n" + card)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    throughput = {name: round(t["audio_s"] / t["cpu_s"], 3) for name, t in timing.items() if t["cpu_s"] > 0}
    fields = dict(
        model=model, model_name=export_manifest.get("name"), eval_set=items.source, eval_set_uri=items.uri,
        eval_set_fingerprint=items.fingerprint, utterances=len(rows),
        failures=int(sum(r["failed"] for r in rows)), overlap_with_training=items.overlap,
        summary=summary, skipped=skipped, notes=notes, card=card, audio_s_per_cpu_s=throughput,
        language=cfg.evaluate.language, synthesis=cfg.export.synthesis.model_dump(mode="json"),
        contents=sorted([*(p.name for p in out.iterdir()), "manifest.json"]),
    )
    with publish.publish_dir(output, overwrite=cfg.evaluate.overwrite, kind=artifacts.EVAL,
                             inputs=[model]) as staging:
        import shutil

        shutil.copytree(out, staging, dirs_exist_ok=True)
        manifest = artifacts.write_manifest(staging, artifacts.EVAL, artifacts.EVAL_VERSION, **fields)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _track(cfg: AudiotuneConfig, output: str, model: str, export_manifest: dict[str, Any],
           manifest: dict[str, Any], summary: dict[str, dict[str, float]], work: Path) -> str | None:
    """Log the Eval to the stage's MLflow run; record it on the registered version (registering the export when
    it is not yet)."""
    from audiotune.export import registry

    name = cfg.export.registered_model_name
    means = {k: v["mean"] for k, v in summary.items() if math.isfinite(v["mean"])}
    version = None
    with tracking.stage_run(cfg.tracking, "evaluate") as tracker:
        tracker.log_params({"evaluate": cfg.evaluate.model_dump(mode="json"), "inputs": {
            "model": model, "eval_set": manifest["eval_set"],
            "eval_set_fingerprint": manifest["eval_set_fingerprint"]}})
        tracker.log_metrics({**means, **{f"{k}_ci_low": v["low"] for k, v in summary.items()
                                         if math.isfinite(v["low"])},
                             **{f"{k}_ci_high": v["high"] for k, v in summary.items() if math.isfinite(v["high"])},
                             "failures": manifest["failures"],
                             "overlap_with_training": manifest["overlap_with_training"]})
        out = work / "eval"
        for rel in ("manifest.json", "summary.json", "card.md", "model_card.md", "utterances.parquet",
                    "transcripts.jsonl"):
            tracker.log_artifact(out / rel, "eval")
        tracker.log_artifacts(out / "plots", "eval/plots")
        if cfg.evaluate.log_wavs and (out / "wavs").is_dir():
            tracker.log_artifacts(out / "wavs", "eval/wavs")
        tracker.set_tags({"audiotune.eval_uri": output, "audiotune.eval_set_fingerprint":
                          manifest["eval_set_fingerprint"]})
        if name and tracker.active:
            source = _registry_source(tracker, model, export_manifest)
            version = registry.record_evaluation(
                cfg.tracking, name, model, export_manifest, source, tracker.run_id, means,
                fingerprint=manifest["eval_set_fingerprint"], eval_uri=output, eval_set_uri=manifest["eval_set_uri"],
                card=manifest["card"])
            tracker.set_tags({"audiotune.registered_model": name, "audiotune.registered_version": version})
    return version


def _registry_source(tracker, model: str, export_manifest: dict[str, Any]) -> str | None:
    """Where a version registered by this stage points: the export on S3, else a copy logged to this run."""
    if storage.is_s3(model):
        return model
    if storage.exists(storage.join(model, "registration.json")):
        return None  # registered already (by `audiotune export`): the version is only tagged
    tracker.log_artifacts(Path(model), "export")
    return f"runs:/{tracker.run_id}/export"


def champion_evaluator(cfg: AudiotuneConfig):
    """``evaluator(export_uri, eval_set_uri) -> (means, fingerprint)`` for the gate: evaluates the champion on the
    challenger's eval set into a temporary Eval (the gate stores the means as the champion version's tags)."""

    def run(export_uri: str, eval_set_uri: str) -> tuple[dict[str, float], str]:
        with tempfile.TemporaryDirectory(prefix="audiotune-champion-eval-") as tmp:
            result = evaluate(cfg, export_uri, str(Path(tmp) / "eval"), eval_set=eval_set_uri, register=False)
        return result.means(), result.manifest["eval_set_fingerprint"]

    return run
