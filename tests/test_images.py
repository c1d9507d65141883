"""The container images: Dockerfiles reference files that exist, `make images` tags what `audiotune.images` names,
and every component's `base_image` is one of those images."""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from audiotune import __version__, images

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {"cpu": ROOT / "images" / "cpu" / "Dockerfile", "cuda": ROOT / "images" / "cuda" / "Dockerfile"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def dockerignore() -> list[str]:
    path = ROOT / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [p.strip().rstrip("/") for p in lines if p.strip() and not p.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    parts = Path(rel).parts
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(parts[0], p) for p in patterns if not p.startswith("!"))


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_copies_files_that_exist_and_are_in_the_context(kind):
    patterns = dockerignore()
    copies = [(w, a) for w, a in instructions(DOCKERFILES[kind]) if w in ("COPY", "ADD")]
    assert copies, "no COPY in the Dockerfile"
    for word, args in copies:
        tokens = shlex.split(args)
        if any(t.startswith("--from=") for t in tokens):
            continue  # from another build stage, not from the context
        sources = [t for t in tokens if not t.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"{kind}/Dockerfile: {word} {src}: no such file in the repository"
            if src != ".":
                assert not ignored(src, patterns), f"{kind}/Dockerfile: {word} {src} is excluded by .dockerignore"
    # what `pip install /src` needs must reach the build context
    for needed in ("setup.cfg", "pyproject.toml", "constraints.txt", "README.md", "src/audiotune/__init__.py"):
        assert (ROOT / needed).exists() and not ignored(needed, patterns), needed


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_installs_pinned_and_runs_as_non_root(kind):
    steps = instructions(DOCKERFILES[kind])
    text = "\n".join(f"{w} {a}" for w, a in steps)
    users = [a for w, a in steps if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{kind}: the final USER must not be root"
    assert "-c /src/constraints.txt /src" in text, f"{kind}: the package must install with constraints.txt"
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in text, f"{kind}: torch must match constraints.txt ({pinned})"
    assert f"ARG VERSION={__version__}" in text, f"{kind}: the VERSION default must be the package version"
    assert "org.opencontainers.image.version" in text
    for ref in re.findall(r"\$\{(\w+)[}:]", " ".join(a for w, a in steps if w == "FROM")):
        assert re.search(rf"^ARG {ref}=\S+", text, re.M), f"{kind}: FROM uses ${{{ref}}} without an ARG default"
    if kind == "cuda":
        assert "DS_BUILD_FUSED_ADAM=1" in text and "DS_ACCELERATOR=cuda" in text and "--no-build-isolation" in text
        assert re.search(r"FROM nvidia/cuda:\$\{CUDA_VERSION\}-cudnn-runtime", text)
        cuda = re.search(r"ARG CUDA_VERSION=(\d+)\.(\d+)", text).groups()
        assert f"whl/cu{cuda[0]}{cuda[1]}" in text, "the torch wheel index must match the CUDA base image"
        assert "ARG FLASH_ATTN=0" in text


def make_images(**variables: str) -> list[str]:
    cmd = ["make", "-s", "-n", "images", *[f"{k}={v}" for k, v in variables.items()]]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return re.findall(r"-t (\S+)", out)


def test_make_images_tags_are_the_library_image_names(monkeypatch):
    monkeypatch.delenv(images.REGISTRY_ENV, raising=False)
    assert make_images() == [images.image("cpu"), images.image("cuda")]
    assert make_images(IMAGE_REGISTRY="registry.example.com/ml") == [
        "registry.example.com/ml/audiotune-cpu:" + __version__, "registry.example.com/ml/audiotune-cuda:" + __version__]
    if not os.environ.get(images.REGISTRY_ENV):
        assert (images.CPU_IMAGE, images.CUDA_IMAGE) == tuple(make_images())
    monkeypatch.setenv(images.REGISTRY_ENV, "registry.example.com/ml/")
    assert images.image("cuda") == "registry.example.com/ml/audiotune-cuda:" + __version__


def _base_images(path: Path) -> list[tuple[int, str | None, str]]:
    """(line, literal value or None, source text) of every ``base_image=`` keyword in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.keyword) and node.arg == "base_image":
            value = node.value.value if isinstance(node.value, ast.Constant) else None
            found.append((node.value.lineno, value, ast.unparse(node.value)))
    return found


def test_component_base_images_are_the_project_images(monkeypatch):
    """Every component's base_image is one of the project's images (and there are components to check)."""
    monkeypatch.delenv(images.REGISTRY_ENV, raising=False)
    allowed = {images.image("cpu"), images.image("cuda")}
    assert (ROOT / "components").is_dir(), "components/ is missing"
    found = {path.name: _base_images(path) for path in sorted((ROOT / "components").glob("*.py"))}
    stages = {"convert.py", "tokenize.py", "train_llm.py", "train_flow.py", "train_joint.py", "export.py", "run.py"}
    assert stages <= {name for name, images_found in found.items() if images_found}, (
        f"components without a base_image: {sorted(stages - {n for n, f in found.items() if f})}")
    problems = []
    for name, base_images in found.items():
        path = ROOT / "components" / name
        for line, literal, source in base_images:
            if literal is not None:
                ok = literal in allowed
            else:
                ok = re.fullmatch(r"(\w+\.)*(CPU_IMAGE|CUDA_IMAGE)|images\.image\(.*\)", source) is not None
            if not ok:
                problems.append(f"{path.relative_to(ROOT)}:{line}: base_image={source} (expected "
                                f"audiotune.images.CPU_IMAGE or CUDA_IMAGE: {sorted(allowed)})")
    assert not problems, "\n".join(problems)
