"""benchmarks/bench_gpu.py runs on a CPU (what a GPU day will run, minus the GPU), and its table compares right."""

from __future__ import annotations

import json

import torch

from a2v_flower import devices
from benchmarks import bench_gpu


def test_gpu_benchmark_quick_on_the_cpu_writes_every_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "cuda_count", lambda: 0)  # also on a GPU machine: --device cpu means CPU only
    bench_gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu.json").read_text())
    rows = {r["figure"]: r for r in result["rows"]}
    assert set(rows) == {"AST float32, batch 1", "AST float32, batch 2", "adapters + kd step (batch 32)",
                         "CLIP judge", "feature extractor"}  # bfloat16 is refused on a CPU, so not timed
    assert all(r["device"] == "cpu" and r["ms"] > 0 and r["cpu_ms"] > 0 and r["peak_mb"] == 0 for r in rows.values())
    assert result["ray"] == {} and "Ray placement skipped: no GPU to place" in result["notes"]
    assert result["actors_per_gpu"]["0.25"] == 4 and result["actors_per_gpu"]["0.2"] == 4  # not 5
    table = (tmp_path / "gpu.md").read_text()
    assert "| AST float32, batch 1 (per clip) | " in table and "| no GPU | n/a | - |" in table


def test_gpu_table_puts_cpu_and_gpu_side_by_side():
    rows = [{"figure": "AST float32, batch 4", "device": "cpu", "ms": 400.0, "cpu_ms": 700.0, "per": "clip",
             "peak_mb": 0}, {"figure": "AST float32, batch 4", "device": "cuda:0", "ms": 5.0, "cpu_ms": 5.0,
                             "per": "clip", "peak_mb": 812.4},
            {"figure": "AST float32, batch 16", "device": "cuda:0", "ms": 2.0, "cpu_ms": 2.0, "per": "clip",
             "peak_mb": 900.0}]
    lines = bench_gpu.table(rows, torch.device("cuda:0"))
    assert lines[2] == "| AST float32, batch 4 (per clip) | 400.0 (700.0) | 5.0 | 80.0x | 812 |"
    assert lines[3] == "| AST float32, batch 16 (per clip) | not run (--cpu-clips) | 2.0 | n/a | 900 |"
