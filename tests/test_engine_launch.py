"""Relaunching under torchrun: SIGTERM and SIGINT to the launcher reach torchrun; the exit code comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Stands in for torchrun: like it, exits with 1 on SIGTERM / SIGINT (torchrun re-raises the signal as an exception
# once its workers are down), otherwise sleeps and exits with the given code.
FAKE_TORCHRUN = """
import os, signal, sys, time
from pathlib import Path
out, sleep, code = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
def stop(signum, frame):
    with open(out / "signals.txt", "a") as f:
        f.write(f"{signal.Signals(signum).name} {os.getsid(0)}\\n")
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
(out / "ready").write_text(str(os.getpid()))
time.sleep(sleep)
sys.exit(code)
"""
LAUNCHER = """
import sys
from audiotune.train import launch
launch.torchrun_command = lambda nproc, argv: [sys.executable, "-c", sys.argv[1], *argv]
sys.exit(launch.relaunch(2, sys.argv[2:]))
"""


def _launch(out: Path, sleep: float, code: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, FAKE_TORCHRUN, str(out), str(sleep), str(code)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_ready(out: Path, proc: subprocess.Popen) -> int:
    deadline = time.time() + 60
    while not (out / "ready").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the fake torchrun never started"
        time.sleep(0.05)
    return int((out / "ready").read_text())


@pytest.mark.parametrize("sig, expected", [(signal.SIGTERM, 143), (signal.SIGINT, 1)])
def test_a_signal_to_the_launcher_reaches_torchrun_once(tmp_path, sig, expected):
    proc = _launch(tmp_path, sleep=60, code=0)
    child = _wait_ready(tmp_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == expected, err  # SIGTERM: 143, "interrupted, checkpoint written; a rerun resumes"
    received = (tmp_path / "signals.txt").read_text().splitlines()
    assert [line.split()[0] for line in received] == [sig.name]
    assert int(received[0].split()[1]) == child  # torchrun leads its own session: a group's signal skips it
    assert f"passing it on to torchrun (pid {child})" in err
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


@pytest.mark.parametrize("code", [0, 3])
def test_without_a_signal_the_exit_code_of_torchrun_comes_back(tmp_path, code):
    proc = _launch(tmp_path, sleep=0, code=code)
    proc.communicate(timeout=60)
    assert proc.returncode == code
    assert not (tmp_path / "signals.txt").exists()
