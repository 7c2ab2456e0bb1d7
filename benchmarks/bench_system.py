"""System benchmark: what Flower costs us, what round 1 costs, what travels, and memory by number of sites.

    python benchmarks/bench_system.py                     # full size (about 16 min on 2 busy shared cores)
    python benchmarks/bench_system.py --quick             # smoke size (6-7 min on 2 busy shared cores)
    python benchmarks/bench_system.py --sites 3,10 --rounds 4 train.local_epochs=2   # extra args: Hydra overrides

Everything is measured in one invocation, so the ratios compare runs made under the same machine load.
Runs, in this order, each a real `flwr run` on the Ray simulation engine with its own FLWR_HOME, its own
SuperLink ports (stopped afterwards) and a fresh embedding cache under <out>/cache:

  a2v cold   `a2v-run num_rounds=R diffusion.render_every=0 wandb.mode=disabled` on 3 sites (default
             partition, 1-s synthetic clips, `model.audio.max_length=128`), empty cache: sites embed every clip
             before round 1 (the "prepare" step)
  a2v warm   the same again: every embedding comes from the disk cache
  bare       benchmarks/bare_app: FedAvg on one 4-float array, ClientApps that return their input; same
             number of sites, rounds and client resources (`client-resources-num-cpus`)
  bare payload  the same with one array as large as our adapters (what Flower costs at our message size)
  memory     for each --sites count: `a2v-run partition=iid num_rounds=1 train.local_epochs=1` with a 50/50
             train/test split (so 100 sites of 3-4 clips still have held-out clips), and the bare app at the
             same count (unless --no-bare-sweep)

Figures (printed, and written to <out>/system.json and <out>/system.md):

  * per-round wall time, split into train and evaluate phases: a2v rows from the `time` stamps in
    metrics.jsonl (round r ends at its last row; round 1 starts at the last round's end minus Flower's
    "Strategy execution finished in X s"); the bare app writes its own stamps (run-config `times-file`).
    Framework overhead = bare round time vs a2v round time, later rounds (>= 2), warm cache.
  * round 1 vs later rounds (cold and warm cache): round 1 also starts the Ray actors; clips are embedded
    before it (the prepare step, its seconds reported apart).
  * encoder calls per clip: summary.json `encoder_calls` / clips in the federation (cold ~1, warm 0).
  * bytes per site per round: `bytes_up`/`bytes_down` of the train rows (array payloads; mean, min, max over
    sites). Evaluation messages carry the global adapters again; that size is reported separately.
  * peak memory: the sum of RSS every 0.2 s (--interval) and of PSS (shared pages counted once) every 2 s
    (--pss-interval) over all processes of the run: the launcher, `flwr run`, the detached SuperLink,
    SuperExec, flwr-simulation (the ServerApp) and Ray's processes and workers. They are found in /proc by
    an environment variable that only this run's processes inherit (A2V_BENCH_RUN); per site = peak / sites,
    marginal cost of a site = PSS slope between the smallest count and each larger one.

--quick: 2 rounds of 1 local epoch for the cold/warm/bare runs, memory at 3 and 10 sites, no bare sweep and
no bare payload run.
Child processes get OMP_NUM_THREADS=1 unless it is set (shared cores: oversubscription dominates otherwise).
Wall times are loose on a shared machine; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from omegaconf import OmegaConf  # noqa: E402

from a2v_flower import config as C  # noqa: E402
from a2v_flower.data.site import federation  # noqa: E402
from a2v_flower.processes import stop_local_superlink  # noqa: E402
from a2v_flower.run import flwr_env  # noqa: E402

BIN = Path(sys.executable).parent
BARE_APP = ROOT / "benchmarks" / "bare_app"
MARK = "A2V_BENCH_RUN"
PAGE = os.sysconf("SC_PAGE_SIZE")
# Small data, otherwise the default app: 10 classes x 32 clips of 1 s, tiny random AST at 128 frames.
DATA = ["data.seconds=1.0", "data.clip_seconds=1.0", "model.audio.max_length=128"]
BASE = ["diffusion.render_every=0", "wandb.mode=disabled"]
SWEEP = ["partition=iid", "num_rounds=1", "train.local_epochs=1", "data.splits={train:0.5,val:0.0,test:0.5}"]
# --scale: cross-device, the same total data at every size: 10 classes x 300 clips of 1 s, of which the server keeps
# 20 % as its test set (evaluate.mode=server) and every site draws 4 clips of the rest (partition=pool); 100 sites
# sampled per round whatever the federation's size
SCALE = ["num_rounds=3", "partition=pool", "evaluate.mode=server", "data.clips_per_class=300"]
SCALE_SAMPLED = 100
SERVER = "flwr-simulation (ServerApp + engine)"
STRATEGY_RE = re.compile(r"Strategy execution finished in ([0-9.]+)s")


# --------------------------------------------------------------------------------------------------
# Memory: processes of one run, found by an inherited environment variable
# --------------------------------------------------------------------------------------------------

def kind_of(cmd: str) -> str:
    """Which part of the system a process is, from its command line."""
    if "a2v-run" in cmd:
        return "a2v-run launcher"
    if "flower-superlink" in cmd:
        return "SuperLink"
    if "flower-superexec" in cmd:
        return "SuperExec"
    if "flwr-simulation" in cmd:
        return "flwr-simulation (ServerApp + engine)"
    if "flwr" in cmd and " run " in f" {cmd} ":
        return "flwr run CLI"
    if cmd.startswith("ray::") or "default_worker.py" in cmd or "setup_worker.py" in cmd:
        return "Ray workers (ClientApp actors)"  # actors retitle themselves ray::ClientAppActor
    if "ray" in cmd:
        return "Ray system processes"
    return "other"


class MemorySampler(threading.Thread):
    """Polls /proc: every `interval` s the sum of RSS (cheap, statm), every `pss_interval` s the sum of PSS
    (smaps_rollup: about 20 ms per 600 MB process, hence less often), over the processes whose environment
    holds `A2V_BENCH_RUN=<tag>` (everything the run started, however detached)."""

    def __init__(self, tag: str, interval: float = 0.2, pss_interval: float = 2.0):
        super().__init__(daemon=True)
        self.marker = f"{MARK}={tag}".encode()
        self.interval, self.pss_interval = interval, pss_interval
        self.done = threading.Event()
        self.known: dict[int, bool] = {}  # pid -> whether it is this run's (decided once per pid)
        self.root: int | None = None       # the launched process: between fork and exec its environ is ours
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.at_peak: dict[str, int] = {}
        self.peak_by_kind: Counter = Counter()  # kind -> its own largest RSS sum over the run
        self.samples = self.pss_samples = 0
        self.last_pss = 0.0

    def ours(self) -> dict[int, str]:
        """pid -> kind of every live process of this run."""
        pids = {int(n) for n in os.listdir("/proc") if n.isdigit()}
        for pid in self.known.keys() - pids:  # gone: forget (a reused pid is judged again)
            del self.known[pid]
        for pid in pids - self.known.keys():
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read()
                if not env:  # mid-exec (or a kernel thread): judged again at the next poll, not unmarked for good
                    continue
                self.known[pid] = self.marker in env.split(b"\0")
            except PermissionError:
                self.known[pid] = False
            except OSError:  # exited meanwhile
                continue
        if self.root in self.known:
            self.known[self.root] = True
        out = {}
        for pid, mine in self.known.items():
            if mine:
                try:  # read each time: a process forked by a marked one shows its parent's until exec
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        out[pid] = kind_of(f.read().replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    continue
        return out

    @staticmethod
    def rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            return 0

    @staticmethod
    def pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            pass
        return 0

    def sample(self) -> None:
        procs = self.ours()
        by_kind: Counter = Counter()
        for pid, kind in procs.items():
            by_kind[kind] += self.rss(pid)
        rss = sum(by_kind.values())
        self.peak_by_kind |= by_kind  # Counter union keeps the larger count per kind
        self.samples += 1
        self.peak_procs = max(self.peak_procs, len(procs))
        if rss > self.peak_rss:
            self.peak_rss, self.at_peak = rss, dict(by_kind)
        if self.pss_interval and time.monotonic() - self.last_pss >= self.pss_interval:
            self.last_pss = time.monotonic()
            self.pss_samples += 1
            self.peak_pss = max(self.peak_pss, sum(self.pss(pid) for pid in procs))

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.interval)

    def stop(self) -> dict:
        self.done.set()
        self.join()
        return {"peak_rss_bytes": self.peak_rss, "peak_pss_bytes": self.peak_pss, "peak_processes": self.peak_procs,
                "rss_by_kind_at_peak": self.at_peak, "peak_rss_by_kind": dict(self.peak_by_kind),
                "samples": self.samples, "pss_samples": self.pss_samples}


def cleanup(tag: str, grace: float = 15.0) -> int:
    """Wait for this run's processes to exit; SIGTERM (then SIGKILL) the ones left. Returns how many were left."""
    sampler = MemorySampler(tag)
    deadline = time.time() + grace
    while sampler.ours() and time.time() < deadline:
        time.sleep(0.5)
    left = sampler.ours()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in sampler.ours():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(2)
        if not sampler.ours():
            break
    return len(left)


