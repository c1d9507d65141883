"""ZeRO memory accounting against DeepSpeed's estimators, and the configuration the pipeline picks when a stage's
``zero_stage`` is ``auto`` (:mod:`audiotune.train.sizing`, resolved where the training is launched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from audiotune.train.memory import (
    DDP,
    ZERO2,
    ZERO2_OFFLOAD,
    ZERO3,
    ZERO3_OFFLOAD,
    ZERO3_OFFLOAD_OPTIMIZER,
    GiB,
    activation_bytes,
    choose_zero_config,
    count_parameters,
    deepspeed_state_memory,
    model_state_memory,
)

# Qwen2.5-3B's shape, counted on the meta device by benchmarks/zero_memory.py
FULL, LORA_TRAINABLE, LARGEST = 3_085_938_688, 29_933_568, 311_164_928
LORA_TOTAL = FULL + LORA_TRAINABLE


def qwen_params(h=2048, layers=36, heads=16, kv_heads=2, ffn=11008, vocab=151936) -> tuple[int, int]:
    """(parameters, LoRA r=16 all-linear adapter parameters) of a tied-embedding Qwen2 from its shape."""
    head = h // heads
    kv = kv_heads * head
    attn = h * h + h + 2 * (h * kv + kv) + h * h  # q (bias), k, v (bias), o
    mlp = 3 * h * ffn
    block = attn + mlp + 2 * h
    lora = 16 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + ffn) + (ffn + h))
    return vocab * h + layers * block + h, layers * lora


def test_the_3b_counts_follow_from_the_shape():
    assert qwen_params() == (FULL, LORA_TRAINABLE)
    assert LARGEST == 151936 * 2048  # the (tied) embedding


def test_count_parameters_on_the_meta_device():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape = dict(h=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=1000)
    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=1000, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert count_parameters(model) == (qwen_params(**shape)[0], qwen_params(**shape)[0], 1000 * 64)


@pytest.mark.parametrize("gpus", [1, 8, 16])
def test_accounting_matches_deepspeed_up_to_its_fp32_gradients(gpus):
    """DeepSpeed's estimators count 2 + 18 bytes: our 2 + 2 + 12 plus a 4-byte fp32 gradient partition
    (ZeRO-2), or 18 bytes for the partitioned states (ZeRO-3). With offloading the GPU figures agree exactly."""
    def both(option, n=FULL, t=FULL):
        return (model_state_memory(n, t, gpus, option, LARGEST).gpu,
                deepspeed_state_memory(n, t, gpus, option, LARGEST).gpu)

    ours, ds = both(ZERO2)
    assert ds - ours == pytest.approx(4 * FULL / gpus, abs=2)
    ours, ds = both(ZERO3)
    assert ds - ours == pytest.approx(2 * FULL / gpus, abs=2)
    for option in (ZERO2_OFFLOAD, ZERO3_OFFLOAD_OPTIMIZER, ZERO3_OFFLOAD):
        ours, ds = both(option)
        assert ours == pytest.approx(ds, abs=2), option.name
    # LoRA: the frozen base costs 2 bytes per parameter, partitioned only under ZeRO-3
    ours, ds = both(ZERO2, LORA_TOTAL, LORA_TRAINABLE)
    assert ours >= 2 * FULL and ds - ours == pytest.approx(4 * LORA_TRAINABLE / gpus, abs=2)
    ours, _ = both(ZERO3, LORA_TOTAL, LORA_TRAINABLE)
    assert ours == pytest.approx(4 * LARGEST + (2 * FULL + 16 * LORA_TRAINABLE) / gpus, abs=2)


def test_full_fine_tune_states_by_stage():
    mem = model_state_memory(FULL, FULL, 8, ZERO2, LARGEST)
    assert mem.gpu == pytest.approx(2 * FULL + 14 * FULL / 8)
    assert model_state_memory(FULL, FULL, 1, DDP).gpu == 16 * FULL
    off = model_state_memory(FULL, FULL, 16, ZERO3_OFFLOAD, LARGEST)
    assert off.gpu == 4 * LARGEST and off.cpu == pytest.approx(16 * FULL / 16)
    with pytest.raises(ValueError, match="trainable_params"):
        model_state_memory(10, 20, 1, DDP)


@pytest.mark.parametrize("n, t, gpus, gpu_gb, expected", [
    (LORA_TOTAL, LORA_TRAINABLE, 1, 80, DDP),  # LoRA 3B: the frozen base (5.8 GiB) fits anywhere
    (LORA_TOTAL, LORA_TRAINABLE, 16, 24, DDP),  # adapters' optimizer states are too small to partition
    (FULL, FULL, 1, 80, DDP),  # 46 GiB (57 by DeepSpeed's count) < 60 GiB
    (FULL, FULL, 8, 80, ZERO2),  # same traffic as DDP, 11-12 GiB instead of 46-57
    (FULL, FULL, 16, 80, ZERO2),
    (FULL, FULL, 1, 40, ZERO2_OFFLOAD),  # one 40 GiB GPU: the optimizer moves to the CPU
    (FULL, FULL, 8, 12, ZERO3),  # 7.6 GiB < 9 GiB
    (FULL, FULL, 1, 4, ZERO3_OFFLOAD),  # only the gathered layer stays on the GPU
])
def test_choose_zero_config(n, t, gpus, gpu_gb, expected):
    choice = choose_zero_config(n, t, gpus, gpu_gb, largest_layer_params=LARGEST)
    assert choice.option == expected and choice.fits, choice.reason
    assert choice.to_dict()["option"]["zero_stage"] == expected.stage
    json.dumps(choice.to_dict())


def test_choose_zero_config_checks_cpu_memory_and_says_when_nothing_fits():
    choice = choose_zero_config(FULL, FULL, 1, 40, largest_layer_params=LARGEST, cpu_mem_gb_per_gpu=32)
    assert choice.option == ZERO3_OFFLOAD and not choice.fits and "CPU memory" in choice.reason
    choice = choose_zero_config(FULL, FULL, 1, 1, largest_layer_params=LARGEST)
    assert not choice.fits and choice.option == ZERO3_OFFLOAD and "exceed" in choice.reason
    with pytest.raises(ValueError, match="gpus"):
        choose_zero_config(FULL, FULL, 0, 80)
    # activations reserved on top of the headroom push a full fine-tune on one 80 GiB GPU to offloading
    choice = choose_zero_config(FULL, FULL, 1, 80, largest_layer_params=LARGEST, activation_gb=10.7)
    assert choice.option == ZERO2_OFFLOAD and "10.7 GiB of activations" in choice.reason


def test_activation_estimate():
    ckpt = activation_bytes(2048, 1, 2048, 36, 11008, 256, 151936, checkpointing=True)
    full = activation_bytes(2048, 1, 2048, 36, 11008, 256, 151936, checkpointing=False)
    assert ckpt["layers"] < full["layers"] / 10 and ckpt["logits"] == full["logits"] == 10 * 151936 * 2048
    assert 7 * GiB < full["layers"] < 9 * GiB


def test_results_file_is_current():
    """benchmarks/results/zero_memory.json was written by the code as it is (python -m benchmarks.zero_memory)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "zero_memory.json"
    result = json.loads(path.read_text())
    assert result["model"]["full"]["n_params"] == FULL
    assert result["model"]["lora"]["trainable_params"] == LORA_TRAINABLE
    for row in result["per_gpu_model_states"]:
        m = result["model"][row["mode"]]
        option = {o.name: o for o in (ZERO2, ZERO3, ZERO2_OFFLOAD, ZERO3_OFFLOAD_OPTIMIZER, ZERO3_OFFLOAD)}[
            row["config"]]
        mem = model_state_memory(m["n_params"], m["trainable_params"], row["gpus"], option,
                                 m["largest_layer_params"])
        assert row["gpu_gib"] == round(mem.gpu / GiB, 2), row
    for pick in result["default_choice"]:
        m = result["model"][pick["mode"]]
        choice = choose_zero_config(m["n_params"], m["trainable_params"], pick["gpus"], pick["gpu_mem_gib"],
                                    largest_layer_params=m["largest_layer_params"])
        assert choice.option.name == pick["option"]["name"], pick


