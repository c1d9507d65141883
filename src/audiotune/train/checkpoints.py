"""Checkpoints beside the output artifact: complete only once fully written, newest-first resume.

A checkpoint is a directory ``checkpoint-<step>`` under ``<output>.checkpoints`` (local
or S3): the training state of every process (:func:`save_training_state`) and, written
last, ``manifest.json`` with the trainer state, so a checkpoint without a manifest is
incomplete and ignored. The trainer state carries the run's identity
(:func:`run_identity`: settings, data, number of processes); a resume from a checkpoint
of another run is refused (:func:`check_identity`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from audiotune import storage
from audiotune.errors import EXIT_USAGE, TrainingError

log = logging.getLogger(__name__)

KIND = "audiotune.checkpoint"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_uri(output: str) -> str:
    """Where the checkpoints of the artifact at ``output`` live."""
    return output.rstrip("/") + ".checkpoints"


def list_complete(root: str) -> list[tuple[int, str]]:
    """``(step, uri)`` of every complete checkpoint under ``root``, oldest first."""
    found: dict[int, str] = {}
    for rel in storage.list_files(root):
        parts = rel.split("/")
        if len(parts) == 2 and parts[1] == "manifest.json":
            match = _NAME.match(parts[0])
            if match:
                found[int(match.group(1))] = storage.join(root, parts[0])
    return sorted(found.items())


def read_state(uri: str) -> dict[str, Any]:
    """The trainer state saved in a checkpoint."""
    return json.loads(storage.read_text(storage.join(uri, "manifest.json")))["trainer_state"]


def find_resume(root: str, resume: str) -> str | None:
    """The checkpoint to resume from: ``auto`` → newest complete, ``never`` → None, else the given URI."""
    if resume == "never":
        return None
    if resume != "auto":
        if not storage.exists(storage.join(resume, "manifest.json")):
            raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint (no manifest.json)")
        return resume
    complete = list_complete(root)
    return complete[-1][1] if complete else None


class UntrustedCheckpoint(TrainingError):
    """A DeepSpeed resume (which unpickles) from a location other than the run's own checkpoints (exit 2)."""

    exit_code = EXIT_USAGE


def _inside(uri: str, root: str) -> bool:
    if storage.is_s3(uri) or storage.is_s3(root):
        return storage.is_s3(uri) and storage.is_s3(root) and uri.rstrip("/").startswith(root.rstrip("/") + "/")
    try:
        Path(uri).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def require_trusted(uri: str, root: str, trust: bool, section: str = "<stage>") -> None:
    """Refuse a DeepSpeed resume from ``uri`` outside ``root`` (the run's own checkpoints) unless ``trust``.

    DeepSpeed loads its checkpoint files with ``torch.load(weights_only=False)``: whoever can write where a
    checkpoint comes from can run code in the training process.

    Raises:
        UntrustedCheckpoint: Naming the checkpoint, the run's own location and the setting that allows it.
    """
    if trust or _inside(uri, root):
        return
    raise UntrustedCheckpoint(
        f"train.resume={uri}: a DeepSpeed checkpoint is read with pickle, which runs code from whoever wrote it, "
        f"and this one is outside the run's own checkpoints {root}; resume only from a location you control, and "
        f"set {section}.train.trust_checkpoint=true to allow it")


def prune(root: str, keep_last: int, best_step: int | None) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last``, keeping the best one."""
    complete = list_complete(root)
    for step, uri in complete[:-keep_last] if keep_last else complete:
        if step != best_step:
            log.info("removing old checkpoint %s", uri)
            storage.delete(uri)


def write_manifest(directory: Path, state: dict[str, Any]) -> None:
    """The checkpoint's manifest (written into the staging dir, published last)."""
    (Path(directory) / "manifest.json").write_text(
        json.dumps({"kind": KIND, "schema_version": 1, "trainer_state": state}, indent=2) + "\n"
    )