# --------------------------------------------------------------------------------------------------
# Running one simulation
# --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(flwr_home: Path, tag: str) -> dict:
    """a2v-run's environment (a2v_flower.run.flwr_env) with a private FLWR_HOME, ports and the marker."""
    env = flwr_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()), MARK: tag})
    return env


def launch(label: str, cmd: list[str], out: Path, args) -> dict:
    """Run `cmd` (a2v-run or flwr run) with memory sampling; stop its SuperLink and every process it left."""
    tag = f"{label}-{uuid.uuid4().hex[:8]}"
    flwr_home = out / "flwr" / label
    shutil.rmtree(flwr_home, ignore_errors=True)
    env = run_env(flwr_home, tag)
    log_path = out / "logs" / f"{label}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[bench_system] {label}: {' '.join(cmd)}", flush=True)
    sampler = MemorySampler(tag, args.interval, args.pss_interval)
    sampler.start()
    t0 = time.time()
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sampler.root = proc.pid
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out, rc = True, None
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        except BaseException:  # Ctrl-C: leave nothing behind
            os.killpg(proc.pid, signal.SIGTERM)
            stop_local_superlink(flwr_home)
            cleanup(tag)
            raise
    wall = time.time() - t0
    stop_local_superlink(flwr_home)  # a2v-run stops its own; flwr run leaves it running
    left = cleanup(tag)
    exit_s = time.time() - t0 - wall  # until every process of the run is gone
    memory = sampler.stop()
    text = log_path.read_text(errors="replace")
    if timed_out or rc != 0:
        raise SystemExit(f"[bench_system] {label} {'timed out' if timed_out else f'failed (exit {rc})'}; "
                         f"log: {log_path}\n{text[-3000:]}")
    found = STRATEGY_RE.findall(text)
    print(f"[bench_system] {label}: {wall:.1f} s, peak RSS {memory['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    return {"label": label, "wall_s": wall, "exit_s": exit_s, "log": str(log_path), "memory": memory, "t0": t0,
            "leftover_processes": left,
            "strategy_s": float(found[-1]) if found else None}


