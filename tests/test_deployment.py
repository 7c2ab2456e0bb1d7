"""`scripts/deploy.py` for real: a SuperLink and SuperNodes on loopback, insecure and TLS + SuperNode auth."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import TINY

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "deploy.py"
spec = importlib.util.spec_from_file_location("deploy", SCRIPT)
deploy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deploy)

# TINY (2 rounds, 8 clips per class) with one local epoch and no image rendering: a round costs little more
# than the four ClientApp processes (train + evaluate on 2 sites) that deployment spawns for it.
QUICK = [*TINY, "train.local_epochs=1", "diffusion.render_every=0"]


def our_processes(work: Path) -> list[int]:
    """PIDs whose command line or environment (FLWR_HOME) mentions `work`: what a deployment left running."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(work).encode() in text and int(proc.name) != os.getpid():
            found.append(int(proc.name))
    return found


def kill(pids: list[int]) -> None:
    """SIGKILL the given PIDs (leftovers of a failed test), ignoring those already gone."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_deploy(tmp_path: Path, cache: Path, *flags: str, on_line=None, timeout: float = 600) -> tuple[int, str]:
    """Run deploy.py like a user, `on_line` sees each output line; SIGTERM (its clean stop) after `timeout`."""
    cmd = [sys.executable, str(SCRIPT), "--sites", "2", "--work-dir", str(tmp_path / "work"), *flags, *QUICK,
           f"paths.cache_dir={cache}", f"paths.output_root={tmp_path / 'outputs'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), start_new_session=True)
    timer = threading.Timer(timeout, proc.send_signal, [signal.SIGTERM])
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line:
                on_line(line)
        proc.wait(60)
    finally:
        timer.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, "".join(lines)


def run_folder(tmp_path: Path) -> Path:
    """The single run folder a deployment wrote."""
    (summary,) = (tmp_path / "outputs").rglob("summary.json")
    return summary.parent


def check_run(run: Path, sites: set[str]) -> None:
    """summary.json exists, metrics.jsonl has one eval row per round, each with exactly `sites`."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and 0 <= summary["final_top1"] <= 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["round"] for r in evals] == [1, 2]
    assert all(set(r["sites"]) == sites for r in evals), [r["sites"] for r in evals]
    assert run.name.endswith("_deploy") and "num_sites: 2" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_insecure_deployment(tmp_path, cache_dir):
    work = tmp_path / "work"
    try:
        code, out = run_deploy(tmp_path, cache_dir, "--insecure")
        assert code == 0, out[-4000:]
        assert "(insecure)" in out and "final top-1 retrieval" in out
        check_run(run_folder(tmp_path), {"0", "1"})
        log = (work / "superlink.log").read_text()
        assert log.count("[Fleet.ActivateNode] Activated") == 2
        assert not our_processes(work), "deploy.py left Flower processes running"
    finally:
        kill(our_processes(work))


@pytest.fixture(scope="module")
def auth_deployment(tmp_path_factory, cache_dir):
    """A TLS + auth deployment of 2 registered SuperNodes, plus a rogue SuperNode with an unregistered key.

    The rogue is started by the test as soon as deploy.py reports the SuperLink's port, so it knocks while the
    legitimate nodes are being registered and started. Yields (exit code, output, run folder, work, rogue).
    """
    tmp_path = tmp_path_factory.mktemp("auth")
    work, rogue = tmp_path / "work", []

    def start_rogue(line: str) -> None:
        if m := re.search(r"SuperLink on 127\.0\.0\.1:(\d+)", line):
            home = tmp_path / "rogue"
            key = deploy.make_node_key(home / "key").with_suffix("")  # a valid key pair nobody registered
            ca = Path(shutil.copy(work / "certs" / "ca.crt", home))  # it does trust the SuperLink's certificate
            cmd = deploy.supernode_command(2, 3, int(m[1]), ca, key)
            rogue.append(deploy.start(cmd, home, tmp_path / "rogue.log"))

    try:
        code, out = run_deploy(tmp_path, cache_dir, "--tls", "--auth", on_line=start_rogue)
        run = run_folder(tmp_path) if code == 0 else None
        yield code, out, run, work, rogue
    finally:
        deploy.stop(rogue)
        kill(our_processes(work))


@pytest.mark.slow
@pytest.mark.xdist_group("auth_deployment")  # one worker runs both tests: the deployment is started once
def test_tls_deployment_with_supernode_auth(auth_deployment):
    code, out, run, work, _ = auth_deployment
    assert code == 0, out[-4000:]
    assert "(TLS, SuperNode auth)" in out and "final top-1 retrieval" in out
    check_run(run, {"0", "1"})
    assert len(list((work / "keys").glob("site-*.pub"))) == 2
    link = (work / "superlink.log").read_text()
    assert "Uvicorn running on https://" in link  # the SuperLink served TLS only
    assert link.count("[ControlServicer.RegisterNode] Created node_id") == 2
    assert not our_processes(work), "deploy.py left Flower processes running"


@pytest.mark.slow
@pytest.mark.xdist_group("auth_deployment")
def test_unregistered_supernode_is_refused(auth_deployment):
    code, out, _, work, rogue = auth_deployment
    assert code == 0, out[-4000:]  # the run went on with the two registered SuperNodes
    assert rogue and rogue[0].wait(60) != 0  # the rogue SuperNode gave up: it was never activated
    assert "Failed to activate SuperNode" in (work.parent / "rogue.log").read_text()
    link = (work / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in link
    assert link.count("[Fleet.ActivateNode] Activated") == 2  # only the registered ones
