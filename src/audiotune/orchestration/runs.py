"""The MLflow side of a pipeline run: one parent run, a nested run per stage.

How the parent run is handled:

- The first task of the pipeline (``prepare_run``) creates the parent run, tagged with the
  Kubeflow run id (``audiotune.pipeline_run_id``), and hands its id to the training and export
  tasks through their config (``tracking.parent_run_id``); their stage runs nest under it.
- The convert and tokenize tasks are cached by Kubeflow, so their inputs must not change from
  one pipeline run to the next: they do not get the parent run id. Each creates its stage run
  under a unique name, finds it again by that name and returns its id; the ``link_runs`` task
  (never cached) then nests that run under the parent. When Kubeflow served a task from its
  cache, the returned run belongs to the earlier pipeline run: ``link_runs`` records it in a small
  nested run ``<stage> (cached)`` instead of moving it.
- The exit handler (``finish_run``) runs whether the pipeline succeeded or not. An exit task may
  not depend on other tasks, so it finds the parent run by its Kubeflow run id tag, and ends it
  FINISHED or FAILED (with the failed task in a tag).

With the KFP >= 2.17 MLflow plugin (``MLFLOW_RUN_ID`` in every task's pod) the plugin owns the tree: it opens
the parent run and a nested run per task, and ends them. ``prepare_run`` then opens no parent of its own: it logs
the parameters and config into its task run and hands on the plugin's parent; each stage logs into its task's run
(:func:`audiotune.tracking.stage_run`); ``finish_run`` finds no parent of ours and ends nothing.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from audiotune import tracking

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from audiotune.config import AudiotuneConfig, TrackingConfig

log = logging.getLogger(__name__)

PIPELINE_RUN_TAG = "audiotune.pipeline_run_id"
PIPELINE_TAG = "audiotune.pipeline"
CACHED_FROM_TAG = "audiotune.cached_from"
VERSION_TAG = "audiotune.registered_version"  # set by the export task: the version it registered
PIPELINE_NAME = "audiotune-finetune"


def _client(cfg: TrackingConfig) -> MlflowClient:
    return tracking.client_for(cfg)


def start(cfg: AudiotuneConfig, pipeline_run_id: str, params: dict[str, Any]) -> str | None:
    """Create the parent run of pipeline run ``pipeline_run_id``; None when tracking is off.

    It carries the pipeline parameters as run parameters and the resolved config as an artifact.
    """
    tags = {PIPELINE_RUN_TAG: pipeline_run_id, PIPELINE_TAG: PIPELINE_NAME, "audiotune.mode": cfg.pipeline.mode}
    plugin = tracking.plugin_run_id() if tracking.is_active(cfg.tracking) else None
    if plugin:  # the KFP MLflow plugin opened the parent and this task's run: no second tree
        client = _client(cfg.tracking)
        parent = client.get_run(plugin).data.tags.get(tracking.PARENT_TAG)
        tracker = tracking.StageTracker(client, plugin)
        tracker.set_tags({k: v for k, v in tags.items() if k != PIPELINE_RUN_TAG})  # finish() must not find it
        tracker.log_params({f"pipeline.{k}": v for k, v in params.items()})
        tracker.log_dict(cfg.model_dump(mode="json"), "config.json")
        log.info("MLflow: logging into the KFP plugin's run %s (parent %s)", plugin, parent)
        return parent or None
    run_id = tracking.start_parent_run(cfg.tracking, cfg.run.name, tags=tags)
    if run_id is not None:
        tracker = tracking.StageTracker(_client(cfg.tracking), run_id)
        tracker.log_params({f"pipeline.{k}": v for k, v in params.items()})
        tracker.log_dict(cfg.model_dump(mode="json"), "config.json")
    return run_id


def find(cfg: TrackingConfig, pipeline_run_id: str) -> str | None:
    """The parent run of pipeline run ``pipeline_run_id``, or None (tracking off, or never created)."""
    if not tracking.is_active(cfg):
        return None
    client = _client(cfg)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'",
                               max_results=1)
    return found[0].info.run_id if found else None


def finish(cfg: TrackingConfig, pipeline_run_id: str, state: str, error: str | None = None) -> str | None:
    """End the parent run: FINISHED when ``state`` is SUCCEEDED, FAILED (with the error) otherwise.

    Returns:
        The parent run's id, or None when there is none.
    """
    run_id = find(cfg, pipeline_run_id)
    if run_id is None:
        log.info("no MLflow parent run for pipeline run %s (tracking off, or the run never started)",
                 pipeline_run_id)
        return None
    client = _client(cfg)
    ok = state.upper() in ("SUCCEEDED", "SUCCESS")
    tags = {"audiotune.pipeline_state": state}
    if not ok and error:
        tags["audiotune.error"] = error[:5000]
    tracking.StageTracker(client, run_id).set_tags(tags)
    client.set_terminated(run_id, "FINISHED" if ok else "FAILED")
    log.info("MLflow parent run %s ended %s", run_id, "FINISHED" if ok else "FAILED")
    return run_id


def set_tags(cfg: TrackingConfig, run_id: str | None, tags: dict[str, Any]) -> None:
    """Tag a run (e.g. the parent run with where the export went); nothing when tracking is off."""
    if run_id and tracking.is_active(cfg):
        tracking.StageTracker(_client(cfg), run_id).set_tags(tags)


def unique_run_name(stage: str) -> str:
    """A run name no other run has, so the stage run can be found again (see :func:`claim`)."""
    return f"{stage}-{uuid.uuid4().hex[:12]}"


def claim(cfg: TrackingConfig, run_name: str, stage: str) -> str | None:
    """Find the run named ``run_name``, rename it ``stage`` and return its id (None: tracking off); with the KFP
    MLflow plugin, the stage logged into the task's run: that run's id."""
    if not tracking.is_active(cfg):
        return None
    if tracking.plugin_run_id():
        return tracking.plugin_run_id()
    client = _client(cfg)
    exp = client.get_experiment_by_name(cfg.experiment)
    found = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'",
                               max_results=1) if exp else []
    if not found:
        log.warning("the %s stage run %s was not found in experiment %s", stage, run_name, cfg.experiment)
        return None
    run_id = found[0].info.run_id
    client.update_run(run_id, name=stage)
    return run_id


def link(cfg: TrackingConfig, parent_run_id: str | None, stage: str, run_id: str | None) -> str | None:
    """Nest stage run ``run_id`` under the parent run; a run of an earlier pipeline run (a cache hit) is
    recorded in a new nested run ``<stage> (cached)`` with its metrics. Returns the nested run's id."""
    if not parent_run_id or not run_id or not tracking.is_active(cfg):
        return None
    client = _client(cfg)
    run = client.get_run(run_id)
    current = run.data.tags.get(tracking.PARENT_TAG)
    if current in (None, "", parent_run_id):
        tracking.StageTracker(client, run_id).set_tags({tracking.PARENT_TAG: parent_run_id})
        return run_id
    parent = client.get_run(parent_run_id)
    stub = client.create_run(
        parent.info.experiment_id, run_name=f"{stage} (cached)",
        tags={tracking.PARENT_TAG: parent_run_id, tracking.STAGE_TAG: stage, CACHED_FROM_TAG: run_id},
    )
    tracker = tracking.StageTracker(client, stub.info.run_id)
    tracker.log_metrics(run.data.metrics)
    client.set_terminated(stub.info.run_id, "FINISHED")
    log.info("%s came from the cache (MLflow run %s of an earlier pipeline run)", stage, run_id)
    return stub.info.run_id


