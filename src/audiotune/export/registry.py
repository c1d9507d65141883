"""The MLflow model registry: register an export as a new version, and champion/challenger promotion.

A registered version carries tags: the data fingerprint, the base model, the code version and
the key metrics (``metric.<name>``), which is what :func:`promote` compares. The version in
production holds the alias ``champion``; :func:`promote` moves the alias to a challenger only when
its metric is better (lower unless ``greater_is_better``), or when there is no champion yet.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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


@contextmanager
def _registry_call(cfg, what: str) -> Iterator[None]:
    """Turn the registry's errors inside the block into one-line TrackingErrors naming ``what`` and the URI."""
    try:
        yield
    except _exception() as err:
        raise tracking.TrackingError(f"{what} at {tracking.resolve_uri(cfg)} failed: {err.message}") from None


def _challenger_and_holder(client, name: str, version: str | None, alias: str) -> tuple[str, str | None]:
    """``version`` (default: the newest of ``name``) and the version holding ``alias`` (None when none does)."""
    if version is None:
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise tracking.TrackingError(f"registered model {name!r} has no versions")
        version = str(max(int(v.version) for v in versions))
    try:
        current = client.get_model_version_by_alias(name, alias)
    except _exception():
        current = None
    return version, str(current.version) if current is not None else None


def register(cfg, name: str, source: str, run_id: str | None, tags: Mapping[str, Any],
             metrics: Mapping[str, Any]) -> str:
    """Register ``source`` (a ``runs:/`` or storage URI) as a new version of ``name``; returns the version.

    Raises:
        TrackingError: The tracking server / registry cannot be reached or refuses the registration.
    """
    client = _client(cfg)
    with _registry_call(cfg, f"registering {name}"):
        try:
            client.get_registered_model(name)
        except _exception():
            client.create_registered_model(name, description="Fine-tuned with audiotune.")
        all_tags = {k: str(v) for k, v in tags.items() if v is not None}
        all_tags.update({f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))})
        version = client.create_model_version(name, source, run_id=run_id, tags=all_tags)
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
    with _registry_call(cfg, f"promotion of {name}"):
        version, champion = _challenger_and_holder(client, name, version, alias)
        challenger_value = _metric(client, name, version, metric)
        if challenger_value is None:
            raise tracking.TrackingError(f"{name} version {version} has no tag {METRIC_TAG}{metric}; it cannot be "
                                         "compared")
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
    log.info(message)
    return Promotion(better, message, name, version, champion, challenger_value, champion_value)


# ------------------------------------------------------------------------------------------ evaluation and gate
EVAL_TAG = "eval_set_fingerprint"


def _eval_prefix(fingerprint: str) -> str:
    """Tag prefix of a version's results on one eval set (a version may be evaluated on several)."""
    return f"eval.{fingerprint[:16]}."


def _registered_version(model: str, name: str) -> str | None:
    """The version ``audiotune export`` registered for the export at ``model`` (its registration.json)."""
    import json

    from audiotune import storage

    try:
        record = json.loads(storage.read_text(storage.join(model, "registration.json")))
    except (OSError, ValueError):
        return None
    return str(record["version"]) if record.get("name") == name and record.get("version") else None


def record_evaluation(cfg, name: str, model: str, export_manifest: Mapping[str, Any], source: str | None,
                      run_id: str | None, means: Mapping[str, float], fingerprint: str, eval_uri: str,
                      eval_set_uri: str, card: str) -> str:
    """Put an Eval's means on the registered version of the export at ``model`` (registering it first when it
    is not): ``metric.<name>`` tags (what the gate reads), the eval set's fingerprint and URI, per-set tags
    ``eval.<fingerprint>.<name>``, and the card table as the version's description. Returns the version.

    Raises:
        TrackingError: The registry cannot be reached or refuses.
    """
    client = _client(cfg)
    finite = {k: float(v) for k, v in means.items() if math.isfinite(float(v))}
    tags = {EVAL_TAG: fingerprint, "eval_uri": eval_uri, "eval_set_uri": eval_set_uri,
            **{f"{_eval_prefix(fingerprint)}{k}": repr(v) for k, v in finite.items()}}
    version = _registered_version(model, name)
    with _registry_call(cfg, f"recording the evaluation of {name}"):
        if version is None:
            if source is None:
                raise tracking.TrackingError(f"the export at {model} has no registry source to register")
            export_metrics = dict(export_manifest.get("metrics") or {})
            version = register(cfg, name, source, run_id, tags={
                "dataset_fingerprint": export_manifest.get("dataset_fingerprint"),
                "base_model": export_manifest.get("base_model") or "none",
                "code_version": export_manifest.get("code_version"), "export_uri": model,
                "mode": export_manifest.get("mode"), **tags}, metrics={**export_metrics, **finite})
        else:
            for key, value in {**tags, **{f"{METRIC_TAG}{k}": repr(v) for k, v in finite.items()}}.items():
                client.set_model_version_tag(name, version, key, str(value))
        client.update_model_version(name, version, description=card[:4900])
    log.info("%s version %s carries the eval metrics (eval set %s)", name, version, fingerprint[:12])
    return version


