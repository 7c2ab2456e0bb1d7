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


def cmdline(pid: int) -> bytes:
    """A process's command line, arguments separated by NUL (b'' once it has exited)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def kill(pids: list[int]) -> None:
    """SIGKILL the given PIDs (leftovers of a failed test), ignoring those already gone."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# Put on PYTHONPATH, it makes SuperNodes send a heartbeat every 10 s (Flower's least; its default, 30 s, has no
# option): the SuperLink then takes a dead SuperNode for unavailable after 2 x 10 s instead of 2 x 30 s.
HEARTBEAT = """import os, sys
if os.path.basename(sys.argv[0] if sys.argv else "") == "flower-supernode":
    import flwr.common.constant
    flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL = 10  # read when Flower's SuperNode modules are imported
"""


def run_deploy(tmp_path: Path, cache: Path, *flags: str, on_line=None, timeout: float = 600,
               env: dict | None = None) -> tuple[int, str]:
    """Run deploy.py like a user with `flags` (its --options, and Hydra overrides that win over QUICK); `on_line`
    sees each output line; SIGTERM (its clean stop) after `timeout`."""
    options, overrides = [f for f in flags if f.startswith("--")], [f for f in flags if not f.startswith("--")]
    cmd = [sys.executable, str(SCRIPT), "--sites", "2", "--work-dir", str(tmp_path / "work"), *options, *QUICK,
           f"paths.cache_dir={cache}", f"paths.output_root={tmp_path / 'outputs'}", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})), start_new_session=True)
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


def check_run(run: Path, *sites: set[str]) -> None:
    """summary.json exists, metrics.jsonl has one eval row per round, round r's with exactly `sites[r - 1]`."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == len(sites) and 0 <= summary["final_top1"] <= 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["round"] for r in evals] == list(range(1, len(sites) + 1))
    assert [set(r["sites"]) for r in evals] == list(sites), [r["sites"] for r in evals]
    assert run.name.endswith("_deploy") and "num_sites: 2" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_insecure_deployment_goes_on_without_a_supernode_that_dies(tmp_path, cache_dir):
    """`--insecure` (also the default), `federation.min_sites=1`: SuperNode 1 is SIGKILLed as round 2 starts; deploy.py
    reports the death, the round fails for site 1 only and the run completes, exit 0, naming the failure. The
    SuperNodes' heartbeat is 10 s (HEARTBEAT), so the SuperLink notices the death 40 s sooner."""
    work, killed = tmp_path / "work", []
    (tmp_path / "heartbeat").mkdir()
    (tmp_path / "heartbeat" / "sitecustomize.py").write_text(HEARTBEAT)

    def kill_site_1(line: str) -> None:
        if "[ROUND 2/2]" in line and not killed:  # round 1 is over
            (pid,) = [pid for pid in our_processes(work) if b"flower-supernode" in cmdline(pid)
                      and b"partition-id=1 " in cmdline(pid)]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    try:
        code, out = run_deploy(tmp_path, cache_dir, "--insecure", "federation.min_sites=1", on_line=kill_site_1,
                               env={"PYTHONPATH": str(tmp_path / "heartbeat")})
        assert code == 0, out[-4000:]
        assert "(insecure)" in out and killed
        assert "SuperNode 1 (partition-id=1) died with exit code -9; last lines of" in out
        final = next(line for line in reversed(out.splitlines()) if "final top-1 retrieval" in line)
        assert "failed sites round 2: site 1 (first: site 1: train: Error: Node Unavailable" in final, final
        check_run(run_folder(tmp_path), {"0", "1"}, {"0"})
        log = (work / "superlink.log").read_text()
        assert log.count("[Fleet.ActivateNode] Activated") == 2
        assert not our_processes(work), "deploy.py left Flower processes running"
    finally:
        kill(our_processes(work))


@pytest.mark.slow
def test_tls_deployment_with_supernode_auth_refuses_an_unregistered_supernode(tmp_path, cache_dir):
    """A TLS + auth deployment of 2 registered SuperNodes, plus a rogue SuperNode with an unregistered key; one
    round (every message of a deployment starts a ClientApp process: what two rounds would add, the insecure
    test shows). The rogue is started as soon as deploy.py reports the SuperLink's port, so it knocks while the legitimate
    nodes are being registered and started.
    """
    work, rogue = tmp_path / "work", []

    def start_rogue(line: str) -> None:
        if m := re.search(r"SuperLink on 127\.0\.0\.1:(\d+)", line):
            home = tmp_path / "rogue"
            key = deploy.make_node_key(home / "key").with_suffix("")  # a valid key pair nobody registered
            ca = Path(shutil.copy(work / "certs" / "ca.crt", home))  # it does trust the SuperLink's certificate
            cmd = deploy.supernode_command(2, 3, int(m[1]), ca, key)
            rogue.append(deploy.start(cmd, home, tmp_path / "rogue.log"))

    try:
        code, out = run_deploy(tmp_path, cache_dir, "--tls", "--auth", "num_rounds=1", on_line=start_rogue)
        assert code == 0, out[-4000:]  # the run went on with the two registered SuperNodes
        assert "(TLS, SuperNode auth)" in out and "final top-1 retrieval" in out
        check_run(run_folder(tmp_path), {"0", "1"})
        assert len(list((work / "keys").glob("site-*.pub"))) == 2
        link = (work / "superlink.log").read_text()
        assert "Uvicorn running on https://" in link  # the SuperLink served TLS only
        assert link.count("[ControlServicer.RegisterNode] Created node_id") == 2
        assert not our_processes(work), "deploy.py left Flower processes running"
        # the rogue SuperNode gave up: it was never activated
        assert rogue and rogue[0].wait(60) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "rogue.log").read_text()
        assert "No SuperNode found with the given public key" in link
        assert link.count("[Fleet.ActivateNode] Activated") == 2  # only the registered ones
    finally:
        deploy.stop(rogue)
        kill(our_processes(work))
