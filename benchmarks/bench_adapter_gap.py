"""Why centralised adapters lost to the linear probe on the real recordings (issue 28): centralised rows of
bench_quality's protocol (same sites, splits, budget and scoring) with one thing changed per row, beside the probe.

    python benchmarks/bench_adapter_gap.py real0.5 3 '[{"name": "main"},
        {"name": "wd 0.05", "train": [["weight_decay", 0.05]]}]'
    python benchmarks/bench_adapter_gap.py real5 3 '[{"name": "token embedding", "tokens": true}]'
    python benchmarks/bench_adapter_gap.py synth 1 '[{"name": "token embedding", "tokens": true}]'

Arguments: the data (real0.5 | real5: the folder benchmarks/real_recordings.py builds in outputs/real, at
data.clip_seconds 0.5 or 5.0, with the real-recordings label skew; synth: the default synthetic data, ESC-50
groups), the number of data splits (seeds), and a JSON list of variants, each the keyword arguments of `central`
(train: TrainSpec overrides; width, rank, kind; rounds; noise: Gaussian input noise in training, in units of
the input std; code, rand: a fixed sinusoidal or Gaussian code of each token's index added to the standardised
input; tokens: the adapters' learned token embedding; pos: its init std; frozen: not trained). Prints top-1
with a 95 % bootstrap interval over (split, clip) and the paired difference to the probe. BENCHMARKS.md, "Why
the adapters lost to the linear probe", has the results.
"""
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_quality as B  # noqa: E402
from a2v_flower import config as C  # noqa: E402
from a2v_flower.models import adapters as A  # noqa: E402
from a2v_flower.models.audio_encoder import encoder_dim  # noqa: E402

torch.set_num_threads(1)
SKEW = ("partition=classes", "partition.sites=[[dog,rooster],[pig,cow],[frog,cat],[duck,horse],[owl]]")

_forward = A.AdapterSet.forward


def code_of(k, d, rand):
    """(K, D) fixed code of each token index: sinusoidal (the Transformer's) or seeded Gaussian."""
    if rand:
        return torch.randn(k, d, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(k, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    pe = torch.zeros(k, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


def forward(self, x):
    """AdapterSet.forward, with an optional fixed code added to the standardised input and optional Gaussian input
    noise in training (x + c * std is x standardised + c)."""
    std = self.in_std
    if getattr(self, "code", 0):
        x = x + self.code * code_of(*x.shape[1:], getattr(self, "rand", False)) * std
    if self.training and getattr(self, "noise", 0):
        x = x + self.noise * torch.randn_like(x) * std
    return _forward(self, x)


A.AdapterSet.forward = forward


def central(cfg, data, train=(), width=None, rank=None, kind=None, rounds=10, noise=0.0, norm=True, kd_epochs=5,
            pos=0.0, code=0.0, rand=False, frozen=False, tokens=False):
    """Centralised rows of bench_quality's protocol with a variant: TrainSpec overrides, adapter size/kind, rounds,
    input noise, a fixed token code (code, rand), the token embedding (tokens; pos: its init std; frozen)."""
    spec = C.as_config(cfg).train
    dim = encoder_dim(C.as_config(cfg).model.audio)
    correct, fits = [], []
    for seed, sites, targets in data:
        n = A.input_norm([A.embedding_moments(s.splits["train"][0]) for s in sites]) if norm else None

        def make(s):
            A.TOKEN_EMBEDDING_STD = pos or 0.5
            ad = A.build_adapters(dim, targets, width or cfg.adapter.width, cfg.adapter.heads, s,
                                  kind or cfg.adapter.kind, rank or cfg.adapter.rank, n,
                                  cfg.model.audio.tokens if (pos or tokens) else 0)
            ad.noise, ad.code, ad.rand = noise, code, rand
            if frozen:
                for head in ad.values():
                    head.token_embedding.requires_grad_(False)
            return ad
        m = B.Method("centralised", kind="central", train=tuple(train))
        sc = B.Scenario("non-IID")
        r = B.run(m, sc, sites, targets, make, spec, None, rounds, seed, (32, 32), kd_epochs, 3, cfg.adapter.wire)
        correct.append(r["correct"])
        fits.append(r["train_fit"])
    c = torch.cat(correct).numpy()
    return c, float(np.mean(fits))


def probe(data):
    """bench_quality's linear probe on each split: per-clip hits of all splits, mean train fit."""
    cs, fits = [], []
    for seed, sites, targets in data:
        r = B.linear_probe(sites, seed)
        cs.append(r["correct"])
        fits.append(r["train_fit"])
    return torch.cat(cs).numpy(), float(np.mean(fits))


def report(name, c, fit, ref=None, t=0.0):
    """Print one row: top-1 with its bootstrap interval and, with `ref`, the paired difference to it."""
    rng = np.random.default_rng(0)
    lo, hi = B.bootstrap(c, rng)
    vs = ""
    if ref is not None:
        d, dlo, dhi, p = B.paired(c, ref, rng)
        vs = f" vs probe {d:+.3f} [{dlo:+.3f}, {dhi:+.3f}] p={p:.3f}"
    print(f"{name:45s} top1 {c.mean():.3f} [{lo:.3f}, {hi:.3f}] n={len(c)} fit {fit:.3f}{vs} ({t:.0f}s)", flush=True)
    return {"name": name, "top1": float(c.mean()), "ci": [lo, hi], "fit": fit}


if __name__ == "__main__":
    which = sys.argv[1]
    seeds = list(range(int(sys.argv[2])))
    variants = json.loads(sys.argv[3])
    over = {"real0.5": ["data=esc50", "data.root=outputs/real", "data.clip_seconds=0.5"],
            "real5": ["data=esc50", "data.root=outputs/real", "data.clip_seconds=5.0"],
            "synth": []}[which]
    skew = SKEW if which.startswith("real") else B.GROUPS
    cfg, data = B.load_splits(over, skew, seeds)
    t = time.time()
    ref, fit = probe(data)
    report("probe", ref, fit, t=time.time() - t)
    for v in variants:
        t = time.time()
        name = v.pop("name", json.dumps(v))
        c, fit = central(cfg, data, **v)
        report(name, c, fit, ref, time.time() - t)
