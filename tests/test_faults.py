"""The failure table, row by row: what happens when a config, a file, a site, a SuperNode or the launcher fails.

Fast tests call `a2v-run`'s entry point or the real ServerApp/ClientApp in process (tests/inprocess.py);
tests marked slow start real Flower processes. docs/reliability.md lists each case with its command.
"""

from __future__ import annotations

import dataclasses
import contextlib
import csv
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch

from a2v_flower import config as C
from a2v_flower import site_generators as R
from a2v_flower import processes, run, server_app
from a2v_flower.checkpoints import load_tensors, save_tensors
from a2v_flower.data.esc50 import read_metadata
from a2v_flower.data.site import dataset_root
from a2v_flower.models.generators import build_generator
from a2v_flower.names import safe_name
from a2v_flower.preflight import token_shape
from a2v_flower.nodes import RoundFailed, short_reason
from tests.conftest import TINY, once
from tests.inprocess import LocalGrid, run_server

BIN = Path(sys.executable).parent
SMALL = [*TINY, "num_rounds=1", "federation.num_sites=2", "diffusion.render_every=0", "train.local_epochs=1"]


def snapshot(folder: Path) -> dict[str, float]:
    """Every file under `folder` with its modification time (what a refusal must leave alone)."""
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")} if folder.exists() else {}


# ---- fixtures: a finished run to resume, generator checkpoints to load, a broken copy of the data --------------

@pytest.fixture(scope="module")
def base(cache_dir, tmp_path_factory) -> list[str]:
    """The valid overrides every refusal case starts from (outputs in a folder of the module's own)."""
    out = tmp_path_factory.mktemp("faults") / "outputs"
    return [*SMALL, f"paths.cache_dir={cache_dir}", f"paths.output_root={out}"]


@pytest.fixture(scope="module")
def finished_run(base, tmp_path_factory) -> Path:
    """A 1-round run folder (server checkpoint, both sites' state files) made by the real apps in process."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_server(C.absolute_paths(C.compose_config(base), Path.cwd()), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def generators(base, tmp_path_factory) -> Path:
    """Gaussian per-class generator checkpoints of both sites for every class, as a generator_training run saves."""
    folder = tmp_path_factory.mktemp("generators")
    cfg = C.absolute_paths(C.compose_config([*base, *pretrained_overrides(folder)]), Path.cwd())
    classes = list(cfg.data.classes)
    replay, shape = C.replay_spec(cfg, classes), token_shape(C.validate(cfg))
    for site in (0, 1):
        states = {c: build_generator(replay.generator, shape).state_tensors() | {"seen": torch.tensor([i])}
                  for i, c in enumerate(classes)}
        R.save_site_generators(replay, site, states, classes, set(range(len(classes))), shape, 1, False)
    return folder


def pretrained_overrides(folder: Path) -> list[str]:
    return ["generator=gaussian", "granularity=per_class", "mode=use_pretrained", f"generator_checkpoint.dir={folder}"]


def data_copy(base: list[str], dst: Path) -> Path:
    """A copy of the TINY synthetic dataset (ESC-50 layout) to break."""
    cfg = C.absolute_paths(C.compose_config(base), Path.cwd())
    return Path(shutil.copytree(dataset_root(C.data_spec(cfg)), dst))


def corrupt_audio(root: Path, classes: set[str] | None = None) -> None:
    """Overwrite the audio of `classes` (all if None) with bytes no decoder reads."""
    for clip in read_metadata(root):
        if classes is None or clip.category in classes:
            clip.path.write_bytes(b"not audio")


# ---- refused configs: one line, exit status 2, nothing written --------------------------------------------------

REFUSED = [  # (overrides, what the one line must say)
    (["train.lr=-1"], r"train.lr=-1(\.0)? is not allowed; expected a number > 0"),
    (["num_rounds=0"], r"num_rounds=0(\.0)? is not allowed"),
    (["partition=classes", "partition.sites=[[dog,cat],[rain]]"], r"partition.sites\[0\]: unknown classes \['cat'\]"),
    (["partition=groups", "partition.sites=[[animals],[space]]"], r"unknown groups \['space'\]"),
    (["strategy.fraction_train=0"], r"strategy.fraction_train=0(\.0)? is not allowed; expected a fraction in \(0, 1\]"),
    (["strategy.fraction_train=5"], r"strategy.fraction_train=5(\.0)? is not allowed"),
    (["strategy.fraction_evaluate=0"], r"strategy.fraction_evaluate=0(\.0)? is not allowed"),
    (["sharing=sequential"], r"sharing.mode='sequential' shares generators but generator.type='none'"),
    (["sharing=averaged"], r"sharing.mode='averaged' shares generators"),
    (["model.audio.tokens=1"], r"model.audio.tokens=1(\.0)? is not allowed; .* expected 2..145"),
    (["model.audio.tokens=999"], r"model.audio.tokens=999(\.0)? is not allowed"),
    (["data.splits={train: 1.2, val: -0.1, test: -0.1}"], r"data.splits.train=1.2 is not allowed; expected a fraction"),
    (["data.splits.train=0.9"], r"data.splits=.* summing to 1"),
    (["federation.min_sites=5"], r"federation.min_sites=5(\.0)? is not allowed; expected null \(all sites\) or .* 1..federation"),
    (["federation.min_sites=0"], r"federation.min_sites=0(\.0)? is not allowed"),
    (["federation.num_cpus=0"], r"federation.num_cpus=0"),
    (["name=../escape"], r"name='../escape' cannot name a file"),
    (["generator=gaussian", "generator_checkpoint.base_name=a/b"], r"generator_checkpoint.base_name='a/b' cannot name"),
    (["strategy.aggregation=median"], r"strategy.aggregation='median' is not allowed"),
    (["wandb.mode=maybe"], r"wandb.mode='maybe' is not allowed"),
    (["adapter.heads=3"], r"adapter.width=64 must be divisible by adapter.heads=3"),
    (["prompt_template=hello"], r"prompt_template='hello' must contain"),
    (["generator=vae"], r"generator.type='vae' is unconditioned"),
    (["strategy=kd"], r"strategy.aggregation='kd' distils on generator samples"),
    (["server_generator.epochs=5"], r"server_generator.epochs=5 but nothing uses its samples"),
    (["train.lrr=3"], r"Could not override 'train.lrr'"),
    (["partition=nosuch"], r"Could not find 'partition/nosuch'"),
    (["schedule={5: [{from_round: 1, classes: [dog]}]}"], r"schedule.5: site 5 is not allowed; expected a site id 0..1"),
    (["federation.timeout=0"], r"federation.timeout=0(\.0)? is not allowed; expected a number > 0"),
    (["data.clip_seconds=-1"], r"data.clip_seconds=-1(\.0)? is not allowed"),
    (["resume=/nonexistent/run"], r"resume='/nonexistent/run': no server_round_\*.safetensors"),
    (["-m", "train.lr=0.1,-1"], r"train.lr=-1(\.0)? is not allowed"),  # the second job is refused before the first runs
]


def refuse(argv: list[str], capsys) -> str:
    """Run a2v-run's entry point; assert exit status 2 and exactly one line on stderr; return it."""
    with pytest.raises(SystemExit) as exit_:
        run.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("a2v-run: "), err
    return err[0]


