"""Adapter cost benchmark: FLOPs per training sample, parameters, bytes per site per round, CPU time per step.

    python benchmarks/bench_adapters.py [--width 256] [--dim 64] [--batch 16] [--repeats 3] [--out outputs/bench]

For each `adapter.kind` and `adapter.wire`, on SD's head (77 x 768) and FLUX's (T5 16 x 4096 + pooled 768):
matmul FLOPs of one forward + backward pass per sample (torch's FlopCounterMode over a batch of `--batch`),
parameters, the adapter bytes one site moves per round (train reply up, train and evaluate messages down), and
CPU seconds of 20 training steps (one torch thread, median of `--repeats`, kinds interleaved). Quality is
bench_quality.py's job (BENCHMARKS.md puts both side by side).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from a2v_flower import config as C
from a2v_flower.models.adapters import KINDS, build_adapters
from a2v_flower.training import TrainSpec, adapter_loss

HEADS = {"sd": {"clip": (77, 768)}, "flux": {"t5": (16, 4096), "pooled": (768,)}}
WIRE_BYTES = {"float32": 4, "float16": 2}


def step_flops(adapters, x, y, targets, spec: TrainSpec) -> float:
    """Matmul FLOPs of one forward + backward pass, per sample."""
    with FlopCounterMode(display=False) as counter:
        adapter_loss(adapters(x), y, targets, spec).backward()
    return counter.get_total_flops() / len(x)


def step_seconds(adapters, x, y, targets, spec: TrainSpec, steps: int = 20) -> float:
    """CPU seconds of `steps` AdamW steps on one batch."""
    opt = torch.optim.AdamW(adapters.parameters(), lr=spec.lr)
    t0 = time.process_time()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        adapter_loss(adapters(x), y, targets, spec).backward()
        opt.step()
    return time.process_time() - t0


def measure(args) -> dict:
    """Figures per diffusion head set and adapter kind (bytes per wire dtype)."""
    spec, rows = C.spec("train", loss="mse+contrastive", temperature=0.1), {}
    for diffusion, shapes in HEADS.items():
        targets = {h: torch.randn(10, *s, generator=torch.Generator().manual_seed(0)) for h, s in shapes.items()}
        x, y = torch.randn(args.batch, 8, args.dim), torch.arange(args.batch) % 10
        models = {k: build_adapters(args.dim, targets, args.width, 4, 0, kind=k, rank=args.rank) for k in KINDS}
        times: dict[str, list[float]] = {k: [] for k in KINDS}
        for _ in range(args.repeats):
            for kind, model in models.items():
                times[kind].append(step_seconds(model, x, y, targets, spec))
        for kind, model in models.items():
            params = sum(p.numel() for p in model.parameters())
            rows[f"{diffusion} {kind}"] = {
                "flops_per_sample": step_flops(model, x, y, targets, spec), "params": params,
                "cpu_s_20_steps": statistics.median(times[kind]),
                "bytes_per_site_round": {w: 3 * params * b for w, b in WIRE_BYTES.items()}}
    return rows


def main() -> None:
    """Measure, write <out>/adapters.json and adapters.md, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64, help="audio token width D (tiny AST 64, real AST 768)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="outputs/bench")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = measure(args)
    lines = [f"width {args.width}, rank {args.rank}, D {args.dim}, batch {args.batch}; CPU s of 20 steps, one thread, "
             f"median of {args.repeats}; bytes = adapters up (train) + down (train, evaluate) per site and round", "",
             "| head | kind | MFLOP / sample (fwd+bwd) | parameters | MB / site / round, float32 | float16 | CPU s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        b = r["bytes_per_site_round"]
        lines.append(f"| {name.split()[0]} | {name.split()[1]} | {r['flops_per_sample'] / 1e6:.1f} | {r['params']:,} | "
                     f"{b['float32'] / 1e6:.2f} | {b['float16'] / 1e6:.2f} | {r['cpu_s_20_steps']:.2f} |")
    for d in HEADS:
        a, lo = rows[f"{d} attention"], rows[f"{d} lowrank"]
        lines.append(f"\n{d}: lowrank + float16 vs attention + float32: {a['flops_per_sample'] / lo['flops_per_sample']:.1f}x "
                     f"fewer FLOPs, {a['bytes_per_site_round']['float32'] / lo['bytes_per_site_round']['float16']:.1f}x "
                     f"fewer bytes, {a['cpu_s_20_steps'] / lo['cpu_s_20_steps']:.1f}x less CPU time per step.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapters.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    (out / "adapters.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
