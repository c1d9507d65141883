"""Fingerprints of a base model: its architecture config and a checksum of every tensor.

The llm stage records the fingerprint of the base it trained on; export and the joint stage refuse
a base whose fingerprint differs (a LoRA merged into the wrong base is the failure this prevents).
Sharding and load dtype do not change a fingerprint; any changed weight does. A base whose code ships
with its weights (``auto_map``) also has the sha256 of every such .py file in its fingerprint
(``remote_code``): a changed modeling file is named when export compares the fingerprints.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

_CONFIG_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    t = tensor.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _digest(config: dict[str, Any], tensors) -> dict[str, Any]:
    h = hashlib.blake2b(digest_size=20)
    shapes = {}
    for name, tensor in tensors:
        shapes[name] = [list(tensor.shape), str(tensor.dtype).replace("torch.", "")]
        h.update(name.encode())
        h.update(json.dumps(shapes[name]).encode())
        h.update(_tensor_bytes(tensor))
    return {"config": {k: config.get(k) for k in _CONFIG_KEYS if k in config}, "tensors": len(shapes),
            "parameters": int(sum(_numel(s[0]) for s in shapes.values())),
            "shapes_digest": hashlib.blake2b(json.dumps(shapes, sort_keys=True).encode(), digest_size=16).hexdigest(),
            "checksum": h.hexdigest()}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def fingerprint_checkpoint(path: str | Path) -> dict[str, Any]:
    """Fingerprint of a checkpoint directory: its config and every stored tensor (name, shape, dtype, bytes).

    Independent of sharding and of the dtype a model is later loaded in; a few seconds per GB.
    """
    from safetensors import safe_open

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    index: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                index[key] = file

    def tensors():
        handles: dict[Path, Any] = {}
        try:
            for name in sorted(index):
                file = index[name]
                if file not in handles:
                    handles[file] = safe_open(str(file), framework="pt").__enter__()
                yield name, handles[file].get_tensor(name)
        finally:
            for h in handles.values():
                h.__exit__(None, None, None)

    fingerprint = _digest(config, tensors())
    code = remote_code_files(path)
    if code:
        fingerprint["remote_code"] = code
    return fingerprint


def remote_code_files(path: str | Path) -> dict[str, str]:
    """sha256 of the .py files a model folder's ``auto_map`` names (config.json, tokenizer_config.json), and of
    the files they import relatively; empty when the model needs no code of its own."""
    from transformers.dynamic_module_utils import get_relative_import_files

    path = Path(path)
    modules: set[str] = set()
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((path / name).read_text()).get("auto_map") or {}
        except (OSError, ValueError):
            continue
        for refs in auto_map.values():
            for ref in refs if isinstance(refs, list) else [refs]:
                if isinstance(ref, str) and "." in ref and "--" not in ref:
                    modules.add(ref.rsplit(".", 1)[0] + ".py")
    files = {path / m for m in modules if (path / m).is_file()}
    for file in list(files):
        files.update(Path(f) for f in get_relative_import_files(str(file)))
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(files) if f.is_file()}


def code_mismatch(recorded: dict[str, str], found: dict[str, str]) -> list[str]:
    """The remote-code files that differ between two ``remote_code`` maps, one line each."""
    problems = []
    for name in sorted(set(recorded) | set(found)):
        a, b = recorded.get(name), found.get(name)
        if a != b:
            problems.append(f"remote code {name}: " + (f"sha256 {a[:12]}… at training, {b[:12]}… now (the file "
                                                       "changed)" if a and b else
                                                       "missing now" if a else "not there at training"))
    return problems


def fingerprint_model(model: nn.Module) -> dict[str, Any]:
    """Fingerprint of an in-memory model (a scratch init), in the same form as :func:`fingerprint_checkpoint`."""
    config = model.config.to_dict() if hasattr(model, "config") else {}
    state = model.state_dict()
    return _digest(config, ((k, state[k]) for k in sorted(state)))


def fingerprint_mismatch(recorded: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints (empty when they agree)."""
    problems = code_mismatch(recorded.get("remote_code") or {}, found.get("remote_code") or {})
    for key in sorted(set(recorded.get("config", {})) | set(found.get("config", {}))):
        a, b = recorded.get("config", {}).get(key), found.get("config", {}).get(key)
        if a != b:
            problems.append(f"config.{key}: trained on {a!r}, found {b!r}")
    for key in ("tensors", "parameters", "shapes_digest", "checksum"):
        if recorded.get(key) != found.get(key):
            problems.append(f"{key}: trained on {recorded.get(key)!r}, found {found.get(key)!r}")
    return problems

