"""The typed parameters of the pipeline and how they map onto the one config schema.

The knobs users change often are typed pipeline parameters (shown one by one in the Kubeflow UI);
everything else travels in one ``config`` mapping validated by the same schema as the CLI.
The resolved config is, field by field:

    schema defaults  ←  typed pipeline parameters  ←  the config mapping

i.e. the mapping is the more specific and wins where it sets a field that a parameter also sets
(the prepare step logs each such shadowed parameter). :func:`split` does the reverse for the
SDK: from a config it derives the parameter values and a mapping that holds only what the
parameters do not already say, so a run cloned in the UI reacts to its parameters.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from audiotune.config import AudiotuneConfig, ConfigError, apply_overrides, validate

TRAIN_STAGES = ("llm", "flow", "joint")


def _none_to_empty(value: Any) -> Any:
    return "" if value is None else value


def _empty_to_none(value: Any) -> Any:
    return None if value == "" else value


def _targets_to_config(value: str) -> Any:
    value = value.strip()
    if value in ("", "all-linear"):
        return "all-linear"
    return [t.strip() for t in value.split(",") if t.strip()]


def _targets_from_config(value: Any) -> str:
    return value if isinstance(value, str) else ",".join(value)


def _zero_to_config(value: str) -> Any:
    value = value.strip()
    try:
        number = float(value)  # "2"; "2.0" when a number came back through protobuf
    except ValueError:
        return value  # "auto"; anything else is refused by the schema, naming the field
    return int(number) if number.is_integer() else number


@dataclass(frozen=True)
class PipelineParam:
    """One typed pipeline parameter.

    Attributes:
        name: Parameter name in the pipeline (and the Kubeflow UI).
        type: Python type of the parameter (str, int or float).
        paths: Config fields (dotted paths) it sets.
        description: What it does, shown in the UI.
        to_config: Parameter value → config value.
        from_config: Config value → parameter value.
    """

    name: str
    type: type
    paths: tuple[str, ...]
    description: str
    to_config: Callable[[Any], Any] = lambda v: v
    from_config: Callable[[Any], Any] = lambda v: v


PARAMS: tuple[PipelineParam, ...] = (
    PipelineParam("source_uri", str, ("convert.source",),
                  "Source corpus: a manifest file or folder, local or s3://.", _empty_to_none, _none_to_empty),
    PipelineParam("source_format", str, ("convert.format",),
                  "Source layout: jsonl, acestep, kaldi or text; empty autodetects.", _empty_to_none, _none_to_empty),
    PipelineParam("base_model_uri", str, ("tokenize.base_model", "llm.base_model"),
                  "Base causal LM (Hugging Face layout, local or s3://); its tokenizer is used. Empty: none.",
                  _empty_to_none, _none_to_empty),
    PipelineParam("base_flow_uri", str, ("flow.base_flow",),
                  "Base flow decoder to fine-tune (local or s3://). Empty: train from scratch.",
                  _empty_to_none, _none_to_empty),
    PipelineParam("mode", str, ("pipeline.mode",), "What to train: llm, flow, both or acestep."),
    PipelineParam("llm_epochs", float, ("llm.train.epochs",), "Epochs of the llm stage."),
    PipelineParam("llm_lr", float, ("llm.train.lr",), "Peak learning rate of the llm stage."),
    PipelineParam("flow_epochs", float, ("flow.train.epochs",), "Epochs of the flow stage."),
    PipelineParam("flow_lr", float, ("flow.train.lr",), "Peak learning rate of the flow stage."),
    PipelineParam("joint_epochs", float, ("joint.train.epochs",),
                  "Epochs of the joint stage (mode both); 0 skips it, even when the config sets "
                  "joint.train.max_steps."),
    PipelineParam("joint_lr_scale", float, ("joint.lr_scale",),
                  "The joint stage's learning rates: llm_lr and flow_lr times this."),
    PipelineParam("lora_r", int, ("llm.lora.r",), "LoRA rank."),
    PipelineParam("lora_alpha", float, ("llm.lora.alpha",), "LoRA alpha."),
    PipelineParam("lora_targets", str, ("llm.lora.target_modules",),
                  "LoRA target modules, comma-separated, or all-linear.", _targets_to_config, _targets_from_config),
    PipelineParam("zero_stage", str, tuple(f"{s}.train.deepspeed.zero_stage" for s in TRAIN_STAGES),
                  "DeepSpeed ZeRO stage of the training stages: 0-3, or auto (picked at launch from the model's "
                  "size, the GPUs and their memory).", _zero_to_config, str),
    PipelineParam("gpus", int, ("cluster.gpus_per_node",),
                  "GPUs per training pod (per node); one torchrun process each (0: CPU, one process)."),
    PipelineParam("output_uri", str, ("pipeline.output_uri",),
                  "Durable location of the training outputs and the export (s3://...). Empty: the artifact store.",
                  _empty_to_none, _none_to_empty),
    PipelineParam("mlflow_experiment", str, ("tracking.experiment",), "MLflow experiment of the runs."),
    PipelineParam("registered_model_name", str, ("export.registered_model_name",),
                  "MLflow registered model the export is registered as. Empty: not registered.",
                  _empty_to_none, _none_to_empty),
)

BY_NAME = {p.name: p for p in PARAMS}

def schema_has(path: str) -> bool:
    """Whether the dotted ``path`` names a field of :class:`AudiotuneConfig`."""
    model: Any = AudiotuneConfig
    for part in path.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        model = fields[part].annotation
    return True


def _get(data: dict[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _delete(data: dict[str, Any], path: str) -> None:
    parts = path.split(".")
    chain = [data]
    for part in parts[:-1]:
        node = chain[-1].get(part)
        if not isinstance(node, dict):
            return
        chain.append(node)
    chain[-1].pop(parts[-1], None)
    for depth in range(len(parts) - 1, 0, -1):  # drop sections left empty
        if not chain[depth]:
            chain[depth - 1].pop(parts[depth - 1], None)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def typed_values(cfg: AudiotuneConfig) -> dict[str, Any]:
    """Parameter values that say what ``cfg`` says (where a parameter's fields disagree: the first one's)."""
    data = cfg.model_dump(mode="json")
    values: dict[str, Any] = {}
    for param in PARAMS:
        values[param.name] = param.type(param.from_config(_get(data, param.paths[0])[1]))
    return values


def defaults() -> dict[str, Any]:
    """The parameters' defaults: the schema's defaults (one place for defaults)."""
    return typed_values(AudiotuneConfig())


def overrides(typed: dict[str, Any]) -> list[str]:
    """``a.b=value`` overrides (the ``--set`` form) that the typed parameter values stand for."""
    items = []
    for name, value in typed.items():
        param = BY_NAME.get(name)
        if param is None:
            raise ConfigError(f"unknown pipeline parameter {name!r}; known: {', '.join(BY_NAME)}")
        try:
            value = param.type(value)
        except (TypeError, ValueError):
            raise ConfigError(f"pipeline parameter {name} = {value!r}: expected {param.type.__name__}") from None
        converted = param.to_config(value)
        items += [f"{path}={json.dumps(converted)}" for path in param.paths]
    return items


def resolve(mapping: dict[str, Any] | None, typed: dict[str, Any]) -> tuple[AudiotuneConfig, list[str]]:
    """The config of a pipeline run: schema defaults ← ``typed`` parameters ← ``mapping``.

    Returns:
        The validated config and one note per parameter whose value the mapping shadows.

    Raises:
        ConfigError: Naming the field (or parameter) and the bad value.
    """
    mapping = mapping or {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(mapping).__name__}")
    base = apply_overrides({}, overrides(typed))
    notes = []
    for name, value in typed.items():
        for path in BY_NAME[name].paths:
            found, in_mapping = _get(mapping, path)
            if found and in_mapping != _get(base, path)[1]:
                notes.append(f"config sets {path}={in_mapping!r}, which takes precedence over the pipeline "
                             f"parameter {name}={value!r}")
    return validate(_merge(base, mapping), "pipeline parameters and config"), notes


def split(cfg: AudiotuneConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pipeline arguments for ``cfg``: typed parameter values and the config mapping for the rest.

    The mapping holds the fields the config sets, minus those a parameter already carries exactly,
    so that ``resolve(mapping, typed) == cfg``. Null values are left out: Kubeflow parameters
    cannot carry them, and a field left out takes its default.
    """
    typed = typed_values(cfg)
    mapping = _drop_none(set_fields(cfg))
    base = apply_overrides({}, overrides(typed))
    full = cfg.model_dump(mode="json")
    for param in PARAMS:
        for path in param.paths:
            if _get(full, path)[1] == _get(base, path)[1]:
                _delete(mapping, path)
            else:  # the parameter cannot say it (e.g. per-stage values differ): the mapping must
                _set(mapping, path, _get(full, path)[1])
    return typed, mapping


def set_fields(model: Any) -> dict[str, Any]:
    """The fields a config sets, at any depth, as JSON values: what re-validates into the same config
    (fields left out keep their defaults, and "set" stays "set", which e.g. the mel preset relies on).

    Unlike ``model_dump(exclude_unset=True)`` a section that was not set itself but has fields set
    (say, by assignment) is kept.
    """
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if hasattr(type(value), "model_fields"):
            sub = set_fields(value)
            if sub or name in model.model_fields_set:
                out[name] = sub
        elif name in model.model_fields_set:
            out[name] = model.model_dump(mode="json", include={name})[name]
    return out


def _drop_none(data: Any) -> Any:
    """``data`` without null values (in mappings, also inside lists) and without the mappings left empty."""
    if isinstance(data, list):
        return [_drop_none(v) for v in data]
    if not isinstance(data, dict):
        return data
    out = {}
    for key, value in data.items():
        value = _drop_none(value)
        if value is not None and value != {}:
            out[key] = value
    return out


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
