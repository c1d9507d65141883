"""DeepSpeed's own optimizers, as train/deepspeed.py declares them: the config, and the CPU Adam op built here.

The op test JIT-builds DeepSpeed's ``cpu_adam`` C++ extension (what ``offload_optimizer`` runs; the CUDA image
compiles it at build time with ``DS_BUILD_CPU_ADAM=1``), so it is in the slow tier: ``pytest -m slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from audiotune.config import DeepSpeedSettings, TrainSettings
from audiotune.train.deepspeed import check_user_config, generate, optimizer_block

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("offload", [False, True])
def test_config_declares_deepspeeds_adamw_and_keeps_its_guards(offload):
    train = TrainSettings(lr=3e-4, weight_decay=0.05, betas=(0.9, 0.95),
                          deepspeed=DeepSpeedSettings(zero_stage=2, offload_optimizer=offload))
    config = generate(train, "fp32")
    assert config["optimizer"]["type"] == "AdamW"
    params = dict(config["optimizer"]["params"])
    # no GPU here: without offload DeepSpeed is asked for its torch_adam variant, never with offload
    assert params.pop("torch_adam", False) is (not offload)
    assert params == {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.05}
    assert "torch_adam" not in optimizer_block(train, gpu=True)["params"]
    assert "zero_allow_untested_optimizer" not in config and "zero_force_ds_cpu_optimizer" not in config
    assert ("offload_optimizer" in config["zero_optimization"]) is offload


def test_user_json_gets_the_optimizer_unless_it_names_one():
    train = TrainSettings(deepspeed=DeepSpeedSettings(zero_stage=2))
    assert check_user_config({"zero_optimization": {"stage": 2}}, train, "fp32", "ds.json")["optimizer"]["type"] \
        == "AdamW"
    own = {"type": "Adam", "params": {"lr": 1e-3}}
    assert check_user_config({"zero_optimization": {"stage": 2}, "optimizer": own}, train, "fp32",
                             "ds.json")["optimizer"] == own


def test_cuda_image_compiles_both_adam_ops():
    text = (ROOT / "images" / "cuda" / "Dockerfile").read_text()
    assert "DS_BUILD_FUSED_ADAM=1" in text and "DS_BUILD_CPU_ADAM=1" in text


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cpu_adam_op_builds_and_steps_as_adamw():
    """DeepSpeedCPUAdam (JIT-built here, or loaded from the torch extensions cache) takes the same step as
    torch's AdamW."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    torch.manual_seed(0)
    ref = torch.nn.Parameter(torch.randn(64, 32))
    ours = torch.nn.Parameter(ref.detach().clone())
    grads = [torch.randn(64, 32) for _ in range(3)]
    settings = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    torch_opt = torch.optim.AdamW([ref], **settings)
    ds_opt = DeepSpeedCPUAdam([ours], adamw_mode=True, **settings)
    for grad in grads:
        ref.grad, ours.grad = grad.clone(), grad.clone()
        torch_opt.step()
        ds_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
