"""benchmarks/bench_system.py --quick --sites 10: real Flower runs (a2v cold + warm cache with 3 sites, the bare
app, a 10-site memory sweep)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_system_benchmark_quick(tmp_path):
    out = tmp_path / "bench"
    # one Ray actor per run (federation.num_cpus=2 on 2 cores, as tests/conftest.py's TINY), and TINY's 8 clips per
    # class (the benchmark's 32: 4 times the clips to embed and train on in every run): the same figures to check
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_system.py"), "--quick", "--sites", "10",
                           "--out", str(out), "federation.num_cpus=2", "data.clips_per_class=8"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "system.json").read_text())
    f, runs = data["figures"], data["runs"]

    # the embedding cache: every clip embedded exactly once in the cold run's round 1, never again
    assert f["clips"] == 80
    assert f["encoder_calls_per_clip_cold"] == 1 and f["encoder_calls_per_clip_warm"] == 0
    # by step: before round 1 (sites prepare their data), round 1, round 2
    assert runs["cold"]["encoder_calls_by_round"] == [80, 0, 0] and runs["warm"]["encoder_calls_by_round"] == [0] * 3

    # what travels: adapters + class statistics up; class targets only in round 1's train message
    assert f["bytes_up_per_site_round"] > f["eval_message_bytes"] > 0
    assert f["bytes_down_round1"] > f["bytes_down_later"] >= f["eval_message_bytes"]
    assert 0 < f["bytes_up_min"] <= f["bytes_up_per_site_round"] <= f["bytes_up_max"]

    # per-round times of every run (a2v from metrics.jsonl + Flower's strategy time, bare from its stamps)
    for name in ("cold", "warm", "bare"):
        rounds = runs[name]["rounds"]
        assert [r["round"] for r in rounds] == [1, 2], name
        assert all(r["round_s"] > 0 and r["train_s"] > 0 and r["eval_s"] >= 0 for r in rounds), (name, rounds)
    assert 0 < f["overhead_ratio"] < math.inf and 0 < f["framework_share"] < math.inf

    # memory: every process of the run found (SuperLink, ServerApp process, Ray workers), none left behind
    assert [m["sites"] for m in f["memory"]] == [10]
    for m in f["memory"]:
        assert m["peak_pss_bytes"] > 0 and m["peak_rss_bytes"] >= m["peak_pss_bytes"]
        assert m["rss_per_site"] == pytest.approx(m["peak_rss_bytes"] / m["sites"])
    for run in [runs["cold"], runs["warm"], runs["bare"], *runs["sweep"]]:
        kinds = run["memory"]["rss_by_kind_at_peak"]
        assert {"SuperLink", "flwr-simulation (ServerApp + engine)", "Ray workers (ClientApp actors)"} <= set(kinds)
    assert "a2v-run launcher" in runs["cold"]["memory"]["rss_by_kind_at_peak"]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in ps

    md = (out / "system.md").read_text()
    for row in ("| round time, later rounds (warm cache): a2v vs bare Flower |", "| encoder calls per clip",
                "| bytes up per site per round", "| 10 | 8-8 |"):
        assert row in md, row
    assert md in proc.stdout  # the same tables are printed
