"""Rendering memory benchmark: does a generator-only run with a diffusion pipeline configured load it?

    python benchmarks/bench_render_memory.py                        # UNet width 256, 2 runs of each (~6 min)
    python benchmarks/bench_render_memory.py --unet-width 192 --repeats 1   # the slow test's size (~3 min)

Three real `a2v-run` simulations (local SuperLink, SuperExec, `flwr-simulation` with the Ray backend,
exactly as a user starts one) on the tiny synthetic data, differing only in the keys shown:

| run | overrides |
|---|---|
| generator-only, pipeline configured | mode=generator_training diffusion.render_every=1 |
| generator-only, rendering off | mode=generator_training diffusion.render_every=0 |
| control: federated, renders | mode=federated diffusion.render_every=1 |

All three use generator=gaussian and `diffusion.name_or_path` = a StableDiffusionPipeline saved here
with `save_pretrained` whose UNet is widened (`--unet-width`) until its weights stand out in memory
(about 290 MB at width 256; the tiny default pipeline's 4 MB would vanish in the noise).

What is measured, from /proc, every `--interval` seconds while a run goes:

- server process peak RSS: the kernel's high-water mark (VmHWM) of the `flwr-simulation` process, the
  one that runs the ServerApp (Flower's simulation runs it in a thread beside the Ray backend) and
  would load the pipeline. VmHWM is exact, not sampled; the last value read before the process exits.
- run tree peak RSS / PSS: the largest sum, over one sample, of the RSS (and PSS, which splits shared
  pages) of every process of the run: a2v-run, `flwr run`, the detached SuperLink and SuperExec (kept
  once seen, though they are re-parented), `flwr-simulation`, and Ray's processes.
- pipelines built: a `sitecustomize` put on PYTHONPATH for the runs only (the package is unchanged)
  wraps `a2v_flower.rendering.pipelines._counted` in every process that imports that module and logs each call
  with `PIPELINES_BUILT` and the process id, so the count comes from the real server process.

Writes <out>/render_memory.json and render_memory.md and prints the table. Processes the runs leave
behind (the SuperLink) are stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Tiny data and models (the tests' size); the runs differ only in RUNS' overrides.
BASE = ["++data.clips_per_class=8", "++data.seconds=1.0", "data.clip_seconds=1.0", "model.audio.max_length=128",
        "train.local_epochs=1", "adapter.width=64", "wandb.mode=disabled", "generator=gaussian",
        "diffusion.guidance_scale=1.0"]  # no classifier-free guidance: half the UNet passes, same weights
RUNS = {
    "generator-only, pipeline configured": ["mode=generator_training", "diffusion.render_every=1"],
    "generator-only, rendering off": ["mode=generator_training", "diffusion.render_every=0"],
    "control: federated, renders": ["mode=federated", "diffusion.render_every=1"],
}

HOOK = '''"""Written by benchmarks/bench_render_memory.py for its runs only: log every pipeline a2v_flower builds."""
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

_LOG = os.environ.get("A2V_BENCH_PIPELINE_LOG")


def _write(row):
    row.update(pid=os.getpid(), time=time.time(), argv0=os.path.basename(sys.argv[0]) if sys.argv else "")
    with open(_LOG, "a") as f:
        f.write(json.dumps(row) + "\\n")


class _Finder(importlib.abc.MetaPathFinder):
    """Finds a2v_flower.rendering.pipelines like the normal path finder, then wraps its pipeline counter."""

    def find_spec(self, name, path, target=None):
        if name != "a2v_flower.rendering.pipelines":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            counted = getattr(module, "_counted", None)
            if counted is None:
                _write({"event": "no _counted in a2v_flower.rendering.pipelines"})
                return

            def logged(pipe):
                out = counted(pipe)
                _write({"event": "built", "pipelines_built": module.PIPELINES_BUILT, "type": type(pipe).__name__})
                return out

            module._counted = logged
            _write({"event": "imported"})

        spec.loader.exec_module = exec_and_wrap
        return spec


if _LOG:
    sys.meta_path.insert(0, _Finder())
'''


# ---- the pipeline ---------------------------------------------------------------------------------

def make_pipeline(folder: Path, width: int, seed: int = 0) -> dict:
    """Save an SD-1.x pipeline without text encoder whose UNet has blocks (width, 2*width); return its size."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from a2v_flower.rendering.pipelines import tiny_sd_pipeline
    from a2v_flower.models.text_encoders import CLIP_DIM

    if not (folder / "model_index.json").is_file():
        tiny = tiny_sd_pipeline(seed)  # tiny VAE and scheduler of the project's pipeline
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(width, 2 * width),
            norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CLIP_DIM, attention_head_dim=8)
        pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=None, tokenizer=None, unet=unet,
                                       scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None,
                                       image_encoder=None, requires_safety_checker=False)
        pipe.save_pretrained(folder)
    weights = sorted(folder.rglob("*.safetensors"))
    return {"folder": str(folder), "unet_width": width,
            "weight_bytes": sum(p.stat().st_size for p in weights),
            "files": {str(p.relative_to(folder)): p.stat().st_size for p in weights}}


