"""The components: importable from the installed package, thin, typed, documented, on the project's images."""

import ast
import inspect
from pathlib import Path

import pytest
import yaml

from audiotune import components
from audiotune.images import CPU_IMAGE, CUDA_IMAGE

ROOT = Path(__file__).resolve().parents[1]
STAGES = {
    "convert_data": CPU_IMAGE, "tokenize_data": CPU_IMAGE, "train_llm": CUDA_IMAGE, "train_flow": CUDA_IMAGE,
    "train_joint": CUDA_IMAGE, "export_model": CPU_IMAGE,
}
BOOKKEEPING = {"prepare_run": CPU_IMAGE, "link_runs": CPU_IMAGE, "finish_run": CPU_IMAGE}
ALL = {**STAGES, **BOOKKEEPING}


def test_installed_as_audiotune_components():
    from audiotune.components import convert_data, export_model, tokenize_data, train_flow, train_joint, train_llm

    assert {c.name for c in (convert_data, tokenize_data, train_llm, train_flow, train_joint, export_model)} == {
        n.replace("_", "-") for n in STAGES}
    assert Path(components.__file__).resolve().parent == ROOT / "components"


@pytest.mark.parametrize("name", sorted(ALL))
def test_lightweight_on_the_project_image(name):
    component = getattr(components, name)
    container = component.component_spec.implementation.container
    assert container.image == ALL[name]
    script = " ".join(container.command)
    assert "pip install" not in script, "the image has everything; nothing is installed at run time"


@pytest.mark.parametrize("name", sorted(ALL))
def test_thin_and_documented(name):
    component = getattr(components, name)
    func = component.python_func
    tree = ast.parse(inspect.getsource(func).lstrip())
    body = tree.body[0].body
    statements = body[1:] if isinstance(body[0], ast.Expr) else body  # after the docstring
    assert len(statements) <= 8, f"{name} has {len(statements)} statements: logic belongs in the library"
    spec = component.component_spec
    for inp, definition in (spec.inputs or {}).items():
        if inp == "status":
            continue
        assert definition.description, f"{name}: input {inp!r} is missing from the docstring's Args"
    doc = inspect.getdoc(func)
    assert "Args:" in doc


@pytest.mark.parametrize("name", sorted(STAGES))
def test_typed_artifacts(name):
    spec = getattr(components, name).component_spec
    outputs = {k: v.type for k, v in (spec.outputs or {}).items()}
    assert any(t.startswith("system.Metrics") for t in outputs.values()), f"{name} has no Metrics output"
    assert any(t.startswith(("system.Dataset", "system.Model")) for t in outputs.values())


@pytest.mark.parametrize("name", ["train_llm", "train_flow", "train_joint"])
def test_training_components_output_the_job_manifest(name):
    component = getattr(components, name)
    assert component.component_spec.outputs["job_manifest"].type.startswith("system.Artifact")
    assert "job_manifest: What was launched: the TrainJob's (or PyTorchJob's) manifest" in inspect.getdoc(
        component.python_func)


def test_component_modules_import_only_stdlib_and_kfp_at_the_top():
    for path in sorted((ROOT / "components").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for module in names:
                top = module.split(".")[0]
                assert top in ("kfp", "typing", "audiotune"), f"{path.name} imports {module} at the top"
                if top == "audiotune":
                    assert module.startswith(("audiotune.components", "audiotune.images")), (
                        f"{path.name} imports {module} at the top; the library is imported in the function body")


def test_training_launches_torchrun_with_one_process_on_cpu(monkeypatch, tmp_path):
    """The training step runs the stage's CLI under torchrun, with the resolved config and one process on CPU."""
    import json
    import subprocess

    from audiotune.config import AudiotuneConfig
    from audiotune.orchestration import steps

    seen = {}

    def fake_run(cmd, check):
        seen["cmd"] = cmd
        config = cmd[cmd.index("--config") + 1]
        seen["config"] = Path(config).read_text()
        out = Path(cmd[cmd.index("--output") + 1])
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps({"kind": "audiotune.llm", "metrics": {"val_loss": 1.5}}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    cfg = AudiotuneConfig.model_validate({"llm": {"train": {"deepspeed": {"zero_stage": 2}}},
                                          "cluster": {"gpus_per_node": 4}})
    outcome = steps.train("llm", steps.to_json(cfg), "run-1", str(tmp_path / "model"),
                          {"--tokens": "/data/tokens", "--base-model": ""}, str(tmp_path / "job" / "manifest"))
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=1"]  # no GPU here: one process
    assert cmd[cmd.index("-m", 3):][:5] == ["-m", "audiotune.cli", "train", "llm", "--tokens"]
    assert "--base-model" not in cmd
    written = yaml.safe_load(seen["config"])["llm"]["train"]
    assert written["deepspeed"]["zero_stage"] == 2 and written["nproc_per_node"] == 1
    assert outcome.metrics == {"val_loss": 1.5}
    note = yaml.safe_load((tmp_path / "job" / "manifest").read_text())  # one node: a note, no PyTorchJob
    assert note["launcher"] == "torchrun" and note["command"][:4] == cmd[:4] and note["zero_stage"] == 2
