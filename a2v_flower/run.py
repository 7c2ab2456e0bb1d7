"""`a2v-run`: check the whole config before anything is written, run the Flower app as a simulation on a
SuperLink of its own, and exit 0 only if this run completed every round.

    a2v-run                                  # 3 sites, tiny models, synthetic ESC-50
    a2v-run partition=groups num_rounds=10   # any config key or group, Hydra style
    a2v-run -m strategy=avg,uniform,none     # a sweep: every job checked first, one run folder each
    a2v-run --help                           # every group and key with its default

Exit status: 0 every round of every job completed; 1 a run failed or stopped (the last line says why);
2 the config was refused (one line, nothing written); 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig  # what Hydra hands `launch`: config.for_job types it
from omegaconf.errors import OmegaConfBaseException

from a2v_flower import resources
from a2v_flower.schema import CONF_DIR, Config  # also registers the config's schema with Hydra (no torch)
from a2v_flower.processes import (become_subreaper, die_with_parent, end_stream_after_run, leftovers, settle,
                                  signals_ignored, stop_processes)
from a2v_flower import sweeps

APP_DIR = resources.CHECKOUT  # the checkout (site-packages in a wheel install): the Flower processes' folder
REFUSED, FAILED = 2, 1  # exit statuses
REFUSALS = (ValueError, OSError, HydraException, OmegaConfBaseException)  # OSError: a folder that cannot be made
PATH_KEYS = ("resume", "paths.output_root", "paths.cache_dir", "data.root", "hydra.run.dir")
OUTCOMES: list[tuple[Path, bool]] = []  # (run folder, completed) of each job of this process
SIGNALS: list[int] = []  # the signals that interrupted this process
LEFT: list[str] = []     # what the last clean-up could not stop or remove (empty: everything)

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port of 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(home: Path | None = None) -> dict:
    """Environment for Flower processes: FLWR_HOME `home`, no per-run dependency install, Ray on loopback."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # flower-superlink etc.
    if home is not None:
        env["FLWR_HOME"] = str(home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # else gigabytes are installed per run
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's single-node mode: node IP 127.0.0.1
    env.setdefault("RAY_prestart_worker_first_driver", "0")  # idle workers Flower's actors never use: ~1 s CPU a run
    # Ray's tip that a future Ray stops hiding GPUs from num_gpus=0 actors: printed every run, nothing to act on
    # (turning it off the way it suggests would let CPU-only actors see the GPUs); its text only, not its behaviour
    quiet = "ignore::FutureWarning:ray._private.worker"
    env["PYTHONWARNINGS"] = ",".join(w for w in (env.get("PYTHONWARNINGS"), quiet) if w)
    return env


def quote_paths(argv: list[str]) -> list[str]:
    """Folder overrides (PATH_KEYS) quoted for Hydra's grammar when their value needs it: a sweep job's folder is
    named by its overrides (`3_sharing=averaged,strategy=kd`), and `resume=` of it would not parse unquoted."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+~") in PATH_KEYS and value[:1] not in ("'", '"') and re.search(r"[^\w./~@:-]", value):
            quote = next((q for q in ("'", '"') if q not in value), None)  # a value holding both stays as it is
            arg = f"{key}={quote}{value}{quote}" if quote else arg
        out.append(arg)
    return out


def job_overrides(argv: list[str]) -> list[list[str]]:
    """The overrides of every job `argv` asks for (each combination of a `-m` sweep); none for Hydra's other
    flags (--help, --cfg, --config-dir, ...: Hydra prints or composes something else). `hydra.*` overrides are
    Hydra's own and not checked."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return []
    overrides = [a for a in argv if a not in ("-m", "--multirun") and not a.lstrip("+~").startswith("hydra")]
    if not any(a in ("-m", "--multirun") for a in argv):
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check(argv: list[str]) -> list[Config]:
    """Every job's config, checked: a refusal raises before Hydra creates a folder or Flower starts."""
    jobs = job_overrides(argv)
    if not jobs:  # --help, --cfg, ...: nothing to check, and torch (2 s) not imported
        return []
    from a2v_flower import config as C, preflight

    confs = []
    for overrides in jobs:
        conf = preflight.check_run(C.checked(overrides, Path.cwd()))
        C.check_devices(conf)
        if warning := preflight.long_run_warning(conf, len(conf.data.classes) if conf.data.classes else 50):
            print(f"a2v-run: warning: {warning}", file=sys.stderr)
        confs.append(conf)
    return confs


def start_superlink(home: Path, log_file) -> subprocess.Popen:
    """A simulation SuperLink of this launch only (own FLWR_HOME, a free loopback port), the CLI's default
    connection pointing at it; return its process."""
    port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "a2v"\n\n[superlink.a2v]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    cmd = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess", "--host", "127.0.0.1",
           "--port", str(port), "--disable-runtime-dependency-installation"]
    # own session: Ctrl-C reaches a2v-run, which then stops everything in order; if a2v-run is killed
    # outright, the SuperLink gets SIGTERM (and its superexec, flwr-simulation and Ray follow their parents)
    link = subprocess.Popen(cmd, env=flwr_env(home), cwd=APP_DIR, stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
    deadline = time.monotonic() + 60
    while link.poll() is None and time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return link
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink did not start on 127.0.0.1:{port} (exit code {link.poll()}); "
                       f"see {log_file.name}")