# ---- /proc sampling -------------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _kb(text: str, key: str) -> int:
    """Value in kB of `key:` in a /proc status-like text (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _read(f"/proc/{entry.name}/stat")
            if stat:
                out[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # comm may contain spaces
    return out


class TreeSampler(threading.Thread):
    """Samples RSS/PSS of a process tree; processes stay members once seen (the SuperLink is detached)."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.members, self.interval, self.stop = {root}, interval, threading.Event()
        self.procs: dict[int, dict] = {}       # pid -> cmdline, peak rss, last VmHWM (kB)
        self.peak_rss = self.peak_pss = 0      # kB, largest sum over one sample
        self.samples: list[tuple[float, int, int]] = []
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        parents = _parents()
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        todo, tree = [p for p in self.members if p in parents], set()
        while todo:
            pid = todo.pop()
            if pid not in tree:
                tree.add(pid)
                todo += children.get(pid, [])
        self.members |= tree
        rss = pss = 0
        for pid in tree:
            status = _read(f"/proc/{pid}/status")
            if not status:
                continue
            p = self.procs.setdefault(pid, {"cmdline": "", "peak_rss_kb": 0, "hwm_kb": 0})
            p["cmdline"] = _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip() or p["cmdline"]
            r = _kb(status, "VmRSS")
            p["peak_rss_kb"] = max(p["peak_rss_kb"], r)
            p["hwm_kb"] = max(p["hwm_kb"], _kb(status, "VmHWM"))
            rss += r
            pss += _kb(_read(f"/proc/{pid}/smaps_rollup"), "Pss")
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.samples.append((round(time.monotonic() - self.t0, 2), rss, pss))

    def alive(self) -> list[int]:
        """Members still running."""
        return [pid for pid in self.members if Path(f"/proc/{pid}").exists() and pid != os.getpid()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- one run --------------------------------------------------------------------------------------

def measure(name: str, overrides: list[str], work: Path, hook_dir: Path, interval: float, timeout: int,
            grace: float = 30.0) -> dict:
    """Run `a2v-run *overrides` like a user, sampling its process tree; return the figures."""
    from a2v_flower.processes import stop_local_superlink

    work.mkdir(parents=True, exist_ok=True)
    flwr_home, events = work / "flwr", work / "pipelines.jsonl"
    events.unlink(missing_ok=True)
    env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
               FLWR_LOCAL_CONTROL_API_PORT=str(free_port()), A2V_BENCH_PIPELINE_LOG=str(events),
               PYTHONPATH=os.pathsep.join([str(hook_dir), *filter(None, [os.environ.get("PYTHONPATH")])]))
    t0 = time.perf_counter()
    with open(work / "a2v-run.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "a2v-run"), *overrides], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        finally:
            stop_local_superlink(flwr_home)  # a2v-run does this too; a crashed one might not
            wall = time.perf_counter() - t0
            deadline = time.monotonic() + grace  # SuperExec and flwr-simulation notice the SuperLink is gone
            while sampler.alive() and time.monotonic() < deadline:
                time.sleep(0.5)
            sampler.stop.set()
            sampler.join()
    leftovers = sampler.alive()
    for pid in leftovers:  # only processes of this run
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    rows = [json.loads(line) for line in events.read_text().splitlines()] if events.is_file() else []
    built = [r for r in rows if r["event"] == "built"]
    servers = {pid: p for pid, p in sampler.procs.items() if "flwr-simulation" in p["cmdline"]}
    top = sorted(sampler.procs.items(), key=lambda kv: -kv[1]["hwm_kb"])[:8]
    mb = 1024 / 1e6  # kB (KiB, as /proc reports) -> MB
    return {
        "name": name, "overrides": overrides, "returncode": rc, "wall_s": round(wall, 1),
        "server_pids": sorted(servers),
        "server_peak_rss_mb": round(max((p["hwm_kb"] for p in servers.values()), default=0) * mb, 1),
        "tree_peak_rss_mb": round(sampler.peak_rss * mb, 1), "tree_peak_pss_mb": round(sampler.peak_pss * mb, 1),
        "processes_seen": len(sampler.procs),
        "pipelines_built": len(built),
        "pipelines_built_in_server": sum(r["pid"] in servers for r in built),
        "diffusion_imported_by": sorted({r["argv0"] for r in rows if r["event"] == "imported"}),
        "pipeline_events": rows,
        "top_processes": [{"pid": pid, "peak_rss_mb": round(p["hwm_kb"] * mb, 1), "cmdline": p["cmdline"][:160]}
                          for pid, p in top],
        "samples_s_rss_pss_kb": sampler.samples,
        "left_running_then_stopped": leftovers,  # still there `grace` s after the run: sent SIGTERM
    }


def prepare_cache(overrides: list[str]) -> None:
    """Make the synthetic data, the sites' embeddings and the text targets once, before any measured run."""
    from a2v_flower import config as C
    from a2v_flower.cache import TensorCache
    from a2v_flower.data.site import load_site
    from a2v_flower.models.audio_encoder import AudioEncoder
    from a2v_flower.models.text_encoders import class_targets

    cfg = C.absolute_paths(C.compose_config(overrides), ROOT)
    encoder = AudioEncoder(C.validate(cfg).model.audio)
    sites = [load_site(C.data_spec(cfg), C.partition_spec(cfg), encoder, i) for i in range(cfg.federation.num_sites)]
    class_targets(sites[0].classes, cfg.prompt_template, cfg.diffusion.type, C.validate(cfg).model.text, cfg.diffusion.t5_seq_len,
                  TensorCache(Path(cfg.paths.cache_dir) / "targets"))


# ---- main -----------------------------------------------------------------------------------------

def main() -> None:
    """Build the pipeline, run every configuration `--repeats` times (interleaved), write the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    ap.add_argument("--out", default="outputs/bench_render_memory")
    ap.add_argument("--unet-width", type=int, default=256, help="UNet block widths (w, 2w); 256 = 288 MB of weights")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each configuration, interleaved")
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between /proc samples")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    hook_dir = out / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    pipeline = make_pipeline(out / f"pipeline_w{args.unet_width}", args.unet_width)
    common = [*BASE, f"federation.num_sites={args.sites}", f"num_rounds={args.rounds}",
              f"paths.cache_dir={out / 'cache'}", f"diffusion.name_or_path={pipeline['folder']}", *args.overrides]
    prepare_cache(common)
    print(f"pipeline {pipeline['folder']}: {pipeline['weight_bytes'] / 1e6:.0f} MB of weights", flush=True)
    runs = []
    for rep in range(args.repeats):
        for i, (name, keys) in enumerate(RUNS.items()):
            work = out / "runs" / f"{rep}_{i}"
            overrides = [*common, *keys, f"paths.output_root={work / 'outputs'}", f"name=render_memory_{i}"]
            r = measure(name, overrides, work, hook_dir, args.interval, args.timeout)
            r["repeat"] = rep
            runs.append(r)
            if r["returncode"] != 0:
                print((work / "a2v-run.log").read_text()[-3000:], file=sys.stderr)
            print(f"{name:38s} rc {r['returncode']} pipelines built {r['pipelines_built']} "
                  f"server peak {r['server_peak_rss_mb']:.0f} MB tree peak RSS {r['tree_peak_rss_mb']:.0f} MB "
                  f"PSS {r['tree_peak_pss_mb']:.0f} MB {r['wall_s']:.0f}s", flush=True)
    write(out, pipeline, runs, args)
    if any(r["returncode"] != 0 for r in runs):
        raise SystemExit("some runs failed; see their a2v-run.log under " + str(out / "runs"))


def summarise(runs: list[dict]) -> dict:
    """Median figures per configuration and the differences that answer the question (MB)."""
    med = {name: {k: statistics.median(r[k] for r in runs if r["name"] == name)
                  for k in ("server_peak_rss_mb", "tree_peak_rss_mb", "tree_peak_pss_mb", "pipelines_built")}
           for name in RUNS}
    gen, off, ctl = (med[n] for n in RUNS)
    return {"median": med,
            "generator_only_pipeline_minus_off": {k: round(gen[k] - off[k], 1) for k in gen},
            "control_minus_off": {k: round(ctl[k] - off[k], 1) for k in ctl}}


def write(out: Path, pipeline: dict, runs: list[dict], args) -> None:
    """render_memory.json (everything, samples included) and render_memory.md (the table)."""
    summary = summarise(runs)
    figures = {"date": time.strftime("%Y-%m-%d"), "pipeline": pipeline, "repeats": args.repeats,
               "sites": args.sites, "rounds": args.rounds, "interval_s": args.interval, "runs": runs,
               "summary": summary}
    (out / "render_memory.json").write_text(json.dumps(figures, indent=1))
    lines = [f"Pipeline: StableDiffusionPipeline, UNet width {args.unet_width}, "
             f"{pipeline['weight_bytes'] / 1e6:.0f} MB of fp32 weights; {args.sites} sites, {args.rounds} rounds, "
             f"{args.repeats} run(s) of each configuration.", "",
             "| run | pipelines built (server process) | server process peak RSS (MB) | run tree peak RSS (MB) | "
             "run tree peak PSS (MB) | wall s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['pipelines_built']} ({r['pipelines_built_in_server']}) | {r['server_peak_rss_mb']:.0f} | "
              f"{r['tree_peak_rss_mb']:.0f} | {r['tree_peak_pss_mb']:.0f} | {r['wall_s']:.0f} |" for r in runs]
    d_gen, d_ctl = summary["generator_only_pipeline_minus_off"], summary["control_minus_off"]
    lines += ["", f"Generator-only with the pipeline configured minus rendering off: server "
              f"{d_gen['server_peak_rss_mb']:+.0f} MB, tree RSS {d_gen['tree_peak_rss_mb']:+.0f} MB, "
              f"tree PSS {d_gen['tree_peak_pss_mb']:+.0f} MB.",
              f"Control (renders) minus rendering off: server {d_ctl['server_peak_rss_mb']:+.0f} MB, "
              f"tree RSS {d_ctl['tree_peak_rss_mb']:+.0f} MB, tree PSS {d_ctl['tree_peak_pss_mb']:+.0f} MB."]
    (out / "render_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