@pytest.mark.parametrize("overrides,match", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_refused_config_is_one_line_exit_2_and_writes_nothing(overrides, match, base, capsys):
    out = Path(base[-1].split("=", 1)[1])
    line = refuse([*base, *overrides], capsys)
    assert re.search(match, line), line
    assert not out.exists() or not any(out.iterdir())  # no run folder, no .hydra, no run.log


PRETRAINED_REFUSED = [  # how the generator folder is broken, what the line must say
    ("empty", r"file does not exist"),
    ("truncated", r"corrupt or not a safetensors file"),
    ("tokens", r"token_shape is \[8, 64\] in the file but \[4, 64\] was asked"),
    ("type", r"type is 'gaussian' in the file but 'cvae' was asked"),
]


@pytest.mark.parametrize("case,match", PRETRAINED_REFUSED, ids=[c for c, _ in PRETRAINED_REFUSED])
def test_pretrained_checkpoints_are_checked_before_start(case, match, base, generators, tmp_path, capsys):
    folder, extra = tmp_path / "gens", []
    if case == "empty":
        folder.mkdir()
    else:
        shutil.copytree(generators, folder)
    if case == "truncated":  # one site's files cut short
        for path in folder.glob("*_node0_*"):
            path.write_bytes(path.read_bytes()[:100])
    extra = {"tokens": ["model.audio.tokens=4"],
             "type": ["generator=cvae", "generator_checkpoint.base_name=gaussian_per_class"]}.get(case, [])
    before = snapshot(folder)
    line = refuse([*base, *pretrained_overrides(folder), *extra], capsys)
    assert re.search(match, line), line
    assert snapshot(folder) == before


def test_valid_pretrained_and_resume_configs_pass_the_same_checks(base, generators, finished_run):
    assert run.check([*base, *pretrained_overrides(generators)])
    assert run.check([*base, f"resume={finished_run}", "num_rounds=2"])


def break_adapter_shape(run_dir: Path) -> None:
    path = run_dir / "checkpoints" / "server_round_1.safetensors"
    tensors, meta = load_tensors(path)
    key = next(k for k in tensors if k.startswith("adapters/") and k.endswith("queries"))
    tensors[key] = torch.zeros(3, 5)
    save_tensors(path, tensors, meta)


RESUME_REFUSED = {  # how the finished run (d) is broken (g: generator files), extra overrides, the line's gist
    "adapter shape": (lambda d, g: break_adapter_shape(d), [],
                      r"adapters in .* do not fit this config: .*queries is \(3, 5\) there"),
    "site state truncated": (lambda d, g: (d / "state/site_1_round_1.safetensors").write_bytes(b"\0" * 40), [],
                             r"site_1_round_1.safetensors is corrupt"),
    "generator file as checkpoint": (lambda d, g: shutil.copy(next(g.glob("*node0*")),
                                                              d / "checkpoints/server_round_2.safetensors"),
                                     ["num_rounds=3"], r"server_round_2.safetensors has no resume metadata"),
    "stray name": (lambda d, g: (d / "checkpoints/server_round_x.safetensors").write_bytes(b""), [],
                   r"server_round_x.safetensors is not a server checkpoint"),
    "already done": (lambda d, g: None, ["num_rounds=1"], r"is at round 1 but num_rounds=1"),
    "changed config": (lambda d, g: None, ["train.lr=0.1"], r"resume: train=.* differs from the checkpoint's"),
    "no checkpoints": (lambda d, g: shutil.rmtree(d / "checkpoints"), [], r"no server_round_\*.safetensors"),
}


@pytest.mark.parametrize("case", RESUME_REFUSED)
def test_resume_is_checked_before_start(case, base, finished_run, generators, tmp_path, capsys):
    broken = Path(shutil.copytree(finished_run, tmp_path / "run"))
    damage, extra, match = RESUME_REFUSED[case]
    damage(broken, generators)
    before = snapshot(broken)
    line = refuse([*base, f"resume={broken}", "num_rounds=2", *extra], capsys)
    assert re.search(match, line), line
    assert snapshot(broken) == before  # the resumed folder is left as it was


# ---- safe names ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../ESCAPED_rain", "a/b", "a\\b", "..", ".hidden", "ra\nin", "", "x..y"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ValueError, match="cannot name a file"):
        safe_name(name, "class")


def test_a_class_with_a_separator_is_refused_at_load_naming_the_row(base, tmp_path, capsys):
    root = data_copy(base, tmp_path / "esc")
    meta = root / "meta" / "esc50.csv"
    rows = list(csv.reader(meta.open()))
    bad = next(i for i, r in enumerate(rows) if r[3] == "rain")
    rows[bad][3] = "../../../../../../ESCAPED_rain"
    with meta.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    line = refuse([*base, "data=esc50", f"data.root={root}", "data.classes=null"], capsys)
    assert f"line {bad + 1}: category='../../../../../../ESCAPED_rain' cannot name a file" in line


# ---- failing sites, min_sites, the federation's size (real ServerApp and ClientApps in process) ----------------

def test_failing_site_stops_the_run_naming_it(base, tmp_path, task_identity):
    broken = data_copy(base, tmp_path / "site1_data")
    corrupt_audio(broken)  # site 1's SuperNode finds no readable audio (its data-root)
    cfg = C.absolute_paths(C.compose_config(base), Path.cwd())
    grid = LocalGrid(2, node_configs={1: {"data-root": str(broken)}})
    with pytest.raises(RoundFailed, match=r"round 1: 1 of 2 sites failed, more than federation.min_sites=2 allows; "
                                          r"first: site 1: train: ValueError: No usable audio"):
        run_server(cfg, tmp_path / "run", grid, launch_id="abc")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["run_id"] == "abc" and not summary["completed"] and summary["rounds_done"] == 0
    assert list(summary["failures"]) == ["1"] and list(summary["failures"]["1"]) == ["site 1"]
    assert summary["failures"]["1"]["site 1"].startswith("train: ValueError: No usable audio")
    ok, line = run.outcome(summary, "abc", 0)
    assert not ok and line.startswith("run abc FAILED: round 1: 1 of 2 sites failed") and "site 1: train:" in line


def test_min_sites_lets_the_run_finish_and_the_final_line_names_failures(base, tmp_path, task_identity):
    broken = data_copy(base, tmp_path / "site1_data")
    corrupt_audio(broken)
    cfg = C.absolute_paths(C.compose_config([*base, "num_rounds=2", "federation.min_sites=1"]), Path.cwd())
    run_server(cfg, tmp_path / "run", LocalGrid(2, node_configs={1: {"data-root": str(broken)}}), launch_id="abc")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] and summary["rounds_done"] == 2 and set(summary["failures"]) == {"1", "2"}
    ok, line = run.outcome(summary, "abc", 0)
    assert ok and "failed sites round 1: site 1; round 2: site 1 (first: site 1: train: ValueError: No usable" in line
    evals = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r["sites"]) == {"0"} for r in evals if r["kind"] == "eval")  # went on with site 0
    last = [r for r in evals if r["kind"] == "eval"][-1]
    n = summary["final_eval_clips"]
    assert n == last["num_examples"] == last["sites"]["0"]["n"] > 0  # the clips the final top-1 counts
    assert line.startswith(f"final top-1 retrieval {last['top1']:.3f} ({round(last['top1'] * n)} of {n} held-out "
                           "clips; chance 0.")


