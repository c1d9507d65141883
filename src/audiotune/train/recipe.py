"""The steps every training recipe (``stages/train_*.py``) takes the same way.

A recipe reads top to bottom: :func:`start_run` (precision, accelerator, the lease on its outputs, the
resolved config in the log) → its own data and model set-up → :func:`tracked` (a work folder and the
stage's MLflow run, the lease released at the end) → :func:`fit` (resume, train, gather the weights) →
:func:`publish_on_main` (the final metrics and the artifact, from the main process) → the result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from audiotune import tracking
from audiotune.config import dump_config
from audiotune.train import output_lock
from audiotune.train.engine import make_accelerator, resolve_dtype
from audiotune.train.plots import loss_curve

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Run:
    """What a training run starts with: its precision, its accelerator and the lease on its outputs."""

    dtype: str
    accelerator: Any
    lease: output_lock.Lease


def start_run(cfg, settings, outputs: list[str], stage: str, what: str) -> Run:
    """Resolve the precision, make the accelerator, take the lease on ``outputs`` (released by
    :func:`tracked`) and log the resolved config once (main process).

    Args:
        cfg: The pipeline config (logged).
        settings: The stage's ``train`` section.
        outputs: The URIs the run will publish.
        stage: The stage's name (``llm``, ``flow``, ``joint``, ``acestep``).
        what: Inputs and outputs for the log line.
    """
    dtype = resolve_dtype(settings.dtype)
    acc = make_accelerator(settings, dtype)
    lease = output_lock.acquire(acc, outputs, stage)
    if acc.is_main_process:
        log.info("train %s: %s\n%s", stage, what, dump_config(cfg))
    return Run(dtype=dtype, accelerator=acc, lease=lease)


@contextlib.contextmanager
def tracked(cfg, run: Run, stage: str) -> Iterator[tuple[Any, Path]]:
    """The stage's MLflow run and a temporary work folder; the output lease is released on the way out."""
    with run.lease, tempfile.TemporaryDirectory(prefix=f"audiotune-{stage}-") as tmp, \
            tracking.stage_run(cfg.tracking, stage) as tracker:
        yield tracker, Path(tmp)


def fit(engine) -> tuple[Any, dict]:
    """Resume from the newest checkpoint (if any), train, and gather the weights (every process takes part:
    ZeRO-3 gathers them); returns the final state and the state dict."""
    engine.maybe_resume()
    state = engine.fit()
    return state, engine.acc.get_state_dict(engine.model)


def publish_on_main(run: Run, tracker, metrics: dict[str, Any], publish: Callable[[], T]) -> T | None:
    """Log the final metrics and publish (main process; None elsewhere), then wait for every process."""
    result = None
    if run.accelerator.is_main_process:
        tracker.log_metrics(tracking.final_metrics(metrics))
        result = publish()
    run.accelerator.wait_for_everyone()
    return result


def write_run_files(staging: Path, metrics: dict[str, Any], history: list[dict], tracker=None) -> None:
    """``metrics.json``, ``history.json`` and ``loss_curve.png`` of a trained model's artifact; the curve and the
    metrics also logged to ``tracker`` when given."""
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (staging / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    loss_curve(history, staging / "loss_curve.png")
    if tracker is not None:
        for name in ("loss_curve.png", "metrics.json"):
            tracker.log_artifact(staging / name)


def history_values(history: list[dict], key: str) -> list[float]:
    """Every logged value of ``key`` in a run's history, in order."""
    return [h[key] for h in history if key in h]


def mean(values: list[float]) -> float | None:
    """The mean of ``values``; None when there are none."""
    return sum(values) / len(values) if values else None