def save_checkpoint(acc, model, optimizer, scheduler, extra_state: dict[str, Any], root: str, work_dir: Path,
                    state: dict[str, Any], keep_last: int) -> str:
    """Write ``checkpoint-<step>`` of the trainer ``state`` under ``root``, then prune; returns its URI.

    Every process takes part and writes its part (its RNG states, its DeepSpeed partitions) into a staging
    directory: beside the target for a local root, in its own ``work_dir`` for S3, from where it uploads its
    files. The main process writes the ``extra_state`` objects (``<name>.safetensors``) and ``manifest.json``
    last (a rename locally), so a checkpoint without a manifest is incomplete; it then prunes to the newest
    ``keep_last`` and ``state["best_step"]``.
    """
    name = f"checkpoint-{state['step']}"
    local_root = not storage.is_s3(root)
    staging = (Path(root) / f".{name}.tmp") if local_root else Path(work_dir) / name
    if (acc.is_main_process or not local_root) and staging.exists():
        shutil.rmtree(staging)
    acc.wait_for_everyone()
    save_training_state(acc, model, optimizer, scheduler, staging)
    if acc.is_main_process and extra_state:
        from safetensors.torch import save_file

        for extra, obj in extra_state.items():
            save_file(obj.state_dict(), str(staging / f"{extra}.safetensors"))
    target = storage.join(root, name)
    if not local_root:
        storage.upload_dir(staging, target)
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_manifest(staging, state)
        if local_root:
            if Path(target).exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        else:
            storage.write_bytes(storage.join(target, "manifest.json"), (staging / "manifest.json").read_bytes())
        prune(root, keep_last, state.get("best_step"))
        log.info("checkpoint %s", target)
    if not local_root:
        shutil.rmtree(staging, ignore_errors=True)
    acc.wait_for_everyone()
    return target


def load_checkpoint(acc, model, optimizer, scheduler, extra_state: dict[str, Any], uri: str, work_dir: Path) -> None:
    """Restore what :func:`save_checkpoint` wrote at ``uri`` (every process calls it; S3 is downloaded first)."""
    from safetensors.torch import load_file

    local = Path(uri) if not storage.is_s3(uri) else storage.download(uri, Path(work_dir) / "resume")
    load_training_state(acc, model, optimizer, scheduler, local)
    for name, obj in extra_state.items():
        path = local / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {uri} has no {path.name}; it was written without {name!r} "
                                    "(resume from another checkpoint or set train.resume=never)")
        obj.load_state_dict(load_file(str(path)))


# ------------------------------------------------------------------------------------------- run identity
class CheckpointMismatch(TrainingError, ValueError):
    """A checkpoint to resume from was written by a run with other settings, data or processes."""


# Settings a resume may change: how long to train, and the cadence of logs, validation and checkpoints; memory
# knobs that leave the arithmetic alone (activation recomputation, DeepSpeed offloading; the JSON is compared
# through the keys the stage settings check); nproc_per_node, since the number of processes is compared itself.
RESUME_FREE = ("train.max_steps", "train.epochs", "train.resume", "train.save_every", "train.eval_every",
               "train.log_every", "train.keep_last", "train.nproc_per_node", "train.gradient_checkpointing",
               "train.deepspeed.offload_optimizer", "train.deepspeed.offload_params", "train.deepspeed.config_file",
               "train.trust_checkpoint", "overwrite")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def run_identity(section: str, config: dict[str, Any], free: tuple[str, ...] = (), **facts: Any) -> dict[str, Any]:
    """What a resume must match: a stage's config section (but :data:`RESUME_FREE` and ``free``) and ``facts``.

    Args:
        section: Name of the config section (``llm``), the prefix of the field names in messages.
        config: The section as JSON (``model_dump(mode="json")``).
        free: More fields (relative to the section, e.g. ``base_model``) a resume may change.
        facts: Further values that must match, e.g. the seed, the Tokens' dataset fingerprint.

    Returns:
        ``config`` (the compared fields, flat), ``config_hash`` (their digest) and the ``facts``.
    """
    skip = (*RESUME_FREE, *free)
    flat = {f"{section}.{k}": v for k, v in _flatten(config).items()
            if not any(k == s or k.startswith(f"{s}.") for s in skip)}
    digest = hashlib.blake2b(json.dumps(flat, sort_keys=True).encode(), digest_size=16).hexdigest()
    return {"config_hash": digest, "config": flat, **facts}


def identity_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the identity a checkpoint was written with and this run's (empty when none)."""
    problems = []
    if saved.get("config_hash") != current.get("config_hash") and "config" in saved and "config" in current:
        old, new = saved["config"], current["config"]
        problems += [f"{k}: checkpoint {old.get(k, '<unset>')!r}, now {new.get(k, '<unset>')!r}"
                     for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k, "<unset>")]
    for key in sorted((set(saved) & set(current)) - {"config", "config_hash"}):
        if saved[key] != current[key]:
            problems.append(f"{key}: checkpoint {saved[key]!r}, now {current[key]!r}")
    return problems


