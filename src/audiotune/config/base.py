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
