"""Typed pipeline parameters ↔ the config schema: defaults from the schema, the mapping wins, round trips."""

from pathlib import Path

import pytest

from audiotune.config import AudiotuneConfig, ConfigError, load_config
from audiotune.orchestration import params

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_defaults_come_from_the_schema():
    d = params.defaults()
    cfg = AudiotuneConfig()
    assert d["llm_lr"] == cfg.llm.train.lr and d["lora_r"] == cfg.llm.lora.r and d["mode"] == cfg.pipeline.mode
    assert d["source_uri"] == "" and d["lora_targets"] == "all-linear"
    assert set(d) == {p.name for p in params.PARAMS}


@pytest.mark.parametrize("overrides", [
    [],
    ["llm.lora.target_modules=[q_proj, v_proj]", "pipeline.mode=both", "llm.base_model=/models/base"],
    ["llm.train.deepspeed.zero_stage=3", "llm.train.nproc_per_node=8", "pipeline.output_uri=s3://b/out"],
    ["tokenize.mel.fmax=7600", "convert.format=kaldi", "tracking.experiment=x"],
])
def test_split_then_resolve_gives_back_the_config(overrides):
    cfg = load_config(EXAMPLES / "demo.yaml", overrides)
    typed, mapping = params.split(cfg)
    again, notes = params.resolve(mapping, typed)
    assert again == cfg
    # a note only where one parameter stands for several fields that the config sets apart
    multi = [p.name for p in params.PARAMS if len(p.paths) > 1]
    assert all(any(f"parameter {name}=" in n for name in multi) for n in notes)
    assert again.tokenize.mel.resolved() == cfg.tokenize.mel.resolved()


def test_mapping_carries_only_what_the_parameters_do_not():
    cfg = load_config(EXAMPLES / "demo.yaml", ["llm.train.lr=0.003"])
    typed, mapping = params.split(cfg)
    assert typed["llm_lr"] == 0.003 and "lr" not in mapping["llm"]["train"]
    assert mapping["llm"]["init"] == "scratch"
    assert "mode" not in mapping["pipeline"] and "experiment" not in mapping["tracking"]  # both are parameters
    assert mapping["pipeline"]["root"] == "demo/pipeline"


def test_typed_parameters_apply_and_the_mapping_wins():
    cfg, notes = params.resolve({}, {"llm_lr": 0.01, "lora_targets": "q_proj,v_proj", "gpus": 0, "zero_stage": 2})
    assert cfg.llm.train.lr == 0.01 and cfg.llm.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.llm.train.nproc_per_node == 1  # 0 GPUs: one process
    assert cfg.llm.train.deepspeed.zero_stage == 2 and notes == []
    cfg, notes = params.resolve({"llm": {"train": {"lr": 0.5}}}, {"llm_lr": 0.01})
    assert cfg.llm.train.lr == 0.5
    assert notes == ["config sets llm.train.lr=0.5, which takes precedence over the pipeline parameter llm_lr=0.01"]


def test_values_arrive_as_kubeflow_sends_them():
    # integers come back from protobuf Structs as floats, numbers may arrive as strings
    mapping = {"llm": {"lora": {"r": 8.0}, "train": {"max_steps": 30.0}}}
    cfg, _ = params.resolve(mapping, {"lora_r": "4", "llm_lr": "1e-3"})
    assert cfg.llm.lora.r == 8 and cfg.llm.train.max_steps == 30 and cfg.llm.train.lr == 1e-3


def test_bad_values_name_the_field_or_parameter():
    with pytest.raises(ConfigError, match=r"pipeline\.mode"):
        params.resolve({}, {"mode": "everything"})
    with pytest.raises(ConfigError, match=r"lora_r = 'many'"):
        params.resolve({}, {"lora_r": "many"})
    with pytest.raises(ConfigError, match="unknown pipeline parameter 'lr'"):
        params.resolve({}, {"lr": 1.0})
    with pytest.raises(ConfigError, match=r"convert\.sample_rate"):
        params.resolve({"convert": {"sample_rate": 10}}, {})


def test_every_parameter_maps_onto_the_schema():
    assert [path for p in params.PARAMS for path in p.paths if not params.schema_has(path)] == []


def test_the_ci_example_config_is_valid_and_submittable():
    cfg = load_config(EXAMPLES / "ci" / "retrain.yaml")
    typed, mapping = params.split(cfg)
    assert typed["gpus"] == 8 and typed["zero_stage"] == "2" and typed["output_uri"].startswith("s3://")
    assert params.resolve(mapping, typed)[0] == cfg


def test_joint_epochs_zero_skips_the_joint_stage_even_when_the_config_sets_max_steps():
    from audiotune.orchestration.steps import joint_enabled

    both = {"pipeline": {"mode": "both"}, "joint": {"train": {"max_steps": 10}}}
    cfg, _ = params.resolve(both, {"joint_epochs": 0})
    assert cfg.joint.train.max_steps == 10 and not joint_enabled(cfg)
    cfg, _ = params.resolve({**both, "joint": {"train": {"max_steps": 10, "epochs": 0}}}, {})
    assert not joint_enabled(cfg)  # the config's own epochs: 0 is the same switch
    cfg, _ = params.resolve(both, {"joint_epochs": 2})
    assert joint_enabled(cfg)
    # the demo turns its joint stage on (epochs 1, max_steps 10): it runs, through the parameters as well
    demo = load_config(EXAMPLES / "demo.yaml")
    typed, mapping = params.split(demo)
    assert typed["joint_epochs"] > 0 and joint_enabled(params.resolve(mapping, typed)[0])
    assert not joint_enabled(params.resolve(mapping, {**typed, "joint_epochs": 0})[0])
    assert params.defaults()["joint_epochs"] == AudiotuneConfig().joint.train.epochs == 0  # off unless asked for
    assert not joint_enabled(AudiotuneConfig(pipeline={"mode": "both"}))


def test_zero_stage_parameter_takes_a_stage_or_auto():
    for value, expected in (("auto", "auto"), ("2", 2), (3, 3), ("1.0", 1)):
        cfg, _ = params.resolve({}, {"zero_stage": value})
        assert {cfg.llm.train.deepspeed.zero_stage, cfg.flow.train.deepspeed.zero_stage,
                cfg.joint.train.deepspeed.zero_stage} == {expected}, value
    for bad in ("2.5", "four", "5"):
        with pytest.raises(ConfigError, match=r"llm\.train\.deepspeed\.zero_stage"):
            params.resolve({}, {"zero_stage": bad})
    cfg = load_config(EXAMPLES / "demo.yaml", ["llm.train.deepspeed.zero_stage=auto"])
    typed, mapping = params.split(cfg)
    assert params.resolve(mapping, typed)[0] == cfg


def test_several_nodes_need_an_s3_output_uri_before_anything_runs():
    with pytest.raises(ConfigError, match=r"cluster\.num_nodes=2 needs pipeline\.output_uri"):
        params.resolve({"cluster": {"num_nodes": 2}}, {})
    with pytest.raises(ConfigError, match=r"pipeline\.output_uri"):
        params.resolve({"cluster": {"num_nodes": 2}}, {"output_uri": "/shared/out"})
    cfg, _ = params.resolve({"cluster": {"num_nodes": 2}}, {"output_uri": "s3://bucket/out"})
    assert cfg.cluster.num_nodes == 2