def test_choose_zero_config_keeps_to_the_allowed_options():
    no_zero3 = tuple(o for o in (DDP, ZERO2, ZERO3, ZERO2_OFFLOAD, ZERO3_OFFLOAD_OPTIMIZER, ZERO3_OFFLOAD)
                     if o.stage != 3)
    choice = choose_zero_config(FULL, FULL, 8, 12, largest_layer_params=LARGEST, options=no_zero3)
    assert choice.option == ZERO2_OFFLOAD  # ZeRO-3 would fit (see above), but is not allowed
    with pytest.raises(ValueError, match="options"):
        choose_zero_config(FULL, FULL, 8, 12, options=())


# --- zero_stage: auto, as the launcher resolves it ------------------------------------------------------------

QWEN25_3B = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=2048, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
                 tie_word_embeddings=True, max_position_embeddings=32768, torch_dtype="bfloat16")


def _auto(tmp_path, mode: str, gpus_per_node: int, nodes: int = 1, **llm):
    from audiotune.config import validate

    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text(json.dumps(QWEN25_3B))  # all a size needs: no weights
    return validate({"llm": {"base_model": str(base), "mode": mode, "train": {"deepspeed": {"zero_stage": "auto"}},
                             **llm},
                     "cluster": {"num_nodes": nodes, "gpus_per_node": gpus_per_node,
                                 "gpu_type": "NVIDIA-H100-80GB-HBM3", "memory": "480Gi"},
                     "pipeline": {"output_uri": "s3://bucket/out"}})


