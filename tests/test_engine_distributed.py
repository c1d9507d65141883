"""The engine's metrics with two processes (torchrun, gloo on CPU): every logged number covers both ranks.

This file is also the worker: ``torchrun tests/test_engine_distributed.py OUT`` trains a one-weight model whose
loss is ``2 · loss_a + 3 · loss_b`` with parts that differ between the ranks, and validates on three examples,
which two ranks can only share by one of them running a repeat.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

W_A, W_B = 2.0, 3.0
# validation examples: (value of the loss per target, targets); "tokens" counts 5 more positions per example
VAL = [(1.0, 10), (4.0, 1), (10.0, 3)]
STEPS = 4


class _Train:
    def batches(self, epoch: int) -> list[list[int]]:  # noqa: ARG002
        return [[k] for k in range(8)]

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rank = torch.distributed.get_rank()
        return {"x": torch.tensor([[float(indices[0] + 1 + 10 * rank)]])}


class _Val:
    """Validation batches dealt by a TokenBudgetSampler (one example each): ranks 0, 1 get [0, 1], [2, 1 again]."""

    def __init__(self, rank: int, world_size: int):
        from audiotune.train.batching import TokenBudgetSampler

        self.sampler = TokenBudgetSampler([n for _, n in VAL], batch_tokens=1000, max_batch_size=1, seed=0,
                                          shuffle=False, rank=rank, world_size=world_size)

    def batches(self, epoch: int) -> list[list[int]]:
        return self.sampler.batches(epoch)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(indices)}


def _loss(model, batch):
    if not model.training:
        value, targets = VAL[int(batch["index"][0])]
        forward = model(torch.zeros(1, 1)).sum() * 0  # every rank runs as many forwards
        return forward + value, {"target_tokens": targets, "tokens": targets + 5, "loss_part": value / 2}
    x = batch["x"]
    a, b = (model(x) ** 2).mean(), ((model(x) - x) ** 2).mean()
    metrics = {"tokens": 1, "samples": 1, "loss_a": a.detach(), "loss_b": b.detach()}
    if torch.distributed.get_rank() == 0:
        metrics["only_rank0"] = 7.0  # a metric one rank reports: the others must still reduce the same list
    return W_A * a + W_B * b, metrics


class _Tracker:
    def log_metrics(self, metrics, step=None) -> None:
        pass


def _worker(out: Path) -> None:
    from audiotune.config import TrainSettings
    from audiotune.train.engine import Engine, make_accelerator

    train = TrainSettings(lr=1e-3, schedule="constant", max_steps=STEPS, log_every=2, eval_every=STEPS,
                          save_every=1000, dtype="fp32")
    acc = make_accelerator(train, "fp32")
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    engine = Engine(train=train, accelerator=acc, model=model, param_groups=[{"params": list(model.parameters())}],
                    loss_fn=_loss, train_data=_Train(), val_data=_Val(acc.process_index, acc.num_processes),
                    output=str(out / "model"), tracker=_Tracker(), work_dir=out / f"work{acc.process_index}",
                    seed=0)
    state = engine.fit()
    if acc.is_main_process:
        (out / "history.json").write_text(json.dumps(state.history))


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("engine-2proc")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "history.json").read_text())


def test_logged_parts_are_reduced_like_the_loss(history):
    logged = [h for h in history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for record in logged:
        # each rank sees other inputs (x + 10 · rank): rank 0's parts alone would not add up to the total
        assert record["loss"] == pytest.approx(W_A * record["loss_a"] + W_B * record["loss_b"], rel=1e-6)
        assert record["only_rank0"] == pytest.approx(7.0)  # the mean over the micro-batches that reported it


def test_validation_weighs_targets_and_counts_every_example_once(history):
    val = next(h for h in history if "val_loss" in h)
    targets = sum(n for _, n in VAL)
    assert val["val_loss"] == pytest.approx(sum(v * n for v, n in VAL) / targets)  # not by tokens, no repeat
    assert val["val_loss_part"] == pytest.approx(sum(v / 2 * n for v, n in VAL) / targets)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