def test_an_earlier_runs_summary_is_never_taken_for_this_one():
    old = {"run_id": "old", "completed": True, "final_top1": 0.097, "chance_top1": 0.1}
    ok, line = run.outcome(old, "new", 700)
    assert not ok and "run new FAILED: its ServerApp stopped before writing a summary" in line


class DyingGrid(LocalGrid):
    """A LocalGrid whose last node dies once round 1 is over: Flower then lists it no more."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluated = False

    def get_node_ids(self) -> list[int]:
        nodes = super().get_node_ids()
        return nodes[:-1] if self.evaluated else nodes

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        self.evaluated |= any(m.metadata.message_type == "evaluate" for m in self.sent)
        return replies


def test_a_dead_site_costs_at_most_one_round(base, tmp_path, task_identity):
    cfg = C.absolute_paths(C.compose_config([*base, "num_rounds=2", "federation.min_sites=1"]), Path.cwd())
    run_server(cfg, tmp_path / "on", DyingGrid(2))  # round 2 goes on with the one node left, without waiting
    evals = [r for r in map(json.loads, (tmp_path / "on" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert [sorted(r["sites"]) for r in evals] == [["0", "1"], ["0"]]
    cfg = C.absolute_paths(C.compose_config([*base, "num_rounds=2", "federation.timeout=2"]), Path.cwd())
    with pytest.raises(RoundFailed, match=r"round 2: only 1 SuperNodes connected after federation.timeout=2 s; "
                                          r"federation.min_sites=2"):
        run_server(cfg, tmp_path / "off", DyingGrid(2))  # min_sites = all: a clear stop, not an hour of waiting


def plain_run_config(base: list[str], out: Path, *extra: str) -> dict:
    """Flower's run config of `flwr run .` with `overrides` only: no config file, no federation.num_sites."""
    overrides = [o for o in base if not o.startswith(("federation.num_sites", "paths.output_root"))]
    overrides += [f"paths.output_root={out}", *extra]
    return {"config-file": "", "overrides": " ".join(f"'{o}'" if " " in o else o for o in overrides)}


def run_plain(grid: LocalGrid, run_config: dict) -> None:
    from flwr.app import Context, RecordDict

    server_app.main(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))


def test_plain_flwr_run_takes_the_site_count_from_the_federation(base, tmp_path, task_identity):
    run_plain(LocalGrid(2), plain_run_config(base, tmp_path, "name=plain"))  # the config's default is 3 sites
    (summary,) = tmp_path.rglob("*_plain/summary.json")
    summary = json.loads(summary.read_text())
    assert summary["completed"] and summary["num_sites"] == 2 and summary["run_id"] == "flwr-7"


@pytest.mark.parametrize("grid,extra,match", [
    (LocalGrid(2), ["data.classes=[dog,rain,rooster]", "partition=classes", "partition.sites=[[dog],[rain],[rooster]]"],
     r"partition.sites has 3 sites but federation.num_sites=2; .*\(the federation has 2 SuperNodes, the config asks "
     r"for 3 sites: start 3 SuperNodes, e.g. flwr run --federation-config num-supernodes=3"),
    (LocalGrid(2), ["schedule={2: [{from_round: 1, classes: [dog]}]}"], r"schedule.2: site 2 is not allowed"),
    (LocalGrid(2), ["federation.num_sites=3"], r"federation.num_sites=3 but the federation has 2 SuperNodes"),
    (LocalGrid(2, node_configs={1: {"num-partitions": 3}}), [], r"SuperNodes disagree on num-partitions: \[2, 3\]"),
])
def test_a_size_that_cannot_be_reconciled_stops_before_round_1(grid, extra, match, base, tmp_path, task_identity):
    start = time.monotonic()
    with pytest.raises(ValueError, match=match):
        run_plain(grid, plain_run_config(base, tmp_path, *extra))
    assert not [m for m in grid.sent if m.metadata.message_type != "query.site"]  # nothing trained
    assert time.monotonic() - start < 60