def ray_cpus(sites: int, per_site: int, cores: int) -> int:
    """CPUs Ray is told the machine has, so that its actors (one per `per_site` CPUs) finish a round of `sites`
    equal sites soonest: 3 sites on 2 cores get 3 actors sharing them, not one actor running two sites back to
    back while the other idles. The fewest actors that do (each holds its own torch); at least the cores."""
    slots = max(1, cores // per_site)

    def makespan(actors: int) -> float:  # in site-times: full waves of `actors` sites sharing the cores, the rest
        full, rest = divmod(sites, actors)
        return (full * max(actors, slots) + (max(rest, slots) if rest else 0)) / slots
    return per_site * min(range(slots, max(slots, sites) + 1), key=lambda a: (makespan(a), a))


def stage_app(folder: Path) -> Path:
    """Copy what `flwr run` packs into the app (a2v_flower/, conf/, pyproject.toml and what it names) to
    `folder`, from the checkout or from a wheel install (resources.py); return it.
    Flower walks and resolves every file under the folder it is given, a checkout's .venv included: 3 s of CPU
    per launch for 48k files, for a package of 100."""
    shutil.rmtree(folder, ignore_errors=True)  # an earlier launch's copy
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    code = resources.package_dir()
    shutil.copytree(code, folder / "a2v_flower",  # without a wheel's copies of conf/ and the project files: below
                    ignore=lambda d, names: ignore(d, names) | (set(resources.PACKAGED) if Path(d) == code else set()))
    shutil.copytree(CONF_DIR, folder / "conf", ignore=ignore)
    for name in resources.PROJECT_FILES:  # the last two: declared in [project]
        shutil.copy(resources.project_file(name), folder)
    return folder


def flwr_command(config_file: Path, conf: Config, launch_id: str, app: Path) -> list[str]:
    """The `flwr run` call that simulates `federation.num_sites` sites of `app` (see `stage_app`) on Ray."""
    fed = conf.federation
    per_round = math.ceil(max(conf.strategy.fraction_train, conf.strategy.fraction_evaluate) * fed.num_sites)
    cpus = ray_cpus(per_round, fed.num_cpus, os.cpu_count() or 1) if fed.even_load else os.cpu_count() or 1
    return ["flwr", "run", str(app), "--stream",
            "--run-config", f"config-file='{config_file}' launch-id='{launch_id}'",
            "--federation-config", f"num-supernodes={fed.num_sites} client-resources-num-cpus={fed.num_cpus} "
                                   f"client-resources-num-gpus={fed.num_gpus} init-args-num-cpus={cpus}"]


def simulate(config_file: Path, conf: Config, launch_id: str, run_log: Path) -> int:
    """Run the app on a SuperLink of its own with `flwr run --stream` (output to the terminal and `run_log`),
    then stop every process that started, also on Ctrl-C or an error; return `flwr run`'s exit status."""
    home = Path(tempfile.mkdtemp(prefix="a2v-flwr-"))
    with open(run_log, "a", buffering=1) as out:
        try:
            # if this process is killed outright, the guard stops what it started (else they linger ~77 s)
            subprocess.Popen([sys.executable, "-m", "a2v_flower.guard", str(os.getpid())], stdin=subprocess.DEVNULL)
            link = start_superlink(home, out)
            app = stage_app(home / "app")
            flwr = subprocess.Popen(flwr_command(config_file, conf, launch_id, app), env=flwr_env(home), cwd=APP_DIR,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    preexec_fn=die_with_parent)
            threading.Thread(target=end_stream_after_run, args=(link.pid, flwr), daemon=True).start()
            for line in flwr.stdout:
                sys.stdout.write(line)
                out.write(line)
            code = flwr.wait()
            settle(link.pid)
            return code
        finally:
            with signals_ignored():  # a second Ctrl-C or kill must not cut the clean-up short
                log.info("stopped %d Flower/Ray processes of this run", stop_processes())
                shutil.rmtree(home, ignore_errors=True)
                LEFT[:] = leftovers(home)


def outcome(summary: dict, launch_id: str, code: int) -> tuple[bool, str]:
    """(completed, final line) of this launch from the summary its ServerApp wrote."""
    if summary.get("run_id") != launch_id:  # missing, or an earlier run's summary in the same folder
        return False, (f"run {launch_id} FAILED: its ServerApp stopped before writing a summary (flwr run exit "
                       f"code {code}); see run.log")
    failures = summary.get("failures") or {}
    failed = "; ".join(f"round {r}: {', '.join(sites)}" for r, sites in failures.items())
    first = next((f"{site}: {why}" for sites in failures.values() for site, why in sites.items()), "")
    note = f"; failed sites {failed} (first: {first})" if failures else ""
    if not summary.get("completed"):
        why = summary.get("error") or f"{summary.get('rounds_done')} of {summary.get('rounds')} rounds done"
        return False, f"run {launch_id} FAILED: {why}{note}"
    top1, n = summary["final_top1"], summary.get("final_eval_clips")
    if top1 is None:
        return True, f"final top-1 retrieval n/a (no site has held-out clips){note}"
    clips = f"{round(top1 * n)} of {n} held-out clips; " if n else ""  # one clip is 1/n: the figure's grain
    return True, f"final top-1 retrieval {top1:.3f} ({clips}chance {summary['chance_top1']:.3f}){note}"


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def launch(composed: DictConfig) -> float | None:
    """Run one checked config (a job) as a simulation; record whether this run completed every round."""
    from a2v_flower import config as C

    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    conf = C.for_job(composed, Path.cwd(), hydra_cfg.job.override_dirname,  # a sweep's runs form one wandb group
                     "/".join(Path(hydra_cfg.sweep.dir).parts[-2:]) if sweep else None)
    run_dir = Path(conf.resume) if conf.resume else Path(hydra_cfg.runtime.output_dir)
    if sweep:  # a parallel launcher's worker: its job's processes are its own to stop
        become_subreaper()
        sweeps.pin_gpu(hydra_cfg.job.num, str(hydra_cfg.launcher.get("_target_", "")))
    config_file = run_dir / ("config_resumed.yaml" if conf.resume else "config.yaml")
    config_file.write_text(C.to_yaml(conf))
    launch_id = uuid.uuid4().hex[:12]
    log.info("run %s in %s", launch_id, run_dir)
    try:
        code = simulate(config_file, conf, launch_id, run_dir / "run.log")
    except KeyboardInterrupt:
        record_interrupted(run_dir, launch_id, conf.num_rounds)
        raise
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    ok, line = outcome(summary, launch_id, code)
    OUTCOMES.append((run_dir, ok))
    sweeps.write_outcome(run_dir, launch_id, ok, line)  # what the sweep's launching process reads, whatever the launcher
    print(f"{line}; outputs in {run_dir}", flush=True)
    with open(run_dir / "run.log", "a") as out:
        out.write(f"{line}; outputs in {run_dir}\n")
    return summary.get("final_top1") if ok else None


def stopped_line() -> str:
    """Whether the clean-up stopped and removed everything, as the final line says it."""
    return "every process of the run was stopped" if not LEFT else f"NOT everything was stopped: {', '.join(LEFT)}"


def record_interrupted(run_dir: Path, launch_id: str, rounds: int) -> None:
    """An interrupted launch in summary.json (`interrupted`, not failed sites: the failures of the round in
    progress are the interruption's, when the sites' processes were stopped first) and in run.log."""
    file = run_dir / "summary.json"
    old = json.loads(file.read_text()) if file.is_file() else {}
    summary = old if old.get("run_id") == launch_id else {"run_id": launch_id}
    saved = [int(n) for p in (run_dir / "checkpoints").glob("server_round_*.safetensors")
             if (n := p.stem.rsplit("_", 1)[1]).isdigit()]  # the ServerApp had no time to write its summary
    done = summary.get("rounds_done", max(saved, default=0))
    how = "/".join(signal.Signals(s).name for s in SIGNALS) or "KeyboardInterrupt"
    summary["failures"] = {r: f for r, f in (summary.get("failures") or {}).items() if int(r) <= done}
    summary |= {"completed": False, "interrupted": True, "rounds_done": done, "rounds": rounds,
                "error": f"interrupted by {how} after round {done} of {rounds}"}
    file.write_text(json.dumps(summary, indent=2))
    with open(run_dir / "run.log", "a") as out:
        out.write(f"run {launch_id} INTERRUPTED ({summary['error']}); {stopped_line()}; outputs in {run_dir}\n")


def interrupt(signum: int, frame) -> None:
    """SIGINT or SIGTERM: note which, and stop like Ctrl-C does (through every `finally`)."""
    SIGNALS.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second one, even before the clean-up starts, is ignored
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Console entry point: refuse a bad config in one line (exit 2) before anything is written, then run
    every job; exit 1 unless all of them completed."""
    argv = quote_paths(sys.argv[1:] if argv is None else list(argv))
    try:
        confs = check(argv)
    except REFUSALS as err:
        print(f"a2v-run: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(REFUSED) from None
    if len(confs) == 1 and confs[0].resume:  # continue in the run's own folder: its run.log, no new folder
        argv += quote_paths([f"hydra.run.dir={confs[0].resume}"]) + ["hydra.output_subdir=null"]
    become_subreaper()
    for sig in (signal.SIGINT, signal.SIGTERM):  # `kill` stops like Ctrl-C: through `finally`
        if signal.getsignal(sig) is not signal.SIG_IGN:  # a background job's ignored Ctrl-C stays ignored
            signal.signal(sig, interrupt)
    sys.argv = [sys.argv[0], *argv]
    try:
        launch()
    except KeyboardInterrupt:
        print(f"a2v-run: interrupted; {stopped_line()}", file=sys.stderr)
        raise SystemExit(130) from None
    # a sweep's jobs may have run in other processes (joblib, submitit): their outcomes are read from their folders
    outcomes = sweeps.read_outcomes(sweeps.SWEEPS[-1], len(confs)) if sweeps.SWEEPS else OUTCOMES
    failed = [str(d) for d, ok in outcomes if not ok]
    if failed:
        if len(outcomes) > 1:
            print(f"a2v-run: {len(failed)} of {len(outcomes)} runs FAILED: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(FAILED)


if __name__ == "__main__":
    main()
