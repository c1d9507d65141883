"""The export stage: LLM and/or Flow artifacts → one package a user can ship, uploaded and registered.

Recipe: read the inputs → LLM: check the base is the one trained on, merge LoRA in the base's dtype,
prove the merge on a validation probe batch, save in ``save_pretrained`` layout (+ the adapter-only
variant), reload and compare → flow: strict load, copy → tokenizers → samples synthesized end to
end (LLM → flow → vocoder) → model card and manifest → publish atomically to the output URI → MLflow:
log the package, register a version tagged with data fingerprint, base model, code version and
metrics (a registry failure leaves the published export complete).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from audiotune import __version__, artifacts, publish, storage, tracking
from audiotune.config import AudiotuneConfig, dump_config
from audiotune.export.merge import (
    ExportError,
    Verification,
    base_dtype,
    check_base,
    check_reload,
    merge_llm,
    save_merged,
)
from audiotune.export.samples import render_samples
from audiotune.models.vocab import AudioVocab

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "codebooks.json", "codebooks.safetensors",
                 "tokenizer.json", "tokenizer_config.json", "vocab.json", "base_fingerprint.json")
FLOW_FILES = ("config.json", "model.safetensors", "speakers.json", "speaker_embeddings.safetensors", "mel.json",
              "manifest.json", "metrics.json",
              # a release flow (CosyVoice / Step-Audio-EditX) in the upstream layout, LoRA merged by the flow stage
              "flow.pt", "hift.pt", "cosyvoice.yaml", "cosyvoice2.yaml", "cosyvoice3.yaml", "release.json",
              "release_flow.json")


@dataclass
class ExportResult:
    """What the stage produced."""

    output: str
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    registered_version: str | None


def export(cfg: AudiotuneConfig, output: str, llm: str | None = None, flow: str | None = None,
           tokens: str | None = None) -> ExportResult:
    """Run the export stage.

    Args:
        cfg: The pipeline config; the ``export`` section drives this stage.
        output: URI of the Export (local path or s3://).
        llm: LLM model artifact URI (absent in flow-only runs).
        flow: Flow model artifact URI (absent in llm-only runs).
        tokens: Tokens artifact URI (probe batch, sample texts, audio tokenizer); default: the one the LLM or
            flow was trained on.
    """
    llm_manifest, flow_manifest, tokens = _setup_inputs(cfg, output, llm, flow, tokens)
    with tempfile.TemporaryDirectory(prefix="audiotune-export-") as tmp:
        tokens_dir = _tokens_dir(tokens, Path(tmp))
        package = Path(tmp) / "package"
        package.mkdir()
        verification = _export_llm(cfg, llm, llm_manifest, tokens_dir, package) if llm else None
        if flow:
            _export_flow(flow, package / "flow")
        if tokens_dir is not None and (tokens_dir / "tokenizer" / "audio").is_dir():
            shutil.copytree(tokens_dir / "tokenizer" / "audio", package / "audio_tokenizer")
        samples = render_samples(cfg.export, package, tokens_dir)
        metrics = _metrics(llm_manifest, flow_manifest, verification, samples, package)
        fields = _describe(cfg, output, package, (llm, flow, tokens), (llm_manifest, flow_manifest), tokens_dir,
                           verification, samples, metrics)
        with publish.publish_dir(output, overwrite=cfg.export.overwrite, kind=artifacts.EXPORT,
                                 inputs=[llm, flow, tokens]) as staging:
            shutil.copytree(package, staging, dirs_exist_ok=True)
            manifest = artifacts.write_manifest(staging, artifacts.EXPORT, artifacts.EXPORT_VERSION, **fields)
        (package / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # for the MLflow copy
        log.info("exported %s (%.1f MiB)", output, metrics["package_mb"])
        version = _track_and_register(cfg, output, package, manifest, metrics)
    return ExportResult(output=output, metrics=metrics, manifest=manifest, registered_version=version)


def _setup_inputs(cfg: AudiotuneConfig, output: str, llm: str | None, flow: str | None,
                  tokens: str | None) -> tuple[dict | None, dict | None, str | None]:
    """The inputs' manifests and the Tokens to read; nothing to export, a registry without tracking or an
    output to keep refused before any work."""
    E = cfg.export
    if not llm and not flow:
        raise ExportError("nothing to export: give an LLM artifact (--llm), a Flow artifact (--flow), or both")
    if E.registered_model_name and not cfg.tracking.enabled:
        raise ExportError("export.registered_model_name needs tracking (tracking.enabled=true): the registry is "
                          "MLflow's")
    publish.require_missing_or_overwrite(output, E.overwrite, artifacts.EXPORT, [llm, flow, tokens])
    llm_manifest = artifacts.read_manifest(llm, artifacts.LLM, artifacts.LLM_VERSION) if llm else None
    flow_manifest = artifacts.read_manifest(flow, artifacts.FLOW, artifacts.FLOW_VERSION) if flow else None
    tokens = tokens or (llm_manifest or {}).get("tokens") or (flow_manifest or {}).get("tokens")
    log.info("export: llm=%s flow=%s tokens=%s -> %s\n%s", llm, flow, tokens, output, dump_config(cfg))
    return llm_manifest, flow_manifest, tokens


def _describe(cfg: AudiotuneConfig, output: str, package: Path, uris: tuple, manifests: tuple,
              tokens_dir: Path | None, verification: Verification | None, samples: list,
              metrics: dict[str, Any]) -> dict[str, Any]:
    """The manifest's fields; writes ``verification.json`` and the model card (``README.md``) into the package."""
    from audiotune.export.card import model_card, verification_record

    (llm, flow, tokens), (llm_manifest, flow_manifest) = uris, manifests
    data = _data_summary(tokens, tokens_dir)
    name = cfg.export.registered_model_name or cfg.run.name
    fields = dict(
        name=name, uri=output, llm=llm, flow=flow, tokens=tokens, code_version=_code_version(),
        base_model=(llm_manifest or {}).get("base_model"), mode=(llm_manifest or {}).get("mode"),
        dataset_fingerprint=(llm_manifest or flow_manifest or {}).get("dataset_fingerprint"),
        verification=verification.to_dict() if verification else None, samples=samples, data=data,
        metrics=metrics, registered_model_name=cfg.export.registered_model_name,
    )
    record = verification_record(fields["verification"], llm_manifest, flow_manifest)
    (package / "verification.json").write_text(json.dumps(record, indent=2) + "\n")
    (package / "README.md").write_text(model_card(name, {**fields, "audiotune_version": __version__},
                                                  llm_manifest, flow_manifest, data, samples))
    fields["contents"] = sorted([*(p.name for p in package.iterdir()), "manifest.json"])
    return fields


# ------------------------------------------------------------------------------------------------------ inputs
TOKENS_PARTS = ("manifest.json", "report.json", "tokenizer/", "val/")


def _tokens_dir(tokens: str | None, work: Path) -> Path | None:
    """A local folder with the parts of the Tokens the export reads (not every training shard)."""
    if not tokens:
        return None
    try:
        artifacts.read_manifest(tokens, artifacts.TOKENS, artifacts.TOKENS_VERSION)
    except artifacts.ArtifactError as err:
        log.warning("no usable Tokens (%s): the merge probe uses random ids and samples use default texts", err)
        return None
    if not storage.is_s3(tokens):
        return Path(tokens)
    local = work / "tokens"
    files = storage.list_files(tokens)
    wanted = [f for f in files if f.startswith(TOKENS_PARTS) or f in TOKENS_PARTS]
    if not any(f.startswith("val/part-") for f in files):  # no validation split: one training shard will do
        wanted += [f for f in files if f.startswith("train/part-")][:1]
    for rel in wanted:
        storage.download(storage.join(tokens, rel), local / rel)
    log.info("fetched %d of the %d files of %s", len(wanted), len(files), tokens)
    return local


def _probe(vocab: AudioVocab, manifest: dict[str, Any], tokens_dir: Path | None, count: int,
           seed: int) -> dict[str, torch.Tensor]:
    """A fixed batch of validation sequences (train when there is no val split; random ids without Tokens)."""
    from audiotune.train.batching import collate_padded
    from audiotune.train.llm_data import load_examples

    examples = []
    config = manifest.get("config") or {}
    if tokens_dir is not None:
        for split in ("val", "train"):
            examples, _ = load_examples(tokens_dir / split, vocab, config.get("layout", "auto"),
                                        int(config.get("max_seq_len", 2048)), "truncate", repeat=False)
            if examples:
                break
    if examples:
        examples = sorted(examples, key=lambda e: e.id)[:count]
        channel_pad = vocab.channel_pad_id if vocab.num_codebooks > 1 else None
        batch = collate_padded(examples, vocab.pad_id, channel_pad)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab.lm_vocab_size, (count, 32), generator=gen)
    if vocab.num_codebooks > 1:
        extra = torch.randint(0, vocab.codebook_size, (count, 32, vocab.num_codebooks - 1), generator=gen)
        ids = torch.cat([ids[..., None], extra], dim=-1)
    return {"input_ids": ids, "attention_mask": torch.ones(count, 32, dtype=torch.long)}


