"""benchmarks/bench_render_memory.py end to end, small: a generator-only run never loads the configured pipeline.

Three real `a2v-run` simulations (see the script). The pipeline's UNet is widened to width 192, about
165 MB of fp32 weights, so that loading it must raise the server process's peak RSS (VmHWM, exact,
kept by the kernel) by at least that much: the weights have to be resident to render. Runs that build
no pipeline differ only by allocator and thread-timing noise, a few tens of MB at most. Hence:

- control (renders) minus rendering off > half the weights: the measurement can see a pipeline;
- generator-only with the pipeline configured vs rendering off: within a quarter of the weights,
  i.e. far below what a loaded pipeline would add.

The pipeline-construction count comes from the server process itself, so it is asserted exactly.
No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_generator_only_run_does_not_load_the_pipeline(tmp_path):
    out = tmp_path / "render_memory"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_render_memory.py"), "--out", str(out),
                           "--unet-width", "192", "--repeats", "1", "--sites", "2", "--rounds", "1",
                           "federation.num_cpus=2"],  # one Ray actor a run, as TINY: the server's memory is measured
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads((out / "render_memory.json").read_text())
    runs = {r["name"]: r for r in figures["runs"]}
    gen, off, ctl = (runs[name] for name in ("generator-only, pipeline configured", "generator-only, rendering off",
                                             "control: federated, renders"))
    assert all(r["returncode"] == 0 and r["server_pids"] for r in runs.values()), runs
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in ps  # no SuperLink (or anything else of the runs) left behind

    # Pipelines built, counted inside the runs' processes.
    assert gen["pipelines_built"] == 0 and off["pipelines_built"] == 0
    assert ctl["pipelines_built_in_server"] >= 1 and "flwr-simulation" in ctl["diffusion_imported_by"]

    # Memory: the control proves a loaded pipeline is visible; generator-only does not show one.
    weights_mb = figures["pipeline"]["weight_bytes"] / 1e6
    assert weights_mb > 100
    assert ctl["server_peak_rss_mb"] - off["server_peak_rss_mb"] > 0.5 * weights_mb, figures["summary"]
    assert abs(gen["server_peak_rss_mb"] - off["server_peak_rss_mb"]) < 0.25 * weights_mb, figures["summary"]
    assert "| generator-only, pipeline configured | 0 (0) |" in (out / "render_memory.md").read_text()
