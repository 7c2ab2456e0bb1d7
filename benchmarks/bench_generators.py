"""Generator cost benchmark: batched vs per-sample training throughput, and size vs the predecessor's VAE.

    python benchmarks/bench_generators.py [--n 512] [--epochs 3] [--out outputs/bench]

Both throughputs are measured in the same run on the same data and epochs, so their ratio holds on a
noisy machine. Writes <out>/generators.json and generators.md and prints them.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from a2v_flower.models.generators import GENERATOR_TYPES, GeneratorSpec, build_generator, train_generator


def predecessor_vae_params(seq: int = 1214, dim: int = 768, hidden: int = 1024, latent: int = 256) -> int:
    """Parameters of the predecessor's flattened (seq*dim) VAE, for size comparisons (~1.91e9 by default)."""
    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    flat = seq * dim
    encoder = linear(flat, hidden) + linear(hidden, hidden) + linear(hidden, 2 * latent)
    decoder = linear(latent, hidden) + linear(hidden, hidden) + linear(hidden, flat)
    return encoder + decoder


def throughput(spec: GeneratorSpec, x: torch.Tensor, y: torch.Tensor, targets: dict) -> float:
    """Training samples per second of `spec` (epochs x N / wall time)."""
    gen = build_generator(spec, tuple(x.shape[1:]))
    t0 = time.perf_counter()
    train_generator(gen, x, y, targets, spec)
    return spec.epochs * len(x) / (time.perf_counter() - t0)


def size(kind: str, token_shape: tuple[int, int]) -> tuple[int, int]:
    """(parameters, bytes of the saved state incl. optimizer moments) of a fresh, one-step-trained generator."""
    gen = build_generator(GeneratorSpec(kind, epochs=1), token_shape)
    x = torch.randn(8, *token_shape)
    train_generator(gen, x, torch.zeros(8, dtype=torch.long), {"pooled": torch.randn(2, 4)}, GeneratorSpec(kind, epochs=1))
    params = sum(p.numel() for p in gen.parameters())
    return params, sum(t.numel() * t.element_size() for t in gen.state_tensors().values())


def main() -> None:
    """Measure and write the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="training samples (tiny AST shape 8 x 64)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default="outputs/bench")
    args = ap.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(args.n, 8, 64), torch.randint(0, 10, (args.n,))
    targets = {"clip": torch.randn(10, 77, 768)}
    spec = GeneratorSpec("cvae", epochs=args.epochs, batch_size=32)
    batched = throughput(spec, x, y, targets)
    per_sample = throughput(replace(spec, batch_size=1), x, y, targets)
    old = predecessor_vae_params()
    rows = {"throughput_batched_samples_per_s": batched, "throughput_per_sample_samples_per_s": per_sample,
            "batched_speedup": batched / per_sample, "predecessor_vae_params": old,
            "predecessor_vae_fp32_bytes": old * 4, "sizes": {}}
    for kind in GENERATOR_TYPES:
        for shape in ((8, 64), (8, 768)):
            params, nbytes = size(kind, shape)
            rows["sizes"][f"{kind} {shape[0]}x{shape[1]}"] = {"params": params, "state_bytes": nbytes,
                                                             "predecessor_over_ours_params": old / params if params else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generators.json").write_text(json.dumps(rows, indent=2))
    lines = [f"cvae training, {args.n} samples x {args.epochs} epochs: batched (32) {batched:.0f} samples/s, "
             f"per-sample {per_sample:.0f} samples/s -> **{batched / per_sample:.1f}x**", "",
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