def eval_means(cfg, name: str, version: str, fingerprint: str) -> dict[str, float] | None:
    """A version's means on the eval set ``fingerprint``, or None when it was not evaluated on it."""
    tags = _client(cfg).get_model_version(name, version).tags or {}
    prefix = _eval_prefix(fingerprint)
    found = {k[len(prefix):]: float(v) for k, v in tags.items() if k.startswith(prefix)}
    return found or None


def promote_gated(cfg, name: str, rule, version: str | None = None, alias: str = "champion",
                  evaluator=None) -> Promotion:
    """Move ``alias`` to ``version`` (default: the newest) when the gate ``rule`` says it beats the holder, both
    measured on the challenger's eval set; the champion is evaluated on that set by ``evaluator(export_uri,
    eval_set_uri) -> (means, fingerprint)`` when its stored results are for another set.

    Raises:
        TrackingError: The registry cannot be reached, or the model / version does not exist.
    """
    from audiotune.evaluation.gate import decide

    client = _client(cfg)
    with _registry_call(cfg, f"promotion of {name}"):
        version, champion = _challenger_and_holder(client, name, version, alias)
        tags = client.get_model_version(name, version).tags or {}
        fingerprint = tags.get(EVAL_TAG)
        if champion == version:
            return Promotion(False, f"{name} version {version} already holds {alias!r}", name, version, champion,
                             None, None)
        if not fingerprint:
            message = (f"{name} version {version} was not evaluated (no tag {EVAL_TAG}): run `audiotune evaluate` "
                       f"on it; {alias} stays")
            return Promotion(False, message, name, version, champion, None, None)
        challenger_means = eval_means(cfg, name, version, fingerprint) or {}
        champion_means = None
        if champion is not None:
            champion_means = eval_means(cfg, name, champion, fingerprint)
            if champion_means is None:
                champion_means = _evaluate_champion(cfg, client, name, champion, tags, fingerprint, evaluator)
                if isinstance(champion_means, str):
                    return Promotion(False, f"{name} version {version} was not compared: {champion_means}; {alias} "
                                     "stays", name, version, champion, None, None)
        decision = decide(challenger_means, champion_means, rule)
        if champion_means is not None:
            _log_comparison(client, name, version, challenger_means, champion_means, rule.metrics)
        if decision.promote:
            client.set_registered_model_alias(name, alias, version)
            message = (f"{name} version {version} is the new {alias}"
                       + (f", replacing version {champion}" if champion else "") + f": {decision.reason}")
        else:
            message = f"{name} version {version} did not pass the gate against {alias} version {champion}: " \
                      f"{decision.reason}; the alias stays"
    log.info(message)
    return Promotion(decision.promote, message, name, version, champion, None, None)


def _evaluate_champion(cfg, client, name: str, champion: str, challenger_tags: Mapping[str, str],
                       fingerprint: str, evaluator) -> dict[str, float] | str:
    """The champion's means on the challenger's eval set, evaluated now and stored as its tags; or why not."""
    champion_tags = client.get_model_version(name, champion).tags or {}
    export_uri, eval_set_uri = champion_tags.get("export_uri"), challenger_tags.get("eval_set_uri")
    if evaluator is None or not export_uri or not eval_set_uri:
        return (f"version {champion} has no results on eval set {fingerprint[:12]} and cannot be evaluated on it "
                f"(export_uri {export_uri!r}, eval set {eval_set_uri!r})")
    log.info("evaluating champion version %s (%s) on the challenger's eval set %s", champion, export_uri,
             eval_set_uri)
    means, got = evaluator(export_uri, eval_set_uri)
    if got != fingerprint:
        return (f"re-evaluating version {champion} on {eval_set_uri} gave eval set {got[:12]}, not the challenger's "
                f"{fingerprint[:12]} (the set changed since)")
    for key, value in means.items():
        if math.isfinite(float(value)):
            client.set_model_version_tag(name, champion, f"{_eval_prefix(fingerprint)}{key}", repr(float(value)))
    return dict(means)


def _log_comparison(client, name: str, version: str, challenger: Mapping[str, float],
                    champion: Mapping[str, float], metrics: list[str]) -> None:
    """The champion-vs-challenger plot, logged to the run that registered the challenger (when there is one)."""
    import tempfile
    from pathlib import Path

    from audiotune.evaluation.report import plot_comparison

    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        return
    with tempfile.TemporaryDirectory(prefix="audiotune-gate-") as tmp:
        path = plot_comparison({k: {"mean": v} for k, v in champion.items()},
                               {k: {"mean": v} for k, v in challenger.items()}, list(metrics),
                               Path(tmp) / "champion_vs_challenger.png")
        if path is not None:
            client.log_artifact(run_id, str(path), "eval/plots")
