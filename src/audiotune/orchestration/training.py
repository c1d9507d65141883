"""Launching a training stage from its pipeline task: ``torchrun`` in the task's own pod, or a multi-node job.

- One node (``cluster.num_nodes == 1``): the task runs ``torchrun --nproc_per_node <gpus>`` over the stage's CLI
  (``audiotune train <stage> ...``) with the run's config, one process per GPU of the pod (one process on CPU).
  DeepSpeed ZeRO comes from the stage's ``train.deepspeed`` settings, which the stage turns into its config.
- Several nodes: the task submits a Kubeflow Trainer v2 TrainJob (``cluster.launcher: trainjob``, the default)
  or a Training Operator PyTorchJob (``pytorchjob``) through :mod:`audiotune.cluster`, which runs the same
  command on every node of the same image and follows it to the end. The MLflow run ids the KFP MLflow plugin put
  in this task's environment are passed on to the nodes, so rank 0 logs into the task's run. Every node must read
  its inputs and write its output in one place, so this needs ``pipeline.output_uri`` (the config schema refuses a
  config without one); inputs the task only has locally are published there.

A ``zero_stage: auto`` is resolved here, before the processes start (:mod:`audiotune.train.sizing`). What was
launched is written to ``manifest_path`` (the task's ``job_manifest`` artifact): the job's manifest, or on one
node a short YAML note with the torchrun command.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from audiotune import artifacts, credentials, publish, storage
from audiotune.config import AudiotuneConfig
from audiotune.errors import TrainingError
from audiotune.orchestration import params

log = logging.getLogger(__name__)

NODE_CONFIG = "/tmp/audiotune-config.yaml"  # where each node of a multi-node job writes the run's config
CONFIG_ENV = "AUDIOTUNE_CONFIG_YAML"
ARTIFACT_OPTIONS = ("--tokens", "--llm", "--flow")  # inputs that are artifacts of earlier tasks


class LaunchError(TrainingError, RuntimeError):
    """Training could not be launched, or its processes failed."""


def processes(gpus_per_node: int) -> int:
    """torchrun processes in this pod: one per requested GPU; one on CPU (no GPU requested or visible)."""
    import torch

    available = torch.cuda.device_count()
    if gpus_per_node == 0 or available == 0:
        if gpus_per_node > 1:
            log.warning("%d GPUs requested but none is visible: training with one process on CPU", gpus_per_node)
        return 1
    if gpus_per_node > available:
        raise LaunchError(f"cluster.gpus_per_node={gpus_per_node} but only {available} GPUs are visible in this pod")
    return gpus_per_node


def config_yaml(cfg: AudiotuneConfig, stage: str, nproc: int) -> str:
    """The run's config for the training processes: the fields it sets (so it re-loads as the same config), with
    the stage's ``nproc_per_node`` set to the processes actually launched (on a copy; ``cfg`` is unchanged)."""
    cfg = cfg.model_copy(deep=True)
    getattr(cfg, stage).train.nproc_per_node = nproc
    return yaml.safe_dump(params.set_fields(cfg), sort_keys=False)


def write_note(path: str | Path | None, **fields) -> None:
    """The ``job_manifest`` artifact of a task that created no multi-node job: a YAML note of what it did instead."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    note = "# no TrainJob / PyTorchJob: cluster.num_nodes is 1\n"
    Path(path).write_text(note + yaml.safe_dump(fields, sort_keys=False), encoding="utf-8")


def run_torchrun(stage: str, cfg: AudiotuneConfig, argv: list[str], nproc: int,
                 manifest_path: str | Path | None = None) -> None:
    """``torchrun --nproc_per_node <nproc> -m audiotune.cli <argv> --config <the run's config>`` in this pod."""
    from audiotune.train.launch import torchrun_command

    with tempfile.TemporaryDirectory(prefix=f"audiotune-{stage}-") as tmp:
        config_path = os.path.join(tmp, "config.yaml")
        Path(config_path).write_text(config_yaml(cfg, stage, nproc), encoding="utf-8")
        cmd = torchrun_command(nproc, [*argv, "--config", config_path])
        ds = getattr(cfg, stage).train.deepspeed
        write_note(manifest_path, launcher="torchrun", nproc_per_node=nproc, zero_stage=ds.zero_stage,
                   offload_optimizer=ds.offload_optimizer, offload_params=ds.offload_params, command=cmd)
        log.info("launching %d training process(es), DeepSpeed ZeRO %d: %s", nproc, ds.zero_stage, " ".join(cmd))
        code = subprocess.run(cmd, check=False).returncode
    if code != 0:
        hint = " (interrupted; a retry resumes from the newest checkpoint)" if code == 143 else ""
        raise LaunchError(f"train {stage}: torchrun exited with code {code}{hint}")


