"""stage_run: the context a stage runs in, its own MLflow run nested under the pipeline run's parent."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from audiotune.tracking.client import (
    PARENT_TAG,
    STAGE_TAG,
    TrackingError,
    _client,
    _experiment_id,
    bounded_requests,
    is_active,
    plugin_run_id,
    resolve_uri,
    spool_path,
)
from audiotune.tracking.tracker import StageTracker, failures, first_line

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from audiotune.config import TrackingConfig

log = logging.getLogger(__name__)


def _end(tracker: StageTracker, client: MlflowClient, status: str) -> None:
    """Flush what an outage kept and end the run; an unreachable server is reported, not raised."""
    tracker.flush(force=True)
    if tracker.run_id == plugin_run_id() and not tracker.pending:  # the KFP MLflow plugin ends its own run
        return
    if tracker.pending:
        log.warning("MLflow at %s did not answer by the end of the stage: %s of run %s were not sent; they are in "
                    "%s (metrics also in the artifact's history.json)", tracker.uri, tracker.unsent_summary(),
                    tracker.run_id, tracker.spool)
        return
    try:
        client.set_terminated(tracker.run_id, status)
    except failures() as err:
        log.warning("MLflow at %s: cannot mark run %s %s (%s)", tracker.uri, tracker.run_id, status, first_line(err))


@contextmanager
def stage_run(cfg: TrackingConfig, stage: str) -> Iterator[StageTracker]:
    """Run a stage inside its own MLflow run, nested under ``cfg.parent_run_id`` when set.

    The run ends FINISHED when the block succeeds, FAILED when it raises (the error propagates),
    KILLED on an interrupt. Requests are bounded by :func:`bounded_requests`; an outage of the server during
    the block is survived (see :class:`StageTracker`).

    Args:
        cfg: Tracking configuration.
        stage: Stage name; the run name unless ``cfg.run_name`` is set, and the ``audiotune.stage`` tag.

    Yields:
        The tracker of the stage run (inert when tracking is off for this process).

    Raises:
        TrackingError: When the server is unreachable or the parent run does not exist at the start.
    """
    if not is_active(cfg):
        yield StageTracker()
        return
    with bounded_requests(cfg):
        uri = resolve_uri(cfg)
        client = _client(uri)
        tags = {STAGE_TAG: stage}
        if cfg.parent_run_id:
            from mlflow.exceptions import MlflowException

            try:
                experiment_id = client.get_run(cfg.parent_run_id).info.experiment_id
            except MlflowException as err:
                raise TrackingError(f"parent run {cfg.parent_run_id} not found at {uri}: {err.message}") from err
            tags[PARENT_TAG] = cfg.parent_run_id
        else:
            experiment_id = _experiment_id(client, uri, cfg.experiment)
        run_id = plugin_run_id()  # the KFP MLflow plugin's run of this task, else one of our own
        if run_id:
            client.set_tag(run_id, STAGE_TAG, stage)
        else:
            run_id = client.create_run(experiment_id, run_name=cfg.run_name or stage, tags=tags).info.run_id
        log.info("MLflow run %s for stage %s at %s", run_id, stage, uri)
        tracker = StageTracker(client, run_id, uri, spool_path(cfg, run_id), cfg.retry_every_s)
        try:
            yield tracker
        except Exception:
            _end(tracker, client, "FAILED")
            raise
        except BaseException:
            _end(tracker, client, "KILLED")
            raise
        _end(tracker, client, "FINISHED")