def test_auto_sizes_the_base_model_from_its_config_json(tmp_path):
    from audiotune.train import sizing

    assert sizing.model_size("llm", _auto(tmp_path, "full", 8)) == sizing.ModelSize(FULL, FULL, LARGEST)
    assert sizing.model_size("llm", _auto(tmp_path, "lora", 8)) == sizing.ModelSize(LORA_TOTAL, LORA_TRAINABLE, LARGEST)


@pytest.mark.parametrize("mode, gpus, nodes, gpu_gib, expected", [
    ("lora", 8, 1, 80, DDP),  # the rows of docs/scaling.md's table, through the launch path
    ("lora", 8, 2, 24, DDP),
    ("full", 8, 1, 80, ZERO2),
    ("full", 8, 2, 80, ZERO2),
    ("full", 1, 1, 40, ZERO2_OFFLOAD),
    ("full", 8, 1, 12, ZERO3),
])
def test_auto_picks_what_the_scaling_plan_says(tmp_path, caplog, mode, gpus, nodes, gpu_gib, expected):
    import logging

    from audiotune.train import sizing

    cfg = _auto(tmp_path, mode, gpus, nodes)
    with caplog.at_level(logging.INFO, logger="audiotune.train.sizing"):
        resolved, choice = sizing.with_zero("llm", cfg, gpus, gpu_gib=gpu_gib)
    assert choice.option == expected and choice.fits
    ds = resolved.llm.train.deepspeed
    assert (ds.zero_stage, ds.offload_optimizer, ds.offload_params) == tuple(expected.settings().values())
    assert f"zero_stage=auto: {expected.name}" in caplog.text and f"on {gpus * nodes} GPU(s)" in caplog.text
    assert cfg.llm.train.deepspeed.zero_stage == "auto"  # a copy: the shared config is not changed
    again, none = sizing.with_zero("llm", resolved, gpus, gpu_gib=gpu_gib)  # resolved once; now it is explicit
    assert none is None and again is resolved