def shared_input(uri: str, base: str, name: str) -> str:
    """An input every node can read: an s3:// URI as is; a local artifact published under ``base/inputs/name``
    (once per run: a complete copy from an earlier task or attempt is reused)."""
    if storage.is_s3(uri):
        return uri
    target = storage.join(base, "inputs", name)
    if storage.exists(storage.join(target, artifacts.MANIFEST)):
        return target
    log.info("publishing %s to %s for the training nodes", uri, target)
    with publish.publish_dir(target, overwrite=True) as staging:
        shutil.copytree(uri, staging, dirs_exist_ok=True)
    return target


def run_multinode(stage: str, cfg: AudiotuneConfig, argv: list[str], pipeline_run_id: str,
                  manifest_path: str | Path | None = None) -> None:
    """Run the stage on ``cluster.num_nodes`` nodes through a TrainJob or a PyTorchJob (``cluster.launcher``) and
    follow it to the end; its manifest (YAML) goes to ``manifest_path`` before it is created."""
    from audiotune.cluster import JobError, JobSpec, launcher
    from audiotune.cluster.trainjob import FORWARDED_ENV
    from audiotune.images import CUDA_IMAGE
    from audiotune.train.launch import torchrun_command

    gpus, nodes = cfg.cluster.gpus_per_node, cfg.cluster.num_nodes
    runner = launcher(cfg.cluster)
    if runner.name == "trainjob":  # Trainer's torch plugin sets PET_NNODES, PET_NODE_RANK, ...: torchrun reads them
        command = ["python", "-m", "torch.distributed.run", "-m", "audiotune.cli", *argv, "--config", NODE_CONFIG]
    else:  # the Training Operator sets RANK, MASTER_ADDR, MASTER_PORT; the kubelet expands $(...)
        command = torchrun_command(max(1, gpus), [*argv, "--config", NODE_CONFIG], nnodes=nodes, python="python")
    env = {CONFIG_ENV: config_yaml(cfg, stage, max(1, gpus))}
    forwarded = FORWARDED_ENV if cfg.cluster.mlflow_secret else (*FORWARDED_ENV, "MLFLOW_TRACKING_URI")
    env.update({k: os.environ[k] for k in forwarded  # the KFP MLflow plugin's run (and server, without a Secret)
                if os.environ.get(k) and not credentials.is_uri_with_userinfo(os.environ[k])})
    spec = JobSpec.from_settings(
        cfg.cluster, run_id=pipeline_run_id, task=f"train-{stage}", image=CUDA_IMAGE, argv=argv, env=env,
        # each node writes the config from its environment, then runs torchrun
        command=["sh", "-c", f'printf "%s" "${CONFIG_ENV}" > {NODE_CONFIG} && exec {shlex.join(command)}'],
    )
    log.info("training %s on %d nodes × %d GPUs through a %s", stage, nodes, gpus, runner.kind)
    try:
        result = runner.run(spec, manifest_path=manifest_path)
    except JobError as err:
        raise LaunchError(f"train {stage}: {err}") from None
    log.info("%s %s/%s %s in %.0fs", runner.kind, result.namespace, result.name, result.state.lower(),
             result.duration_s)


def launch(stage: str, cfg: AudiotuneConfig, inputs: dict[str, str], output: str, pipeline_run_id: str,
           base: str | None, manifest_path: str | Path | None = None) -> None:
    """Train ``stage`` from ``inputs`` (CLI option → URI) into ``output``, on this pod or on several nodes.

    Args:
        stage: llm, flow or joint.
        cfg: The run's config.
        inputs: e.g. ``{"--tokens": "/tmp/inputs/tokens", "--base-model": "s3://..."}``; empty values are left out.
        output: Where the stage publishes its artifact.
        pipeline_run_id: The Kubeflow run id (names the multi-node job).
        base: The run's durable location (``<output_uri>/<run.name>/<run id>``), needed for several nodes.
        manifest_path: Where the job's manifest (or, on one node, a note of the torchrun command) goes.
    """
    from audiotune.train import sizing

    multinode = cfg.cluster.num_nodes > 1
    if multinode and not (base and storage.is_s3(base)):  # the schema refuses it; a config built in code may not
        raise LaunchError(f"cluster.num_nodes={cfg.cluster.num_nodes}: every node must read the inputs and write "
                          "the output in one place; set pipeline.output_uri to an s3:// location")
    nproc = max(1, cfg.cluster.gpus_per_node) if multinode else processes(cfg.cluster.gpus_per_node)
    try:
        cfg, _ = sizing.with_zero(stage, cfg, nproc)
    except sizing.SizingError as err:
        raise LaunchError(str(err)) from None
    argv = ["train", stage]
    for option, uri in inputs.items():
        if uri:  # artifacts of earlier tasks are local to this pod; base models are URIs every node can read
            shared = multinode and option in ARTIFACT_OPTIONS
            argv += [option, shared_input(uri, base, option.lstrip("-")) if shared else uri]
    argv += ["--output", output]
    if multinode:
        run_multinode(stage, cfg, argv, pipeline_run_id, manifest_path)
    else:
        run_torchrun(stage, cfg, argv, nproc, manifest_path)
