"""Child processes in tests, each with a deadline: a test that waits on a stuck child fails with a
message naming what did not finish, instead of hanging the suite."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

# Long enough for 4 CPU ranks compiling on 2 busy cores; a hang ends here, not in CI's own timeout.
TIMEOUT_S = 420


def run_process(cmd: list, timeout: float = TIMEOUT_S, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, **kwargs), in its own process group: past
    `timeout` the whole group (torchrun and its workers) is killed and the test fails."""
    cmd = [str(c) for c in cmd]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s (killed); "
                        f"last stderr: {err[-2000:]}", pytrace=False)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def join_processes(context, what: str, timeout: float = TIMEOUT_S) -> None:
    """Wait for a torch.multiprocessing ProcessContext (start_processes(join=False)); past `timeout`
    kill every process still running and fail the test."""
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            alive = [p.pid for p in context.processes if p.is_alive()]
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{what}: processes {alive} still running after {timeout:.0f} s (killed): "
                        "a deadlock, or a machine far too slow", pytrace=False)
