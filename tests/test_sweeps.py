"""Sweeps whatever the Hydra launcher: outcomes read from the jobs' folders, a joblib and a submitit_local sweep."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from a2v_flower.sweeps import pin_gpu, read_outcomes, write_outcome
from tests.conftest import TINY
from tests.test_hf import audiofolder, saved_dataset
from tests.test_simulation import BIN, flwr_home_env

ROOT = Path(__file__).resolve().parents[1]
SHORT = [*TINY, "num_rounds=1", "diffusion.render_every=0"]  # one round, no rendering: each job starts real Flower


def fake_job(sweep: Path, name: str, completed: bool | None, summary: bool = True) -> Path:
    """A job folder as Hydra and a2v-run leave it; `completed` None: the job wrote no outcome (its worker died)."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(f"seed: {name[0]}\npartition: {{mode: iid}}\n")
    (run / "config.yaml").write_text(f"seed: {name[0]}\npartition: {{mode: iid}}\n")
    if summary:
        (run / "summary.json").write_text(json.dumps({"completed": True, "final_top1": 0.5, "rounds": 1}))
    if completed is not None:
        write_outcome(run, "abc", completed, "run abc FAILED: because" if not completed else "ok")
    return run


def test_outcomes_come_from_the_job_folders_and_a_missing_job_fails(tmp_path):
    ok, failed, silent = (fake_job(tmp_path, n, c) for n, c in (("0_a", True), ("1_b", False), ("2_c", None)))
    assert read_outcomes(tmp_path, 3) == [(str(ok), True), (str(failed), False), (str(silent), False)]
    assert read_outcomes(tmp_path, 4)[-1] == (f"{tmp_path}/<job 3: no run folder>", False)


def test_sweep_table_lists_a_job_that_left_no_summary(tmp_path):
    fake_job(tmp_path, "0_a", True)
    fake_job(tmp_path, "1_b", None, summary=False)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep_report.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in (tmp_path / "sweep.md").read_text().splitlines() if r.startswith("| 0_a") or r.startswith("| 1_b")]
    assert len(rows) == 2 and "| completed |" in rows[0] and "FAILED: no summary.json" in rows[1]


def test_joblib_jobs_take_the_listed_gpus_in_turn(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    monkeypatch.setenv("A2V_SWEEP_GPUS", "")
    monkeypatch.delenv("A2V_SWEEP_GPUS")  # absent, and absent again after the test
    seen = []
    for job in range(4):  # one worker running four jobs: the list is kept aside, not narrowed
        pin_gpu(job, "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher")
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["0", "1", "2", "0"]
    pin_gpu(1, "hydra._internal.core_plugins.basic_launcher.BasicLauncher")  # one after another: left as it is
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def sweep(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`a2v-run -m` with SHORT + `overrides` in `tmp_path`; its result and its sweep folder."""
    proc = subprocess.run([str(BIN / "a2v-run"), "-m", *SHORT, f"paths.cache_dir={tmp_path / 'cache'}",
                           f"paths.output_root={tmp_path / 'outputs'}", *overrides],
                          env=flwr_home_env(tmp_path), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    folders = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(folders) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, folders[0]


@pytest.mark.slow
def test_joblib_sweep_over_an_audiofolder_and_a_saved_dataset(tmp_path):
    """Two jobs at once (joblib), each its own SuperLink and Ray: data=hf from an audiofolder and from a
    save_to_disk folder, Dirichlet partition; both complete, each run folder holds its partition."""
    folder, saved = audiofolder(tmp_path / "af", per_class=6), saved_dataset(tmp_path / "saved", per_class=3)
    proc, root = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "data=hf",
                       f"data.path={folder},{saved}", "partition=dirichlet", "federation.num_sites=2",
                       "hydra.sweep.subdir=${hydra.job.num}")  # folders named by these overrides: over 255 bytes
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    runs = sorted(p.parent for p in root.rglob("summary.json"))
    assert len(runs) == 2 and all(json.loads((r / "outcome.json").read_text())["completed"] for r in runs)
    for run, clips in zip(runs, (18, 18)):  # 3 classes x 6 files; 2 splits x 3 classes x 3 (repeats dropped)
        part = json.loads((run / "partition.json").read_text())
        ids = [c for site in part["sites"].values() for c in site]
        assert part["mode"] == "dirichlet" and set(part["sites"]) == {"0", "1"} and len(set(ids)) == len(ids) == clips
    table = (root / "sweep.md").read_text()
    assert table.count("| completed |") == 2 and "data.path" in table.splitlines()[0]


@pytest.mark.slow
def test_submitit_local_sweep_sees_a_failed_job(tmp_path):
    """Two jobs at once through submitit's local executor (SLURM's launcher, run here); one cannot start its rounds
    (federation.timeout of 1 ms: no site answers before round 1): the sweep's table shows both outcomes and the
    exit status is 1."""
    proc, root = sweep(tmp_path, "hydra/launcher=submitit_local", "federation.timeout=3600,0.001")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "a2v-run: 1 of 2 runs FAILED" in proc.stderr and "federation.timeout=0.001" in proc.stderr
    assert list(root.glob(".submitit/*/*_log.out"))  # the jobs ran under submitit, in their own processes
    rows = [r for r in (root / "sweep.md").read_text().splitlines() if r.startswith("| 0_") or r.startswith("| 1_")]
    assert "| completed |" in rows[0] and "FAILED: no site sent its embedding moments before round 1" in rows[1]


def doc_commands(*names: str) -> list[tuple[str, list[str]]]:
    """(doc, overrides) of every line of docs/<name> that starts with `a2v-run`."""
    out = []
    for name in names:
        for line in re.findall(r"^\s*a2v-run(.*)$", (ROOT / "docs" / name).read_text(), flags=re.M):
            out.append((name, [a for a in shlex.split(line.split("#")[0]) if a not in ("-m", "--multirun")]))
    return out


def test_the_docs_have_commands():
    assert len(doc_commands("data.md")) >= 8 and len(doc_commands("sweeps.md")) >= 5


@pytest.mark.parametrize("doc,overrides", doc_commands("data.md", "sweeps.md"))
def test_every_docs_command_composes(doc, overrides, make_cfg):
    """Each command of docs/data.md and docs/sweeps.md composes (launcher options included) and validates, every
    value of a sweep."""
    from a2v_flower import config as C

    expanded = [[f"{o.partition('=')[0]}={v}" for v in o.partition("=")[2].split(",")]
                if "," in o and "[" not in o else [o] for o in overrides]
    width = max(map(len, expanded), default=1)
    for combo in zip(*[e if len(e) > 1 else e * width for e in expanded]):
        C.validate(make_cfg(*combo))
