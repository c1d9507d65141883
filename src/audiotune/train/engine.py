"""The training engine shared by the llm, flow and joint stages.

Built on accelerate (DDP or DeepSpeed ZeRO 0-3, mixed precision, gradient
accumulation); checkpoints are written by :mod:`audiotune.train.checkpoints` without
pickle (trainable weights only, so LoRA checkpoints stay small). A stage hands it one
module, parameter groups, a loss function and a batch source; the engine runs the
loop, validates, logs to MLflow, checkpoints every N steps beside the output and
resumes exactly: model, optimizer, scheduler, RNG states and the position in the data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from transformers import get_scheduler

from audiotune import storage
from audiotune.config import TrainSettings
from audiotune.train import checkpoints
from audiotune.train.deepspeed import deepspeed_plugin

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """SIGTERM arrived; a checkpoint was written and the run can resume."""


class BatchSource(Protocol):
    """Batches for this process: ``batches(epoch)`` lists index groups, ``collate`` makes tensors."""

    def batches(self, epoch: int) -> list[list[int]]: ...

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]: ...


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


class Stateful(Protocol):
    """Extra training state saved in checkpoints (e.g. an EMA of the weights): tensors only."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class EngineState:
    """Where training is; saved in every checkpoint's manifest."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_dtype(dtype: str) -> str:
    """``auto`` → bf16 on a GPU that supports it, else fp32."""
    if dtype != "auto":
        return dtype
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def make_accelerator(train: TrainSettings, dtype: str) -> Accelerator:
    """An Accelerator for these settings: gloo on CPU, NCCL on GPUs, DeepSpeed when a ZeRO stage is set."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "LOCAL_RANK" not in os.environ:
        # One process running several stages (tests, notebooks): accelerate keeps a process-wide singleton
        # whose settings (mixed precision, DeepSpeed plugin) must not leak from one stage into the next.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()
    plugin = deepspeed_plugin(train, dtype)
    # bf16 autocast is applied by the engine around the loss: accelerate's own mixed precision also wraps forward
    # to cast every model output to fp32, i.e. an extra [tokens, vocab] fp32 copy of the logits per step, large with
    # a 152k vocabulary (not measured on a GPU here). fp16 keeps accelerate's handling for its loss scaling;
    # DeepSpeed has its own.
    mixed = "fp16" if dtype == "fp16" else "no"
    return Accelerator(
        gradient_accumulation_steps=train.grad_accum,
        mixed_precision=mixed,
        deepspeed_plugin=plugin,
        # without cpu=True accelerate treats torchrun processes on a CPU-only machine as unrelated single
        # processes (DistributedType.NO: no DDP wrapping, reduce() a no-op); cpu=True gives MULTI_CPU (DDP on gloo).
        # DeepSpeed keeps cpu=False: accelerate disables DeepSpeed under cpu=True.
        cpu=plugin is None and not torch.cuda.is_available(),
        # the backend only matters with several processes; set for one, accelerate expects a process group
        kwargs_handlers=[InitProcessGroupKwargs(backend=backend)] if "LOCAL_RANK" in os.environ else [],
        step_scheduler_with_optimizer=False,
    )


def build_optimizer(param_groups: list[dict[str, Any]], train: TrainSettings) -> torch.optim.Optimizer:
    """AdamW; each group may carry its own ``lr`` and ``weight_decay``."""
    return torch.optim.AdamW(param_groups, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)


def decay_groups(named_params: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float,
                 name: str = "params") -> list[dict[str, Any]]:
    """Split trainable parameters into decayed and not decayed (biases, norms, 1-D) groups."""
    decay, no_decay = [], []
    for pname, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in pname.lower() or pname.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": f"{name}.decay"},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}.no_decay"}]
    return [g for g in groups if g["params"]]