# --------------------------------------------------------------------------------------------------------- LLM
def _export_llm(cfg: AudiotuneConfig, llm: str, manifest: dict[str, Any], tokens_dir: Path | None,
                package: Path) -> Verification | None:
    from transformers import AutoTokenizer

    E = cfg.export
    artifact = storage.local_copy(llm)
    vocab = AudioVocab.from_dict(manifest["vocab"])
    tokenizer = AutoTokenizer.from_pretrained(str(artifact), trust_remote_code=False)
    out = package / "llm"
    verification = None
    if manifest.get("mode") == "lora":
        base_uri = E.base_model or manifest.get("base_model")
        if not base_uri:
            raise ExportError(f"{llm} is a LoRA adapter without a recorded base model; set export.base_model")
        if not storage.exists(storage.join(base_uri, "config.json")):
            raise ExportError(f"base model {base_uri} is missing (no config.json there); set export.base_model")
        base_path = storage.local_copy(base_uri)
        check_base(manifest.get("base_fingerprint"), base_path, base_uri)
        dtype = base_dtype(base_path, E.dtype)
        probe = _probe(vocab, manifest, tokens_dir, E.probe_samples, cfg.run.seed)
        merged, verification = merge_llm(artifact, manifest, base_path, dtype, probe, E.verify_tolerance)
        merged.config.use_cache = True  # for generation by users; training set it off
        save_merged(merged, base_path, out, E.max_shard_size)  # in the base family's layout
        if E.verify_reload:
            check_reload(out, merged, probe, dtype, verification)
        del merged
        if E.keep_adapter:
            (package / "llm-adapter").mkdir()
            for name in ADAPTER_FILES:
                if (artifact / name).is_file():
                    shutil.copy2(artifact / name, package / "llm-adapter" / name)
    else:
        from audiotune.export.merge import load_full

        load_full(artifact, base_dtype(artifact, E.dtype))  # it loads as saved
        shutil.copytree(artifact, out, ignore=shutil.ignore_patterns("manifest.json", "history.json", "*.png",
                                                                     "metrics.json", "README.md"))
    tokenizer.save_pretrained(str(out))
    (out / "vocab.json").write_text(json.dumps(vocab.to_dict(), indent=2) + "\n")
    return verification


