"""Shared pieces of the configuration: its error, the strict section base, run and tracking settings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from audiotune.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A configuration that cannot be used; the message names the field and value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    """Settings shared by every stage of one run."""

    name: str = Field("audiotune", description="Name of the run, used for MLflow run names and output paths.")
    seed: int = Field(0, description="Seed for every random choice (splits, initialisation, sampling).")
    num_workers: int = Field(
        0, ge=0, description="Worker processes for CPU-bound work; 0 means one per available core."
    )


class TrackingConfig(_Section):
    """MLflow tracking."""

    enabled: bool = Field(True, description="Log to MLflow. False turns tracking off everywhere.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI. Unset: MLFLOW_TRACKING_URI, else a local store under ./mlruns.",
    )
    experiment: str = Field("audiotune", description="MLflow experiment that holds the runs.")
    parent_run_id: str | None = Field(
        None, description="Run id of the pipeline's parent run; stage runs are nested under it."
    )
    run_name: str | None = Field(None, description="Name of the stage run; defaults to the stage name.")
    request_timeout_s: float = Field(
        20.0, gt=0, description="Timeout of one request to an HTTP tracking server (MLflow's "
        "MLFLOW_HTTP_REQUEST_TIMEOUT, set for the stage's calls)."
    )
    request_retries: int = Field(
        1, ge=0, le=5, description="Retries of a failed request (MLflow's MLFLOW_HTTP_REQUEST_MAX_RETRIES, set for "
        "the stage's calls; backoff factor 1). A request that still fails starts an outage: see retry_every_s."
    )
    retry_every_s: float = Field(
        60.0, ge=0, description="During an outage of the tracking server the stage goes on: metrics, params and "
        "tags are kept in order (and appended to a local file under spool_dir) and sent when the server answers "
        "again, tried at most this often; what is still unsent at the end is reported with the file."
    )
    spool_dir: str | None = Field(
        None, description="Local folder of the files of what an outage kept from MLflow (<run id>.jsonl); unset: "
        "./mlruns/unsent."
    )
