"""A generator trained on the server itself, from what sites send (the predecessor's "generators in the federated
server"): no site generators and no data. Its samples of class c start at the sites' pooled mean embedding
of c and are trained so that (a) the adapters of the sites that trained c map them, on average, to the
per-class adapter output those sites reported, and (b) their per-class mean and variance match the sites'
pooled audio statistics. The samples then join kd and refinement like the site generators' samples."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from a2v_flower.generator_schema import ServerGeneratorSpec
from a2v_flower.models.adapters import AdapterSet
from a2v_flower.models.generators.base import CONDITION_DIM, class_condition

log = logging.getLogger(__name__)


def class_moments(class_stats: dict[int, dict[str, torch.Tensor]], num_classes: int
                  ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Pooled per-class mean and variance of the sites' audio embeddings: (classes, (C', K, D), (C', K, D))."""
    n, s1, s2 = torch.zeros(num_classes), {}, {}
    for stats in class_stats.values():
        for c in torch.nonzero(stats["counts"]).flatten().tolist():
            k, m, v = stats["counts"][c], stats[f"audio_mean/{c}"], stats[f"audio_var/{c}"]
            s1[c] = s1.get(c, 0) + k * m
            s2[c] = s2.get(c, 0) + k * (v + m * m)
            n[c] += k
    present = sorted(s1)
    if not present:
        return [], torch.empty(0), torch.empty(0)
    mean = torch.stack([s1[c] / n[c] for c in present])
    var = torch.stack([s2[c] / n[c] for c in present]) - mean.pow(2)
    return present, mean, var.clamp_min(1e-8)


class StatsGenerator(nn.Module):
    """x = mean_c + std_c * f(z, condition_c): a residual around each class's pooled statistics."""

    def __init__(self, token_shape: tuple[int, int], spec: ServerGeneratorSpec):
        super().__init__()
        k, d = token_shape
        self.token_shape, self.latent_dim = (k, d), spec.latent_dim
        self.net = nn.Sequential(nn.Linear(spec.latent_dim + CONDITION_DIM, spec.hidden), nn.SiLU(),
                                 nn.Linear(spec.hidden, spec.hidden), nn.SiLU(), nn.Linear(spec.hidden, k * d))
        nn.init.zeros_(self.net[-1].weight)  # starts at the class means; learns spread and teacher agreement
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, y: torch.Tensor, cond: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(len(y), self.latent_dim, generator=generator).to(mean.device)  # CPU noise: runs repeat
        return mean + std * self.net(torch.cat([z, cond], 1)).view(len(y), *self.token_shape)


def train_server_generator(gen: StatsGenerator, teachers: dict[int, AdapterSet],
                           class_stats: dict[int, dict[str, torch.Tensor]], class_targets: dict[str, torch.Tensor],
                           spec: ServerGeneratorSpec, seed: int, report: dict | None = None) -> float:
    """`spec.epochs` AdamW steps on teacher agreement + moment matching; returns the last step's loss and fills
    `report` (if given) with the last step's components per class: {class: {"loss", "agree", "moment"}}.
    Runs where `gen` is (the teachers must be there too); the statistics come from the CPU."""
    num_classes, dev = len(next(iter(class_targets.values()))), next(gen.parameters()).device
    present, mean, var = class_moments(class_stats, num_classes)
    if not present:
        return float("nan")
    for t in teachers.values():
        t.eval().requires_grad_(False)
    mean, var = mean.to(dev), var.to(dev)
    ids = torch.tensor(present).repeat_interleave(spec.batch_per_class)       # (B,)
    slot = torch.arange(len(present)).repeat_interleave(spec.batch_per_class).to(dev)
    cond = class_condition(class_targets, ids).to(dev)
    rng = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(gen.parameters(), lr=spec.lr)
    loss = torch.tensor(float("nan"))
    for _ in range(spec.epochs):
        x = gen(ids, cond, mean[slot], var[slot].sqrt(), rng)                  # (B, K, D)
        xs = x.view(len(present), spec.batch_per_class, *x.shape[1:])
        moment = ((xs.mean(1) - mean).pow(2) / var).flatten(1).mean(1) \
            + ((xs.var(1) - var).pow(2) / var.pow(2)).flatten(1).mean(1)        # (C',) per class
        agree: list[list[torch.Tensor]] = [[] for _ in present]               # per class: one term per site, head
        for site, teacher in teachers.items():
            stats = class_stats.get(site, {})
            out = teacher(x)
            for head, o in out.items():
                scale = class_targets[head].float().var(0).mean().clamp_min(1e-8)
                for j, c in enumerate(present):
                    if (want := stats.get(f"out/{head}/{c}")) is not None:
                        agree[j].append(F.mse_loss(o[slot == j].mean(0), want.to(dev)) / scale.to(dev))
        terms = sum(len(a) for a in agree)
        loss = sum(sum(a) for a in agree) / max(1, terms) + spec.moment_weight * moment.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt.step()
    if report is not None and spec.epochs:
        moment = moment.detach()
        for j, c in enumerate(present):
            a = torch.stack(agree[j]).detach().mean().item() if agree[j] else 0.0
            report[c] = {"loss": a + spec.moment_weight * float(moment[j]), "agree": a, "moment": float(moment[j])}
    return float(loss.detach())


@torch.no_grad()
def sample_server_generator(gen: StatsGenerator, class_stats: dict, class_targets: dict[str, torch.Tensor],
                            per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` samples of every class some site holds, drawn where `gen` is: (x (N, K, D), y (N,)) on the CPU."""
    num_classes, dev = len(next(iter(class_targets.values()))), next(gen.parameters()).device
    present, mean, var = class_moments(class_stats, num_classes)
    if not present:
        return torch.empty(0, *gen.token_shape), torch.empty(0, dtype=torch.long)
    y = torch.tensor(present).repeat_interleave(per_class)
    slot = torch.arange(len(present)).repeat_interleave(per_class)
    x = gen(y, class_condition(class_targets, y).to(dev), mean[slot].to(dev), var[slot].sqrt().to(dev),
            torch.Generator().manual_seed(seed))
    return x.cpu(), y


def train_and_sample(gen: StatsGenerator, spec: ServerGeneratorSpec, samples_per_class: int,
                     teachers: dict[int, AdapterSet], class_stats: dict, class_targets: dict[str, torch.Tensor],
                     classes: list[str], seed: int, sample_seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train the server generator (one log line per class, as the predecessor's server did), then sample it:
    (x (N, K, D), y (N,), its figures for metrics.jsonl)."""
    per_class: dict = {}
    loss = train_server_generator(gen, teachers, class_stats, class_targets, spec, seed, report=per_class)
    for c, f in per_class.items():
        log.info("Class %r: server generator Loss=%.4f (agree=%.4f, moment=%.4f)", classes[c], f["loss"],
                 f["agree"], f["moment"])
    log.info("Generator training completed. Average loss: %.4f", loss)
    x, y = sample_server_generator(gen, class_stats, class_targets, samples_per_class, sample_seed)
    return x, y, {"server/generator_loss": loss,
                  "server/generator_per_class": {classes[c]: f for c, f in per_class.items()}}
