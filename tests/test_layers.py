"""The import contracts in ``.importlinter`` (the layer order of docs/architecture.md) hold, and name every module."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"


def test_import_contracts_kept() -> None:
    # In its own process: import-linter configures logging with dictConfig, which disables every logger that
    # already exists (the audiotune ones included) for the rest of a pytest session. It finds components/ and
    # pipelines/ from the working directory.
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), str(CONFIG), "--no-cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"an import breaks a contract in .importlinter:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    assert "ignored imports" not in done.stdout, "a layer exception came back: move the code, do not ignore it"


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