def peak_memory_mb() -> float:
    """Peak accelerator memory, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Engine:
    """Runs one training stage; see the module docstring."""

    def __init__(self, *, train: TrainSettings, accelerator: Accelerator, model: torch.nn.Module,
                 param_groups: list[dict[str, Any]], loss_fn: LossFn, train_data: BatchSource,
                 val_data: BatchSource | None, output: str, tracker, work_dir: Path, seed: int,
                 on_step: Callable[[EngineState], None] | None = None,
                 eval_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 extra_state: dict[str, Stateful] | None = None):
        """Optional hooks (all processes): ``on_step(state)`` runs after every optimizer step (e.g. an EMA
        update, periodic samples), before logging, validation and checkpointing of that step;
        ``eval_context()`` is entered around validation (e.g. swap in EMA weights); ``extra_state`` objects
        (``state_dict()`` of tensors / ``load_state_dict``) are saved in every checkpoint as
        ``<name>.safetensors`` by the main process and restored on resume."""
        self.on_step = on_step
        self.eval_context = eval_context
        self.extra_state = dict(extra_state or {})
        self.train = train
        self.acc = accelerator
        self.loss_fn = loss_fn
        self.train_data = train_data
        self.val_data = val_data
        self.tracker = tracker
        self.work_dir = Path(work_dir)
        self.seed = seed
        self.ckpt_root = checkpoints.checkpoints_uri(output)
        self.state = EngineState()
        self._stop = False
        self.steps_per_epoch = max(1, math.ceil(len(train_data.batches(0)) / train.grad_accum))
        self.total_steps = train.max_steps or max(1, math.ceil(train.epochs * self.steps_per_epoch))
        optimizer = build_optimizer(param_groups, train)
        warmup = train.warmup_steps if train.warmup_steps is not None else int(train.warmup_ratio * self.total_steps)
        scheduler = get_scheduler(train.schedule, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=self.total_steps)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        bf16 = resolve_dtype(train.dtype) == "bf16" and accelerator.state.deepspeed_plugin is None
        self.autocast = (torch.autocast(device_type=accelerator.device.type, dtype=torch.bfloat16) if bf16
                         else contextlib.nullcontext())

    # ------------------------------------------------------------------ resume
    def maybe_resume(self) -> bool:
        """Load the newest complete checkpoint (``train.resume``); True when one was loaded."""
        uri = checkpoints.find_resume(self.ckpt_root, self.train.resume)
        if uri is None:
            return False
        local = Path(uri) if not storage.is_s3(uri) else storage.download(uri, self.work_dir / "resume")
        checkpoints.load_training_state(self.acc, self.model, self.optimizer, self.scheduler, local)
        for name, obj in self.extra_state.items():
            path = local / f"{name}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint {uri} has no {path.name}; it was written without {name!r} "
                                        "(resume from another checkpoint or set train.resume=never)")
            from safetensors.torch import load_file

            obj.load_state_dict(load_file(str(path)))
        self.state = EngineState(**checkpoints.read_state(str(local)))
        log.info("resumed from %s at step %d (epoch %d, batch %d)", uri, self.state.step, self.state.epoch,
                 self.state.batch_in_epoch)
        return True

    # ------------------------------------------------------------------- loop
    def fit(self) -> EngineState:
        """Train until ``total_steps``; returns the final state."""
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        s = self.state
        self.model.train()
        window = {"loss": 0.0, "tokens": 0, "samples": 0, "micro": 0, "t0": time.perf_counter()}
        log.info("training %d steps (%d per epoch, %d processes)", self.total_steps, self.steps_per_epoch,
                 self.acc.num_processes)
        try:
            while s.step < self.total_steps:
                batches = self.train_data.batches(s.epoch)
                while s.batch_in_epoch < len(batches) and s.step < self.total_steps:
                    batch = self._to_device(self.train_data.collate(batches[s.batch_in_epoch]))
                    s.batch_in_epoch += 1
                    grad_norm = self._micro_step(batch, window)
                    if self.acc.sync_gradients:
                        self.scheduler.step()
                        s.step += 1
                        if self.on_step is not None:
                            self.on_step(s)
                        self._after_step(window, grad_norm)
                        if self._should_stop():
                            self.save_checkpoint()
                            raise TrainingInterrupted(f"stopped by SIGTERM at step {s.step}; checkpoint written")
                if s.batch_in_epoch >= len(batches):
                    s.epoch += 1
                    s.batch_in_epoch = 0
            if self.val_data is not None and (not s.history or s.history[-1].get("step") != s.step
                                              or "val_loss" not in s.history[-1]):
                self._validate()
            self.save_checkpoint()
        finally:
            signal.signal(signal.SIGTERM, previous)
        return s

    def _micro_step(self, batch: dict[str, torch.Tensor], window: dict[str, Any]) -> Any:
        grad_norm = None
        with self.acc.accumulate(self.model):
            with self.autocast:
                loss, metrics = self.loss_fn(self.model, batch)
            self.acc.backward(loss)
            if self.acc.sync_gradients and self.train.max_grad_norm > 0:
                norm = self.acc.clip_grad_norm_(self.model.parameters(), self.train.max_grad_norm)
                if norm is None and hasattr(self.model, "get_global_grad_norm"):  # DeepSpeed clips itself
                    norm = self.model.get_global_grad_norm()
                grad_norm = norm  # a tensor until it is logged: no device sync per step
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        window["loss"] += loss.detach().float()  # stays on the device: no sync per step
        window["tokens"] += int(metrics.get("tokens", 0))
        window["samples"] += int(metrics.get("samples", 0))
        window["micro"] += 1
        for key, value in metrics.items():
            if key not in ("tokens", "samples"):
                window.setdefault("extra", {}).setdefault(key, []).append(float(value))
        return grad_norm

    def _after_step(self, window: dict[str, Any], grad_norm: Any) -> None:
        s = self.state
        if s.step % self.train.log_every == 0 or s.step == self.total_steps:
            elapsed = time.perf_counter() - window["t0"]
            totals = self._reduce([float(window["loss"]), window["micro"], window["tokens"], window["samples"]])
            record = {
                "step": s.step, "loss": totals[0] / max(totals[1], 1),
                "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": totals[2] / elapsed,
                "samples_per_s": totals[3] / elapsed, "peak_memory_mb": peak_memory_mb(),
            }
            names = [g.get("name") for g in self.optimizer.param_groups]
            if len({n.split(".")[0] for n in names if n}) > 1:  # several models (joint): each one's learning rate
                for name, lr in zip(names, self.scheduler.get_last_lr(), strict=True):
                    if name:
                        record[f"lr.{name}"] = lr
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            for key, values in window.get("extra", {}).items():
                record[key] = sum(values) / len(values)
            s.history.append(record)
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=s.step)
            eta = (self.total_steps - s.step) * elapsed / max(self.train.log_every, 1)
            log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s ETA %.0fs", s.step, self.total_steps,
                     record["loss"], record["lr"], record["tokens_per_s"], eta)
            window.update(loss=0.0, tokens=0, samples=0, micro=0, t0=time.perf_counter(), extra={})
        if self.val_data is not None and s.step % self.train.eval_every == 0:
            self._validate()
        if s.step % self.train.save_every == 0 and s.step < self.total_steps:
            self.save_checkpoint()

    def _reduce(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return self.acc.reduce(tensor, reduction="sum").tolist() if self.acc.num_processes > 1 else values

    @torch.no_grad()
    def _validate(self) -> float:
        self.model.eval()
        total, count = 0.0, 0.0
        parts: dict[str, float] = {}  # loss components a loss function reports as loss_<name> (joint: llm, flow)
        with self.eval_context() if self.eval_context is not None else contextlib.nullcontext():
            for indices in self.val_data.batches(0):
                batch = self._to_device(self.val_data.collate(indices))
                with self.autocast:
                    loss, metrics = self.loss_fn(self.model, batch)
                weight = float(metrics.get("tokens", 1)) or 1.0
                total += float(loss) * weight
                count += weight
                for key, value in metrics.items():
                    if key.startswith("loss_"):
                        parts[key] = parts.get(key, 0.0) + float(value) * weight
        names = sorted(parts)
        reduced = self._reduce([total, count, *(parts[k] for k in names)])
        total, count = reduced[0], reduced[1]
        extra = {f"val_{k}": v / count for k, v in zip(names, reduced[2:], strict=True)} if count else {}
        self.model.train()
        val = total / count if count else float("nan")
        s = self.state
        if s.best_val_loss is None or val < s.best_val_loss:
            s.best_val_loss, s.best_step = val, s.step
        if s.history and s.history[-1].get("step") == s.step:
            s.history[-1].update(val_loss=val, **extra)
        else:
            s.history.append({"step": s.step, "val_loss": val, **extra})
        self.tracker.log_metrics({"val_loss": val, **extra}, step=s.step)
        log.info("step %d val_loss %.4f (best %.4f at step %s)", s.step, val, s.best_val_loss, s.best_step)
        return val

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> str:
        """Write a complete checkpoint of the current step (all processes take part).

        Every process writes its part (its RNG states, its DeepSpeed partitions) into a staging directory: beside
        the target for a local root, in its own work directory for S3, from where it uploads its files. The main
        process writes ``manifest.json`` last (a rename locally), so a checkpoint without one is incomplete.
        """
        step = self.state.step
        name = f"checkpoint-{step}"
        local_root = not storage.is_s3(self.ckpt_root)
        staging = (Path(self.ckpt_root) / f".{name}.tmp") if local_root else self.work_dir / name
        if (self.acc.is_main_process or not local_root) and staging.exists():
            shutil.rmtree(staging)
        self.acc.wait_for_everyone()
        checkpoints.save_training_state(self.acc, self.model, self.optimizer, self.scheduler, staging)
        if self.acc.is_main_process and self.extra_state:
            from safetensors.torch import save_file

            for extra, obj in self.extra_state.items():
                save_file(obj.state_dict(), str(staging / f"{extra}.safetensors"))
        target = storage.join(self.ckpt_root, name)
        if not local_root:
            storage.upload_dir(staging, target)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            state = asdict(self.state)
            checkpoints.write_manifest(staging, state)
            if local_root:
                if Path(target).exists():
                    shutil.rmtree(target)
                os.replace(staging, target)
            else:
                storage.write_bytes(storage.join(target, "manifest.json"), (staging / "manifest.json").read_bytes())
            checkpoints.prune(self.ckpt_root, self.train.keep_last, self.state.best_step)
            log.info("checkpoint %s", target)
        if not local_root:
            shutil.rmtree(staging, ignore_errors=True)
        self.acc.wait_for_everyone()
        return target

    # ------------------------------------------------------------------ misc
    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002
        log.warning("SIGTERM: will checkpoint and stop after the current step")
        self._stop = True

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.acc.device)
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.acc.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (model init and data order depend on it)."""
    set_seed(seed)


def history_json(state: EngineState) -> str:
    return json.dumps(state.history, indent=1)
