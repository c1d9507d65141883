"""What each pipeline component does; the component bodies (``components/``) are thin calls into here.

Every function takes the config mapping a task received, validates it with the one schema (a
bad config fails the task at once, naming the field) and calls the stage recipe. Training runs
under ``torchrun`` (see :func:`train`); everything else runs in the task's process.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audiotune import artifacts, storage
from audiotune.config import AudiotuneConfig, ConfigError, dump_config, validate
from audiotune.errors import AudiotuneError
from audiotune.orchestration import params, runs
from audiotune.orchestration.source_fingerprint import source_fingerprint

log = logging.getLogger(__name__)

CONVERT_SECTIONS = ("run", "tracking", "convert")
# a "section.field" entry ships one field of another section: the tokenize stage splits a MOSS-TTSD import into
# train/val with convert.val_fraction, so it travels to (and keys the cache of) the tokenize task
TOKENIZE_SECTIONS = ("run", "tracking", "tokenize", "convert.val_fraction")


class StepError(AudiotuneError, RuntimeError):
    """A pipeline step failed (a training process exited non-zero, an input is unusable)."""


@dataclass
class Outcome:
    """What a step hands back to its component.

    Attributes:
        metrics: The stage's key figures (numbers only), for the task's Metrics artifact.
        metadata: Extra metadata for the output artifact (where it lives, its kind, ...).
        run_id: The MLflow run of the stage, when the component reports it.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""


SECRETS_DIR = "/var/run/secrets/audiotune"  # where the pipeline mounts cluster.extra_secrets (one folder each)


def setup(secrets_dir: str = SECRETS_DIR, workspace: str = "") -> None:
    """Set up a component process: INFO logging to stderr (the task log in the Kubeflow UI), the keys of the
    mounted extra Secrets as environment variables (where not already set), as the PyTorchJob pods get them, and
    with a KFP workspace (``workspace``: its path in this pod) the model cache there (unless a PVC is mounted)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if workspace:
        cache = os.path.join(workspace, "cache")
        os.environ.setdefault("XDG_CACHE_HOME", cache)
        os.environ.setdefault("HF_HOME", os.path.join(cache, "huggingface"))
    root = Path(secrets_dir)
    for path in sorted(root.glob("*/*")) if root.is_dir() else []:
        if path.name.startswith(".") or not path.is_file():
            continue
        os.environ.setdefault(path.name, path.read_text(encoding="utf-8").strip())


def record(outcome: Outcome, artifact: Any, metrics: Any) -> None:
    """Put an outcome into a task's output artifact metadata and its Metrics artifact (if given)."""
    artifact.metadata.update({k: v for k, v in outcome.metadata.items() if v is not None})
    if metrics is not None:
        for name, value in outcome.metrics.items():
            metrics.log_metric(name, value)
        # the figures also as the artifact's file: a Metrics artifact without one is "missing" to the
        # kfp.local cache, which then never reuses the task
        os.makedirs(os.path.dirname(metrics.path), exist_ok=True)
        with open(metrics.path, "w", encoding="utf-8") as f:
            json.dump(outcome.metrics, f, indent=1, sort_keys=True)


