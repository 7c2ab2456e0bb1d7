"""GPU benchmark: what the device setting buys, the CPU and the GPU measured in one run.

    python benchmarks/bench_gpu.py                         # a GPU machine: CPU vs cuda, Ray placement, peak memory
    python benchmarks/bench_gpu.py --device cpu --quick    # anywhere, in seconds (tiny configs): what the test runs
    python benchmarks/bench_gpu.py --device cpu --only ast,extractor --batches 1,4 --dtypes float32 --cpu-clips 4 \
        --repeats 1                                        # the real AST's CPU cost per clip (BENCHMARKS.md)

Random weights of the real configs, so a GPU machine without network can run it: the AST of
MIT/ast-finetuned-audioset-10-10-0.4593 (transformers' ASTConfig() defaults, 1024 frames), saved with save_pretrained
and loaded by path as a user would (model.audio.name_or_path=<folder>); adapters and kd on SD's 77 x 768 head; a
CLIP ViT-L/14 judge. Figures (median of --repeats after one warm-up, CUDA synchronised):
  ast        ms per clip at batch 1/4/16 in float32 and bfloat16 (bfloat16 on the GPU only), peak GPU memory
  extractor  the feature extractor's ms per clip (numpy, on the CPU whatever the device: the next bottleneck)
  kd         ms per adapters + kd step (batch 32: teacher forward, student forward/backward, AdamW)
  judge      ms per image of the CLIP judge (8 images of 512 px)
  ray        4 Ray actors at num_gpus=0.25 and one at 0: what each sees (CUDA_VISIBLE_DEVICES, device auto)
Every timed figure is measured on the CPU and on --device; the table gives CPU / device. Without a GPU the device
column and Ray are skipped, saying so. Writes <out>/gpu.json and gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from a2v_flower import config as C
from a2v_flower import devices
from a2v_flower.models.adapters import build_adapters
from a2v_flower.models.audio_encoder import AudioEncoder, encoder_dim
from a2v_flower.training import predict, train_adapters

TINY_AST = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median (wall, this process's CPU) seconds of `fn()` over `repeats` runs after one warm-up, the device
    synchronised around each. On a shared machine the CPU seconds are the steadier figure of the two."""
    fn()
    times = []
    for _ in range(repeats):
        devices.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        devices.synchronize(device)
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return statistics.median(t for t, _ in times), statistics.median(c for _, c in times)


def row(figure: str, device: torch.device, took: tuple[float, float], n: int, per: str) -> dict:
    """One figure: wall and CPU ms per `per` (n of them per timed call) and the device's peak memory."""
    return {"figure": figure, "device": str(device), "ms": 1e3 * took[0] / n, "cpu_ms": 1e3 * took[1] / n,
            "per": per, "peak_mb": devices.peak_memory(device) / 2**20}