def _export_flow(flow: str, out: Path) -> None:
    from audiotune.models.flow import FlowLoadError, load_flow
    from audiotune.models.flow.adapt import has_lora

    try:
        model = load_flow(flow)  # strict: a plain flow, LoRA merged and EMA weights in place by the flow stage
    except FlowLoadError as err:
        raise ExportError(f"{flow}: not a plain flow model ({err}); the flow stage writes its LoRA merged into "
                          "the weights and its EMA weights as the model") from None
    if has_lora(model):
        raise ExportError(f"{flow} still carries LoRA layers; the flow stage merges them into the weights")
    source = storage.local_copy(flow)
    out.mkdir(parents=True)
    for name in FLOW_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)


# ---------------------------------------------------------------------------------------------------- metadata
def _data_summary(tokens: str | None, tokens_dir: Path | None) -> dict[str, Any]:
    """Figures of the data the models were trained on: the Tokens report and the Dataset report behind it."""
    if tokens_dir is None or not (tokens_dir / "report.json").is_file():
        return {}
    report = json.loads((tokens_dir / "report.json").read_text())
    manifest = json.loads((tokens_dir / "manifest.json").read_text())
    rows = report.get("rows") or {}
    summary: dict[str, Any] = {
        "tokens": tokens, "dataset": manifest.get("dataset"),
        "text_tokenizer": (manifest.get("text_tokenizer") or {}).get("kind"),
        "audio_tokenizer": (manifest.get("audio_tokenizer") or {}).get("type"),
        "speakers": manifest.get("speakers"), "dataset_fingerprint": manifest.get("dataset_fingerprint"),
        "audio_hours": report.get("audio_hours"), "audio_tokens_per_second": report.get("audio_tokens_per_second"),
    }
    for key in ("train", "val", "quarantined"):
        if key in rows:
            summary[f"rows_{key}"] = rows[key]
    dataset = _dataset_report(manifest.get("dataset"))
    if dataset:
        hours = dataset.get("hours") or {}
        summary.update({
            "source": dataset.get("source"), "source_format": dataset.get("format"),
            "sample_rate": dataset.get("sample_rate"), "hours_train": hours.get("train"),
            "hours_val": hours.get("val"), "source_rows": (dataset.get("rows") or {}).get("input"),
            "source_rows_quarantined": (dataset.get("rows") or {}).get("quarantined"),
            "tasks": dataset.get("tasks"),
        })
    return {k: v for k, v in summary.items() if v is not None}