def numeric(data: dict[str, Any], keys: tuple[str, ...], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of ``data[key]`` for each key, flattened to ``a_b`` names (None and text skipped)."""
    out: dict[str, float] = {}
    for key in keys:
        value = data.get(key)
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(numeric(value, tuple(value), f"{name}_"))
    return out


def to_json(cfg: AudiotuneConfig, sections: tuple[str, ...] | None = None) -> str:
    """A config as the JSON that travels between tasks: the fields it sets (so that re-validating it gives the
    same config, unset fields included), keys sorted (a stable cache key), optionally only some sections
    (``"section.field"``: that one field of a section)."""
    data = params.set_fields(cfg)
    if sections is not None:
        picked: dict[str, Any] = {}
        for name in sections:
            section, _, field = name.partition(".")
            if section not in data:
                continue
            if not field:
                picked[section] = data[section]
            elif field in data[section]:
                picked.setdefault(section, {})[field] = data[section][field]
        data = picked
        if "tracking" in data:
            data["tracking"].pop("parent_run_id", None)  # not an input of a cached task: see runs.py
    return json.dumps(data, sort_keys=True)


def load(config: str | dict[str, Any], origin: str) -> AudiotuneConfig:
    """Validate a task's config (JSON text or a mapping); a bad one fails the task naming the field."""
    if isinstance(config, str):
        try:
            config = json.loads(config) if config.strip() else {}
        except json.JSONDecodeError as err:
            raise ConfigError(f"{origin}: not valid JSON ({err})") from None
    return validate(config, origin)


# --------------------------------------------------------------------------------------- prepare


@dataclass
class Prepared:
    """The resolved run: what the first task hands to the rest of the DAG."""

    config: str
    convert_config: str
    tokenize_config: str
    parent_run_id: str
    mode: str
    run_joint: bool
    source_uri: str
    source_format: str
    base_model_uri: str
    llm_base_model_uri: str
    base_flow_uri: str
    source_fingerprint: str


def joint_enabled(cfg: AudiotuneConfig) -> bool:
    """Whether the joint stage runs: mode both, and joint epochs > 0 (0 skips it, whatever max_steps says)."""
    return cfg.pipeline.mode == "both" and cfg.joint.enabled


def prepare(config: dict[str, Any], typed: dict[str, Any], pipeline_run_id: str) -> Prepared:
    """Resolve and validate the run's config, fingerprint the source, open the MLflow parent run."""
    from audiotune.train import sizing

    cfg, notes = params.resolve(config, typed)
    sizing.check(cfg)  # what the training tasks would only find out after convert and tokenize
    for note in notes:
        log.warning("%s", note)
    if not cfg.convert.source:
        raise StepError("no source data: set the source_uri parameter (or convert.source in config)")
    fingerprint = source_fingerprint(cfg.convert.source, cfg.convert.val_source)
    log.info("pipeline run %s, mode %s, source %s (%s)\n%s", pipeline_run_id, cfg.pipeline.mode,
             cfg.convert.source, fingerprint, dump_config(cfg))
    parent = runs.start(cfg, pipeline_run_id, typed)
    cfg.tracking.parent_run_id = parent
    return Prepared(
        config=to_json(cfg),
        convert_config=to_json(cfg, CONVERT_SECTIONS),
        tokenize_config=to_json(cfg, TOKENIZE_SECTIONS),
        parent_run_id=parent or "",
        mode=cfg.pipeline.mode,
        run_joint=joint_enabled(cfg),
        source_uri=cfg.convert.source,
        source_format=cfg.convert.format or "",
        base_model_uri=cfg.tokenize.base_model or "",
        llm_base_model_uri=cfg.llm.base_model or "",
        base_flow_uri=cfg.flow.base_flow or "",
        source_fingerprint=fingerprint,
    )


# ----------------------------------------------------------------------------------- data stages


def convert(config: str, source_uri: str, source_format: str, output: str) -> Outcome:
    """The convert stage into ``output``; its MLflow run gets a unique name, found again afterwards."""
    from audiotune.stages.convert import convert as run_convert

    cfg = load(config, "convert_data config")
    cfg.tracking.run_name = runs.unique_run_name("convert")
    result = run_convert(cfg, source=source_uri, output=output, fmt=source_format or None)
    report = result.report
    return Outcome(
        metrics=numeric(report, ("rows", "bad_fraction", "hours", "throughput")),
        metadata={"kind": artifacts.DATASET, "fingerprint": result.manifest.get("fingerprint"),
                  "source": source_uri},
        run_id=runs.claim(cfg.tracking, cfg.tracking.run_name, "convert") or "",
    )


def tokenize(config: str, dataset: str, base_model_uri: str, output: str) -> Outcome:
    """The tokenize stage of ``dataset`` into ``output`` (MLflow run as in :func:`convert`)."""
    from audiotune.stages.tokenize import tokenize as run_tokenize

    cfg = load(config, "tokenize_data config")
    cfg.tracking.run_name = runs.unique_run_name("tokenize")
    result = run_tokenize(cfg, dataset=dataset, output=output, base_model=base_model_uri or None)
    report = result.report
    return Outcome(
        metrics=numeric(report, ("rows", "bad_fraction", "audio_hours", "text_tokens", "audio_frames",
                                 "sequence_length_percentiles", "throughput")),
        metadata={"kind": artifacts.TOKENS},
        run_id=runs.claim(cfg.tracking, cfg.tracking.run_name, "tokenize") or "",
    )


def link(config: str, stage_runs: dict[str, str]) -> None:
    """Nest the data stages' MLflow runs (or their cached stand-ins) under the parent run."""
    cfg = load(config, "link_runs config")
    for stage, run_id in stage_runs.items():
        runs.link(cfg.tracking, cfg.tracking.parent_run_id, stage, run_id or None)


# -------------------------------------------------------------------------------------- training


def durable_output(cfg: AudiotuneConfig, pipeline_run_id: str, name: str, workspace: str = "") -> str | None:
    """``<output_uri>/<run.name>/<pipeline run id>/<name>``; without ``pipeline.output_uri``, on one node, the same
    under the KFP workspace (``<workspace>/runs/...``: it outlives a task's retries, not the run); else None."""
    if cfg.pipeline.output_uri:
        return storage.join(cfg.pipeline.output_uri, cfg.run.name, pipeline_run_id, name)
    if workspace and cfg.cluster.num_nodes == 1:
        return storage.join(workspace, "runs", cfg.run.name, pipeline_run_id, name)
    return None


def _complete(uri: str) -> bool:
    return storage.exists(storage.join(uri, artifacts.MANIFEST))


def _train(stage: str, cfg: AudiotuneConfig, pipeline_run_id: str, inputs: dict[str, str],
           outputs: dict[str, tuple[str, str]], output: str, manifest: str | None, workspace: str = "") -> None:
    """Launch ``stage`` unless an earlier attempt already published all its outputs; then put each output into its
    KFP artifact path.

    Args:
        outputs: CLI option → (where the stage writes it, the KFP artifact path it must end up in).
        output: The stage's ``--output``.
        manifest: The task's ``job_manifest`` artifact path (the PyTorchJob's manifest, or a note), or None.
    """
    from audiotune.orchestration.training import LaunchError, launch, write_note

    durable = {opt: target for opt, (target, local) in outputs.items() if target != local}
    if durable and all(_complete(t) for t in durable.values()):
        log.info("%s already published by an earlier attempt of this task: reusing it", ", ".join(durable.values()))
        write_note(manifest, launcher="none", reused=sorted(durable.values()))
    else:
        if any(storage.exists(t) for t in durable.values()):  # half-published by a failed attempt (S3)
            cfg = cfg.model_copy(update={stage: getattr(cfg, stage).model_copy(update={"overwrite": True})})
        extra = {opt: target for opt, (target, _) in outputs.items() if opt != "--output"}
        try:
            launch(stage, cfg, {**inputs, **extra}, output, pipeline_run_id,
                   durable_output(cfg, pipeline_run_id, "", workspace), manifest)
        except LaunchError as err:
            raise StepError(str(err)) from None
    for target, local in outputs.values():
        if target != local:
            storage.download(target, local)


def _manifest(uri: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(uri, artifacts.MANIFEST)))


