"""The training engine shared by the llm, flow and joint stages.

Built on accelerate (DDP or DeepSpeed ZeRO 0-3, mixed precision, gradient
accumulation); checkpoints are written by :mod:`audiotune.train.checkpoints` and read
without unpickling code (trainable weights only, so LoRA checkpoints stay small); under
DeepSpeed its own format, which unpickles, is resumed only from the run's own checkpoints
unless ``train.trust_checkpoint``. A stage hands it one
module, parameter groups, a loss function and a batch source; the engine runs the
loop, validates, logs to MLflow, checkpoints every N steps beside the output and
resumes exactly: model, optimizer, scheduler, RNG states and the position in the data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from accelerate import Accelerator

from audiotune.config import TrainSettings
from audiotune.errors import AudiotuneError, TrainingError
from audiotune.train import checkpoints
from audiotune.train.engine_setup import (
    build_optimizer,
    build_scheduler,
    decay_groups,
    make_accelerator,
    peak_memory_mb,
    resolve_dtype,
    seed_everything,
)

log = logging.getLogger(__name__)

__all__ = [  # the builders live in engine_setup; stages import them from here with the Engine
    "BatchSource", "Engine", "EngineState", "LossFn", "Stateful", "TooManyDropped", "TrainingInterrupted",
    "build_optimizer", "build_scheduler", "check_dropped", "decay_groups", "history_json", "make_accelerator",
    "peak_memory_mb", "resolve_dtype", "seed_everything",
]


class TrainingInterrupted(AudiotuneError):
    """SIGTERM arrived; a checkpoint was written and the run can resume."""


class TooManyDropped(TrainingError):
    """A training stage would drop more of its rows than ``<stage>.train.max_drop_fraction`` allows."""


def check_dropped(source: str, rows: int, dropped: int, why: str, setting: str, fraction: float,
                  advice: str) -> None:
    """Refuse to train on what is left when more than ``fraction`` of ``rows`` were dropped.

    Args:
        source: The split read (named in the message).
        rows: Rows of the split.
        dropped: Rows the stage dropped.
        why: Why they were dropped, e.g. ``longer than llm.max_seq_len=256``.
        setting: The setting's path, e.g. ``llm.train.max_drop_fraction``.
        fraction: Its value.
        advice: What to change instead.

    Raises:
        TooManyDropped: Naming the count, the reason and the setting.
    """
    if rows and dropped / rows > fraction:
        raise TooManyDropped(f"{source}: {dropped} of {rows} rows dropped ({why}), {dropped / rows:.1%} > "
                             f"{setting}={fraction:g}; {advice}, or raise {setting} to train on the rest")


class BatchSource(Protocol):
    """Batches for this process: ``batches(epoch)`` lists index groups, ``collate`` makes tensors.

    A source may also tell, with ``repeats(epoch)`` (its own, or its ``sampler``'s, e.g. a
    :class:`~audiotune.train.batching.TokenBudgetSampler`), which of its batches only repeat one dealt to
    another process so that every process runs as many batches; validation runs those with weight 0.
    """

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
    identity: dict[str, Any] = field(default_factory=dict)  # what a resume must match (checkpoints.run_identity)


class Engine:
    """Runs one training stage; see the module docstring."""

    def __init__(self, *, train: TrainSettings, accelerator: Accelerator, model: torch.nn.Module,
                 param_groups: list[dict[str, Any]], loss_fn: LossFn, train_data: BatchSource,
                 val_data: BatchSource | None, output: str, tracker, work_dir: Path, seed: int,
                 on_step: Callable[[EngineState], None] | None = None,
                 eval_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 extra_state: dict[str, Stateful] | None = None, identity: dict[str, Any] | None = None):
        """Optional hooks (all processes): ``on_step(state)`` runs after every optimizer step (e.g. an EMA
        update, periodic samples), before logging, validation and checkpointing of that step;
        ``eval_context()`` is entered around validation (e.g. swap in EMA weights); ``extra_state`` objects
        (``state_dict()`` of tensors / ``load_state_dict``) are saved in every checkpoint as
        ``<name>.safetensors`` by the main process and restored on resume; ``identity``
        (:func:`audiotune.train.checkpoints.run_identity`) is saved with the number of processes in every
        checkpoint, and a resume from a checkpoint whose identity differs is refused."""
        self.on_step = on_step
        self.eval_context = eval_context
        self.extra_state = dict(extra_state or {})
        self.settings = train
        self.acc = accelerator
        self.loss_fn = loss_fn
        self.train_data = train_data
        self.val_data = val_data
        self.tracker = tracker
        self.work_dir = Path(work_dir)
        self.seed = seed
        self.ckpt_root = checkpoints.checkpoints_uri(output)
        self.state = EngineState(identity={**(identity or {}), "num_processes": accelerator.num_processes})
        self._stop = False
        self._saved: tuple[int, str] | None = None  # (step, uri) of the last checkpoint written
        self.steps_per_epoch = max(1, math.ceil(len(train_data.batches(0)) / train.grad_accum))
        self.total_steps = train.max_steps or max(1, math.ceil(train.epochs * self.steps_per_epoch))
        if accelerator.state.deepspeed_plugin is not None:
            # DeepSpeed builds its own optimizer from the config's "optimizer" block (train/deepspeed.py)
            from accelerate.utils import DummyOptim

            dummy = DummyOptim(param_groups, lr=train.lr, weight_decay=train.weight_decay)
            self.model, self.optimizer = accelerator.prepare(model, dummy)
            self.scheduler = build_scheduler(self.optimizer, train, self.total_steps)
        else:
            optimizer = build_optimizer(param_groups, train)
            self.scheduler = build_scheduler(optimizer, train, self.total_steps)
            self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        bf16 = resolve_dtype(train.dtype) == "bf16" and accelerator.state.deepspeed_plugin is None
        self.autocast = (torch.autocast(device_type=accelerator.device.type, dtype=torch.bfloat16) if bf16
                         else contextlib.nullcontext())

    # ------------------------------------------------------------------ resume
    def maybe_resume(self) -> bool:
        """Load the newest complete checkpoint (``train.resume``); True when one was loaded."""
        uri = checkpoints.find_resume(self.ckpt_root, self.settings.resume)
        if uri is None:
            return False
        if self.acc.state.deepspeed_plugin is not None:  # DeepSpeed unpickles its files
            section = next(iter(self.state.identity.get("config") or {}), "<stage>.").split(".")[0]
            checkpoints.require_trusted(uri, self.ckpt_root, self.settings.trust_checkpoint, section)
        saved = checkpoints.read_state(uri)
        checkpoints.check_identity(uri, saved.get("identity"), self.state.identity)
        checkpoints.load_checkpoint(self.acc, self.model, self.optimizer, self.scheduler, self.extra_state, uri,
                                    self.work_dir)
        self.state = EngineState(**{**saved, "identity": self.state.identity})
        log.info("resumed from %s at step %d (epoch %d, batch %d)", uri, self.state.step, self.state.epoch,
                 self.state.batch_in_epoch)
        return True

    # ------------------------------------------------------------------- loop
    def fit(self) -> EngineState:
        """Train until ``total_steps``; returns the final state."""
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        s = self.state
        self.model.train()
        window = {"loss": 0.0, "tokens": 0, "samples": 0, "micro": 0, "t0": time.perf_counter(), "extra": {}}
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
                            done = self._saved is not None and self._saved[0] == s.step
                            target = self._saved[1] if done else self.save_checkpoint()
                            raise TrainingInterrupted(f"stopped by SIGTERM at step {s.step}; checkpoint {target} "
                                                      "written")
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
            if self.acc.sync_gradients and self.settings.max_grad_norm > 0:
                norm = self.acc.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
                if norm is None and hasattr(self.model, "get_global_grad_norm"):  # DeepSpeed clips itself
                    norm = self.model.get_global_grad_norm()
                grad_norm = norm  # a tensor until it is logged: no device sync per step
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        window["loss"] += loss.detach().float()  # stays on the device: no sync per step
        window["tokens"] += int(metrics.get("tokens", 0))
        window["samples"] += int(metrics.get("samples", 0))
        window["micro"] += 1
        for key, value in metrics.items():  # other metrics: (sum, count) of this process, reduced when logged
            if key not in ("tokens", "samples"):
                value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
                total, count = window["extra"].get(key, (0.0, 0))
                window["extra"][key] = (total + value, count + 1)
        return grad_norm

    def _after_step(self, window: dict[str, Any], grad_norm: Any) -> None:
        s = self.state
        if s.step % self.settings.log_every == 0 or s.step == self.total_steps:
            self._log(window, grad_norm)
        improved = self.val_data is not None and s.step % self.settings.eval_every == 0 and self._validate()
        # pruning keeps the best checkpoint only if one exists at the best step: write it when validation improves
        if (s.step % self.settings.save_every == 0 or improved) and s.step < self.total_steps:
            self.save_checkpoint()

    def _log(self, window: dict[str, Any], grad_norm: Any) -> None:
        """Log the window's metrics, each the mean over every process's micro-batches (as the loss is)."""
        s = self.state
        elapsed = time.perf_counter() - window["t0"]
        extra = window["extra"]
        keys = self._all_keys(extra)
        sums = [float(extra[k][0]) if k in extra else 0.0 for k in keys]
        counts = [extra[k][1] if k in extra else 0 for k in keys]
        totals = self._reduce([float(window["loss"]), window["micro"], window["tokens"], window["samples"],
                               *sums, *counts])
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
        n = len(keys)
        for key, total, count in zip(keys, totals[4:4 + n], totals[4 + n:], strict=True):
            if count:
                record[key] = total / count
        s.history.append(record)
        self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=s.step)
        eta = (self.total_steps - s.step) * elapsed / max(self.settings.log_every, 1)
        log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s ETA %.0fs", s.step, self.total_steps,
                 record["loss"], record["lr"], record["tokens_per_s"], eta)
        window.update(loss=0.0, tokens=0, samples=0, micro=0, t0=time.perf_counter(), extra={})

    def _reduce(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return self.acc.reduce(tensor, reduction="sum").tolist() if self.acc.num_processes > 1 else values

    def _all_keys(self, keys) -> list[str]:
        """The metric names of every process, sorted: each must reduce the same list."""
        keys = sorted(keys)
        if self.acc.num_processes == 1:
            return keys
        gathered: list[Any] = [None] * self.acc.num_processes
        torch.distributed.all_gather_object(gathered, keys)
        return sorted({k for rank_keys in gathered for k in rank_keys})

    @torch.no_grad()
    def _validate(self) -> bool:
        """The validation loss over every process's share; True when it is a new best.

        Each batch's mean loss is weighted by its targets (``target_tokens``, else ``tokens``); a batch that
        only repeats another process's (see :class:`BatchSource`) still runs, so that every process does as
        many forwards (ZeRO-3 gathers weights in each), but weighs 0.
        """
        self.model.eval()
        total, count = 0.0, 0.0
        parts: dict[str, float] = {}  # loss components a loss function reports as loss_<name> (joint: llm, flow)
        batches = self.val_data.batches(0)
        with self.eval_context() if self.eval_context is not None else contextlib.nullcontext():
            for indices, repeat in zip(batches, _repeats(self.val_data, 0, len(batches)), strict=True):
                batch = self._to_device(self.val_data.collate(indices))
                with self.autocast:
                    loss, metrics = self.loss_fn(self.model, batch)
                weight = 0.0 if repeat else float(metrics.get("target_tokens", metrics.get("tokens", 1)))
                if weight > 0:  # a batch without targets has no mean loss (NaN)
                    total += float(loss) * weight
                    count += weight
                for key, value in metrics.items():
                    if key.startswith("loss_"):
                        parts[key] = parts.get(key, 0.0) + (float(value) * weight if weight > 0 else 0.0)
        names = self._all_keys(parts)
        reduced = self._reduce([total, count, *(parts.get(k, 0.0) for k in names)])
        total, count = reduced[0], reduced[1]
        extra = {f"val_{k}": v / count for k, v in zip(names, reduced[2:], strict=True)} if count else {}
        self.model.train()
        val = total / count if count else float("nan")
        s = self.state
        improved = not math.isnan(val) and (s.best_val_loss is None or val < s.best_val_loss)
        if improved:
            s.best_val_loss, s.best_step = val, s.step
        if s.history and s.history[-1].get("step") == s.step:
            s.history[-1].update(val_loss=val, **extra)
        else:
            s.history.append({"step": s.step, "val_loss": val, **extra})
        self.tracker.log_metrics({"val_loss": val, **extra}, step=s.step)
        log.info("step %d val_loss %.4f (best %.4f at step %s)", s.step, val,
                 math.nan if s.best_val_loss is None else s.best_val_loss, s.best_step)
        return improved

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> str:
        """Write a complete checkpoint of the current step (all processes take part); returns its URI.

        See :func:`audiotune.train.checkpoints.save_checkpoint`; older checkpoints are pruned to the newest
        ``train.keep_last`` plus the best by validation loss.
        """
        step = self.state.step
        target = checkpoints.save_checkpoint(self.acc, self.model, self.optimizer, self.scheduler, self.extra_state,
                                             self.ckpt_root, self.work_dir, asdict(self.state), self.settings.keep_last)
        self._saved = (step, target)
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


def _repeats(source: BatchSource, epoch: int, count: int) -> list[bool]:
    """Which of ``source``'s ``count`` batches of ``epoch`` repeat another process's (see :class:`BatchSource`)."""
    for owner in (source, getattr(source, "sampler", None)):
        repeats = getattr(owner, "repeats", None)
        if callable(repeats):
            flags = list(repeats(epoch))
            if len(flags) != count:
                raise ValueError(f"{type(owner).__name__}.repeats({epoch}) has {len(flags)} entries for {count} "
                                 "batches")
            return flags
    return [False] * count


def history_json(state: EngineState) -> str:
    """The run's history (training and validation records by step) as indented JSON."""
    return json.dumps(state.history, indent=1)
