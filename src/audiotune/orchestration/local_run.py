"""Where a local run (``audiotune run --local``) put things, read from ``kfp.local``'s task outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audiotune import tracking

if TYPE_CHECKING:
    from audiotune.config import TrackingConfig


@dataclass
class LocalRun:
    """Where a local run put things."""

    run_dir: str
    parent_run_id: str | None
    export_uri: str | None
    samples_uri: str | None
    tracking_uri: str | None
    experiment_id: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def mlflow_ui(self) -> str | None:
        """The command that shows the runs, and where."""
        if not self.tracking_uri:
            return None
        if self.tracking_uri.startswith(("http://", "https://")):
            base = self.tracking_uri.rstrip("/")
            return f"{base}/#/experiments/{self.experiment_id}/runs/{self.parent_run_id}"
        return (f"mlflow ui --backend-store-uri {self.tracking_uri}  → http://127.0.0.1:5000/#/experiments/"
                f"{self.experiment_id}/runs/{self.parent_run_id}")

    @classmethod
    def read(cls, run_dir: Path, cfg: TrackingConfig) -> "LocalRun":
        """The summary of the local run whose task outputs are in ``run_dir``."""
        outputs = {}
        for path in sorted(run_dir.glob("*/executor_output.json")):
            try:
                outputs[path.parent.name] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        parent = outputs.get("prepare-run", {}).get("parameterValues", {}).get("parent_run_id") or None
        exported = [a for name, out in outputs.items() if name.startswith(("export-model", "export-acestep"))
                    for a in out.get("artifacts", {}).get("exported", {}).get("artifacts", [])]
        export_uri = (exported[0].get("metadata", {}).get("uri") or exported[0]["uri"]) if exported else None
        tracking_uri = experiment_id = None
        if tracking.is_active(cfg):
            tracking_uri = tracking.resolve_uri(cfg)
            if parent:
                experiment_id = tracking.client_for(cfg).get_run(parent).info.experiment_id
        return cls(run_dir=str(run_dir), parent_run_id=parent, export_uri=export_uri,
                   samples_uri=f"{export_uri}/samples" if export_uri else None, tracking_uri=tracking_uri,
                   experiment_id=experiment_id, outputs=outputs)