def train(stage: str, config: str, pipeline_run_id: str, output: str, inputs: dict[str, str],
          manifest: str | None = None, workspace: str = "") -> Outcome:
    """Train ``stage`` (llm | flow) into the KFP artifact path ``output``.

    With ``pipeline.output_uri`` the stage writes to a durable location first (its checkpoints beside it), so that a
    retried task resumes instead of starting over and a retry after a successful publish reuses the result; the
    artifact is then copied to ``output``.

    Args:
        stage: Which training stage.
        config: The run's config (JSON, with ``tracking.parent_run_id``).
        pipeline_run_id: The Kubeflow run id (stable across retries of a task).
        output: Local path of the task's output Model artifact.
        inputs: CLI options and their URIs, e.g. ``{"--tokens": ..., "--base-model": ...}``.
        manifest: Local path of the task's ``job_manifest`` artifact: the PyTorchJob's manifest (several nodes)
            or a YAML note of the torchrun command (one node).
        workspace: The KFP workspace's path in this pod, or empty (see :func:`durable_output`).
    """
    cfg = load(config, f"train_{stage} config")
    target = durable_output(cfg, pipeline_run_id, stage, workspace) or output
    _train(stage, cfg, pipeline_run_id, inputs, {"--output": (target, output)}, target, manifest, workspace)
    manifest = _manifest(output)
    metrics = manifest.get("metrics") or {}
    return Outcome(metrics=numeric(metrics, tuple(metrics)),
                   metadata={"kind": manifest.get("kind"), "uri": target, "steps": manifest.get("steps")})


