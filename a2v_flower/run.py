"""`a2v-run`: compose the Hydra config, check it, and run the Flower app as a simulation (`flwr run`).

    a2v-run                                  # 3 sites, tiny models, synthetic ESC-50
    a2v-run partition=groups num_rounds=10   # any config key or group, Hydra style
    a2v-run -m strategy=avg,uniform,none     # a sweep: one run folder per combination
    a2v-run --help                           # every group and key with its default
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from a2v_flower import config as C
from a2v_flower.data.schedule import check_schedule, held_classes
from a2v_flower.data.site import federation

APP_DIR = C.CONF_DIR.parent


def flwr_env() -> dict:
    """Environment for `flwr run`: a project-local FLWR_HOME and no per-run dependency install."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # flower-superlink etc.
    env.setdefault("FLWR_HOME", str(APP_DIR / ".flwr"))
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # else gigabytes are installed per run
    return env


def superlink_running(env: dict) -> bool:
    """Whether the local SuperLink that `flwr run` manages already answers on its port."""
    port = int(env.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", 39091))
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_local_superlink(flwr_home: str | Path) -> int:
    """Stop the detached SuperLink that `flwr run` started for `flwr_home` (Linux /proc); return how many."""
    marker, stopped = str(Path(flwr_home) / "local-superlink"), 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmd and marker in cmd:
            os.kill(int(proc.name), signal.SIGTERM)
            stopped += 1
    return stopped


def flwr_command(config_file: Path, cfg: DictConfig) -> list[str]:
    """The `flwr run` call that simulates `federation.num_sites` sites on the Ray engine."""
    fed = cfg.federation
    return ["flwr", "run", str(APP_DIR), "--stream",
            "--run-config", f"config-file='{config_file}'",
            "--federation-config", f"num-supernodes={fed.num_sites} client-resources-num-cpus={fed.num_cpus} "
                                   f"client-resources-num-gpus={fed.num_gpus}"]


@hydra.main(config_path=str(C.CONF_DIR), config_name="config", version_base="1.3")
def launch(cfg: DictConfig) -> float | None:
    """Validate everything a run needs before starting it, then stream the simulation."""
    cfg = C.absolute_paths(cfg, Path.cwd())
    C.validate(cfg)
    C.check_gpus(cfg.federation.num_gpus)
    clips, classes, sites = federation(C.data_spec(cfg), C.partition_spec(cfg))  # bad classes/sites fail here
    C.replay_spec(cfg, classes)                                                    # and bad generator groups
    check_schedule(C.schedule_of(cfg), held_classes(clips, sites), cfg.num_rounds)  # and a bad schedule
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.wandb.name == cfg.name:  # not set by hand: the wandb run is named by its overrides
        cfg.wandb.name = hydra_cfg.job.override_dirname or cfg.name
    if hydra_cfg.mode == RunMode.MULTIRUN and not cfg.wandb.group:  # a sweep's runs form one wandb group
        cfg.wandb.group = "/".join(Path(hydra_cfg.sweep.dir).parts[-2:])
    if cfg.resume:  # continue in the old folder; a missing/corrupt checkpoint or a changed config fails here
        from a2v_flower.resume import load_server_checkpoint

        run_dir = Path(cfg.resume)
        load_server_checkpoint(run_dir, cfg)
    config_file = run_dir / ("config_resumed.yaml" if cfg.resume else "config.yaml")
    OmegaConf.save(cfg, config_file)
    env = flwr_env()
    started_here = not superlink_running(env)
    try:
        proc = subprocess.run(flwr_command(config_file, cfg), env=env, cwd=APP_DIR)
    finally:
        if started_here:  # leave no detached SuperLink behind (it would keep this run's environment)
            stop_local_superlink(env["FLWR_HOME"])
    summary_file = run_dir / "summary.json"
    if proc.returncode != 0 or not summary_file.is_file():
        raise SystemExit(f"flwr run failed (exit code {proc.returncode}); see the log above and {run_dir}")
    summary = json.loads(summary_file.read_text())
    top1 = "n/a (no site has held-out clips)" if summary["final_top1"] is None else f"{summary['final_top1']:.3f}"
    print(f"final top-1 retrieval {top1} (chance {summary['chance_top1']:.3f}); outputs in {run_dir}")
    return summary["final_top1"]


class SweepReport(Callback):
    """After a multirun (`a2v-run -m ...`): one comparison table and plot of all its runs."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        subprocess.run([sys.executable, str(APP_DIR / "scripts" / "sweep_report.py"), str(config.hydra.sweep.dir)])


def main() -> None:
    """Console entry point."""
    launch()


if __name__ == "__main__":
    main()
