"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Everything goes through an explicit :class:`mlflow.MlflowClient` bound to the resolved tracking URI,
so nothing here touches MLflow's global state. Only rank 0 logs: in a torchrun worker with
``RANK`` other than ``0``, or with tracking disabled, every call is a no-op and the tracker is inert.

Tracking URI, in order: ``TrackingConfig.uri``, the ``MLFLOW_TRACKING_URI`` environment variable, a
local store ``sqlite:///<cwd>/mlruns/mlflow.db`` with artifacts in ``<cwd>/mlruns/artifacts``.

An outage of the server during a stage does not stop the stage: requests are bounded
(``tracking.request_timeout_s``, ``request_retries``); what could not be sent is kept in order, appended to
``<spool_dir>/<run id>.jsonl``, and sent when the server answers again (tried every ``retry_every_s``); what is
still unsent at the end of the stage is reported in one warning naming that file.

The package holds three concerns, re-exported here so ``from audiotune import tracking`` is the one entry point:

- :mod:`.client`: the URI, the client, experiments, the parent run of a pipeline run (``start_parent_run``,
  ``end_run``) and the KFP plugin's run.
- :mod:`.tracker`: :class:`StageTracker`, which logs to one run and survives an outage of the server.
- :mod:`.stage`: :func:`stage_run`, the context a stage runs in.
"""

from __future__ import annotations

from audiotune.tracking.client import (
    PARENT_TAG,
    PLUGIN_RUN_ENV,
    STAGE_TAG,
    TrackingError,
    bounded_requests,
    client_for,
    end_run,
    is_active,
    plugin_run_id,
    resolve_uri,
    start_parent_run,
)
from audiotune.tracking.stage import stage_run
from audiotune.tracking.tracker import MAX_PARAM_VALUE_LENGTH, StageTracker, final_metrics, flatten

__all__ = [
    "MAX_PARAM_VALUE_LENGTH",
    "PARENT_TAG",
    "PLUGIN_RUN_ENV",
    "STAGE_TAG",
    "StageTracker",
    "TrackingError",
    "bounded_requests",
    "client_for",
    "end_run",
    "final_metrics",
    "flatten",
    "is_active",
    "plugin_run_id",
    "resolve_uri",
    "stage_run",
    "start_parent_run",
]