def train_joint(config: str, pipeline_run_id: str, tokens: str, llm: str, flow: str,
                llm_output: str, flow_output: str, manifest: str | None = None, workspace: str = "") -> Outcome:
    """Train the LLM and the flow together into the two KFP artifact paths (durable copies as in :func:`train`)."""
    cfg = load(config, "train_joint config")
    base = durable_output(cfg, pipeline_run_id, "joint", workspace)
    targets = {"--llm-output": (storage.join(base, "llm") if base else llm_output, llm_output),
               "--flow-output": (storage.join(base, "flow") if base else flow_output, flow_output)}
    _train("joint", cfg, pipeline_run_id, {"--tokens": tokens, "--llm": llm, "--flow": flow}, targets,
           base or os.path.dirname(llm_output.rstrip("/")), manifest, workspace)
    metrics_file = os.path.join(flow_output, "metrics.json")
    metrics = json.loads(Path(metrics_file).read_text()) if os.path.exists(metrics_file) else {}
    return Outcome(metrics=numeric(metrics, tuple(metrics)),
                   metadata={"kind": "audiotune.joint", "uri": base or llm_output,
                             "steps": _manifest(llm_output).get("metrics", {}).get("steps_joint")})


# ---------------------------------------------------------------------------------------- export


def export(config: str, pipeline_run_id: str, output: str, llm: str | None, flow: str | None,
           tokens: str | None) -> Outcome:
    """Export (merge, verify, package, register) into ``output`` or the durable location.

    The parent MLflow run is tagged with where the export, its samples and its registered
    version are, which is what ``audiotune run --local`` and ``submit --promote`` read.
    """
    from audiotune.stages.export import export as run_export

    cfg = load(config, "export_model config")
    target = durable_output(cfg, pipeline_run_id, "export") or output
    if cfg.evaluate.enabled and llm and flow:  # the evaluate task registers it, with the eval metrics
        cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"registered_model_name": None})})
    result = run_export(cfg, target, llm=llm, flow=flow, tokens=tokens)
    version = result.registered_version
    runs.set_tags(cfg.tracking, cfg.tracking.parent_run_id, {
        "audiotune.export_uri": target, "audiotune.samples_uri": storage.join(target, "samples"),
        **({runs.VERSION_TAG: version} if version else {}),
    })
    return Outcome(metrics=numeric(result.metrics or {}, tuple(result.metrics or {})),
                   metadata={"kind": "audiotune.export", "uri": target,
                             "registered_version": str(version) if version else ""})


# ---------------------------------------------------------------------------------------- evaluate


def evaluate(config: str, pipeline_run_id: str, output: str, model: str, workspace: str = "") -> Outcome:
    """Evaluate the export into ``output`` or the durable location, and register it with the eval metrics.

    The parent MLflow run is tagged with the Eval and the registered version (what ``submit --promote`` reads).
    An export that cannot speak from text (llm-only, flow-only) is not evaluated: it registered at export.
    """
    from audiotune.stages.evaluate import evaluate as run_evaluate

    cfg = load(config, "evaluate_model config")
    manifest = artifacts.read_manifest(model, artifacts.EXPORT, artifacts.EXPORT_VERSION)
    if not cfg.evaluate.enabled or not (manifest.get("llm") and manifest.get("flow")):
        log.info("evaluate: skipped (%s)", "evaluate.enabled is off" if not cfg.evaluate.enabled else
                 "the export cannot synthesize from text: it has no LLM or no flow")
        return Outcome(metadata={"kind": "audiotune.eval", "uri": "", "registered_version": ""})
    target = durable_output(cfg, pipeline_run_id, "eval", workspace) or output
    result = run_evaluate(cfg, model, target)
    version = result.registered_version
    runs.set_tags(cfg.tracking, cfg.tracking.parent_run_id, {
        "audiotune.eval_uri": target, **({runs.VERSION_TAG: version} if version else {})})
    return Outcome(metrics={k: float(v) for k, v in result.means().items()},
                   metadata={"kind": "audiotune.eval", "uri": target,
                             "eval_set_fingerprint": result.manifest["eval_set_fingerprint"],
                             "registered_version": str(version) if version else ""})


# ---------------------------------------------------------------------------------------- finish


def finish(config: dict[str, Any], typed: dict[str, Any], pipeline_run_id: str,
           status: dict[str, Any]) -> None:
    """End the parent run from the exit handler (the pipeline's config may itself be what failed)."""
    from audiotune.config import ConfigError, TrackingConfig

    try:
        tracking_cfg = params.resolve(config, typed)[0].tracking
    except ConfigError:
        raw = (config or {}).get("tracking") or {}
        tracking_cfg = TrackingConfig(uri=raw.get("uri"), experiment=raw.get("experiment")
                                      or typed.get("mlflow_experiment") or "audiotune",
                                      enabled=raw.get("enabled", True))
    state = str(status.get("state") or "")
    error = (status.get("error") or {}).get("message")
    runs.finish(tracking_cfg, pipeline_run_id, state, error)
