"""Shared fixtures: the real composed config, shrunk so every test runs in seconds on a CPU."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("WANDB_MODE", "disabled")
# One math thread per process (torch in the xdist workers, and every process a test starts: Flower's SuperLink,
# ServerApp, ClientApps). `make test` runs 2 workers on 2 cores, each often with a Flower run below it: more
# threads than cores only makes them wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from a2v_flower import config as C  # noqa: E402

# Small data and models; same code paths as the default run.
TINY = ["++data.clips_per_class=8", "++data.seconds=1.0", "data.clip_seconds=1.0", "model.audio.max_length=128",
        "train.local_epochs=2", "num_rounds=2", "wandb.mode=disabled", "adapter.width=64"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache for the whole session: synthetic data and embeddings are made once."""
    return tmp_path_factory.mktemp("cache")


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


def pytest_collection_modifyitems(items):
    """Slow tests first (stable order otherwise): with `pytest -n 2` the workers start on the long Flower runs
    and the fast tests fill the gaps, instead of one long run starting last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
