"""The typed config: defaults, YAML, overrides, errors that name the field, JSON round trip."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Optional, get_args, get_origin

import pytest
from pydantic import BaseModel

from audiotune.config import AudiotuneConfig, ConfigError, load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _sub_models(annotation, path: str):
    """(model class, path) for every pydantic model in ``annotation``: the annotation itself, or one inside
    ``list[...]``, ``dict[str, ...]``, ``X | None``, ``Annotated[...]`` and the like, at any depth (``[]`` marks an
    item of a list or a value of a dict in the path)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, path
        return
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Annotated:
        args = args[:1]
    elif origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        args, path = args[1:], f"{path}[]"
    elif origin is not None and isinstance(origin, type) and issubclass(origin, Iterable):
        path = f"{path}[]"
    for arg in args:
        yield from _sub_models(arg, path)


def _all_fields(model_cls, prefix="", seen=()):
    for name, field in model_cls.model_fields.items():
        yield f"{prefix}{name}", field
        for sub, path in _sub_models(field.annotation, f"{prefix}{name}"):
            if sub not in seen:  # a model that contains itself is walked once
                yield from _all_fields(sub, f"{path}.", (*seen, model_cls))


def test_every_field_has_a_description():
    missing = [path for path, f in _all_fields(AudiotuneConfig) if not f.description]
    assert missing == []


def test_the_field_walk_reaches_models_inside_lists_dicts_and_optionals():
    class Leaf(BaseModel):
        x: int = 0

    class Root(BaseModel):
        direct: Leaf = Leaf()
        items: list[Leaf] = []
        by_name: dict[str, Leaf] = {}
        maybe: Optional[Leaf] = None  # the typing spelling on purpose: both spellings are walked
        either: Leaf | None = None
        nested: list[dict[str, Leaf]] = []
        tagged: Annotated[list[Leaf], "meta"] = []

    paths = {path for path, _ in _all_fields(Root)}
    assert {"direct.x", "items[].x", "by_name[].x", "maybe.x", "either.x", "nested[][].x", "tagged[].x"} <= paths
    assert "cluster.tolerations[].key" in {path for path, _ in _all_fields(AudiotuneConfig)}


def test_json_round_trip():
    cfg = load_config(EXAMPLES / "demo.yaml", ["convert.sample_rate=24000", "tracking.enabled=false"])
    again = AudiotuneConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg
    assert again.convert.sample_rate == 24000 and again.tracking.enabled is False


def test_demo_config_loads():
    cfg = load_config(EXAMPLES / "demo.yaml")
    assert cfg.convert.format == "jsonl"


def test_override_creates_nested_and_parses_yaml_values():
    cfg = load_config(None, ["convert.val_fraction=0.25", "run.name=abc", "convert.trim_silence=yes"])
    assert cfg.convert.val_fraction == 0.25 and cfg.run.name == "abc" and cfg.convert.trim_silence is True


@pytest.mark.parametrize(
    "override, path, value",
    [
        ("convert.sample_rate=abc", "convert.sample_rate", "'abc'"),
        ("convert.val_fraction=1.5", "convert.val_fraction", "1.5"),
        ("convert.no_such_field=1", "convert.no_such_field", "1"),
        ("convert.format=wav", "convert.format", "'wav'"),
    ],
)
def test_errors_name_field_and_value(override, path, value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert path in str(err.value) and value in str(err.value)


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="min_duration_s"):
        load_config(None, ["convert.min_duration_s=5", "convert.max_duration_s=2"])


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- a list\n- not sections\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_malformed_override():
    with pytest.raises(ConfigError, match="a.b.c=value"):
        load_config(None, ["convert.sample_rate"])
