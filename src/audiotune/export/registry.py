"""The MLflow model registry: register an export as a new version, and champion/challenger promotion.

A registered version carries tags: the data fingerprint, the base model, the code version and
the key metrics (``metric.<name>``), which is what :func:`promote` compares. The version in
production holds the alias ``champion``; :func:`promote` moves the alias to a challenger only when
its metric is better (lower unless ``greater_is_better``), or when there is no champion yet.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from audiotune import tracking

log = logging.getLogger(__name__)

METRIC_TAG = "metric."


@dataclass
class Promotion:
    """What :func:`promote` decided."""

    promoted: bool
    message: str
    name: str
    challenger: str
    champion: str | None
    challenger_value: float | None
    champion_value: float | None


def _client(cfg):
    return tracking.client_for(cfg)


def _exception():
    from mlflow.exceptions import MlflowException

    return MlflowException


def register(cfg, name: str, source: str, run_id: str | None, tags: Mapping[str, Any],
             metrics: Mapping[str, Any]) -> str:
    """Register ``source`` (a ``runs:/`` or storage URI) as a new version of ``name``; returns the version.

    Raises:
        TrackingError: The tracking server / registry cannot be reached or refuses the registration.
    """
    client = _client(cfg)
    error = _exception()
    try:
        try:
            client.get_registered_model(name)
        except error:
            client.create_registered_model(name, description="Fine-tuned with audiotune.")
        all_tags = {k: str(v) for k, v in tags.items() if v is not None}
        all_tags.update({f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))})
        version = client.create_model_version(name, source, run_id=run_id, tags=all_tags)
    except error as err:
        raise tracking.TrackingError(f"registering {name} at {tracking.resolve_uri(cfg)} failed: {err.message}") \
            from None
    log.info("registered %s version %s from %s", name, version.version, source)
    return str(version.version)


def _metric(client, name: str, version: str, metric: str) -> float | None:
    tags = client.get_model_version(name, version).tags or {}
    value = tags.get(f"{METRIC_TAG}{metric}")
    return float(value) if value is not None else None


def promote(cfg, name: str, version: str | None = None, metric: str = "val_loss", greater_is_better: bool = False,
            alias: str = "champion") -> Promotion:
    """Move ``alias`` to ``version`` (default: the newest) of ``name`` when it beats the current holder.

    Raises:
        TrackingError: The registry cannot be reached, or the model / version does not exist, or the
            challenger has no value of ``metric``.
    """
    client = _client(cfg)
    error = _exception()
    try:
        if version is None:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise tracking.TrackingError(f"registered model {name!r} has no versions")
            version = str(max(int(v.version) for v in versions))
        challenger_value = _metric(client, name, version, metric)
        if challenger_value is None:
            raise tracking.TrackingError(f"{name} version {version} has no tag {METRIC_TAG}{metric}; it cannot be "
                                         "compared")
        try:
            current = client.get_model_version_by_alias(name, alias)
        except error:
            current = None
        champion = str(current.version) if current is not None else None
        champion_value = _metric(client, name, champion, metric) if champion is not None else None
        if champion == version:
            return Promotion(False, f"{name} version {version} already holds {alias!r}", name, version, champion,
                             challenger_value, champion_value)
        if champion is not None and champion_value is None:
            # nothing to compare with: keep the alias rather than replace a model nobody measured this way
            message = (f"{name} version {version} ({metric} {challenger_value:.6g}) was not compared: {alias} "
                       f"version {champion} has no tag {METRIC_TAG}{metric}; the alias stays (tag it, or move "
                       "the alias by hand)")
            log.warning(message)
            return Promotion(False, message, name, version, champion, challenger_value, None)
        better = champion_value is None or (challenger_value > champion_value if greater_is_better
                                            else challenger_value < champion_value)
        if better:
            client.set_registered_model_alias(name, alias, version)
            message = (f"{name} version {version} ({metric} {challenger_value:.6g}) is the new {alias}"
                       + (f", replacing version {champion} ({champion_value:.6g})" if champion else ""))
        else:
            message = (f"{name} version {version} ({metric} {challenger_value:.6g}) did not beat {alias} version "
                       f"{champion} ({champion_value:.6g}); the alias stays")
    except error as err:
        raise tracking.TrackingError(f"promotion of {name} at {tracking.resolve_uri(cfg)} failed: {err.message}") \
            from None
    log.info(message)
    return Promotion(better, message, name, version, champion, challenger_value, champion_value)
