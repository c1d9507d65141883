"""Launching a training stage: in this process, or under torchrun with N processes per node."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

log = logging.getLogger(__name__)


def under_torchrun() -> bool:
    """True inside a process started by torchrun (or a PyTorchJob's torchrun)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(nproc_per_node: int, argv: list[str], nnodes: int = 1, python: str | None = None) -> list[str]:
    """The torchrun command that runs ``audiotune <argv>`` on ``nproc_per_node`` processes per node.

    With ``nnodes > 1`` the command is meant for a Kubeflow PyTorchJob container, not for a shell: the Training
    Operator adds ``MASTER_ADDR``, ``MASTER_PORT`` and ``RANK`` (the node's rank: Master 0, Worker i → i+1) to the
    container's ``env``, and the kubelet expands ``$(NAME)`` references to declared env vars in ``command``, so
    every node gets its own ``--node_rank``. torchrun's static rendezvous then sets the per-process ``RANK``,
    ``LOCAL_RANK`` and ``WORLD_SIZE`` (nnodes × nproc_per_node) itself; the operator's own ``WORLD_SIZE`` and
    ``PET_*`` variables are overridden by these explicit flags.

    Args:
        nproc_per_node: Processes (GPUs) per node.
        argv: Arguments of ``audiotune`` (e.g. ``["train", "llm", "--tokens", ...]``).
        nnodes: Nodes; 1 runs a standalone rendezvous on this machine.
        python: Interpreter in the command; defaults to this one (``sys.executable``).
    """
    cmd = [python or sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if nnodes > 1:
        cmd += [f"--nnodes={nnodes}", "--node_rank=$(RANK)", "--master_addr=$(MASTER_ADDR)",
                "--master_port=$(MASTER_PORT)"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "audiotune.cli", *argv]


def relaunch(nproc_per_node: int, argv: list[str]) -> int:
    """Run this command again under torchrun and return its exit code."""
    cmd = torchrun_command(nproc_per_node, argv)
    log.info("launching %d processes: %s", nproc_per_node, " ".join(cmd))
    return subprocess.run(cmd, check=False).returncode