def test_error_replies_are_cut_to_their_reason():
    trace = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=1)\n"
             "  File \"x.py\", line 3\nValueError: boom\n\nException ClientAppException occurred. Message: "
             "generator checkpoints in /g not loaded\n   (nothing changed)'>")
    assert short_reason(trace) == "generator checkpoints in /g not loaded (nothing changed)"
    assert short_reason("Error: node unavailable\n") == "Error: node unavailable"


def test_a_finished_run_process_left_as_a_zombie_counts_as_gone():
    """a2v-run waits for flwr-simulation (two levels below the SuperLink) to end before stopping the rest; once it
    has exited it stays a zombie, never reaped by superexec, and must not be waited for (it was, 15 s a run)."""
    superexec = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); "
                 "time.sleep(60)")  # never waits for its child, as superexec does not
    link = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', "
                                                    f"{superexec!r}])"], stdout=subprocess.PIPE, text=True)
    try:
        sim = psutil.Process(int(link.stdout.readline()))
        assert processes.run_process_alive(link.pid)
        sim.kill()
        while sim.status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.05)
        assert not processes.run_process_alive(link.pid)
    finally:
        processes.stop_processes([link.pid])


def test_the_guard_stops_what_a_killed_launcher_left():
    """a2v_flower.guard beside a 'launcher' whose child has a session of its own (as the SuperLink has): the
    launcher is SIGKILLed, so no clean-up code of it runs; the guard stops the orphan."""
    from a2v_flower.guard import guard

    launcher = subprocess.Popen([sys.executable, "-c", "import subprocess, time; p = subprocess.Popen(['sleep', "
                                 "'60'], start_new_session=True); print(p.pid, flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE, text=True)
    orphan = psutil.Process(int(launcher.stdout.readline()))
    with ThreadPoolExecutor(1) as pool:
        stopped = pool.submit(guard, launcher.pid, 0.05)
        time.sleep(0.5)  # the guard has seen the child
        launcher.kill()
        launcher.wait()
        assert stopped.result(timeout=60) == 1
    assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE


# ---- real Flower processes ------------------------------------------------------------------------------------------

def start_a2v_run(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    """`a2v-run` like a user in a terminal (its own process group, as a shell job has, Ctrl-C not ignored even
    when pytest was started in the background, which ignores SIGINT in what it starts), output piped."""
    return subprocess.Popen([str(BIN / "a2v-run"), *SMALL, *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def watch(proc: subprocess.Popen, until: str | None = None, timeout: float = 600,
          listen: bool = False) -> tuple[str, dict]:
    """Read `proc`'s output (up to a line containing `until`, else to the end) while recording every process
    below it (pid -> psutil.Process) every 0.5 s and, with `listen`, every 2 s the TCP addresses they listen
    on, with the process name (reading a run's sockets costs about 60 ms of CPU, its process list 2 ms)."""
    tree, listening, out, stop = {}, set(), [], threading.Event()

    def sample():
        for tick in itertools.count():
            if stop.is_set():
                return
            with contextlib.suppress(psutil.Error):
                for p in psutil.Process(proc.pid).children(recursive=True):
                    tree.setdefault(p.pid, p)
                    if listen and tick % 4 == 0:
                        with contextlib.suppress(psutil.Error):
                            for c in p.net_connections(kind="inet"):
                                if c.status == psutil.CONN_LISTEN:
                                    listening.add((c.laddr.ip, p.name()))
            stop.wait(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            out.append(line)
            if (until and until in line) or time.monotonic() > deadline:
                break
    finally:
        stop.set()
        thread.join()
    return "".join(out), {"tree": tree, "listening": listening}


def command(proc: psutil.Process) -> str:
    """A process's command line ('' once it has exited)."""
    with contextlib.suppress(psutil.Error):
        return " ".join(proc.cmdline())
    return ""


def alive(tree: dict[int, psutil.Process]) -> list[str]:
    """Recorded processes still running (psutil compares start times, so a reused PID does not count)."""
    return [f"{p.pid} {p.name()}" for p in tree.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# The second of two runs at once: 80 Dirichlet sites of about 4 clips, a tenth of them sampled per round
EIGHTY = ["federation.num_sites=80", "++data.clips_per_class=32", "strategy.fraction_train=0.1",
          "strategy.fraction_evaluate=0.1", "num_rounds=2"]


@pytest.fixture
def two_runs(shared_dir) -> dict:
    """Two a2v-runs at once from one checkout, 5 s apart, made once per session: a 2-site run and an 80-site run
    (many sites at CI size; BENCHMARKS.md has 1,000 sites). Their outputs and exit codes, the processes of either
    still running once both exited, and the TCP addresses those processes listened on."""

    def make(tmp: Path) -> dict:
        out, cache = tmp / "outputs", f"paths.cache_dir={tmp / 'cache'}"
        first = start_a2v_run(tmp, cache, f"paths.output_root={out}", "name=first")
        time.sleep(5)
        second = start_a2v_run(tmp, cache, f"paths.output_root={out}", "name=second", *EIGHTY)
        with ThreadPoolExecutor(2) as pool:  # read both at once: a full pipe would pause a run
            (out1, seen1), (out2, seen2) = pool.map(lambda proc: watch(proc, listen=True), (first, second))
        return {"out": str(out), "texts": [out1, out2], "codes": [first.wait(60), second.wait(60)],
                "alive": alive(seen1["tree"] | seen2["tree"]),
                "listening": sorted(seen1["listening"] | seen2["listening"])}

    return once(shared_dir, "two_runs", make)


@pytest.mark.slow
def test_two_runs_at_once_complete_on_loopback_and_leave_nothing(two_runs):
    for code, text in zip(two_runs["codes"], two_runs["texts"]):
        assert code == 0, text[-3000:]
        assert "final top-1 retrieval" in text.splitlines()[-1]
    listening = two_runs["listening"]
    assert {"raylet", "gcs_server"} <= {name for _, name in listening}, listening  # Ray was seen listening ...
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in listening), listening  # ... on loopback only
    assert not two_runs["alive"]
    for name in ("first", "second"):
        (run_dir,) = Path(two_runs["out"]).rglob(f"*_{name}")
        assert json.loads((run_dir / "summary.json").read_text())["completed"]
        log = (run_dir / "run.log").read_text()
        assert "Starting Flower SuperLink" in log and "final top-1 retrieval" in log  # the launcher's whole log


@pytest.mark.slow
def test_eighty_sites_a_tenth_sampled_per_round(two_runs):
    from omegaconf import OmegaConf

    from a2v_flower.data.site import federation, split_site

    (run_dir,) = Path(two_runs["out"]).rglob("*_second")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in rows if r["kind"] == "train"]
    assert [len(r["sites"]) for r in trains] == [8, 8] and set(trains[0]["sites"]) != set(trains[1]["sites"])
    cfg = OmegaConf.load(run_dir / "config.yaml")
    clips, classes, sites = federation(C.data_spec(cfg), C.partition_spec(cfg))
    assert len(sites) == 80 and min(map(len, sites)) >= 1  # Dirichlet(0.5) alone leaves sites empty
    no_test = [s for s, idx in enumerate(sites)
               if not split_site([classes.index(clips[i].category) for i in idx], C.data_spec(cfg), s)["test"]]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] and summary["sites_without_eval_clips"] == len(no_test) < 80


@pytest.mark.slow
def test_a_crash_or_ctrl_c_leaves_no_process_behind(cache_dir, tmp_path):
    # the default's actors (one per site): every Ray worker process must be stopped
    paths = [f"paths.cache_dir={cache_dir}", f"paths.output_root={tmp_path / 'outputs'}", "federation.num_cpus=1"]
    # rounds enough to outlast the stream's delay: the kill must land while the run still goes
    crashing = start_a2v_run(tmp_path, *paths, "name=crash", "num_rounds=20")
    text, seen = watch(crashing, until="[ROUND 1/")
    (sim,) = [p for p in seen["tree"].values() if "flwr-simulation" in command(p)]
    sim.kill()  # the ServerApp and Ray's driver die; Ray's own processes are orphaned
    rest, _ = watch(crashing)
    assert crashing.wait(300) == 1, (text + rest)[-3000:]
    assert "FAILED: its ServerApp stopped before writing a summary" in rest.splitlines()[-1]
    assert not alive(seen["tree"])

    interrupted = start_a2v_run(tmp_path, *paths, "name=interrupted")
    text, seen = watch(interrupted, until="Successfully started run")
    os.killpg(interrupted.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
    rest, _ = watch(interrupted)
    assert interrupted.wait(120) == 130, (text + rest)[-3000:]
    assert "interrupted; every process of the run was stopped" in rest
    assert not alive(seen["tree"])

    killed = start_a2v_run(tmp_path, *paths, "name=killed")
    _, seen = watch(killed, until="[ROUND 1/")  # Ray is up
    killed.kill()  # SIGKILL: no clean-up code of a2v-run runs; its children get SIGTERM from the kernel
    deadline = time.monotonic() + 180  # a2v_flower.guard stops them (7 s here; without it Flower took 77 s)
    while alive(seen["tree"]) and time.monotonic() < deadline:
        time.sleep(1)
    assert not alive(seen["tree"])


def corrupt_after_finishing(base: list[str], tmp_path: Path) -> tuple[list[str], Path]:
    """A finished 1-round run on a copy of the data, whose audio is then made unreadable: (overrides, run)."""
    from flwr.supercore.task_identity import TaskIdentity

    root = data_copy(base, tmp_path / "esc")
    overrides = [*base, "data=esc50", f"data.root={root}", "data.classes=null", "data.folds=null"]
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    run_server(C.absolute_paths(C.compose_config(overrides), Path.cwd()), tmp_path / "run", launch_id="first")
    corrupt_audio(root)
    return overrides, tmp_path / "run"


@pytest.mark.slow
def test_a_failed_resumed_run_is_not_reported_with_the_old_summary(base, tmp_path):
    overrides, run_dir = corrupt_after_finishing(base, tmp_path)
    assert json.loads((run_dir / "summary.json").read_text())["completed"]  # the old run's summary
    proc = subprocess.run([str(BIN / "a2v-run"), *overrides, f"resume={run_dir}", "num_rounds=2"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"run \w+ FAILED: round 2: 2 of 2 sites failed, .*first: site \d: train: No usable audio", last), last
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run_id"] != "first" and not summary["completed"] and summary["rounds_done"] == 1
    assert "FAILED" in (run_dir / "run.log").read_text()  # the resumed launch logs into the run's own run.log


def flwr_plain(tmp_path: Path, env: dict, overrides: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """`flwr run . --stream` from the repository root, with Hydra overrides only (no federation options)."""
    quoted = " ".join(f'"{o}"' if " " in o else o for o in overrides)
    start = time.monotonic()
    proc = subprocess.run([str(BIN / "flwr"), "run", ".", "--stream", "--run-config", f"overrides='{quoted}'"],
                          capture_output=True, text=True, timeout=600, cwd=run.APP_DIR, env=env)
    return proc, time.monotonic() - start


@pytest.mark.slow
def test_plain_flwr_run_follows_the_federation_and_refuses_a_mismatch_fast(cache_dir, tmp_path):
    port = run.free_port()
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port),
               FLWR_LOCAL_CONTROL_API_PORT=str(run.free_port()), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")  # the CLI starts flower-superlink from PATH
    small = [o for o in SMALL if not o.startswith("federation.num_sites")]  # the config's default: 3 sites
    paths = [f"paths.cache_dir={cache_dir}", f"paths.output_root={tmp_path / 'outputs'}"]
    try:
        proc, took = flwr_plain(tmp_path, env, [*small, *paths, "data.classes=[dog,rain,rooster]", "partition=classes",
                                                "partition.sites=[[dog],[rain],[rooster]]"])
        assert "partition.sites has 3 sites but federation.num_sites=2" in proc.stdout, proc.stdout[-3000:]
        assert "flwr run --federation-config num-supernodes=3" in proc.stdout and took < 180
        assert not (tmp_path / "outputs").exists()
        proc, _ = flwr_plain(tmp_path, env, [*small, *paths, "name=plain"])
        (summary,) = (tmp_path / "outputs").rglob("*_plain/summary.json")
        summary = json.loads(summary.read_text())
        assert summary["completed"] and summary["num_sites"] == 2, proc.stdout[-3000:]
        assert "federation.num_sites=3 but the federation has 2 SuperNodes: the run has 2 sites" in proc.stdout
    finally:  # the CLI leaves its SuperLink running: stop it (and what it started) by PID
        processes.stop_local_superlink(tmp_path / "flwr")


@pytest.mark.slow
def test_deploy_explains_a_tls_mismatch(tmp_path):
    from tests.test_deployment import deploy

    work, port = tmp_path / "work", deploy.free_port()
    certs = deploy.make_certs(work / "certs")
    deploy.write_connection(work / "cli", port, certs[0])
    procs = [deploy.start(deploy.superlink_command(port, certs, False), work / "superlink", work / "superlink.log")]
    try:
        deploy.wait_until("flower-superlink", lambda: deploy.listening(port), procs, 60)
        log = work / "supernode-0.log"
        procs.append(deploy.start(deploy.supernode_command(0, 1, port, None, None), work / "supernode-0", log))
        node = deploy.SuperNode(0, procs[-1], log, None)  # --insecure against a TLS SuperLink
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"SuperNode 0 cannot connect to the SuperLink on 127.0.0.1:\d+: the "
                                               r"SuperLink speaks TLS but the SuperNode was started with --insecure"):
            deploy.wait_for_supernodes(work / "cli", port, [node], procs[0], timeout=120)
        assert time.monotonic() - start < 60
        other_ca = deploy.make_certs(work / "other")[0]  # a CA that did not sign the SuperLink's certificate
        assert "does not verify against" in deploy.tls_mismatch(port, other_ca)
    finally:
        deploy.stop(procs)


# ---- nothing poisons a run silently -----------------------------------------------------------------------------

def few_clips(base: list[str], n: int = 3) -> tuple[list, object]:
    """The first `n` clips of the TINY dataset and the tiny encoder's spec."""
    from a2v_flower.data.site import federation

    cfg = C.absolute_paths(C.compose_config(base), Path.cwd())
    clips, _, _ = federation(C.data_spec(cfg), C.partition_spec(cfg))
    return clips[:n], C.validate(cfg).model.audio


def _overwrite_tail(path: Path, other: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-64:] = b"\xff" * 64  # NaN float32 bits behind a valid header
    path.write_bytes(bytes(data))


def _rename_tensor(path: Path, other: Path) -> None:
    tensors, meta = load_tensors(path)
    save_tensors(path, {"x": tensors["tokens"]}, meta)


def _reshape(path: Path, other: Path) -> None:
    from a2v_flower.cache import TensorCache

    key = path.stem  # an entry that verifies as written, but not of the shape the encoder makes
    TensorCache(path.parents[1]).put(key, {"tokens": load_tensors(path)[0]["tokens"][:1]})


CACHE_DAMAGE = {  # case -> how clip 0's entry is damaged (clip 1's entry as `other`), what the warning says
    "tail overwritten": (_overwrite_tail, "does not match its checksum"),
    "wrong tensor name": (_rename_tensor, "are not the ones recorded"),
    "wrong shape": (_reshape, "do not have the expected shapes"),
    "another clip's entry": (lambda path, other: shutil.copy(other, path), "another entry copied over it"),
    "older version": (lambda path, other: save_tensors(path, load_tensors(path)[0]), "no verification metadata"),
}


@pytest.mark.parametrize("case", CACHE_DAMAGE)
def test_a_cache_entry_that_does_not_verify_is_recomputed_naming_the_file(case, base, tmp_path, caplog):
    from a2v_flower.cache import TensorCache, file_sha1, sha1_of
    from a2v_flower.data.site import embed_clips
    from a2v_flower.models.audio_encoder import AudioEncoder

    clips, spec = few_clips(base)
    cache, n = TensorCache(tmp_path / "emb"), int(spec.sampling_rate)
    x1, _, _ = embed_clips(AudioEncoder(spec), clips, cache, n)
    path, other = (cache.path(sha1_of(AudioEncoder(spec).identity, file_sha1(c.path), n)) for c in clips[:2])
    damage, why = CACHE_DAMAGE[case]
    damage(path, other)
    enc = AudioEncoder(spec)
    x2, kept, _ = embed_clips(enc, clips, cache, n)
    assert enc.calls == 1 and len(kept) == 3 and torch.isfinite(x2).all() and torch.equal(x1, x2)
    assert any(str(path) in r.getMessage() and why in r.getMessage() for r in caplog.records), caplog.text
    enc = AudioEncoder(spec)
    embed_clips(enc, clips, cache, n)
    assert enc.calls == 0  # the recomputed entry replaced the bad one


class PoisonGrid(LocalGrid):
    """A LocalGrid whose site 1 sends NaN adapters in every train reply."""

    def send_and_receive(self, messages, *, timeout=None):
        from a2v_flower.records import from_record, to_record

        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if not reply.has_error() and reply.metadata.message_type == "train" and reply.content["metrics"]["site"] == 1:
                arrays = from_record(reply.content["arrays"])
                reply.content["arrays"] = to_record({k: torch.full_like(v, float("nan")) for k, v in arrays.items()})
        return replies


def nan_inputs(monkeypatch) -> None:
    """Site 1's first training embedding becomes NaN (as a bad embedding would be)."""
    from a2v_flower import client_app

    load_site = client_app.load_site

    def poisoned(data, part, encoder, site_id):
        site = load_site(data, part, encoder, site_id)
        if site_id == 1:
            site.splits["train"][0][0, 0, 0] = float("nan")
        return site

    monkeypatch.setattr(client_app, "load_site", poisoned)
    monkeypatch.setattr(client_app, "_SITES", {})


NOT_FINITE = {  # case -> (the grid, what the site's failure says)
    "update": (lambda mp: PoisonGrid(2), r"train: update not finite: NaN or Inf in \['arrays/"),
    "input": (lambda mp: nan_inputs(mp) or LocalGrid(2), r"train: ValueError: site 1: 1 of \d+ training inputs hold "
                                                         r"NaN or Inf; refusing to train"),
}


@pytest.mark.parametrize("case", NOT_FINITE)
def test_a_site_that_is_not_finite_fails_its_round(case, base, cache_dir, tmp_path, task_identity, monkeypatch):
    from a2v_flower.cache import TensorCache

    received = TensorCache(Path(cache_dir) / "received")
    for i in range(20):  # earlier runs' class targets: the folder keeps the newest 16
        received.put(f"{i:040x}", {"t": torch.zeros(1)})
    make_grid, why = NOT_FINITE[case]
    cfg = C.absolute_paths(C.compose_config([*base, "federation.min_sites=1"]), Path.cwd())
    run_server(cfg, tmp_path / "on", make_grid(monkeypatch), launch_id="on")
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert summary["completed"] and re.match(why, summary["failures"]["1"]["site 1"]), summary["failures"]
    adapters, _ = load_tensors(tmp_path / "on" / "adapters.safetensors")
    assert all(torch.isfinite(t).all() for t in adapters.values())  # site 0's adapters only
    assert len(list(received.root.glob("*/*.safetensors"))) <= 16
    cfg = C.absolute_paths(C.compose_config(base), Path.cwd())  # min_sites = all: the run stops, naming it
    with pytest.raises(RoundFailed, match=r"round 1: 1 of 2 sites failed, .*first: site 1: " + why):
        run_server(cfg, tmp_path / "off", make_grid(monkeypatch), launch_id="off")


def test_global_adapters_that_are_not_finite_stop_the_run(base, tmp_path, task_identity, monkeypatch):
    from a2v_flower.records import from_record, to_record
    from a2v_flower.server_generators import ServerGenerators

    def nan_training(self, server_round, arrays, teachers):
        return to_record({k: torch.full_like(v, float("nan")) for k, v in from_record(arrays).items()}), {}

    monkeypatch.setattr(ServerGenerators, "after_aggregation", nan_training)
    cfg = C.absolute_paths(C.compose_config(base), Path.cwd())
    with pytest.raises(RoundFailed, match="round 1: the global adapters are not finite after server training"):
        run_server(cfg, tmp_path / "run", launch_id="nan")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    ok, line = run.outcome(summary, "nan", 0)
    assert not ok and "FAILED: round 1: the global adapters are not finite after server training" in line
    assert not (tmp_path / "run" / "adapters.safetensors").exists()
    assert not list((tmp_path / "run").rglob("server_round_*"))  # no checkpoint of NaN adapters


def write_rows(meta: Path, rows: list[list[str]], bom: bool = False) -> None:
    with meta.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        csv.writer(f).writerows(rows)


def test_duplicate_clips_are_dropped_naming_the_rows_or_refused(base, tmp_path, caplog, capsys):
    from a2v_flower.data.site import federation

    root = data_copy(base, tmp_path / "esc")
    meta = root / "meta" / "esc50.csv"
    rows = list(csv.reader(meta.open()))
    original = len(rows) - 1
    shutil.copy(root / "audio" / rows[2][0], root / "audio" / "copy.wav")  # same audio, another name
    write_rows(meta, rows + rows[1:7] + [["copy.wav", *rows[2][1:]]])  # 6 repeated rows and the copy
    clips = read_metadata(root)
    assert len(clips) == original and len({c.path for c in clips}) == original
    assert "7 duplicate clips dropped" in caplog.text and f"line {original + 2} ({rows[1][0]}) repeats line 2" in caplog.text
    assert f"line {original + 8} (copy.wav) has the same audio as {rows[2][0]} on line 3" in caplog.text
    overrides = [*base, "data=esc50", f"data.root={root}", "data.classes=null", "data.folds=null"]
    cfg = C.absolute_paths(C.compose_config(overrides), Path.cwd())
    all_clips, classes, sites = federation(C.data_spec(cfg), C.partition_spec(cfg))
    from a2v_flower.data.site import split_site

    used = [all_clips[i].path for s, idx in enumerate(sites) for part in split_site(
        [classes.index(all_clips[i].category) for i in idx], C.data_spec(cfg), s).values() for i in [idx[j] for j in part]]
    assert len(used) == len(set(used)) == original  # no clip in two splits or two sites
    line = refuse([*overrides, "data.duplicates=refuse"], capsys)
    assert re.search(r"data.duplicates='refuse': .*esc50.csv has 7 duplicate clips: line \d+ \(.*\) repeats line 2", line)


def test_metadata_and_audio_errors_name_the_file_line_and_value(base, tmp_path, capsys):
    from a2v_flower.data.esc50 import load_audio

    root = data_copy(base, tmp_path / "esc")
    meta = root / "meta" / "esc50.csv"
    rows = list(csv.reader(meta.open()))
    write_rows(meta, rows, bom=True)
    assert len(read_metadata(root)) == len(rows) - 1  # the BOM is not part of 'filename'
    rows[5][1] = "x"
    write_rows(meta, rows, bom=True)
    line = refuse([*base, "data=esc50", f"data.root={root}", "data.classes=null", "data.folds=null"], capsys)
    assert f"{meta}, line 6: fold='x' is not allowed; expected a whole number" in line
    with pytest.raises(FileNotFoundError, match=r"nowhere.wav: no such audio file"):
        load_audio(root / "audio" / "nowhere.wav", 16000, 16000)


ISSUE_29_REFUSED = [  # (overrides, with a file at <tmp>/file, what the one line must say)
    (["seed=-1"], r"seed=-1 is not allowed; expected a number >= 0"),
    (["data.duplicates=maybe"], r"data.duplicates='maybe' is not allowed; expected one of \['drop', 'refuse'\]"),
    (["paths.output_root={file}/out"], r"paths.output_root='.*/file/out' cannot be created: .*/file is a file"),
    (["paths.cache_dir={file}/cache"], r"paths.cache_dir='.*/file/cache' cannot be created: .*/file is a file"),
    (["paths.cache_dir={file}/cache", "data=esc50", "data.root={tmp}"], r"paths.cache_dir=.* is a file, not a folder"),
    ([f"name={'n' * 300}"], r"name='nnnn.*\(300 characters\) cannot name a file: it is 300 bytes long, more than 200"),
    ([f"paths.output_root={{tmp}}/{'o' * 300}"], r"paths.output_root='.*'... cannot be created: a name on its way is 300 bytes long, more than the file system's 255"),
    (["paths.output_root={tmp}/ro/out"], r"paths.output_root='.*/ro/out' is not writable: .*/ro does not allow"),
]


@pytest.mark.parametrize("overrides,match", ISSUE_29_REFUSED, ids=[" ".join(o)[:40] for o, _ in ISSUE_29_REFUSED])
def test_unusable_paths_and_unnamed_values_are_one_line_exit_2(overrides, match, base, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "ro").mkdir()
    real = os.access  # root may write anywhere: the folder is made read-only for os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("/ro") else real(p, mode))
    cache = tmp_path / "fresh-cache"  # a refused seed must not leave a synthetic .tmp-<pid> folder either
    argv = [*base, f"paths.cache_dir={cache}", *(o.format(file=tmp_path / "file", tmp=tmp_path) for o in overrides)]
    before = snapshot(tmp_path)
    line = refuse(argv, capsys)
    assert re.search(match, line), line
    assert snapshot(tmp_path) == before  # nothing written: no cache, no run folder


def test_a_failed_synthetic_generation_leaves_no_partial_folder(tmp_path, monkeypatch):
    import soundfile as sf

    from a2v_flower.data import synthetic

    spec = dataclasses.replace(C.data_spec(C.defaults()).synthetic, classes=("dog", "rain"), clips_per_class=2,
                               seconds=0.1)
    stale = tmp_path / "data.tmp-999999999"  # a generator that died (no such process)
    (stale / "audio").mkdir(parents=True)
    written, write = [], sf.write

    def full_disk(path, *args, **kwargs):
        if written:  # the second file: the disk is full
            raise sf.LibsndfileError(2, prefix="Error opening: ")  # what a full disk gave: "System error."
        written.append(path)
        return write(path, *args, **kwargs)

    monkeypatch.setattr(synthetic.sf, "write", full_disk)
    with pytest.raises(OSError, match=r"cannot write the synthetic dataset to .*/data \(\d+ MiB free there, about "):
        synthetic.generate(tmp_path / "data", spec)
    assert not list(tmp_path.iterdir())  # neither this attempt's .tmp-<pid> nor the stale one
    monkeypatch.undo()
    assert (synthetic.generate(tmp_path / "data", spec) / "meta" / "esc50.csv").is_file()


def test_a_very_long_run_is_warned_about_before_it_starts(base, capsys):
    assert run.check([*base, "num_rounds=100000", "diffusion.render_every=10"])
    err = capsys.readouterr().err
    assert re.search(r"a2v-run: warning: num_rounds=100000 will take at least 56 h .* 10000 render rounds", err), err
    run.check(base)
    assert "warning" not in capsys.readouterr().err


def test_the_received_cache_keeps_the_newest_entries(tmp_path):
    from a2v_flower.cache import TensorCache

    cache = TensorCache(tmp_path)
    for i in range(5):
        cache.put(f"{i:040x}", {"t": torch.zeros(1)})
        os.utime(cache.path(f"{i:040x}"), (1000 + i, 1000 + i))
    cache.prune(keep=2)
    assert sorted(p.stem[-1] for p in tmp_path.rglob("*.safetensors")) == ["3", "4"]


def test_an_interruption_is_recorded_as_such_not_as_failed_sites(tmp_path, monkeypatch):
    summary = {"run_id": "abc", "completed": False, "rounds_done": 1, "error": "round 2: 2 of 2 sites failed",
               "failures": {"1": {"site 0": "train: x"}, "2": {"site 1": "train: The actor is dead because its "
                                                                  "owner has died"}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(run, "SIGNALS", [signal.SIGTERM])
    monkeypatch.setattr(run, "LEFT", [])
    run.record_interrupted(tmp_path, "abc", 5)
    got = json.loads((tmp_path / "summary.json").read_text())
    assert got["interrupted"] and not got["completed"] and got["error"] == "interrupted by SIGTERM after round 1 of 5"
    assert got["failures"] == {"1": {"site 0": "train: x"}}  # round 2's failures were the interruption's
    assert "run abc INTERRUPTED (interrupted by SIGTERM after round 1 of 5); every process of the run was stopped" in \
        (tmp_path / "run.log").read_text()


def test_signals_are_ignored_during_clean_up_and_restored_after():
    from a2v_flower.processes import signals_ignored

    before = signal.getsignal(signal.SIGTERM)
    with signals_ignored():
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest if it were not ignored
        time.sleep(0.1)
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.slow
def test_two_sigterms_neither_cut_the_clean_up_short_nor_blame_sites(cache_dir, tmp_path):
    out = tmp_path / "outputs"
    proc = start_a2v_run(tmp_path, f"paths.cache_dir={cache_dir}", f"paths.output_root={out}", "name=twice",
                         "num_rounds=20")
    text, seen = watch(proc, until="[ROUND 2/")
    homes = {Path(a).parent for p in seen["tree"].values() if "flwr run" in command(p)
             for a in p.cmdline() if a.endswith("/app")}
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # during the clean-up
    rest, _ = watch(proc)
    assert proc.wait(120) == 130, (text + rest)[-3000:]
    assert rest.strip().splitlines()[-1] == "a2v-run: interrupted; every process of the run was stopped", rest[-2000:]
    assert not alive(seen["tree"])
    assert homes and not any(h.exists() for h in homes)  # the temporary a2v-flwr-* folder is gone
    (run_dir,) = out.rglob("*_twice")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] and not summary["completed"] and summary["rounds_done"] >= 1
    assert re.fullmatch(r"interrupted by SIGTERM after round \d+ of 20", summary["error"]), summary
    assert "actor is dead" not in json.dumps(summary)
    assert "INTERRUPTED (interrupted by SIGTERM" in (run_dir / "run.log").read_text()
