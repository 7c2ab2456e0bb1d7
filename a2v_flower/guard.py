"""Stop a run's processes when `a2v-run` is killed outright (SIGKILL, the OOM killer), within seconds.

`a2v-run` starts this beside each run: `python -m a2v_flower.guard PID`. It notes every process below PID
while PID lives; once PID is gone it stops the ones still running (found by PID and start time, so never
another run's) and exits. Without it, flwr-simulation and Ray noticed their SuperLink was gone only after
about 77 s. It imports psutil only, and ignores Ctrl-C: `a2v-run` handles that and stops it with the rest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import psutil


def guard(pid: int, period: float = 0.5, grace: float = 5.0) -> int:
    """Watch `pid`; when it has exited, SIGTERM (then SIGKILL after `grace` s) what it had started. Returns how
    many processes were still running."""
    seen: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(pid)
        while parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE:
            for proc in parent.children(recursive=True):
                if proc.pid != os.getpid():
                    seen.setdefault(proc.pid, proc)
            time.sleep(period)
    left = [p for p in seen.values() if p.is_running()]  # is_running compares start times: no reused PID
    terminate(left, grace)
    return len(left)


def terminate(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM `procs`, SIGKILL those still running after `grace` s, and wait for them (up to `grace` s more)."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    guard(int(sys.argv[1]))
