"""Benchmark scripts run end to end at smoke size and write their tables."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from benchmarks import bench_quality
from benchmarks.bench_generators import predecessor_vae_params

ROOT = Path(__file__).resolve().parents[1]


def test_quality_intervals_and_paired_test():
    rng = np.random.default_rng(1)
    a = (rng.random(600) < 0.8).astype(float)
    lo, hi = bench_quality.bootstrap(a, rng)
    assert lo < a.mean() < hi and hi - lo < 0.08  # about +-1.96 * sqrt(0.16 / 600)
    b = np.where(rng.random(600) < 0.25, 1 - a, a)  # a quarter of the clips flipped: mostly 1 -> 0
    diff, lo, hi, p = bench_quality.paired(a, b, rng)
    assert diff == pytest.approx(a.mean() - b.mean()) and lo < diff < hi and diff > 0 and p < 0.01
    assert bench_quality.paired(a, a.copy(), rng)[3] == 1.0  # identical rows: no difference


def test_quality_scenarios_dirichlet_and_lowrank_incremental_rows():
    dirichlet = bench_quality.select("Dirichlet 0.1, 50 sites")
    assert [s.overrides for s in dirichlet] == [bench_quality.DIRICHLET]
    assert "federation.num_sites=50" in bench_quality.DIRICHLET  # FedPFT's setting: 50 sites, alpha 0.1
    assert dirichlet[0] not in bench_quality.select("", quick=True)  # smoke runs keep their three scenarios
    assert len(bench_quality.select("", quick=True)) == 3 and dirichlet[0] in bench_quality.select("")
    incremental = bench_quality.select("class-incremental, hard data")[0]
    rows = {m.name: m for m in bench_quality.methods(incremental, quick=False)}
    lowrank = rows["+ refinement (gaussian, per_class, lowrank)"]
    assert lowrank.covariance == "lowrank" and lowrank.refine and not lowrank.augment
    assert rows["+ replay + refinement (gaussian, per_class, lowrank)"].augment


@pytest.mark.slow
def test_quality_benchmark_quick_scores_every_method_on_the_same_clips_and_resumes(tmp_path, cache_dir):
    out = tmp_path / "bench"
    # replay.kd_epochs=1 (the config's 5): the kd rows and centralised's budget (local + kd epochs a round) are the
    # bulk of --quick's CPU; nothing below depends on how far they train
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--quick", "--out", str(out),
           f"paths.cache_dir={cache_dir}", "replay.kd_epochs=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "quality.csv")))
    by = {(r["scenario"], r["method"]): r for r in rows}
    assert {r["scenario"] for r in rows} == {"non-IID", "non-IID, hard data", "class-incremental, hard data"}
    assert {"linear probe (ceiling)", "centralised", "local only", "FedAvg", "+ kd (gaussian)"} <= {m for _, m in by}
    for scenario in {r["scenario"] for r in rows}:  # the same test clips, all classes, for every method
        sizes = {len(r["correct"].split()) for r in rows if r["scenario"] == scenario}
        assert len(sizes) == 1 and sizes.pop() >= 10
    for r in rows:
        hits = [float(v) for v in r["correct"].split()]
        assert float(r["top1"]) == pytest.approx(np.mean(hits), abs=1e-3) and 0 <= float(r["train_fit"]) <= 1
    local = by["non-IID", "local only"]  # every site's adapters on every clip; its own clips in another column
    assert 0 <= float(local["within_site"]) <= 1 and any(0 < float(v) < 1 for v in local["correct"].split())
    forgetting = by["class-incremental, hard data", "FedAvg"]["forgetting"].split()  # from val, per old class
    assert len(forgetting) == 5 and all(0 <= float(f) <= 1 for f in forgetting)
    assert by["class-incremental, hard data", "joint (all classes from round 1)"]["forgetting"] == ""
    gen = {m: float(r["gen_kb"]) for (s, m), r in by.items() if s.startswith("class")}
    gaussian, cvae = gen["+ replay (gaussian, unified, reset=off)"], "+ replay (cvae, unified, reset=off)"
    assert gen["FedAvg"] == 0 and 0.5 * gaussian <= gen[f"{cvae} at gaussian bytes"] <= 1.5 * gaussian < gen[cvae] / 10
    table = (out / "quality.md").read_text()
    assert table.count("| method | seeds | top-1 [95 % CI] |") == 3 and "vs centralised: diff [95 % CI], p" in table
    assert "| centralised |" in table and "reference" in table and "at gaussian bytes (hidden " in table
    # a stopped run loses nothing: drop the last row, rerun, and only that row is computed again
    lines = (out / "quality.csv").read_text().splitlines(keepends=True)
    (out / "quality.csv").write_text("".join(lines[:-1]))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(" seed 0 top1 ") == 1
    assert (out / "quality.csv").read_text().splitlines(keepends=True)[:-1] == lines[:-1]


def test_generator_benchmark_writes_ratios(tmp_path):
    out = tmp_path / "gb"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_generators.py"), "--n", "64", "--epochs", "1",
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    figures = json.loads((out / "generators.json").read_text())
    work = figures["equal_work"]
    batched, samples, steps = work["batched"], work["per_sample_equal_samples"], work["per_sample_equal_steps"]
    assert batched["samples"] == samples["samples"] == 64 and samples["steps"] == 32 * batched["steps"] == 64
    assert steps["steps"] == batched["steps"] == 2 and steps["samples"] == 2
    assert work["speedup_equal_samples"] == pytest.approx(samples["cpu_s"] / batched["cpu_s"])
    assert work["speedup_equal_samples"] > 1  # batching must beat one sample at a time
    assert figures["sizes"]["cvae 8x768"]["predecessor_over_ours_params"] > 100
    assert "| per-sample, equal samples seen | 64 | 64 |" in (out / "generators.md").read_text()


def test_sweep_report_compares_runs(tmp_path, make_cfg):
    import os

    from omegaconf import OmegaConf

    for i, (agg, tops) in enumerate((("avg", [0.2, 0.5]), ("none", [0.3, 0.4]))):
        run = tmp_path / f"{i}_strategy={agg}"
        (run / ".hydra").mkdir(parents=True)
        OmegaConf.save(make_cfg(f"strategy={agg}"), run / "config.yaml")
        OmegaConf.save(make_cfg(f"strategy={agg}"), run / ".hydra" / "config.yaml")  # Hydra's, at job start
        (run / "metrics.jsonl").write_text("".join(
            f'{{"round": {r + 1}, "kind": "eval", "top1": {t}, "top5": 1.0}}\n' for r, t in enumerate(tops)))
        (run / "summary.json").write_text(f'{{"completed": true, "final_top1": {tops[-1]}, "final_top5": 1.0}}')
        os.utime(run / ".hydra" / "config.yaml", (1000.0, 1000.0))
        os.utime(run / "summary.json", (1000.0 + 190 + i, 1000.0 + 190 + i))  # start-up included
    failed = tmp_path / "2_strategy=uniform"  # stopped before its first evaluation: no scores, and why
    failed.mkdir()
    OmegaConf.save(make_cfg("strategy=uniform"), failed / "config.yaml")
    (failed / "summary.json").write_text('{"completed": false, "rounds_done": 0, "error": "round 1: 3 of 3 sites '
                                         'failed"}')
    proc = subprocess.run([sys.executable, "-m", "a2v_flower.sweep_report", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "sweep.md").read_text()
    assert table.startswith("# sweep over strategy.aggregation: 3 runs")
    assert "| 0_strategy=avg | avg | completed | 0.500 | 0.500 | 1.000 | - | - | 190 |" in table
    assert "| 1_strategy=none | none | completed | 0.400 | 0.400 | 1.000 | - | - | 191 |" in table
    assert "| 2_strategy=uniform | uniform | FAILED: round 1: 3 of 3 sites failed | - | - | - | - | - | - |" in table
    assert (tmp_path / "sweep_rounds.png").is_file() and (tmp_path / "sweep.csv").is_file()


def test_sweep_report_pools_seeds_and_finds_any_swept_key(tmp_path, make_cfg):
    """A sweep over a key outside the usual columns (train.lr) and seeds: the lr gets a column, and each lr's
    seeds are pooled into a mean, a standard deviation and a 95 % t-interval; a failed seed is counted, not pooled."""
    from omegaconf import OmegaConf

    finals = {("0.001", 0): 0.5, ("0.001", 1): 0.6, ("0.001", 2): 0.7, ("0.0001", 0): 0.2, ("0.0001", 1): 0.4}
    for i, ((lr, seed), top1) in enumerate([*finals.items(), (("0.0001", 2), None)]):
        run = tmp_path / f"{i}_lr={lr},seed={seed}"
        run.mkdir()
        OmegaConf.save(make_cfg(f"train.lr={lr}", f"seed={seed}", f"name=job{i}"), run / "config.yaml")
        (run / "metrics.jsonl").write_text("" if top1 is None else f'{{"round": 1, "kind": "eval", "top1": {top1}}}\n')
        (run / "summary.json").write_text(json.dumps({"completed": top1 is not None, "final_top1": top1,
                                                      "rounds_done": 0 if top1 is None else 1, "rounds": 1}))
    proc = subprocess.run([sys.executable, "-m", "a2v_flower.sweep_report", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "sweep.md").read_text()
    assert table.startswith("# sweep over seed, train.lr: 6 runs")  # name differs too, but names no setting
    assert "| final top-1 over seeds, by train.lr" in table.replace("## ", "| ")
    # lr 0.001: mean 0.6, sd 0.1, t(2) = 4.303: 0.6 -+ 4.303 * 0.1 / sqrt(3) = [0.352, 0.848]
    assert "| 0.001 | 3 of 3 | 0.600 | 0.100 | [0.352, 0.848] | 0.500 to 0.700 | reference |" in table, table
    # lr 0.0001: seeds 0 and 1 completed, seed 2 failed: mean 0.3, sd 0.141, t(1) = 12.706: [-0.971, 1.571],
    # shown within [0, 1]; paired with lr 0.001 on seeds 0 and 1: diffs -0.3, -0.2: mean -0.25, sd 0.0707,
    # -0.25 -+ 12.706 * 0.0707 / sqrt(2) = [-0.885, +0.385]
    assert ("| 0.0001 | 2 of 3 | 0.300 | 0.141 | [0.000, 1.000] | 0.200 to 0.400 | -0.250 [-0.885, +0.385] "
            "(2 seeds) |") in table, table
    assert "One run per setting" not in table


def test_sweep_report_columns_are_the_settings_that_differ(make_cfg):
    """Keys that name files or folders are no settings; a schedule (keyed by site ids) is one column, not one
    per site; an experiment changes several keys and each of them is found."""
    from omegaconf import OmegaConf

    from a2v_flower import sweep_report as report
    cfgs = [OmegaConf.to_container(make_cfg(*o)) for o in (["+experiment=class_incremental", "name=a"],
                                                            ["generator=cvae", "name=b"])]
    keys = report.varying_keys(cfgs)
    assert {"schedule", "generator.type", "partition.mode", "replay.refine_epochs"} <= set(keys)
    assert not [k for k in keys if k.startswith(("schedule.", "name", "paths.", "wandb.", "generator_checkpoint."))]
    assert keys.index("generator.type") < keys.index("schedule")  # the usual columns first


def test_predecessor_vae_params_counts_linear_layers():
    seq, dim, hidden, latent = 3, 4, 5, 2
    layers = [nn.Linear(seq * dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 2 * latent),
              nn.Linear(latent, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, seq * dim)]
    assert predecessor_vae_params(seq, dim, hidden, latent) == sum(p.numel() for m in layers for p in m.parameters())
    assert 1.9e9 < predecessor_vae_params() < 1.92e9


@pytest.mark.slow
def test_token_benchmark_quick(tmp_path, cache_dir):
    import json

    out = tmp_path / "tokens"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_tokens.py"), "--quick", "--out", str(out),
                           f"paths.cache_dir={cache_dir}"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "tokens.json").read_text())
    rows = {r["representation"].split(" (")[0].split(",")[0]: r for r in result["rows"]}
    names = [r["representation"] for r in result["rows"]]
    assert names[:3] == ["8 tokens, sound columns (cached by sites)", "8 tokens, every patch (padding too)",
                         "32 tokens, sound columns"]  # what sites cache first: the other rows are compared to it
    assert list(rows) == ["8 tokens", "32 tokens", "mean of patch tokens", "all tokens"]
    rows["8 tokens"] = result["rows"][0]
    assert result["info"]["test_clips"] == 20 and result["info"]["val_clips"] > 0  # the same clips for every row
    assert rows["32 tokens"]["bytes_per_clip"] == 4 * rows["8 tokens"]["bytes_per_clip"]
    assert rows["all tokens"]["bytes_per_clip_real_ast"] == rows["all tokens"]["tokens"] * 768 * 4
    flops = [r["adapter_flops"] for r in (rows["mean of patch tokens"], rows["8 tokens"], rows["32 tokens"],
                                          rows["all tokens"])]
    assert flops == sorted(flops) and len(set(flops)) == 4  # more tokens, more adapter work
    for r in rows.values():
        lo, hi = r["top1_ci95"]
        assert 0 <= lo <= r["top1"] <= hi <= 1 and 1 <= min(r["best_epochs"]) <= max(r["best_epochs"]) <= 3
    assert rows["8 tokens"]["diff_vs_8"] == 0 and rows["8 tokens"]["diff_vs_8_ci95"] == [0.0, 0.0]
    assert (out / "tokens.md").read_text().count("\n|") == 7  # header, separator, five rows
