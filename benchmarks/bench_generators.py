"""Generator cost benchmark: batched vs per-sample training at equal work, and size vs the predecessor's VAE.

    python benchmarks/bench_generators.py [--n 512] [--epochs 3] [--repeats 3] [--out outputs/bench]

cvae training on the same data, timed in CPU seconds of this process (one torch thread), median of
`--repeats` (interleaved, so that a busy machine slows every variant alike):

  batched                mini-batches of 32 (generator.batch_size), `--epochs` over n samples
  per-sample, equal samples seen   batch 1, the same epochs over the same n samples: 32x the optimizer steps
  per-sample, equal steps          batch 1, as many optimizer steps as `batched` (n / 32 samples per epoch)

Writes <out>/generators.json and generators.md and prints them.
"""

from __future__ import annotations

import argparse
import json
import time
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from a2v_flower import config as C
from a2v_flower.models.generators import GENERATOR_TYPES, GeneratorSpec, build_generator, train_generator

SPEC = C.spec("generator", type="cvae")  # the app's default sizes (hidden 256, latent 16)


def predecessor_vae_params(seq: int = 1214, dim: int = 768, hidden: int = 1024, latent: int = 256) -> int:
    """Parameters of the predecessor's flattened (seq*dim) VAE, for size comparisons (~1.91e9 by default)."""
    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    flat = seq * dim
    encoder = linear(flat, hidden) + linear(hidden, hidden) + linear(hidden, 2 * latent)
    decoder = linear(latent, hidden) + linear(hidden, hidden) + linear(hidden, flat)
    return encoder + decoder


def cpu_seconds(spec: GeneratorSpec, x: torch.Tensor, y: torch.Tensor, targets: dict) -> float:
    """CPU seconds of this process for one `train_generator` call on fresh weights."""
    gen = build_generator(spec, tuple(x.shape[1:]))
    t0 = time.process_time()
    train_generator(gen, x, y, targets, spec)
    return time.process_time() - t0


def equal_work(x: torch.Tensor, y: torch.Tensor, targets: dict, epochs: int, repeats: int, batch: int = 32) -> dict:
    """Median CPU seconds, samples seen and optimizer steps of batched and per-sample training (see module doc)."""
    few = max(1, len(x) // batch)  # per-sample at equal steps: epochs x few steps, as batched's epochs x n / batch
    runs = {"batched": (replace(SPEC, epochs=epochs, batch_size=batch), x, y),
            "per_sample_equal_samples": (replace(SPEC, epochs=epochs, batch_size=1), x, y),
            "per_sample_equal_steps": (replace(SPEC, epochs=epochs, batch_size=1), x[:few], y[:few])}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, (spec, xs, ys) in runs.items():
            times[name].append(cpu_seconds(spec, xs, ys, targets))
    out = {}
    for name, (spec, xs, _) in runs.items():
        cpu = statistics.median(times[name])
        out[name] = {"cpu_s": cpu, "cpu_s_all": times[name], "samples": epochs * len(xs),
                     "steps": epochs * -(-len(xs) // spec.batch_size), "samples_per_cpu_s": epochs * len(xs) / cpu}
    b, s, t = out["batched"], out["per_sample_equal_samples"], out["per_sample_equal_steps"]
    out["speedup_equal_samples"] = s["cpu_s"] / b["cpu_s"]          # same samples seen: time ratio
    out["step_cost_ratio"] = b["cpu_s"] / t["cpu_s"]                  # same steps: a 32-sample step vs a 1-sample one
    out["throughput_ratio_equal_steps"] = b["samples_per_cpu_s"] / t["samples_per_cpu_s"]
    return out


def size(kind: str, token_shape: tuple[int, int]) -> tuple[int, int]:
    """(parameters, bytes of the saved state incl. optimizer moments) of a fresh, one-step-trained generator."""
    gen = build_generator(C.spec("generator", type=kind, epochs=1), token_shape)
    x = torch.randn(8, *token_shape)
    train_generator(gen, x, torch.zeros(8, dtype=torch.long), {"pooled": torch.randn(2, 4)}, C.spec("generator", type=kind, epochs=1))
    params = sum(p.numel() for p in gen.parameters())
    return params, sum(t.numel() * t.element_size() for t in gen.state_tensors().values())


def main() -> None:
    """Measure and write the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="training samples (tiny AST shape 8 x 64)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="timings per variant; the median is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the work done)")
    ap.add_argument("--out", default="outputs/bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(args.n, 8, 64), torch.randint(0, 10, (args.n,))
    targets = {"clip": torch.randn(10, 77, 768)}
    work = equal_work(x, y, targets, args.epochs, args.repeats)
    old = predecessor_vae_params()
    rows = {"equal_work": work, "threads": args.threads, "predecessor_vae_params": old,
            "predecessor_vae_fp32_bytes": old * 4, "sizes": {}}
    for kind in GENERATOR_TYPES:
        for shape in ((8, 64), (8, 768)):
            params, nbytes = size(kind, shape)
            rows["sizes"][f"{kind} {shape[0]}x{shape[1]}"] = {"params": params, "state_bytes": nbytes,
                                                             "predecessor_over_ours_params": old / params if params else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generators.json").write_text(json.dumps(rows, indent=2))
    b, s, t = (work[k] for k in ("batched", "per_sample_equal_samples", "per_sample_equal_steps"))
    lines = [f"cvae training ({args.n} samples of 8 x 64, {args.epochs} epochs), CPU seconds, median of {args.repeats}, "
             f"{args.threads} torch thread(s):", "",
             "| variant | samples seen | optimizer steps | CPU s | samples / CPU s |", "|---|---|---|---|---|",
             *(f"| {name} | {v['samples']:,} | {v['steps']:,} | {v['cpu_s']:.2f} | {v['samples_per_cpu_s']:,.0f} |"
               for name, v in (("batched (32)", b), ("per-sample, equal samples seen", s),
                               ("per-sample, equal optimizer steps", t))), "",
             f"Equal samples seen: batched takes **{work['speedup_equal_samples']:.1f}x** less CPU time. "
             f"Equal optimizer steps: a 32-sample step costs {work['step_cost_ratio']:.2f}x a 1-sample step, "
             f"so batched sees {work['throughput_ratio_equal_steps']:.1f}x more samples per CPU second.", "",
             f"Predecessor's flattened 1214x768 VAE: {old / 1e9:.2f} G parameters ({old * 4 / 1e9:.1f} GB fp32).", "",
             "| generator (tokens x dim) | parameters | saved state (weights + AdamW) | predecessor / ours |",
             "|---|---|---|---|"]
    for k, v in rows["sizes"].items():
        ratio = v["predecessor_over_ours_params"]
        lines.append(f"| {k} | {v['params']:,} | {v['state_bytes'] / 1e6:.2f} MB | "
                     f"{f'{ratio:,.0f}x' if ratio else 'no parameters'} |")
    (out / "generators.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