def check_identity(uri: str, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume from ``uri`` when its identity differs from this run's, naming what differs."""
    if not saved:
        log.warning("checkpoint %s records no run identity (an older version wrote it): cannot check that it "
                    "comes from a run with the same settings and data", uri)
        return
    problems = identity_mismatch(saved, current)
    if problems:
        raise CheckpointMismatch(
            f"checkpoint {uri} was written by a different run: {'; '.join(problems)}. An exact resume needs the "
            "same settings, data and number of processes: restore them, point train.resume at another "
            "checkpoint, set train.resume=never, or write to another output")


# ------------------------------------------------------------------------------------------- training state
# Everything a resume needs, without pickle: trainable weights and buffers as safetensors (frozen base weights
# never change, so a LoRA checkpoint stays small), the optimizer through torch.save / torch.load(weights_only=True),
# the schedule and the GradScaler as JSON, every rank's RNG states as safetensors + JSON. Under DeepSpeed the
# engine's own checkpoint holds weights and (partitioned) optimizer states; DeepSpeed reads its files with
# torch.load(weights_only=False): a DeepSpeed resume from outside the run's own checkpoints is refused unless
# <stage>.train.trust_checkpoint (require_trusted).
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.json"
SCALER = "scaler.json"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def _trainable_state(model) -> dict[str, Any]:
    import torch

    params = dict(model.named_parameters())
    state = model.state_dict()
    keep = {k: v for k, v in state.items() if (k in params and params[k].requires_grad) or k not in params}
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in keep.items() if isinstance(v, torch.Tensor)}


def save_training_state(acc, model, optimizer, scheduler, directory: Path) -> None:
    """Write this process's part of a resumable training state into ``directory`` (every process calls it)."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if acc.state.deepspeed_plugin is not None:
        model.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    elif acc.is_main_process:
        save_file(_trainable_state(acc.unwrap_model(model)), str(directory / TRAINABLE))
        torch.save(optimizer.state_dict(), directory / OPTIMIZER)
    if acc.is_main_process:
        (directory / SCHEDULER).write_text(json.dumps(scheduler.state_dict()))
        if getattr(acc, "scaler", None) is not None:
            (directory / SCALER).write_text(json.dumps(acc.scaler.state_dict()))
    _save_rng(directory, acc.process_index)


def load_training_state(acc, model, optimizer, scheduler, directory: Path) -> None:
    """Restore what :func:`save_training_state` wrote (every process calls it)."""
    import torch
    from safetensors.torch import load_file

    directory = Path(directory)
    if acc.state.deepspeed_plugin is not None:
        if not (directory / DEEPSPEED_DIR).is_dir():
            raise FileNotFoundError(f"checkpoint {directory} was not written under DeepSpeed (no {DEEPSPEED_DIR}/); "
                                    "resume with the same deepspeed settings, or set train.resume=never")
        # frozen weights are not in the checkpoint (exclude_frozen_parameters), hence not strict
        model.load_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=False,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        if not (directory / TRAINABLE).is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no {TRAINABLE} (written under DeepSpeed?); resume "
                                    "with the same deepspeed settings, or set train.resume=never")
        saved = load_file(str(directory / TRAINABLE))
        own = _trainable_state(acc.unwrap_model(model))
        missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        if missing or unexpected:
            raise ValueError(f"checkpoint {directory} does not fit this model: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]} (was it written with other model or LoRA settings?)")
        current = acc.unwrap_model(model).state_dict()
        with torch.no_grad():
            for key, value in saved.items():
                current[key].copy_(value)
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER, map_location="cpu", weights_only=True))
    scheduler.load_state_dict(json.loads((directory / SCHEDULER).read_text()))
    if getattr(acc, "scaler", None) is not None and (directory / SCALER).exists():
        acc.scaler.load_state_dict(json.loads((directory / SCALER).read_text()))
    _load_rng(directory, acc.process_index)


def _save_rng(directory: Path, rank: int) -> None:
    import random

    import numpy as np
    import torch
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    save_file(tensors, str(directory / f"rng_state_{rank}.safetensors"))
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    (directory / f"rng_state_{rank}.json").write_text(json.dumps({
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
    }))


def cuda_states(tensors: dict[str, Any]) -> list[Any]:
    """The ``cuda<i>`` RNG states of a saved RNG file in device order (cuda2 before cuda10)."""
    keys = [k for k in tensors if k.startswith("cuda") and k[4:].isdigit()]
    return [tensors[k] for k in sorted(keys, key=lambda k: int(k[4:]))]


def _load_rng(directory: Path, rank: int) -> None:
    import random

    import numpy as np
    import torch
    from safetensors.torch import load_file

    path = directory / f"rng_state_{rank}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {directory} has no RNG state of rank {rank}: it was written by fewer "
                                "processes; an exact resume needs the same number of processes")
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch"])
    cuda = cuda_states(tensors)
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    states = json.loads((directory / f"rng_state_{rank}.json").read_text())
    py_version, py_state, py_gauss = states["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
