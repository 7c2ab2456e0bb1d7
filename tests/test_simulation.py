"""The real thing: `a2v-run` starts `flwr run` (SuperLink + Ray simulation) and writes a run folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from a2v_flower.run import free_port
from tests.conftest import TINY, once

BIN = Path(sys.executable).parent


def flwr_home_env(tmp_path: Path) -> dict:
    """A private FLWR_HOME and free ports, so that runs of parallel tests never meet."""
    return dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))


# The sweep's jobs: 3 sites, shared gaussian generators (averaged in one job, handed site to site in the other)
SWEEP = [*TINY, "federation.num_sites=3", "generator=gaussian", "train.local_epochs=1"]


@pytest.fixture
def sweep(shared_dir) -> dict:
    """One Hydra multirun on a fresh cache, made once per session and read by the tests below: two 3-site jobs
    of 2 rounds that differ in generator sharing (averaged, sequential), wandb offline, rendering in the last
    round. The first job embeds every clip, the second reads them from the disk cache. Its folder and cache.
    The default's actors (`federation.num_cpus=1`: one per site, where TINY has one for all): on the fresh cache,
    three ClientApp processes embed and write the cache at once."""

    def make(tmp: Path) -> dict:
        proc = subprocess.run([str(BIN / "a2v-run"), "-m", *SWEEP, f"paths.cache_dir={tmp / 'cache'}",
                               f"paths.output_root={tmp / 'outputs'}", "wandb.mode=offline",
                               "federation.num_cpus=1", "sharing=averaged,sequential"],
                              env=flwr_home_env(tmp), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (folder,) = (tmp / "outputs" / "multirun").glob("*/*")
        return {"folder": str(folder), "cache": str(tmp / "cache")}

    return once(shared_dir, "sweep", make)


def sweep_job(sweep: dict, sharing: str) -> Path:
    (run,) = [p.parent for p in Path(sweep["folder"]).rglob("summary.json") if f"sharing={sharing}" in str(p)]
    return run


@pytest.mark.slow
def test_simulation_end_to_end_and_cache(sweep):
    run = sweep_job(sweep, "averaged")  # the first job
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapters.safetensors", "accuracy.png"):
        assert (run / name).is_file(), name
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run missing"
    assert len(list((run / "images" / "round_002").glob("*.png"))) >= 10  # the last round renders
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    trains = [r for r in rows if r["kind"] == "train"]
    assert [r["round"] for r in evals] == [1, 2] and all(set(r["sites"]) == {"0", "1", "2"} for r in evals)
    (prepared,) = [r for r in rows if r["kind"] == "prepare"]  # before round 1: 10 classes x 8 clips, once
    assert prepared["encoder_calls"] == prepared["clips"] == 80 and set(prepared["sites"]) == {"0", "1", "2"}
    assert trains[0]["encoder_calls"] == trains[1]["encoder_calls"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["final_top1"] <= 1 and summary["encoder_calls"] == 80
    log = (run / "run.log").read_text()  # the streamed run: Ray's GPU-override tip is filtered (run.flwr_env)
    assert "[ROUND 2/2]" in log and "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO" not in log
    # the second job: warm cache, shared generators trained site after site (train.generators messages)
    second = sweep_job(sweep, "sequential")
    assert json.loads((second / "summary.json").read_text())["encoder_calls"] == 0  # all from the disk cache
    assert "mode: sequential" in (second / "config.yaml").read_text()
    assert sorted(p.name for p in (second / "checkpoints").iterdir()) == ["server_round_1.safetensors",
                                                                          "server_round_2.safetensors"]
    assert len(list((second / "state").glob("site_*_round_2.safetensors"))) == 3


@pytest.mark.slow
def test_multirun_sweep_writes_one_comparison(sweep):
    sweep = Path(sweep["folder"])
    runs = sorted(p.parent.name for p in sweep.rglob("summary.json"))
    assert len(runs) == 2 and all("sharing=" in r for r in runs)  # one folder per combination
    table = (sweep / "sweep.md").read_text().splitlines()
    assert table[0] == "# sweep over sharing.mode: 2 runs"
    assert "sharing.mode" in table[4] and len(table) == 10
    assert table[9].startswith("One run per setting. On the default config, seeds alone move the final top-1")
    assert all(float(row.split("|")[-2]) > 0 for row in table[6:8])  # each job's wall time, start-up included
    assert (sweep / "sweep.csv").is_file() and (sweep / "sweep_rounds.png").is_file()
    # wandb: each run named by its overrides, the sweep's runs in one group named by the sweep folder
    from tests.test_tracking import wandb_records

    runs = [next(r.run for r in wandb_records(p) if r.WhichOneof("record_type") == "run")
            for p in sorted(sweep.rglob("offline-run-*/run-*.wandb"))]
    assert len(runs) == 2 and {r.run_group for r in runs} == {f"{sweep.parent.name}/{sweep.name}"}
    assert sorted("sharing=averaged" in r.display_name for r in runs) == [False, True]
    assert all("generator=gaussian" in r.display_name for r in runs)


@pytest.mark.slow
def test_a_run_resumes_with_new_node_ids_and_its_saved_state(sweep, tmp_path):
    """A copy of the sequential job continues for a third round: new node ids (query.site), restored site and
    server state (a copy: the sweep's own folders stay as the other tests read them)."""
    second = Path(shutil.copytree(sweep_job(sweep, "sequential"), tmp_path / "moved"))
    proc = subprocess.run([str(BIN / "a2v-run"), *SWEEP, f"paths.cache_dir={sweep['cache']}",
                           f"paths.output_root={tmp_path / 'outputs'}", "sharing=sequential", f"resume={second}",
                           "num_rounds=3", "diffusion.render_every=0"],
                          env=flwr_home_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["kind"] == "eval"] == [1, 2, 3]
    summary = json.loads((second / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["encoder_calls"] == 0
    assert sorted(p.name for p in (second / "checkpoints").iterdir()) == ["server_round_2.safetensors",
                                                                          "server_round_3.safetensors"]
    # no detached SuperLink left behind
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "flwr") not in ps


def test_bad_partition_fails_before_anything_starts(tmp_path, cache_dir):
    # the session's cache: the check reads the synthetic dataset's classes, which a fresh cache would generate first
    proc = subprocess.run([str(BIN / "a2v-run"), *TINY, f"paths.cache_dir={cache_dir}",
                           f"paths.output_root={tmp_path}/o", "partition=classes",
                           "partition.sites=[[dog,cat],[rain]]"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "partition.sites[0]: unknown classes ['cat']" in proc.stderr + proc.stdout
    assert not (tmp_path / "flwr").exists() and not list((tmp_path / "o").rglob("metrics.jsonl"))


def test_even_load_gives_a_round_of_sites_as_many_actors_as_finish_it_soonest():
    from a2v_flower.run import ray_cpus

    assert [ray_cpus(sites, 1, 2) for sites in (1, 2, 3, 4, 5, 100)] == [2, 2, 3, 2, 3, 2]
    assert ray_cpus(3, 2, 4) == 6 and ray_cpus(100, 1, 16) == 20  # 5 waves of 20 on 16 cores beat 7 of 16


def test_a_folder_named_by_a_sweeps_overrides_passes_as_a_path():
    """resume=<a sweep job's folder> (named by its overrides: '=', ',', '+', brackets) reaches the config intact."""
    from a2v_flower import config as C
    from a2v_flower.run import quote_paths

    folder = "/runs/multirun/2026-12-01/10-00-00/1_++data.seconds=1.0,sharing=sequential,train.lr=[1e-3]"
    cfg = C.compose_config(quote_paths([f"paths.cache_dir={folder}", "paths.output_root=/plain/folder"]))
    assert cfg.paths.cache_dir == folder and cfg.paths.output_root == "/plain/folder"


def test_help_and_cfg_answer_without_checking_or_importing_torch(tmp_path):
    """`a2v-run --help` / `--cfg job` print and exit 0 without composing a run's checks (which import torch,
    2 s, and generate the synthetic data); the launcher module itself does not import torch."""
    helped = subprocess.run([str(BIN / "a2v-run"), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert helped.returncode == 0 and "a2v-run: federated audio-to-image adapters" in helped.stdout, helped.stderr
    cfg = subprocess.run([str(BIN / "a2v-run"), "--cfg", "job", "num_rounds=7"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert cfg.returncode == 0 and "num_rounds: 7" in cfg.stdout, cfg.stderr
    assert not list(tmp_path.iterdir())  # nothing written where it ran
    probe = "import sys, a2v_flower.run; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"
