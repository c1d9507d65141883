"""What a pipeline task gets of the config, and functions that build a launch config as a copy."""

from __future__ import annotations

import json

from audiotune.config import AudiotuneConfig
from audiotune.orchestration import steps


def test_tokenize_task_gets_convert_val_fraction():
    """The tokenize stage splits a MOSS-TTSD import with convert.val_fraction: it travels with (and keys the cache
    of) the tokenize task, and nothing else of the convert section does."""
    cfg = AudiotuneConfig.model_validate({"convert": {"source": "/data", "val_fraction": 0.25}})
    shipped = json.loads(steps.to_json(cfg, steps.TOKENIZE_SECTIONS))
    assert shipped["convert"] == {"val_fraction": 0.25}
    assert steps.load(json.dumps(shipped), "tokenize").convert.val_fraction == 0.25
    assert "convert" not in json.loads(steps.to_json(AudiotuneConfig(), steps.TOKENIZE_SECTIONS))


def test_forcing_overwrite_for_a_retry_changes_a_copy(tmp_path, monkeypatch):
    """A retried task that finds a half-published output overwrites it, on its own copy of the config."""
    from audiotune.orchestration import training

    seen = {}
    monkeypatch.setattr(training, "launch", lambda stage, cfg, *a, **k: seen.update(cfg=cfg))
    target = tmp_path / "durable"
    target.mkdir()
    (target / "part").write_text("half")
    cfg = AudiotuneConfig()
    steps._train("llm", cfg, "run-1", {}, {"--output": (str(target), str(tmp_path / "local"))}, str(target), None)
    assert seen["cfg"].llm.overwrite is True and cfg.llm.overwrite is False
