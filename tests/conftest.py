"""Shared fixtures: the real composed config, shrunk so every test runs in seconds on a CPU."""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("WANDB_MODE", "disabled")
# One math thread per process (torch in the xdist workers, and every process a test starts: Flower's SuperLink,
# ServerApp, ClientApps). `make test` runs 2 workers on 2 cores, each often with a Flower run below it: more
# threads than cores only makes them wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from a2v_flower import config as C  # noqa: E402

# Small data and models; same code paths as the default run. `federation.num_cpus=2`: one Ray actor per real run on
# 2 cores (the default's even load starts one per site, 3): each actor's imports cost about 3 s of CPU, and the suite
# runs two Flower runs at once anyway. The shared sweep (cold cache) and the crash test keep the default's actors.
TINY = ["++data.clips_per_class=8", "++data.seconds=1.0", "data.clip_seconds=1.0", "model.audio.max_length=128",
        "train.local_epochs=2", "num_rounds=2", "wandb.mode=disabled", "adapter.width=64", "federation.num_cpus=2"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache for the whole session: synthetic data and embeddings are made once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A folder every xdist worker of this session shares (each worker's basetemp is a folder inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once(shared: Path, name: str, make: Callable[[Path], dict]) -> dict:
    """`make(folder)` once per session, by whichever worker asks first, for tests that read the same real run;
    the others wait for it and read its JSON result. A failure is kept too, and fails every test that asks."""
    from filelock import FileLock

    folder, result = shared / name, shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not result.is_file():
            folder.mkdir(exist_ok=True)
            try:
                out = make(folder)
            except BaseException:
                result.write_text(json.dumps({"error": traceback.format_exc()}))
                raise
            result.write_text(json.dumps(out))
    out = json.loads(result.read_text())
    if "error" in out:
        pytest.fail(f"the shared run {name!r} failed:\n{out['error'][-3000:]}")
    return out


@pytest.fixture
def make_cfg(cache_dir, tmp_path):
    """Compose the real config with TINY + `overrides`, paths inside pytest's temp folders."""

    def _make(*overrides: str):
        cfg = C.compose_config([*TINY, f"paths.cache_dir={cache_dir}", f"paths.output_root={tmp_path}/outputs",
                                *overrides])
        return C.absolute_paths(cfg, tmp_path)

    return _make


@pytest.fixture
def task_identity():
    """Flower's per-process task identity, which Message() needs outside a running Flower process."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


# One in-process kd run (strategy=kd, the server's own generator, offline wandb) for the two tests that read it:
# test_server_generator (its metrics and log lines) and test_tracking (the wandb file's key names).
KD_RUN = ["strategy=kd", "server_generator.epochs=5", "server_generator.hidden=32", "replay.kd_epochs=1",
          "replay.refine_epochs=1", "diffusion.render_every=0", "train.local_epochs=1", "wandb.mode=offline",
          "wandb.name=kd_run", "wandb.group=sweep_x"]
KD_LOGGERS = ("a2v_flower.server_generators", "a2v_flower.models.generators.from_statistics")


@pytest.fixture
def kd_run(shared_dir, cache_dir, task_identity, monkeypatch) -> dict:
    """The KD_RUN run by the real ServerApp and ClientApps in process (tests/inprocess.py), made once per session:
    its run folder, and the messages the server generator's loggers wrote (each record once)."""

    def make(folder: Path) -> dict:
        import logging

        from tests.inprocess import run_server

        monkeypatch.setenv("WANDB_MODE", "offline")
        cfg = C.absolute_paths(C.compose_config([*TINY, f"paths.cache_dir={cache_dir}",
                                                 f"paths.output_root={folder}/outputs", *KD_RUN]), folder)
        records: dict[int, logging.LogRecord] = {}  # a record seen by two loggers' handlers counts once

        class Keep(logging.Handler):
            def emit(self, record):
                records[id(record)] = record  # kept alive: no id is reused

        keep, loggers = Keep(), [logging.getLogger(n) for n in KD_LOGGERS]  # they feed Flower's handlers only
        for log in loggers:
            log.addHandler(keep)
        try:
            run_server(cfg, folder / "run")
        finally:
            for log in loggers:
                log.removeHandler(keep)
        return {"run": str(folder / "run"), "messages": [r.getMessage() for r in records.values()]}

    return once(shared_dir, "kd_run", make)


SHARED_RUNS = ("sweep", "two_runs", "kd_run")  # fixtures made once per session by `once`


def pytest_collection_modifyitems(items):
    """The makers of shared runs, the other slow tests, the other readers of shared runs, then the fast tests
    (stable order otherwise). With `pytest -n 2` the workers start on the long Flower runs and the fast tests
    fill the gaps, instead of one long run starting last; a shared run is made first and read when it is long
    done, instead of one worker waiting for the other."""
    made, order = set(), {}
    for item in items:
        shared = {f for f in SHARED_RUNS if f in getattr(item, "fixturenames", ())}
        slow = item.get_closest_marker("slow") is not None
        order[item] = 0 if shared - made else 2 if shared else 1 if slow else 3
        made |= shared
    items.sort(key=order.__getitem__)
