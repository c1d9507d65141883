"""The training engine shared by the llm, flow and joint stages.

Built on accelerate (DDP or DeepSpeed ZeRO 0-3, mixed precision, gradient
accumulation, ``save_state``/``load_state`` with RNG states). A stage hands it one
module, parameter groups, a loss function and a batch source; the engine runs the
loop, validates, logs to MLflow, checkpoints every N steps beside the output and
resumes exactly: model, optimizer, scheduler, RNG states and the position in the data.
"""

from __future__ import annotations

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
    mixed = {"bf16": "bf16", "fp16": "fp16"}.get(dtype, "no")
    plugin = deepspeed_plugin(train, dtype)
    return Accelerator(
        gradient_accumulation_steps=train.grad_accum,
        mixed_precision=mixed,
        deepspeed_plugin=plugin,
        kwargs_handlers=[InitProcessGroupKwargs(backend=backend)],
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
                 val_data: BatchSource | None, output: str, tracker, work_dir: Path, seed: int):
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
        accelerator.register_for_checkpointing(scheduler)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]

    # ------------------------------------------------------------------ resume
    def maybe_resume(self) -> bool:
        """Load the newest complete checkpoint (``train.resume``); True when one was loaded."""
        uri = checkpoints.find_resume(self.ckpt_root, self.train.resume)
        if uri is None:
            return False
        local = Path(uri) if not storage.is_s3(uri) else storage.download(uri, self.work_dir / "resume")
        self.acc.load_state(str(local))
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

    def _micro_step(self, batch: dict[str, torch.Tensor], window: dict[str, Any]) -> float | None:
        grad_norm = None
        with self.acc.accumulate(self.model):
            loss, metrics = self.loss_fn(self.model, batch)
            self.acc.backward(loss)
            if self.acc.sync_gradients and self.train.max_grad_norm > 0:
                norm = self.acc.clip_grad_norm_(self.model.parameters(), self.train.max_grad_norm)
                if norm is None and hasattr(self.model, "get_global_grad_norm"):  # DeepSpeed clips itself
                    norm = self.model.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else None
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        window["loss"] += float(loss.detach())
        window["tokens"] += int(metrics.get("tokens", 0))
        window["samples"] += int(metrics.get("samples", 0))
        window["micro"] += 1
        for key, value in metrics.items():
            if key not in ("tokens", "samples"):
                window.setdefault("extra", {}).setdefault(key, []).append(float(value))
        return grad_norm

    def _after_step(self, window: dict[str, Any], grad_norm: float | None) -> None:
        s = self.state
        if s.step % self.train.log_every == 0 or s.step == self.total_steps:
            elapsed = time.perf_counter() - window["t0"]
            totals = self._reduce([window["loss"], window["micro"], window["tokens"], window["samples"]])
            record = {
                "step": s.step, "loss": totals[0] / max(totals[1], 1),
                "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": totals[2] / elapsed,
                "samples_per_s": totals[3] / elapsed, "peak_memory_mb": peak_memory_mb(),
            }
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
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
        for indices in self.val_data.batches(0):
            batch = self._to_device(self.val_data.collate(indices))
            loss, metrics = self.loss_fn(self.model, batch)
            weight = float(metrics.get("tokens", 1)) or 1.0
            total += float(loss) * weight
            count += weight
        total, count = self._reduce([total, count])
        self.model.train()
        val = total / count if count else float("nan")
        s = self.state
        if s.best_val_loss is None or val < s.best_val_loss:
            s.best_val_loss, s.best_step = val, s.step
        if s.history and s.history[-1].get("step") == s.step:
            s.history[-1]["val_loss"] = val
        else:
            s.history.append({"step": s.step, "val_loss": val})
        self.tracker.log_metrics({"val_loss": val}, step=s.step)
        log.info("step %d val_loss %.4f (best %.4f at step %s)", s.step, val, s.best_val_loss, s.best_step)
        return val

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> str:
        """Write a complete checkpoint of the current step (all processes take part)."""
        step = self.state.step
        name = f"checkpoint-{step}"
        local_root = not storage.is_s3(self.ckpt_root)
        staging = (Path(self.ckpt_root) / f".{name}.tmp") if local_root else self.work_dir / name
        if self.acc.is_main_process and staging.exists():
            shutil.rmtree(staging)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(staging))
        self.acc.wait_for_everyone()
        target = storage.join(self.ckpt_root, name)
        if self.acc.is_main_process:
            state = asdict(self.state)
            if local_root:
                checkpoints.write_manifest(staging, state)
                if Path(target).exists():
                    shutil.rmtree(target)
                os.replace(staging, target)
            else:
                storage.upload_dir(staging, target)
                checkpoints.write_manifest(staging, state)
                storage.write_bytes(storage.join(target, "manifest.json"), (staging / "manifest.json").read_bytes())
                shutil.rmtree(staging, ignore_errors=True)
            checkpoints.prune(self.ckpt_root, self.train.keep_last, self.state.best_step)
            log.info("checkpoint %s", target)
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