@dataclass
class Promotion:
    """Whether a run's model (the challenger) became the champion."""

    promoted: bool
    model_name: str | None
    version: str | None
    message: str


def promote(cfg: AudiotuneConfig, pipeline_run_id: str, metric: str | None = None) -> Promotion:
    """Move ``export.champion_alias`` of ``export.registered_model_name`` to the version that pipeline run
    ``pipeline_run_id`` registered, only if it passes the eval gate (``evaluate.gate``; the champion re-evaluated
    on the challenger's eval set when needed), or, with ``metric``, if it beats the champion on it (lower is better).

    The export task tags the run's parent run with the version it registered; the comparison itself is
    :func:`audiotune.export.registry.promote`'s.

    Raises:
        ConfigError: No registered model name in the config.
        TrackingError: The MLflow server or registry cannot be used.
    """
    from audiotune.config import ConfigError
    from audiotune.export import registry

    name = cfg.export.registered_model_name
    if not name:
        raise ConfigError("export.registered_model_name: promoting needs a registered model name")
    parent = find(cfg.tracking, pipeline_run_id)
    version = _client(cfg.tracking).get_run(parent).data.tags.get(VERSION_TAG) if parent else None
    if not version:
        return Promotion(False, name, None, f"pipeline run {pipeline_run_id} registered no version of {name}")
    if metric is None:
        from audiotune.stages.evaluate import champion_evaluator

        outcome = registry.promote_gated(cfg.tracking, name, cfg.evaluate.gate, version=version,
                                         alias=cfg.export.champion_alias, evaluator=champion_evaluator(cfg))
    else:
        outcome = registry.promote(cfg.tracking, name, version=version, metric=metric,
                                   alias=cfg.export.champion_alias)
    return Promotion(outcome.promoted, name, version, outcome.message)