def test_an_explicit_zero_stage_wins_and_auto_needs_a_known_gpu(tmp_path):
    from audiotune.config import ConfigError, validate
    from audiotune.train import sizing

    cfg = _auto(tmp_path, "full", 8)
    cfg.llm.train.deepspeed.zero_stage = 0
    assert sizing.with_zero("llm", cfg, 8, gpu_gib=12) == (cfg, None) and cfg.llm.train.deepspeed.zero_stage == 0
    # a PyTorchJob's GPUs are not in the launching pod: their memory comes from cluster.gpu_type
    cfg = _auto(tmp_path, "full", 8, nodes=2)
    assert sizing.with_zero("llm", cfg, 8)[1].option == ZERO2
    assert sizing.gpu_memory_gib("NVIDIA-A100-SXM4-40GB") == 40 and sizing.gpu_memory_gib("NVIDIA-L4") == 24
    unknown = validate({"llm": {"train": {"deepspeed": {"zero_stage": "auto"}}},
                        "cluster": {"num_nodes": 2, "gpus_per_node": 8, "gpu_type": "Some-GPU"},
                        "pipeline": {"output_uri": "s3://b/o"}})
    with pytest.raises(ConfigError, match=r"llm\.train\.deepspeed\.zero_stage=auto .*cluster\.gpu_type"):
        sizing.check(unknown)
    with pytest.raises(sizing.SizingError, match="memory of a GPU is unknown"):
        sizing.with_zero("llm", unknown, 8)
    # no GPU in a one-node run: one CPU process, no ZeRO
    cpu = validate({"llm": {"train": {"deepspeed": {"zero_stage": "auto"}}}, "cluster": {"gpus_per_node": 0}})
    cpu, choice = sizing.with_zero("llm", cpu, 1)
    assert choice.option == DDP and cpu.llm.train.deepspeed.zero_stage == 0
    with pytest.raises(sizing.SizingError, match="config.json"):
        sizing.with_zero("llm", _auto(tmp_path, "full", 8, base_model=str(tmp_path / "missing")), 8, gpu_gib=80)


def test_auto_keeps_a_flow_with_ema_off_zero3(tmp_path):
    from audiotune.config import validate
    from audiotune.train import sizing

    def flow(ema: bool):
        return validate({"flow": {"preset": "base", "ema": {"enabled": ema},
                                  "train": {"deepspeed": {"zero_stage": "auto"}}}, "cluster": {"gpus_per_node": 8}})

    # ~100M parameters on 8 GPUs of 0.4 GiB: ZeRO-2 does not fit, ZeRO-3 does, but an EMA needs whole weights
    assert sizing.with_zero("flow", flow(False), 8, gpu_gib=0.4)[1].option == ZERO3
    cfg, choice = sizing.with_zero("flow", flow(True), 8, gpu_gib=0.4)
    assert choice.option == ZERO2_OFFLOAD
    validate(cfg.model_dump(mode="json"))  # the resolved config is still a valid one


def test_audiotune_train_by_hand_resolves_auto(llm_tokens, tmp_path, caplog):
    """``audiotune train llm`` with ``zero_stage: auto`` on a machine without a GPU: no ZeRO, and it trains."""
    import logging

    from audiotune import cli

    out = tmp_path / "llm"
    with caplog.at_level(logging.INFO, logger="audiotune.train.sizing"):
        code = cli.main(["train", "llm", "--tokens", str(llm_tokens), "--output", str(out),
                         "--set", "tracking.enabled=false", "--set", "llm.init=scratch",
                         "--set", "llm.preset=tiny-qwen2", "--set", "llm.train.max_steps=2",
                         "--set", "llm.train.deepspeed.zero_stage=auto"])
    assert code == 0 and (out / "manifest.json").is_file()
    assert "zero_stage=auto" in caplog.text and "no ZeRO" in caplog.text


def test_a_remote_code_base_is_sized_as_the_decoder_of_its_widths(tmp_path) -> None:
    """A model_type transformers does not know (code shipped with the weights) is sized without running that code."""
    from audiotune.config import AudiotuneConfig
    from audiotune.train import sizing

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "step1", "architectures": ["Step1ForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_step1.Step1ForCausalLM"}, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1000}))
    cfg = AudiotuneConfig.model_validate({"llm": {"init": "pretrained", "base_model": str(tmp_path)}})
    config = sizing.llm_config(cfg)
    shape = (config.model_type, config.hidden_size, config.num_hidden_layers, config.vocab_size)
    assert shape == ("llama", 64, 2, 1000)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "step1", "hidden_size": 64}))
    with pytest.raises(sizing.SizingError, match="set zero_stage explicitly"):
        sizing.llm_config(cfg)
