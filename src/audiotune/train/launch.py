"""Launching a training stage: in this process, or under torchrun with N processes per node."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading

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


INTERRUPTED = 143  # 128 + SIGTERM: stopped with a checkpoint written; a rerun resumes


def relaunch(nproc_per_node: int, argv: list[str]) -> int:
    """Run this command again under torchrun and return its exit code.

    SIGTERM and SIGINT sent to this process are passed on to torchrun, which passes SIGTERM on to its workers:
    they finish the current step, write a checkpoint and exit with 143. torchrun itself then exits with 1 (it
    re-raises the signal as an exception), so after a SIGTERM a failed torchrun is reported as 143. torchrun
    gives the workers ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (default 30) before it kills them. torchrun
    runs in its own session, so that a signal to this process group does not reach it twice.
    """
    cmd = torchrun_command(nproc_per_node, argv)
    log.info("launching %d processes: %s", nproc_per_node, " ".join(cmd))
    received: list[int] = []
    pending: list[int] = []  # arrived before torchrun started
    procs: list[subprocess.Popen] = []

    def forward(signum, frame) -> None:  # noqa: ARG001
        received.append(signum)
        if not procs:
            pending.append(signum)
            return
        log.warning("%s: passing it on to torchrun (pid %d)", signal.Signals(signum).name, procs[0].pid)
        with contextlib.suppress(ProcessLookupError):
            procs[0].send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        procs.append(subprocess.Popen(cmd, start_new_session=True))
        while pending:
            procs[0].send_signal(pending.pop(0))
        code = procs[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0 and signal.SIGTERM in received:
        return INTERRUPTED
    return code
