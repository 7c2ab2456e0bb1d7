"""benchmarks/bench_sites.py: --server-test gives every size the same clips; --direct gives the in-process figures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from a2v_flower import config as C  # noqa: E402
from benchmarks import bench_sites  # noqa: E402


def layout(n: int, cache: Path, *overrides: str) -> dict:
    cfg = C.compose_config([*bench_sites.DATA, f"federation.num_sites={n}", f"paths.cache_dir={cache}", *overrides])
    return bench_sites.layout(C.absolute_paths(cfg, cache))


def test_server_test_trains_and_scores_every_size_on_the_same_clips(tmp_path):
    got = {n: layout(n, tmp_path, *bench_sites.SERVER_TEST) for n in (3, 30, 100)}
    assert {n: g["train_clips"] for n, g in got.items()} == {3: 240, 30: 240, 100: 240}
    assert all(g["test_per_class"] == [6] * 10 for g in got.values())  # the server's 20 % of every class
    # a site of 80 clips takes 5 batches of 16 per epoch, one of 2-3 clips a single batch: 5x fewer steps per round
    assert got[3]["steps_per_site_round"] == 40 and got[100]["steps_per_site_round"] == 8
    federated = layout(100, tmp_path)  # the default split: 100 sites keep 1 of their 3 clips each for testing
    assert federated["train_clips"] == 200 and sum(federated["test_per_class"]) == 100


@pytest.mark.slow
def test_direct_gives_the_in_process_figures(tmp_path, task_identity):
    small = [*bench_sites.SERVER_TEST, "num_rounds=2", "train.local_epochs=1", "adapter.width=64"]
    real = bench_sites.run(3, small, tmp_path)
    direct = bench_sites.direct(3, small, tmp_path)
    assert direct["top1_by_round"] == real["top1_by_round"] and direct["round1"] == real["round1"]
    assert all(avg < site for site, avg in direct["update_norms_by_round"])  # averaging cancels part of the updates