def save_ast(folder: Path, quick: bool) -> Path:
    """The real AST's architecture (or the tiny one with --quick), random weights, saved as a user's folder."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(0)
    max_length = 128 if quick else 1024
    ASTModel(ASTConfig(max_length=max_length, **(TINY_AST if quick else {}))).save_pretrained(folder)
    ASTFeatureExtractor(max_length=max_length).save_pretrained(folder)
    return folder


def clips(n: int, seconds: float) -> list[np.ndarray]:
    """`n` clips of noise at 16 kHz (10 s fill the real AST's 1024 frames)."""
    return [np.random.default_rng(i).normal(0, 0.1, int(16000 * seconds)).astype(np.float32) for i in range(n)]


def bench_ast(folder: Path, device: torch.device, batches: list[int], dtypes: list[str], cpu_clips: int,
              repeats: int, seconds: float) -> list[dict]:
    """ms per clip of the encoder (feature extractor included) on `device`, per dtype and batch size."""
    rows, waves = [], clips(max(batches), seconds)
    for dtype in dtypes:
        if dtype != "float32" and device.type == "cpu":
            continue  # refused on a CPU (devices.check_placement)
        for batch in batches:
            if device.type == "cpu" and batch > cpu_clips:
                continue  # a real clip takes seconds on a CPU: --cpu-clips bounds the work
            enc = AudioEncoder(C.spec("model.audio", name_or_path=str(folder), tokens=8, batch_size=batch, dtype=dtype), device).load()
            n = batch * max(1, cpu_clips // batch) if device.type == "cpu" else batch
            devices.reset_peak_memory(device)
            took = timed(lambda: enc.encode(waves[:batch] * (n // batch)), device, repeats)
            rows.append(row(f"AST {dtype}, batch {batch}", device, took, n, "clip"))
    return rows


def bench_extractor(folder: Path, repeats: int, n: int, seconds: float) -> dict:
    """ms per clip of the AST feature extractor (numpy filterbanks, on the CPU whatever the device)."""
    from transformers import AutoFeatureExtractor

    extractor, waves = AutoFeatureExtractor.from_pretrained(folder), clips(n, seconds)
    took = timed(lambda: extractor(waves, sampling_rate=16000, return_tensors="pt"), torch.device("cpu"), repeats)
    return row("feature extractor", torch.device("cpu"), took, n, "clip")


def bench_kd(device: torch.device, dim: int, repeats: int, samples: int, head: tuple[int, int]) -> dict:
    """ms per kd step: the global adapters fitted to a teacher's outputs (SD's 77 x 768 head), batch 32."""
    g = torch.Generator().manual_seed(0)
    targets = {"clip": torch.randn(10, *head, generator=g)}
    x, y = torch.randn(samples, 8, dim, generator=g), torch.arange(samples) % 10
    teacher = build_adapters(dim, targets, 256, 4, 1).to(device)
    student = build_adapters(dim, targets, 256, 4, 0).to(device)
    spec = C.spec("train", local_epochs=1, batch_size=32, loss="mse+contrastive")
    devices.reset_peak_memory(device)
    took = timed(lambda: train_adapters(student, x, y, targets, spec, teacher=predict(teacher, x)), device, repeats)
    return row("adapters + kd step (batch 32)", device, took, samples // 32, "step")


def bench_judge(device: torch.device, quick: bool, repeats: int) -> dict:
    """ms per image of the CLIP judge (ViT-L/14's config, random weights; --quick: the tests' tiny CLIP)."""
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from a2v_flower.rendering.judge import ImageJudge
    from a2v_flower.models.text_encoders import tiny_clip_tokenizer

    if quick:
        judge, size = ImageJudge.tiny(device=device), 64
    else:
        tok, size = tiny_clip_tokenizer(), 512
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14)
        cfg = CLIPConfig(projection_dim=768, vision_config=vision,
                         text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, vocab_size=len(tok), bos_token_id=0,
                                          eos_token_id=1, pad_token_id=1))
        processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 224},
                                                                     crop_size={"height": 224, "width": 224}),
                                  tokenizer=tok)
        judge = ImageJudge(CLIPModel(cfg), processor, device)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8))
              for i in range(8)]
    devices.reset_peak_memory(device)
    took = timed(lambda: judge.scores(images, [f"class {i}" for i in range(10)]), device, repeats)
    return row("CLIP judge", device, took, 8, "image")


