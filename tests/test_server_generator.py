"""The server's own generator, trained from the sites' class statistics only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from a2v_flower import config as C
from a2v_flower.models.adapters import build_adapters
from a2v_flower.models.generators.from_statistics import (StatsGenerator, class_moments,
                                               sample_server_generator, train_server_generator)
from a2v_flower.training import class_means, predict, train_adapters

TARGETS = {"pooled": torch.randn(3, 12, generator=torch.Generator().manual_seed(0))}


def site_stats(x, y, adapters, n=3):
    stats = {f"out/{k}": v for k, v in class_means(predict(adapters, x), y).items()}
    for c in y.unique().tolist():
        stats[f"audio_mean/{c}"], stats[f"audio_var/{c}"] = x[y == c].mean(0), x[y == c].var(0, unbiased=False)
    stats["counts"] = torch.bincount(y, minlength=n).float()
    return stats


def toy(classes, n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([c for c in classes for _ in range(n)])
    centres = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1)) * 3
    return centres[y] + 0.5 * torch.randn(len(y), 4, 8, generator=g), y


def test_class_moments_pool_sites_exactly():
    xa, ya = toy([0, 1], seed=1)
    xb, yb = toy([1, 2], seed=2)
    ad = build_adapters(8, TARGETS, 16, 2, 0)
    present, mean, var = class_moments({0: site_stats(xa, ya, ad), 1: site_stats(xb, yb, ad)}, 3)
    x, y = torch.cat([xa, xb]), torch.cat([ya, yb])
    assert present == [0, 1, 2]
    assert torch.allclose(mean[1], x[y == 1].mean(0), atol=1e-5)
    assert torch.allclose(var[1], x[y == 1].var(0, unbiased=False), atol=1e-4)


def test_server_generator_learns_the_class_spread_and_agrees_with_teachers():
    xa, ya = toy([0, 1], seed=1)
    xb, yb = toy([2], seed=2)
    teachers = {}
    for s, (x, y) in enumerate([(xa, ya), (xb, yb)]):
        teachers[s] = build_adapters(8, TARGETS, 16, 2, s)
        train_adapters(teachers[s], x, y, TARGETS, C.spec("train", local_epochs=20, batch_size=16, lr=3e-3), seed=s)
    stats = {0: site_stats(xa, ya, teachers[0]), 1: site_stats(xb, yb, teachers[1])}
    spec = C.spec("server_generator", epochs=150, hidden=64, lr=3e-3)
    gen = StatsGenerator((4, 8), spec)
    x0, y0 = sample_server_generator(gen, stats, TARGETS, 64, seed=0)
    assert all(float(x0[y0 == c].var(0).max()) < 1e-8 for c in range(3))  # untrained: the class means exactly
    loss = train_server_generator(gen, teachers, stats, TARGETS, spec, seed=0)
    x, y = sample_server_generator(gen, stats, TARGETS, 64, seed=1)
    assert loss < 1.0 and torch.bincount(y).tolist() == [64, 64, 64]
    real = torch.cat([xa, xb])
    for c in range(3):  # per-class spread now close to the real one (0.25 per feature), samples near their class
        assert 0.1 < float(x[y == c].var(0).mean()) < 0.5, c
    centres = torch.stack([real[torch.cat([ya, yb]) == c].mean(0) for c in range(3)])
    assert torch.equal(torch.cdist(x.flatten(1), centres.flatten(1)).argmin(1), y)


def test_server_generator_in_a_run_logs_its_loss(kd_run):
    """The shared kd run (tests/conftest.py KD_RUN: strategy=kd, server_generator.epochs=5, hidden 32, 2 rounds)."""
    from omegaconf import OmegaConf

    run = Path(kd_run["run"])
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.strategy.aggregation == "kd" and cfg.server_generator.epochs == 5 and cfg.num_rounds == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in rows if r["kind"] == "train"]
    assert all(r["server/generator_loss"] >= 0 and r["server/adapter_finetuning_loss"] >= 0 for r in trains)
    assert all(r["server/synthetic_samples"] == 10 * 32 for r in trains)  # 10 classes x replay.samples_per_class
    per_class = trains[-1]["server/generator_per_class"]
    assert len(per_class) == 10
    assert all(f["loss"] == pytest.approx(f["agree"] + f["moment"]) and f["agree"] > 0 for f in per_class.values())
    for line in ("Class 'dog': server generator Loss=", "Generator training completed. Average loss: ",
                 "Distillation completed. Average loss: ", "Adapter fine-tuning completed. Average loss: "):
        assert sum(m.startswith(line) for m in kd_run["messages"]) == cfg.num_rounds, line
