"""The import contracts in ``.importlinter`` (the layer order of docs/architecture.md) hold, and name every module."""

from __future__ import annotations

import configparser
import os
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"


def test_import_contracts_kept(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # import-linter finds components/ and pipelines/ from the working directory
    assert lint_imports(config_filename=str(CONFIG), no_cache=True, no_logo=True) == 0, (
        "an import breaks a contract in .importlinter (run `lint-imports` for the chain)")


def test_every_module_has_a_layer() -> None:
    """A new top-level module or package of src/audiotune must be placed in the layer order, not slip past it."""
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    layers = parser["importlinter:contract:layers"]["layers"]
    named = {name.strip() for line in layers.splitlines() for part in line.split("|") for name in part.split(":")}
    src = ROOT / "src" / "audiotune"
    modules = {f"audiotune.{p.stem}" for p in src.glob("*.py") if p.stem != "__init__"}
    modules |= {f"audiotune.{p.name}" for p in src.iterdir() if (p / "__init__.py").is_file()}
    missing = sorted(modules - named)
    assert not missing, f"not in any layer of .importlinter: {missing}"
    assert os.path.isfile(ROOT / "docs" / "architecture.md")
