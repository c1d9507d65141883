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


def torchrun_command(nproc_per_node: int, argv: list[str], nnodes: int = 1) -> list[str]:
    """The torchrun command that runs ``audiotune <argv>`` on ``nproc_per_node`` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if nnodes > 1:  # the Training Operator sets MASTER_ADDR/PORT, RANK (node rank) and WORLD_SIZE (nodes)
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
