"""The training engine on a one-weight model: schedules, the best checkpoint, resume identity, RNG order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from audiotune.config import TrainSettings
from audiotune.train import checkpoints
from audiotune.train.engine import Engine, build_scheduler, make_accelerator


class Tracker:
    """Records what the engine logs."""

    def __init__(self):
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))


class Batches:
    """``n`` batches of one example each; example i is the number i."""

    def __init__(self, n: int):
        self.n = n

    def batches(self, epoch: int) -> list[list[int]]:  # noqa: ARG002
        return [[i] for i in range(self.n)]

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor([[float(i + 1)] for i in indices])}


def _engine(tmp_path: Path, loss_fn, val: Batches | None = None, identity: dict | None = None,
            **settings) -> Engine:
    train = TrainSettings(**{"lr": 0.1, "schedule": "constant", "log_every": 1, "save_every": 1000,
                             "eval_every": 1000, "dtype": "fp32", **settings})
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    return Engine(train=train, accelerator=make_accelerator(train, "fp32"), model=model,
                  param_groups=[{"params": list(model.parameters())}], loss_fn=loss_fn, train_data=Batches(4),
                  val_data=val, output=str(tmp_path / "out"), tracker=Tracker(), work_dir=tmp_path / "work",
                  seed=0, identity=identity)


def _regression(model, batch):
    x = batch["x"]
    return ((model(x) - 2 * x) ** 2).mean(), {"tokens": x.numel(), "samples": len(x)}


# --- learning-rate schedules -------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, at_12", [("cosine", 0.5), ("linear", 0.5), ("constant", 1.0)])
@pytest.mark.parametrize("warmup", [{"warmup_steps": 4}, {"warmup_ratio": 0.2}])
def test_every_schedule_warms_up_from_zero_then_follows_its_shape(schedule, at_12, warmup):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, TrainSettings(schedule=schedule, **warmup), total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.5) and lrs[4] == pytest.approx(1.0)  # warm-up, then peak
    assert lrs[12] == pytest.approx(at_12)  # half-way through the decay (or none)
    assert (lrs[19] == pytest.approx(1.0)) if schedule == "constant" else lrs[19] < 0.1


def test_no_warmup_starts_at_the_peak():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for schedule in ("cosine", "linear", "constant"):
        assert build_scheduler(optimizer, TrainSettings(schedule=schedule), 10).get_last_lr()[0] == 1.0


# --- the best checkpoint -----------------------------------------------------------------------------------------

VAL_BY_STEP = {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.0, 5: 1.0, 6: 1.5, 7: 1.6, 8: 1.7, 9: 1.8}  # best at 5


def test_the_best_checkpoint_survives_pruning_when_it_falls_between_periodic_ones(tmp_path):
    holder: dict[str, Engine] = {}

    def loss_fn(model, batch):
        if model.training:
            return _regression(model, batch)
        return torch.tensor(VAL_BY_STEP[holder["engine"].state.step]), {"tokens": 1}

    engine = holder["engine"] = _engine(tmp_path, loss_fn, val=Batches(1), max_steps=9, eval_every=1,
                                        save_every=3, keep_last=1)
    state = engine.fit()
    assert (state.best_step, state.best_val_loss) == (5, 1.0)
    kept = checkpoints.list_complete(engine.ckpt_root)
    assert [step for step, _ in kept] == [5, 9]  # keep_last=1 plus the best
    best = checkpoints.read_state(kept[0][1])
    assert best["step"] == 5 and best["best_step"] == 5
    assert not any(p.name.startswith(".") for p in Path(engine.ckpt_root).iterdir())  # no staging left


# --- resume identity ---------------------------------------------------------------------------------------------

def _identity(**changes) -> dict:
    config = {**TrainSettings().model_dump(mode="json"), **changes}
    return checkpoints.run_identity("llm", {"train": config, "overwrite": False}, seed=0, dataset_fingerprint="d1")


def test_run_identity_ignores_what_a_resume_may_change():
    base = _identity()
    assert base["config"]["llm.train.lr"] == TrainSettings().lr
    for free in ({"max_steps": 99}, {"epochs": 3.0}, {"save_every": 7}, {"eval_every": 7}, {"log_every": 7},
                 {"keep_last": 9}, {"resume": "never"}, {"nproc_per_node": 4}, {"gradient_checkpointing": True}):
        assert checkpoints.identity_mismatch(base, _identity(**free)) == [], free
    problems = checkpoints.identity_mismatch(base, _identity(lr=1e-3, batch_tokens=64))
    assert problems == [f"llm.train.batch_tokens: checkpoint {TrainSettings().batch_tokens}, now 64",
                        f"llm.train.lr: checkpoint {TrainSettings().lr}, now 0.001"]
    other = checkpoints.run_identity("llm", {"train": TrainSettings().model_dump(mode="json"), "overwrite": True},
                                     seed=0, dataset_fingerprint="d2")
    assert checkpoints.identity_mismatch(base, other) == ["dataset_fingerprint: checkpoint 'd1', now 'd2'"]


def test_resume_refuses_a_checkpoint_of_another_run_and_accepts_a_longer_run(tmp_path):
    _engine(tmp_path, _regression, identity=_identity(), max_steps=2).fit()
    with pytest.raises(checkpoints.CheckpointMismatch, match=r"llm\.train\.lr: checkpoint 0\.0002, now 0\.001"):
        _engine(tmp_path, _regression, identity=_identity(lr=1e-3), max_steps=4).maybe_resume()
    longer = _engine(tmp_path, _regression, identity=_identity(max_steps=4), max_steps=4)
    assert longer.maybe_resume() and longer.state.step == 2
    assert longer.fit().step == 4
    # a checkpoint written by two processes: the data shards and RNG streams differ
    manifest = Path(checkpoints.list_complete(longer.ckpt_root)[-1][1]) / "manifest.json"
    saved = json.loads(manifest.read_text())
    saved["trainer_state"]["identity"]["num_processes"] = 2
    manifest.write_text(json.dumps(saved))
    with pytest.raises(checkpoints.CheckpointMismatch, match="num_processes: checkpoint 2, now 1"):
        _engine(tmp_path, _regression, identity=_identity(), max_steps=6).maybe_resume()


def test_a_checkpoint_without_identity_still_resumes(tmp_path, caplog):
    first = _engine(tmp_path, _regression, max_steps=2)
    first.fit()
    manifest = Path(checkpoints.list_complete(first.ckpt_root)[-1][1]) / "manifest.json"
    saved = json.loads(manifest.read_text())
    del saved["trainer_state"]["identity"]  # written before identities existed
    manifest.write_text(json.dumps(saved))
    again = _engine(tmp_path, _regression, max_steps=3)
    assert again.maybe_resume() and again.state.identity == {"num_processes": 1}
    assert "records no run identity" in caplog.text


# --- RNG states --------------------------------------------------------------------------------------------------

def test_cuda_rng_states_come_back_in_device_order():
    tensors = {"torch": torch.zeros(1), **{f"cuda{i}": torch.full((1,), float(i)) for i in (0, 1, 10, 11, 2, 3)}}
    assert [int(t.item()) for t in checkpoints.cuda_states(tensors)] == [0, 1, 2, 3, 10, 11]