def rounds_from_stamps(start: float | None, train_end: dict[int, float], round_end: dict[int, float]) -> list[dict]:
    """Per-round wall time and its train/evaluate phases from end-of-phase timestamps."""
    rows, prev = [], start
    for r in sorted(round_end):
        row = {"round": r, "round_s": None, "train_s": None, "eval_s": None}
        if prev is not None:
            row["round_s"] = round_end[r] - prev
            if r in train_end:
                row["train_s"] = train_end[r] - prev
        if r in train_end:
            row["eval_s"] = round_end[r] - train_end[r]
        rows.append(row)
        prev = round_end[r]
    return rows


def a2v_run(label: str, overrides: list[str], out: Path, args) -> dict:
    """One a2v-run; its figures from metrics.jsonl, summary.json and the run's config."""
    runs = out / "runs" / label
    shutil.rmtree(runs, ignore_errors=True)
    res = launch(label, [str(BIN / "a2v-run"), *overrides, f"paths.cache_dir={out / 'cache'}",
                         f"paths.output_root={runs}", f"name={label}"], out, args)
    (summary_file,) = runs.rglob("summary.json")
    run_dir = summary_file.parent
    summary = json.loads(summary_file.read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    round_end, train_end = {}, {}
    prepared = [r for r in rows if r["kind"] == "prepare"]  # before round 1: sites embed their clips
    rows = [r for r in rows if r["kind"] != "prepare"]
    for row in rows:
        round_end[row["round"]] = max(round_end.get(row["round"], 0.0), row["time"])
        if row["kind"] == "train":
            train_end[row["round"]] = row["time"]
    start = max(round_end.values()) - res["strategy_s"] if res["strategy_s"] is not None and round_end else None
    cfg = OmegaConf.load(run_dir / "config.yaml")
    clips, _, sites = federation(C.data_spec(cfg), C.partition_spec(cfg))
    trains = [r for r in rows if r["kind"] == "train"]
    res.update({"run_dir": str(run_dir), "sites": int(cfg.federation.num_sites), "clips": len(clips),
                "clips_per_site": [len(s) for s in sites], "encoder_calls": summary["encoder_calls"],
                "encoder_calls_per_clip": summary["encoder_calls"] / len(clips),
                "encoder_calls_by_round": [r["encoder_calls"] for r in prepared + trains],  # [before round 1, 1, ...]
                "prepare_s": prepared[0]["seconds"] if prepared else None,
                "final_top1": summary.get("final_top1"), "eval_clips": summary.get("final_eval_clips"),
                "to_round1_s": start - res["t0"] if start is not None else None,
                "rounds": rounds_from_stamps(start, train_end, round_end), "bytes": bytes_by_round(trains),
                "eval_message_bytes": eval_bytes(rows)})
    return res


def bare_run(label: str, sites: int, rounds: int, num_cpus: int, out: Path, args, floats: int = 4) -> dict:
    """One run of benchmarks/bare_app (one array of `floats` float32s); per-round times from its own stamps."""
    times = out / "runs" / label / "times.json"
    times.unlink(missing_ok=True)
    res = launch(label, [str(BIN / "flwr"), "run", str(BARE_APP), "--stream",
                         "--run-config", f"num-server-rounds={rounds} num-sites={sites} array-floats={floats} "
                                           f"times-file='{times}'",
                         "--federation-config", f"num-supernodes={sites} client-resources-num-cpus={num_cpus}"],
                 out, args)
    if not times.is_file():
        raise SystemExit(f"[bench_system] {label}: the bare ServerApp wrote no {times}; log: {res['log']}")
    t = json.loads(times.read_text())
    stamps = {key: {int(r): v for r, v in t[key].items()} for key in ("train_end", "round_end")}
    res.update({"sites": sites, "array_floats": floats,
                "rounds": rounds_from_stamps(t["start"], stamps["train_end"], stamps["round_end"])})
    return res


def bytes_by_round(trains: list[dict]) -> list[dict]:
    """Array bytes per site per round, train messages: mean, min and max over sites."""
    out = []
    for row in trains:
        sites = row.get("sites", {}).values()
        up = [s["bytes_up"] for s in sites if "bytes_up" in s]
        down = [s["bytes_down"] for s in sites if "bytes_down" in s]
        out.append({"round": row["round"], "up_mean": row.get("bytes_up"), "down_mean": row.get("bytes_down"),
                    "up_min": min(up, default=None), "up_max": max(up, default=None),
                    "down_min": min(down, default=None), "down_max": max(down, default=None)})
    return out


def eval_bytes(rows: list[dict]) -> int | None:
    """Bytes of the last round's evaluate message per site, as the strategy measured them (adapters in
    `adapter.wire`'s dtype; a node's first message, which also carries the class targets, is a train message)."""
    evals = [r for r in rows if r["kind"] == "eval" and "bytes_down" in r]
    return int(evals[-1]["bytes_down"]) if evals else None


# --------------------------------------------------------------------------------------------------
# Figures and tables
# --------------------------------------------------------------------------------------------------

def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def later(run: dict, key: str = "round_s") -> float | None:
    return mean(r[key] for r in run["rounds"] if r["round"] >= 2)


def first(run: dict, key: str = "round_s") -> float | None:
    return next((r[key] for r in run["rounds"] if r["round"] == 1), None)


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def figures(cold: dict, warm: dict, bare: dict, sweep: list[dict], payload: dict | None = None) -> dict:
    """The headline numbers."""
    b_later = later(bare)
    p_later = later(payload) if payload else None
    f = {"a2v_round_s_later_warm": later(warm), "a2v_round_s_later_cold": later(cold),
         "bare_round_s_later": b_later, "bare_round_s_first": first(bare),
         "overhead_ratio": ratio(later(warm), b_later),              # a2v round / do-nothing round
         "framework_share": ratio(b_later, later(warm)),             # part of an a2v round that is Flower's
         "bare_payload_round_s_later": p_later, "bare_payload_bytes": 4 * payload["array_floats"] if payload else None,
         "framework_share_payload": ratio(p_later, later(warm)),     # same, with adapter-sized messages
         "a2v_round1_s_cold": first(cold), "a2v_round1_s_warm": first(warm),
         "round1_over_later_cold": ratio(first(cold), later(cold)),
         "round1_over_later_warm": ratio(first(warm), later(warm)),
         "round1_over_later_bare": ratio(first(bare), b_later),
         "a2v_train_s_later": later(warm, "train_s"), "a2v_eval_s_later": later(warm, "eval_s"),
         "bare_train_s_later": later(bare, "train_s"), "bare_eval_s_later": later(bare, "eval_s"),
         "clips": cold["clips"], "encoder_calls_per_clip_cold": cold["encoder_calls_per_clip"],
         "encoder_calls_per_clip_warm": warm["encoder_calls_per_clip"]}
    b1 = next((b for b in cold["bytes"] if b["round"] == 1), {})
    bl = [b for b in cold["bytes"] if b["round"] >= 2]
    f.update({"bytes_up_per_site_round": mean(b["up_mean"] for b in cold["bytes"]),
              "bytes_up_min": min((b["up_min"] for b in cold["bytes"] if b["up_min"] is not None), default=None),
              "bytes_up_max": max((b["up_max"] for b in cold["bytes"] if b["up_max"] is not None), default=None),
              "bytes_down_round1": b1.get("down_mean"), "bytes_down_later": mean(b["down_mean"] for b in bl),
              "eval_message_bytes": cold["eval_message_bytes"]})
    base = sweep[0] if sweep else None
    f["memory"] = []
    for run in sweep:
        m = run["memory"]
        row = {"sites": run["sites"], "peak_rss_bytes": m["peak_rss_bytes"], "peak_pss_bytes": m["peak_pss_bytes"],
               "peak_processes": m["peak_processes"], "rss_per_site": m["peak_rss_bytes"] / run["sites"],
               "pss_per_site": m["peak_pss_bytes"] / run["sites"], "wall_s": run["wall_s"],
               "round1_s": first(run), "clips_per_site": [min(run["clips_per_site"]), max(run["clips_per_site"])],
               "marginal_pss_per_site": None}
        if base is not None and run["sites"] > base["sites"]:
            row["marginal_pss_per_site"] = ((m["peak_pss_bytes"] - base["memory"]["peak_pss_bytes"])
                                            / (run["sites"] - base["sites"]))
        if run.get("bare"):
            bm = run["bare"]["memory"]
            row.update({"bare_peak_rss_bytes": bm["peak_rss_bytes"], "bare_peak_pss_bytes": bm["peak_pss_bytes"],
                        "bare_round1_s": first(run["bare"])})
        f["memory"].append(row)
    return f


def fmt_s(v) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


def fmt_x(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.1f}x"


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def mb(v) -> str:
    return "n/a" if v is None else f"{v / 1e6:.2f} MB"


def mib(v) -> str:
    return "n/a" if v is None else f"{v / 2**20:,.0f} MiB"


def markdown(f: dict, runs: dict) -> str:
    """The tables of system.md (also printed)."""
    cold, warm, bare = runs["cold"], runs["warm"], runs["bare"]

    def per(run: dict, key: str) -> str:
        times = ", ".join("n/a" if x["round_s"] is None else f"{x['round_s']:.2f}" for x in run["rounds"])
        return f"{times} s (round 1 = {fmt_x(f[key])} later rounds)"

    def mem(key: str) -> str:
        return " / ".join(mib(r["memory"][key]) for r in (cold, warm, bare))

    rows = [
        ("round time, later rounds (warm cache): a2v vs bare Flower",
         f"{fmt_s(f['a2v_round_s_later_warm'])} vs {fmt_s(f['bare_round_s_later'])}: **{fmt_x(f['overhead_ratio'])}** "
         f"(Flower's share of an a2v round: {pct(f['framework_share'])})"),
        ("of which train / evaluate phase (a2v; bare)",
         f"{fmt_s(f['a2v_train_s_later'])} / {fmt_s(f['a2v_eval_s_later'])}; "
         f"{fmt_s(f['bare_train_s_later'])} / {fmt_s(f['bare_eval_s_later'])}"),
    ]
    if f["bare_payload_round_s_later"] is not None:
        rows.append((f"round time, later rounds, bare app moving an adapter-sized array "
                     f"({mb(f['bare_payload_bytes'])} each way)",
                     f"{fmt_s(f['bare_payload_round_s_later'])} (share of an a2v round: "
                     f"{pct(f['framework_share_payload'])})"))
    rows += [
        ("round times, a2v cold cache", per(cold, "round1_over_later_cold")),
        ("round times, a2v warm cache", per(warm, "round1_over_later_warm")),
        ("round times, bare Flower app (round 1 starts the Ray actors)", per(bare, "round1_over_later_bare")),
        ("sites embed their clips before round 1 (prepare step), cold / warm cache",
         f"{fmt_s(cold['prepare_s'])} / {fmt_s(warm['prepare_s'])}"),
        ("encoder calls per clip, cold / warm cache",
         f"{f['encoder_calls_per_clip_cold']:.2f} / {f['encoder_calls_per_clip_warm']:.2f} "
         f"(before round 1, then by round: {cold['encoder_calls_by_round']} / {warm['encoder_calls_by_round']})"),
        ("bytes up per site per round (adapters + class statistics)",
         f"{mb(f['bytes_up_per_site_round'])} (sites {mb(f['bytes_up_min'])} to {mb(f['bytes_up_max'])})"),
        ("bytes down per site, train message: round 1 (adapters + class targets) / later rounds",
         f"{mb(f['bytes_down_round1'])} / {mb(f['bytes_down_later'])}"),
        ("bytes down per site per round, evaluate message (adapters; not in metrics.jsonl)",
         mb(f["eval_message_bytes"])),
        ("wall time of the whole run: a2v cold / warm / bare",
         " / ".join(f"{r['wall_s']:.1f}" for r in (cold, warm, bare)) + " s"),
        ("peak memory, all processes: a2v cold / warm / bare",
         f"RSS {mem('peak_rss_bytes')}; PSS {mem('peak_pss_bytes')}"),
    ]
    lines = [f"{cold['sites']} sites, {len(cold['rounds'])} rounds, {f['clips']} clips (1 s), tiny random "
             "AST/CLIP, SD targets, no rendering, wandb off; bare app = FedAvg on a 4-float array, ClientApps return "
             "their input.",
             "", "| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    if f["memory"]:
        bare_cols = any("bare_peak_rss_bytes" in m for m in f["memory"])
        head = ["sites", "clips / site", "peak RSS", "peak PSS", "PSS / site", "marginal PSS / added site",
                "processes", "round 1", "run wall"]
        head += ["bare: peak RSS", "bare: peak PSS", "bare: round 1"] if bare_cols else []
        lines += ["", "Peak memory by number of simulated sites (`partition=iid`, 1 round, 1 local epoch; "
                  "sum over all processes of the run):", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for m in f["memory"]:
            cells = [str(m["sites"]), f"{m['clips_per_site'][0]}-{m['clips_per_site'][1]}", mib(m["peak_rss_bytes"]),
                     mib(m["peak_pss_bytes"]), mib(m["pss_per_site"]), mib(m["marginal_pss_per_site"]),
                     str(m["peak_processes"]), fmt_s(m["round1_s"]), f"{m['wall_s']:.1f} s"]
            if bare_cols:
                cells += [mib(m.get("bare_peak_rss_bytes")), mib(m.get("bare_peak_pss_bytes")),
                          fmt_s(m.get("bare_round1_s"))]
            lines.append("| " + " | ".join(cells) + " |")
        top = max(runs["sweep"], key=lambda r: r["sites"])
        kinds = sorted(top["memory"]["rss_by_kind_at_peak"].items(), key=lambda kv: -kv[1])
        lines += ["", f"RSS by process kind at the peak of the {top['sites']}-site run: "
                  + ", ".join(f"{k} {mib(v)}" for k, v in kinds) + "."]
    return "\n".join(lines) + "\n"


def scale_overrides(n: int) -> list[str]:
    """A --scale run of n sites: SCALE, with SCALE_SAMPLED of them drawn per round."""
    f = min(1.0, SCALE_SAMPLED / n)
    return [*DATA, *BASE, *SCALE, f"federation.num_sites={n}", f"strategy.fraction_train={f}",
            f"strategy.fraction_evaluate={f}"]


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a proportion p of n."""
    if not n:
        return float("nan"), float("nan")
    mid, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return mid - half, mid + half


def scale_table(runs: list[dict]) -> tuple[list[dict], str]:
    """Rows and markdown of the scaling curve: peak RSS of the run tree and of the ServerApp process, per site."""
    rows, base = [], runs[0]
    for run in runs:
        server = run["memory"]["peak_rss_by_kind"].get(SERVER, 0)
        row = {"sites": run["sites"], "peak_rss_bytes": run["memory"]["peak_rss_bytes"], "server_rss_bytes": server,
               "server_rss_per_site": server / run["sites"], "round1_s": first(run), "later_s": later(run),
               "sites_per_round": run["sites_per_round"], "wall_s": run["wall_s"], "server_marginal_per_site": None,
               "to_round1_s": run.get("to_round1_s"), "final_top1": run.get("final_top1"),
               "eval_clips": run.get("eval_clips"),
               "top1_ci95": wilson(run.get("final_top1") or 0.0, run.get("eval_clips") or 0)}
        if run["sites"] > base["sites"]:
            row["server_marginal_per_site"] = ((server - base["memory"]["peak_rss_by_kind"].get(SERVER, 0))
                                               / (run["sites"] - base["sites"]))
        rows.append(row)
    head = ["sites", "sampled / round", "peak RSS, all processes", "ServerApp process peak RSS", "ServerApp RSS / site",
            f"ServerApp RSS / site added beyond {base['sites']}", "launch to round 1", "round 1", "later rounds (mean)",
            "run wall", "final top-1 [95 % CI] (server test clips)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        extra = "n/a" if r["server_marginal_per_site"] is None else f"{r['server_marginal_per_site'] / 2**10:,.0f} KiB"
        lines.append(f"| {r['sites']} | {r['sites_per_round']} | {mib(r['peak_rss_bytes'])} | {mib(r['server_rss_bytes'])}"
                     f" | {r['server_rss_per_site'] / 2**10:,.0f} KiB | {extra} | {fmt_s(r['to_round1_s'])} | "
                     f"{fmt_s(r['round1_s'])} | {fmt_s(r['later_s'])} | {r['wall_s']:.0f} s | "
                     + (f"{r['final_top1']:.3f} [{r['top1_ci95'][0]:.3f}, {r['top1_ci95'][1]:.3f}] of "
                        f"{r['eval_clips']}" if r["final_top1"] is not None else "n/a") + " |")
    return rows, "\n".join(lines) + "\n"


def run_scale(counts: list[int], out: Path, args, user: list[str]) -> None:
    """--scale: the scaling curve (one run per site count, 3 rounds, fraction 0.1); writes scale.json/scale.md."""
    t0, runs = time.time(), []
    for n in counts:
        run = a2v_run(f"scale_{n}", [*scale_overrides(n), *user], out, args)
        rows = [json.loads(line) for line in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        run["sites_per_round"] = max(len(r.get("sites", {})) for r in rows if r["kind"] == "train")
        runs.append(run)
    rows, table = scale_table(runs)
    info = machine()
    cmd = " ".join(["python benchmarks/bench_system.py", *sys.argv[1:]])
    header = (f"`{cmd}` on {info['cpus']} CPUs ({info['cpu']}), flwr {info['flwr']}, torch {info['torch']}, "
              f"{info['date']}; total {time.time() - t0:.0f} s.\n\n")
    (out / "scale.md").write_text(header + table)
    (out / "scale.json").write_text(json.dumps({"command": cmd, "machine": info, "rows": rows, "runs": runs}, indent=2))
    print("\n" + header + table)


def machine() -> dict:
    """Where the figures came from."""
    import flwr
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    return {"date": date.today().isoformat(), "cpus": os.cpu_count(), "cpu": cpu, "ram_bytes": mem,
            "python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__,
            "cuda": torch.cuda.is_available(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1 (set here)")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides added to every a2v-run (e.g. train.local_epochs=2)")
    ap.add_argument("--out", default="outputs/bench_system", help="folder for system.json, system.md, logs, runs "
                    "and the (fresh) cache (default: %(default)s)")
    ap.add_argument("--sites", default=None, help="site counts of the memory sweep, comma-separated "
                    "(default 3,10,50,100; --quick: 3,10; empty string: no sweep)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the cold, warm and bare runs "
                    "(default 3; --quick: 2; at least 2, so that there are later rounds)")
    ap.add_argument("--num-sites", type=int, default=3, help="sites of the cold, warm and bare runs (default 3)")
    ap.add_argument("--quick", action="store_true", help="smoke size: 2 rounds of 1 local epoch, sweep 3,10 without "
                    "the bare app")
    ap.add_argument("--bare-sweep", action=argparse.BooleanOptionalAction, default=None,
                    help="also run the bare app at every sweep size (default: on; --quick: off)")
    ap.add_argument("--payload-run", action=argparse.BooleanOptionalAction, default=None,
                    help="also run the bare app with one array as large as our adapters (default: on; --quick: off)")
    ap.add_argument("--scale", default=None, help="only the scaling curve at these site counts, comma-separated "
                    "(e.g. 10,100,1000): %s, 0.4 n clips per class" % " ".join(SCALE))
    ap.add_argument("--interval", type=float, default=0.2, help="RSS sampling period in s (default 0.2)")
    ap.add_argument("--pss-interval", type=float, default=2.0, help="PSS sampling period in s (default 2; 0 = off; "
                    "reading PSS costs about 20 ms of CPU per 600 MB process)")
    ap.add_argument("--timeout", type=float, default=1200, help="limit per run in s (default 1200)")
    args = ap.parse_args()
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    if rounds < 2:
        ap.error("--rounds must be at least 2 (round 1 is compared with later rounds)")
    spec = args.sites if args.sites is not None else ("3,10" if args.quick else "3,10,50,100")
    sweep_sites = sorted({int(s) for s in spec.split(",") if s.strip()})
    bare_sweep = args.bare_sweep if args.bare_sweep is not None else not args.quick
    payload_run = args.payload_run if args.payload_run is not None else not args.quick
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "cache", ignore_errors=True)  # cold means cold
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.scale:
        counts = sorted({int(s) for s in args.scale.split(",") if s.strip()})
        for n in counts:  # bad overrides fail here, before anything starts
            C.validate(C.compose_config([*scale_overrides(n), *args.overrides]))
        return run_scale(counts, out, args, list(args.overrides))

    user = list(args.overrides)
    base = [*DATA, *BASE, f"num_rounds={rounds}", f"federation.num_sites={args.num_sites}",
            *(["train.local_epochs=1"] if args.quick else []), *user]
    cfg = C.compose_config(base)  # bad overrides fail here, before anything starts
    C.validate(cfg)
    for n in sweep_sites:  # every sweep config too (a2v-run itself rejects a partition with an empty site)
        scfg = C.absolute_paths(C.compose_config([*DATA, *BASE, *SWEEP, f"federation.num_sites={n}", *user,
                                                  f"paths.cache_dir={out / 'cache'}"]), ROOT)
        C.validate(scfg)

    t0 = time.time()
    cpus = int(cfg.federation.num_cpus)
    runs: dict = {"sweep": []}
    try:
        runs["cold"] = a2v_run("a2v_cold", base, out, args)
        runs["warm"] = a2v_run("a2v_warm", base, out, args)
        runs["bare"] = bare_run("bare", args.num_sites, rounds, cpus, out, args)
        if payload_run and runs["cold"]["eval_message_bytes"]:
            runs["bare_payload"] = bare_run("bare_payload", args.num_sites, rounds, cpus, out, args,
                                            floats=runs["cold"]["eval_message_bytes"] // 4)
        for n in sweep_sites:
            run = a2v_run(f"sweep_{n}", [*DATA, *BASE, *SWEEP, f"federation.num_sites={n}", *user], out, args)
            if bare_sweep:
                run["bare"] = bare_run(f"bare_{n}", n, 1, cpus, out, args)
            runs["sweep"].append(run)
    except BaseException:  # keep what was measured; every process of the failed run is already stopped
        (out / "system.partial.json").write_text(json.dumps({"argv": sys.argv, "runs": runs}, indent=2))
        print(f"[bench_system] runs so far: {out / 'system.partial.json'}", file=sys.stderr)
        raise
    f = figures(runs["cold"], runs["warm"], runs["bare"], runs["sweep"], runs.get("bare_payload"))
    info = machine()
    table = markdown(f, runs)
    cmd = " ".join(["python benchmarks/bench_system.py", *sys.argv[1:]])
    header = (f"`{cmd}` on {info['cpus']} CPUs ({info['cpu']}), {'CUDA' if info['cuda'] else 'no GPU'}, "
              f"flwr {info['flwr']}, torch {info['torch']}, {info['date']}; total {time.time() - t0:.0f} s.\n\n")
    (out / "system.md").write_text(header + table)
    (out / "system.json").write_text(json.dumps({"command": cmd, "machine": info, "figures": f, "runs": runs,
                                                 "total_s": time.time() - t0}, indent=2))
    print("\n" + header + table)
    print(f"[bench_system] wrote {out / 'system.md'} and {out / 'system.json'}")


if __name__ == "__main__":
    main()
