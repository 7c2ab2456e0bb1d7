"""Sweeps whatever Hydra launcher runs their jobs (basic: one after another in this process; joblib: a workstation's
cores or GPUs; submitit: SLURM): each job writes its outcome into its own run folder, and the launching process
reads every job's from there, for the exit status and for one comparison table (sweep.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


OUTCOME = "outcome.json"  # {run_id, completed, line}: a job's own verdict, in its run folder
SWEEPS: list[Path] = []   # the sweep folders of this process's multiruns (in the order they ended)


def write_outcome(run_dir: Path, launch_id: str, completed: bool, line: str) -> None:
    """Record this job's outcome in its run folder, where the launching process reads it (`read_outcomes`)."""
    (run_dir / OUTCOME).write_text(json.dumps({"run_id": launch_id, "completed": completed, "line": line}))


def read_outcomes(sweep: Path, jobs: int) -> list[tuple[str, bool]]:
    """(run folder, completed) of the `jobs` jobs of the multirun in `sweep`. A job counts as completed only by the
    outcome it wrote; one that wrote none (killed, or its process lost) or left no folder at all counts as failed."""
    found = []
    started = {p.parent.parent for p in sweep.rglob(".hydra/config.yaml")}  # hydra.output_subdir=null: none
    for run in sorted(started | {p.parent for p in sweep.rglob(OUTCOME)}):
        file = run / OUTCOME
        found.append((str(run), file.is_file() and json.loads(file.read_text()).get("completed") is True))
    return found + [(f"{sweep}/<job {i}: no run folder>", False) for i in range(len(found), jobs)]


def pin_gpu(job_num: int, launcher: str) -> None:
    """Under the joblib launcher, give sweep job `job_num` one of the GPUs CUDA_VISIBLE_DEVICES lists, in turn:
    every job starts its own Ray, which would otherwise pack all of them onto the first GPU. (SLURM, through
    submitit, hands each job its own GPUs already.) A worker runs several jobs: the list is kept aside once."""
    if "joblib" not in launcher:
        return
    gpus = os.environ.setdefault("A2V_SWEEP_GPUS", os.environ.get("CUDA_VISIBLE_DEVICES", "")).split(",")
    if len(gpus) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[job_num % len(gpus)]


class SweepReport(Callback):
    """After a multirun (`a2v-run -m ...`): note its folder (the exit status reads its jobs' outcomes), then one
    comparison table and plot of all its runs. Runs in the launching process, whatever the launcher."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        SWEEPS.append(Path(config.hydra.sweep.dir))
        subprocess.run([sys.executable, "-m", "a2v_flower.sweep_report", str(SWEEPS[-1])])
