"""The processes of a run: started so that they die with `a2v-run`, found by PID (never by name), stopped in
order with their descendants and orphans, and the run's own process watched so that a crash is noticed."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from a2v_flower.guard import terminate

LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # prctl, loaded before any fork


def die_with_parent() -> None:
    """In a child before exec: SIGTERM it when this process dies, even by SIGKILL (Linux; elsewhere a no-op)."""
    if LIBC is not None:
        LIBC.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def become_subreaper() -> None:
    """Orphans of this process's children (Ray's processes when flwr-simulation dies) re-parent to this
    process instead of init, so `stop_processes` still finds them (Linux; elsewhere a no-op)."""
    if LIBC is not None:
        LIBC.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def stop_processes(roots: list[int] | None = None, grace: float = 10.0) -> int:
    """SIGTERM the processes `roots` (PIDs) and all their descendants, or without `roots` every process this
    one started (children, theirs, orphans re-parented to it); SIGKILL what is left after `grace` s, reap
    them; return how many there were. Found by PID (psutil), never by name."""
    def tree() -> list[psutil.Process]:
        found = psutil.Process().children(recursive=True) if roots is None else []
        for pid in roots or []:
            with contextlib.suppress(psutil.NoSuchProcess):
                found += [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        live = []
        for p in found:
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE and p.pid != os.getpid():
                    live.append(p)
        return live

    seen: set[int] = set()
    for _ in range(3):  # a process may start another while the first ones stop
        procs = tree()
        if not procs:
            break
        seen |= {p.pid for p in procs}
        terminate(procs, grace)
    if roots is None:
        reap_orphans()
    return len(seen)


def stop_local_superlink(flwr_home: str | Path) -> int:
    """Stop the SuperLink the Flower CLI started, detached, for `flwr_home` (plain `flwr run`: benchmarks,
    tests; a2v-run never uses it) and everything it started; return how many processes there were."""
    marker = str(Path(flwr_home) / "local-superlink")  # in its --log-file and --database paths
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "flower-superlink" in cmd and marker in cmd:
            pids.append(proc.pid)
    return stop_processes(pids) if pids else 0


def reap_orphans(keep: set[int] = frozenset()) -> None:
    """Collect exited processes re-parented to this one (a subreaper), except `keep` (Popen's own children)."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if child.pid not in keep and child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)


def settle(superlink: int, timeout: float = 15.0) -> None:
    """After a finished stream, give Flower up to `timeout` s to end the run's process (SuperLink ->
    superexec -> flwr-simulation, which shuts Ray down) by itself before the rest is stopped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run_process_alive(superlink):
        time.sleep(0.5)


def end_stream_after_run(superlink: int, flwr: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop `flwr run --stream` once the run's process (flwr-simulation: the ServerApp and Ray's driver) has been
    gone for `grace` s: if it crashed, the stream would wait about a minute for Flower to notice. A run that
    finished has written its summary, which is what decides the outcome, whatever the stream's exit."""
    started, gone = False, None
    while flwr.poll() is None:
        if run_process_alive(superlink):
            started, gone = True, None
        elif started:
            gone = gone or time.monotonic()
            if time.monotonic() - gone > grace:
                flwr.terminate()
                return
        time.sleep(0.5)


def run_process_alive(superlink: int) -> bool:
    """Whether a process two levels below the SuperLink (flwr-simulation under superexec) still runs. An exited
    one counts as gone: superexec never reaps it, so it stays a zombie until the SuperLink is stopped."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(superlink).children():
            for grandchild in child.children():
                with contextlib.suppress(psutil.Error):
                    if grandchild.status() != psutil.STATUS_ZOMBIE:
                        return True
    return False


@contextlib.contextmanager
def signals_ignored():
    """SIGINT and SIGTERM ignored inside (a clean-up that must finish), their handlers restored after."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def leftovers(folder: Path) -> list[str]:
    """What a clean-up left: processes still running below this one, and `folder` if it still exists."""
    left = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"process {proc.pid} ({proc.name()})")
    return left + ([f"folder {folder}"] if folder.exists() else [])
