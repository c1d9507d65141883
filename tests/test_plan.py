"""``audiotune plan``: per-GPU figures for a 0.5B and a 3B config against DeepSpeed's own estimators, the choice
``zero_stage: auto`` makes, a refusal in one line, and ``submit`` refusing before it contacts the host."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from audiotune import cli
from audiotune.config import validate
from audiotune.orchestration import plan
from audiotune.train import sizing
from audiotune.train.memory import PREFERENCE, GiB, model_state_memory

QWEN25_3B = dict(model_type="qwen2", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True,
                 max_position_embeddings=32768)
H100 = "NVIDIA-H100-80GB-HBM3"


@pytest.fixture(scope="module")
def base_3b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen25-3b")
    (folder / "config.json").write_text(json.dumps(QWEN25_3B))
    return folder


def _cfg(llm: dict, nodes: int = 1, gpus: int = 8, **cluster) -> dict:
    out = {"llm": {"train": {"deepspeed": {"zero_stage": "auto"}}, **llm},
           "cluster": {"num_nodes": nodes, "gpus_per_node": gpus, "gpu_type": H100, **cluster}}
    if nodes > 1:
        out["pipeline"] = {"output_uri": "s3://bucket/out"}
    return out


@pytest.mark.parametrize("option", PREFERENCE, ids=lambda o: o.name)
def test_breakdown_adds_up_to_the_model_state_accounting(option):
    parts = plan.state_breakdown(3_085_938_688, 29_933_568, 8, option, 311_164_928)
    assert sum(parts.values()) == pytest.approx(model_state_memory(3_085_938_688, 29_933_568, 8, option,
                                                                   311_164_928).gpu)


@pytest.mark.parametrize("case", ["0.5b-full-1", "3b-lora-8", "3b-full-16"])
def test_per_gpu_figures_against_deepspeeds_estimators(case, base_3b):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    llm = {"0.5b-full-1": {"init": "scratch", "preset": "qwen2-0.5b", "mode": "full"},
           "3b-lora-8": {"base_model": str(base_3b), "mode": "lora"},
           "3b-full-16": {"base_model": str(base_3b), "mode": "full"}}[case]
    nodes, gpus = {"0.5b-full-1": (1, 1), "3b-lora-8": (1, 8), "3b-full-16": (2, 8)}[case]
    cfg = validate(_cfg(llm, nodes, gpus))
    [p] = plan.plan(cfg)
    size = sizing.model_size("llm", cfg)
    assert (p.params, p.trainable, p.gpus, p.gpu_gib) == (size.total, size.trainable, nodes * gpus, 80.0)
    choice = sizing.choose("llm", cfg, gpus, 80.0)
    assert p.option == choice.option.name  # the same choice the launcher makes
    frozen = size.total - size.trainable
    o = choice.option
    if o.stage in (0, 2):  # DeepSpeed's ZeRO-2 estimate (one GPU for DDP) plus the frozen bf16 weights
        n = 1 if o.stage == 0 else gpus
        _, ds = estimate_zero2_model_states_mem_needs(size.trainable, n, 1 if o.stage == 0 else nodes,
                                                      cpu_offload=o.offload_optimizer)
        ds += 2 * frozen
    else:
        _, ds, _ = estimate_zero3_model_states_mem_needs(size.trainable, size.largest, gpus, nodes,
                                                         cpu_offload=o.offload_optimizer,
                                                         cpu_offload_params=o.offload_params, zero_init=True)
        ds += 0 if o.offload_params else 2 * frozen / (nodes * gpus)
    assert p.deepspeed_states_gib == pytest.approx(ds / GiB)
    assert sum(p.states.values()) <= p.deepspeed_states_gib + 1e-9  # ours never exceeds DeepSpeed's 2 + 18 bytes
    a = p.activations_gib
    assert 0 < a["with_checkpointing"] < a["without_checkpointing"]
    assert p.need_gib == pytest.approx(p.deepspeed_states_gib + a["without_checkpointing"])
    assert p.tokens_per_s > 0


def test_3b_figures_match_the_scaling_table(base_3b):
    lora = plan.plan(validate(_cfg({"base_model": str(base_3b), "mode": "lora"}, gpus=1)))[0]
    full = plan.plan(validate(_cfg({"base_model": str(base_3b), "mode": "full"}, nodes=2, gpus=8)))[0]
    assert (lora.option, round(sum(lora.states.values()), 2), round(lora.deepspeed_states_gib, 2)) == \
        ("DDP (no ZeRO)", 6.19, 6.31)  # docs/scaling.md: LoRA, 1 GPU
    assert (full.option, round(sum(full.states.values()), 2), round(full.deepspeed_states_gib, 2)) == \
        ("ZeRO-2", 8.26, 8.98)  # docs/scaling.md: full ZeRO-2, 16 GPUs


def test_plan_refuses_in_one_line_and_checkpointing_makes_it_fit(base_3b, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_cfg({"base_model": str(base_3b), "mode": "full"}, gpus=1)))
    assert cli.main(["plan", str(config), "--dataset-tokens", "1000000"]) == 2
    out, err = capsys.readouterr()
    assert "DOES NOT FIT" in out and "weights 5.75, gradients 5.75, optimizer 34.49" in out
    [line] = err.strip().splitlines()
    assert "llm: needs 78.9 GiB per GPU" in line and "gradient_checkpointing" in line
    assert cli.main(["plan", str(config), "--set", "llm.train.gradient_checkpointing=true", "--json"]) == 0
    [p] = json.loads(capsys.readouterr().out)
    assert p["fits"] and p["checkpointing"] and p["need_gib"] < 72


def test_submit_refuses_before_contacting_the_host(base_3b, tmp_path, capsys):
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.path)
            self.send_response(500)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(_cfg({"base_model": str(base_3b), "mode": "full"}, gpus=1)))
        host = f"http://127.0.0.1:{server.server_address[1]}"
        assert cli.main(["submit", "--config", str(config), "--host", host]) == 64
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("audiotune submit: plan: llm: needs 78.9 GiB") and "--force" in line
        assert seen == []
    finally:
        server.shutdown()
        server.server_close()
    from audiotune.pipeline_cli import _submit_usage

    args = cli.build_parser().parse_args(["submit", "--config", str(config), "--host", host, "--force"])
    assert _submit_usage(args, validate(yaml.safe_load(config.read_text()))) is None


def test_unknown_gpu_memory_is_a_clear_refusal_for_plan_and_a_skip_for_submit(monkeypatch):
    monkeypatch.setattr(sizing, "visible_gpu_gib", lambda: None)  # this machine's GPU, if any, is not the target
    cfg = validate({"llm": {"init": "scratch", "preset": "tiny-qwen2"}, "cluster": {"gpus_per_node": 1}})
    with pytest.raises(plan.PlanRefused, match=r"cluster.gpu_type=None.*--gpu-gib"):
        plan.plan(cfg)
    assert plan.preflight(cfg) is None
    assert plan.plan(cfg, gpu_gib=24)[0].fits


def test_an_explicit_zero_stage_is_planned_as_given_and_auto_is_named_beside_it(base_3b):
    cfg = validate(_cfg({"base_model": str(base_3b), "mode": "full",
                         "train": {"deepspeed": {"zero_stage": 3}, "gradient_checkpointing": True}}))
    [p] = plan.plan(cfg)
    assert (p.option, p.auto_option) == ("ZeRO-3", "ZeRO-2") and p.fits
    assert p.states["gathered_layer"] > 0 and p.need_gib == pytest.approx(
        p.deepspeed_states_gib + p.activations_gib["with_checkpointing"])
    assert "zero_stage: auto would pick ZeRO-2" in plan.format_plan([p])
