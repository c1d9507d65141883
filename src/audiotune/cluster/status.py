"""What a training job's status says: its state from the status conditions (PyTorchJob and TrainJob alike), and
Trainer v2's progress report (``status.trainerStatus``, feature gate TrainJobStatus, Trainer >= 2.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUCCEEDED = ("Succeeded", "Complete")  # PyTorchJob's and TrainJob's condition for success


@dataclass
class JobStatus:
    """A job's state from its conditions: success or ``Failed`` (terminal), else the latest true one."""

    state: str
    reason: str = ""
    message: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in SUCCEEDED or self.state == "Failed"


def conditions_status(job: dict[str, Any], success: str) -> JobStatus:
    """The state of a job from its ``status.conditions`` (``Pending`` before the controller wrote any);
    ``success`` is the kind's condition for a job that succeeded."""
    conditions = [c for c in ((job.get("status") or {}).get("conditions") or [])
                  if str(c.get("status")) == "True"]
    for kind in ("Failed", success):
        for cond in conditions:
            if cond.get("type") == kind:
                return JobStatus(kind, cond.get("reason") or "", cond.get("message") or "")
    if conditions:
        last = conditions[-1]
        return JobStatus(last.get("type") or "Unknown", last.get("reason") or "", last.get("message") or "")
    return JobStatus("Pending")


def progress_line(job: dict[str, Any]) -> str | None:
    """Trainer v2's ``status.trainerStatus`` (feature gate TrainJobStatus) as one line; None when absent."""
    ts = (job.get("status") or {}).get("trainerStatus") or {}
    parts = []
    if ts.get("progressPercentage") is not None:
        parts.append(f"{ts['progressPercentage']}%")
    if ts.get("estimatedRemainingSeconds") is not None:
        parts.append(f"about {int(ts['estimatedRemainingSeconds']) // 60} min left")
    parts += [f"{m.get('name')}={m.get('value')}" for m in ts.get("metrics") or [] if m.get("name")]
    return ", ".join(parts) or None