def _dataset_report(dataset: str | None) -> dict[str, Any] | None:
    """The Dataset's report.json (a small file; the Dataset itself is not downloaded), or None."""
    if not dataset:
        return None
    try:
        return json.loads(storage.read_text(storage.join(dataset, "report.json")))
    except (OSError, ValueError) as err:  # moved or deleted since tokenization: the card does without it
        log.warning("no Dataset report at %s (%s): the model card leaves its figures out", dataset, err)
        return None


def _metrics(llm: dict | None, flow: dict | None, verification: Verification | None, samples: list,
             package: Path) -> dict[str, Any]:
    size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file()) / 2**20
    metrics: dict[str, Any] = {"package_mb": round(size, 3), "samples": len(samples)}
    if llm:
        m = llm.get("metrics") or {}
        metrics.update({"llm_val_loss": m.get("val_loss"), "llm_final_loss": m.get("final_loss")})
    if flow:
        m = flow.get("metrics") or {}
        metrics.update({"flow_val_loss": m.get("val_loss"), "flow_final_loss": m.get("final_loss")})
    # the figure champion/challenger compares: the LLM's validation loss, else the flow's
    metrics["val_loss"] = metrics.get("llm_val_loss") if llm else metrics.get("flow_val_loss")
    if verification is not None:
        metrics.update({"merge_max_abs_diff": verification.max_abs_diff,
                        "merge_tolerance": verification.tolerance})
    return {k: v for k, v in metrics.items() if v is not None}


def _base_tag(manifest: dict[str, Any]) -> str:
    """What the registry's ``base_model`` tag says: the LLM's base, or how the models started."""
    if manifest.get("base_model"):
        return str(manifest["base_model"])
    return "scratch" if manifest.get("llm") else "none (flow only)"


def _code_version() -> str:
    import subprocess

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def _tracking_errors() -> tuple[type[BaseException], ...]:
    """What a tracking server or its artifact store raises once a run has started (server gone, store refusing)."""
    from botocore.exceptions import BotoCoreError, ClientError
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return MlflowException, RequestException, BotoCoreError, ClientError, OSError


def _track_and_register(cfg: AudiotuneConfig, output: str, package: Path, manifest: dict[str, Any],
                        metrics: dict[str, Any]) -> str | None:
    """Log the package to the stage's MLflow run and register it; the export itself is already published."""
    E = cfg.export
    try:
        with tracking.stage_run(cfg.tracking, "export") as tracker:
            tracker.log_params({"export": E.model_dump(mode="json"), "inputs": {
                k: manifest.get(k) for k in ("llm", "flow", "tokens", "uri")}})
            tracker.log_metrics(metrics)
            # the registry accepts an object-store URI as a version's source, not a local path: a local export is
            # always logged whole; a large one on S3 is registered where it was uploaded
            small = metrics["package_mb"] <= E.log_weights_max_mb or not storage.is_s3(output)
            if small:
                tracker.log_artifacts(package, "export")
            else:
                for name in ("README.md", "manifest.json", "verification.json"):
                    tracker.log_artifact(package / name, "export")
                if (package / "samples").is_dir():
                    tracker.log_artifacts(package / "samples", "export/samples")
            tracker.set_tags({"audiotune.export_uri": output, "audiotune.code_version": manifest["code_version"]})
            if not E.registered_model_name or not tracker.active:
                return None
            from audiotune.export import registry

            source = f"runs:/{tracker.run_id}/export" if small else output
            version = registry.register(
                cfg.tracking, E.registered_model_name, source, tracker.run_id,
                tags={"dataset_fingerprint": manifest.get("dataset_fingerprint"),
                      "base_model": _base_tag(manifest), "code_version": manifest["code_version"],
                      "export_uri": output, "mode": manifest.get("mode")},
                metrics=metrics)
            tracker.set_tags({"audiotune.registered_model": E.registered_model_name,
                              "audiotune.registered_version": version})
    except (tracking.TrackingError, *_tracking_errors()) as err:
        raise ExportError(f"the export at {output} is complete, but tracking/registering it failed: {err}") from None
    storage.write_text(storage.join(output, "registration.json"), json.dumps(
        {"name": E.registered_model_name, "version": version, "tracking_uri": tracking.resolve_uri(cfg.tracking)},
        indent=2) + "\n")
    return version