def ray_placement(gpus: int | None = None) -> dict:
    """4 actors at num_gpus=0.25 and one at 0 on a local Ray (`gpus`: the GPUs Ray is told of, None: it counts
    them): what each sees, and Flower's pool size."""
    import ray

    def seen() -> dict:
        return {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "cuda_count": devices.cuda_count(),
                "auto": str(devices.resolve("auto"))}

    ray.init(num_cpus=5, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    try:
        probe = ray.remote(type("Probe", (), {"seen": lambda self: seen()}))
        actors = [probe.options(num_cpus=1, num_gpus=g).remote() for g in (0.25,) * 4 + (0,)]
        rows = [{"num_gpus": g, **s} for g, s in zip((0.25,) * 4 + (0,), ray.get([a.seen.remote() for a in actors]))]
        from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

        pool = {str(f): pool_size_from_resources({"num_cpus": 1, "num_gpus": as_flower_passes_it(f)})
                for f in (0.5, 0.25, 0.2)}
        return {"actors": rows, "flower_pool_size_per_num_gpus": pool}
    finally:
        ray.shutdown()


def as_flower_passes_it(num_gpus: float) -> float:
    """`client-resources-num-gpus` as the simulation receives it: through a 32-bit protobuf float (0.2 ->
    0.20000000298...), so int(1 / it) is one less than 1 / 0.2."""
    from flwr.proto.federation_config_pb2 import SimulationConfig

    return SimulationConfig(client_resources_num_gpus=num_gpus).client_resources_num_gpus


def actors_per_gpu() -> dict:
    """Actors per GPU Flower's pool gets for a fraction: int(GPUs / num_gpus) on the value it receives."""
    return {str(f): int(1 / as_flower_passes_it(f)) for f in (0.5, 0.33, 0.25, 0.2, 0.125, 0.1)}


def table(rows: list[dict], device: torch.device) -> list[str]:
    """Markdown: one line per figure, CPU and device side by side with their ratio."""
    lines = ["| figure | CPU ms (CPU time) | GPU ms | CPU / GPU | peak GPU MB |", "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["figure"] for r in rows):
        by = {r["device"]: r for r in rows if r["figure"] == name}
        cpu, dev = by.get("cpu"), by.get(str(device)) if device.type != "cpu" else None
        cells = ["%.1f (%.1f)" % (cpu["ms"], cpu["cpu_ms"]) if cpu else "not run (--cpu-clips)",
                 "%.1f" % dev["ms"] if dev else "no GPU", "%.1fx" % (cpu["ms"] / dev["ms"]) if cpu and dev else "n/a",
                 "%.0f" % dev["peak_mb"] if dev else "-"]
        lines.append(f"| {name} (per {(cpu or dev)['per']}) | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Measure what --only asks for on the CPU and on --device; write gpu.json and gpu.md."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (devices.py)")
    ap.add_argument("--quick", action="store_true", help="tiny configs, 1-s clips, batches 1 and 2, one repeat")
    ap.add_argument("--only", default="ast,extractor,kd,judge,ray", help="comma-separated figures to measure")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--cpu-clips", type=int, default=4, help="clips per AST timing on the CPU (seconds each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="outputs/bench")
    args = ap.parse_args(argv)
    device, only = devices.resolve(args.device, "--device"), set(args.only.split(","))
    batches = [1, 2] if args.quick else [int(b) for b in args.batches.split(",")]
    repeats, seconds, n = (1, 1.0, 2) if args.quick else (args.repeats, 10.0, 16)  # clip length, extractor clips
    targets = [torch.device("cpu")] + ([device] if device.type != "cpu" else [])
    rows, notes = [], [] if device.type != "cpu" else [f"no GPU (--device {args.device} -> cpu): CPU figures only"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_ast(Path(tmp) / "ast", args.quick)
        dim = encoder_dim(C.spec("model.audio", name_or_path=str(folder)))  # the adapters' input width: 768 for the real AST
        for where in targets:
            if "ast" in only:
                rows += bench_ast(folder, where, batches, args.dtypes.split(","), args.cpu_clips, repeats, seconds)
            if "kd" in only:
                rows.append(bench_kd(where, dim, repeats, *((32, (4, 32)) if args.quick else (256, (77, 768)))))
            if "judge" in only:
                rows.append(bench_judge(where, args.quick, repeats))
        if "extractor" in only:
            rows.append(bench_extractor(folder, repeats, n, seconds))
    placement = {}
    if "ray" in only and device.type == "cuda":
        placement = ray_placement()
    elif "ray" in only:
        notes.append("Ray placement skipped: no GPU to place")
    info = {"device": str(device), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "quick": args.quick, "load_avg": os.getloadavg()[0],
            "gpu": devices.describe(device) if device.type == "cuda" else None,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    result = {"info": info, "rows": rows, "ray": placement, "actors_per_gpu": actors_per_gpu(), "notes": notes}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=2))
    gpu = f", {info['gpu']}" if info["gpu"] else ""
    lines = [f"`{info['command']}` ({info['cpus']} CPUs, {info['torch_threads']} torch threads, load average "
             f"{info['load_avg']:.1f} at the end, device {device}{gpu}, torch {torch.__version__}):", "",
             *table(rows, device), "", *(f"- {n}" for n in notes)]
    if placement:
        lines += ["", "| actor num_gpus | CUDA_VISIBLE_DEVICES | GPUs seen | device auto |", "|---|---|---|---|",
                  *(f"| {a['num_gpus']} | {a['CUDA_VISIBLE_DEVICES']} | {a['cuda_count']} | {a['auto']} |"
                    for a in placement["actors"])]
    lines += ["", "Actors per GPU for a num_gpus fraction (Flower: int(GPUs / num_gpus), num_gpus a 32-bit float): "
              + ", ".join(f"{f} -> {n}" for f, n in result["actors_per_gpu"].items())]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
