"""Benchmark scripts run end to end at smoke size and write their tables."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from benchmarks.bench_generators import predecessor_vae_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quality_benchmark_quick(tmp_path, cache_dir):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_quality.py"), "--quick", "--out", str(out),
                           f"paths.cache_dir={cache_dir}", "data.clips_per_class=8", "data.seconds=1.0",
                           "data.clip_seconds=1.0", "model.audio.max_length=128", "train.local_epochs=1",
                           "generator.epochs=2", "adapter.width=64"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "quality.csv")))
    methods = {r["method"] for r in rows}
    assert {"FedAvg", "local only", "centralised (upper bound)", "+ kd (gaussian)"} <= methods
    assert {r["scenario"] for r in rows} == {"non-IID (one group per site)", "class-incremental"}
    assert all(0 <= float(r["top1_mean"]) <= 1 and float(r["mb_per_site_round"]) > 0 for r in rows)
    # generator bytes: none without generators; a neural generator beside its copy at the gaussian's bytes
    gen_bytes = {(r["scenario"], r["method"]): float(r["gen_bytes_per_site_round"]) for r in rows}
    assert all(b == 0 for (_, m), b in gen_bytes.items() if m in ("FedAvg", "local only"))
    gaussian = gen_bytes["non-IID (one group per site)", "+ kd (gaussian)"]  # unified, both classes every round
    default = gen_bytes["class-incremental", "+ replay (cvae, unified)"]
    equal = gen_bytes["class-incremental", "+ replay (cvae, unified) at gaussian bytes"]
    assert 0.5 * gaussian <= equal <= gaussian < default / 10
    hidden = {r["method"]: int(r["generator_size"].split()[1].rstrip(",")) for r in rows if r["generator_size"]}
    assert 1 <= hidden["+ replay (cvae, unified) at gaussian bytes"] < hidden["+ replay (cvae, unified)"]
    table = (out / "quality.md").read_text()
    assert table.count("| scenario | method |") == 1 and "generator kB sent / site / round" in table
    assert "at gaussian bytes (hidden " in table
    assert table.count("\n|") >= len(rows) + 1
    assert (out / "quality_rounds.png").stat().st_size > 1000


def test_generator_benchmark_writes_ratios(tmp_path):
    out = tmp_path / "gb"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_generators.py"), "--n", "64", "--epochs", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    figures = json.loads((out / "generators.json").read_text())
    assert figures["batched_speedup"] > 1  # batching must beat one sample at a time
    assert figures["sizes"]["cvae 8x768"]["predecessor_over_ours_params"] > 100
    assert "samples/s" in (out / "generators.md").read_text()


def test_sweep_report_compares_runs(tmp_path, make_cfg):
    from omegaconf import OmegaConf

    for i, (agg, tops) in enumerate((("avg", [0.2, 0.5]), ("none", [0.3, 0.4]))):
        run = tmp_path / f"{i}_strategy={agg}"
        run.mkdir()
        OmegaConf.save(make_cfg(f"strategy={agg}"), run / "config.yaml")
        (run / "metrics.jsonl").write_text("".join(
            f'{{"round": {r + 1}, "kind": "eval", "top1": {t}, "top5": 1.0}}\n' for r, t in enumerate(tops)))
        (run / "summary.json").write_text(f'{{"final_top1": {tops[-1]}, "final_top5": 1.0}}')
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep_report.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "sweep.md").read_text()
    assert "strategy.aggregation" in table and "| 0_strategy=avg | avg | 0.500 | 0.500 |" in table
    assert "| 1_strategy=none | none | 0.400 | 0.400 |" in table
    assert (tmp_path / "sweep_rounds.png").is_file() and (tmp_path / "sweep.csv").is_file()


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
    rows = {r["representation"].split(" (")[0]: r for r in result["rows"]}
    assert list(rows) == ["8 tokens", "32 tokens", "mean of patch tokens", "all tokens"]
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
    assert (out / "tokens.md").read_text().count("\n|") == 6  # header, separator, four rows
