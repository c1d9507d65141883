"""A user's DeepSpeed JSON against the stage settings: refused where it contradicts them, completed where silent."""

from __future__ import annotations

import json
import logging

import pytest

from audiotune.config import DeepSpeedSettings, TrainSettings
from audiotune.train.deepspeed import DeepSpeedConfigError, check_user_config, resolve


def _train(**deepspeed) -> TrainSettings:
    return TrainSettings(grad_accum=2, max_grad_norm=1.0, deepspeed=DeepSpeedSettings(**deepspeed))


def _zero3(**zero) -> dict:
    return {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True, **zero},
            "bf16": {"enabled": True}}


def test_a_matching_json_passes_and_gets_the_engine_batch_sizes():
    merged = check_user_config(_zero3(), _train(zero_stage=3), "bf16", "ds.json")
    assert merged["zero_optimization"]["stage"] == 3 and merged["bf16"] == {"enabled": True}
    assert (merged["gradient_accumulation_steps"], merged["train_micro_batch_size_per_gpu"]) == (2, 1)


def test_zero3_without_gathering_weights_on_save_is_refused_or_completed():
    user = _zero3(stage3_gather_16bit_weights_on_model_save=False)
    with pytest.raises(DeepSpeedConfigError, match="stage3_gather_16bit_weights_on_model_save=False"):
        check_user_config(user, _train(zero_stage=3), "bf16", "ds.json")
    unset = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    merged = check_user_config(unset, _train(zero_stage=3), "bf16", "ds.json")
    assert merged["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "stage3_gather_16bit_weights_on_model_save" not in unset["zero_optimization"]  # the user's dict as is
    # ZeRO-2 saves whole weights anyway: nothing to check or add
    zero2 = check_user_config({"zero_optimization": {"stage": 2}}, _train(zero_stage=2), "fp32", "ds.json")
    assert "stage3_gather_16bit_weights_on_model_save" not in zero2["zero_optimization"]


@pytest.mark.parametrize("user_offload, setting, named", [
    ({"offload_param": {"device": "cpu"}}, False, r"zero_optimization\.offload_param \(device='cpu'\) disagrees "
                                                  r"with deepspeed\.offload_params=false"),
    ({}, True, r"zero_optimization\.offload_param \(absent\) disagrees with deepspeed\.offload_params=true"),
    ({"offload_param": {"device": "none"}}, True, r"offload_param \(device='none'\).*offload_params=true"),
])
def test_param_offload_that_disagrees_with_the_settings_is_refused(user_offload, setting, named):
    with pytest.raises(DeepSpeedConfigError, match=named):
        check_user_config(_zero3(**user_offload), _train(zero_stage=3, offload_params=setting), "bf16", "ds.json")


def test_matching_param_and_optimizer_offload_pass():
    user = _zero3(offload_param={"device": "cpu"}, offload_optimizer={"device": "cpu"})
    check_user_config(user, _train(zero_stage=3, offload_params=True, offload_optimizer=True), "bf16", "ds.json")
    with pytest.raises(DeepSpeedConfigError, match=r"offload_optimizer \(absent\).*offload_optimizer=true"):
        check_user_config(_zero3(), _train(zero_stage=3, offload_optimizer=True), "bf16", "ds.json")


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_a_missing_or_auto_precision_block_follows_the_dtype(dtype, caplog):
    caplog.set_level(logging.INFO, logger="audiotune.train.deepspeed")
    for blocks in ({}, {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", "loss_scale": 0}}):
        user = {"zero_optimization": {"stage": 2}, **blocks}
        merged = check_user_config(user, _train(zero_stage=2), dtype, "ds.json")
        assert merged["bf16"]["enabled"] is (dtype == "bf16") and merged["fp16"]["enabled"] is (dtype == "fp16")
    assert merged["fp16"]["loss_scale"] == 0  # the rest of the user's block stays
    assert f"bf16.enabled is unset; {str(dtype == 'bf16').lower()} from train.dtype={dtype}" in caplog.text


def test_a_precision_block_that_contradicts_the_dtype_is_refused():
    with pytest.raises(DeepSpeedConfigError, match=r"bf16\.enabled=False \(stage settings say True\)"):
        check_user_config({"bf16": {"enabled": False}}, _train(zero_stage=2), "bf16", "ds.json")


def test_resolve_reads_and_checks_the_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 4}))
    with pytest.raises(DeepSpeedConfigError, match=rf"{path}.*gradient_accumulation_steps=4"):
        resolve(_train(zero_stage=3, config_file=str(path)), "bf16")
    path.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="cannot read DeepSpeed config"):
        resolve(_train(zero_stage=3, config_file=str(path)), "bf16")
