"""Plain training loops shared by sites and server: adapters fitted to class text targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from a2v_flower.models.adapters import AdapterSet


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation hyper-parameters (conf: train.*)."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    cosine_weight: float = 0.0
    grad_clip: float = 1.0


def adapter_loss(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                 cosine_weight: float = 0.0) -> torch.Tensor:
    """Sum over heads of MSE (+ cosine_weight * (1 - cosine)) between outputs and their targets."""
    loss = 0.0
    for head, out in outputs.items():
        tgt = targets[head]
        loss = loss + F.mse_loss(out, tgt)
        if cosine_weight:
            loss = loss + cosine_weight * (1 - F.cosine_similarity(out.flatten(1), tgt.flatten(1))).mean()
    return loss


def train_adapters(adapters: AdapterSet, x: torch.Tensor, y: torch.Tensor,
                   class_targets: dict[str, torch.Tensor], spec: TrainSpec, seed: int = 0) -> float:
    """Fit `adapters` so that x[i] maps to class_targets[head][y[i]]; returns the last epoch's mean loss."""
    opt = torch.optim.AdamW(adapters.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    dev = next(adapters.parameters()).device  # data follow the model (CPU or CUDA)
    class_targets = {h: t.to(dev) for h, t in class_targets.items()}
    adapters.train()
    epoch_loss = float("nan")
    for _ in range(spec.epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), spec.batch_size):
            idx = order[i:i + spec.batch_size]
            xb, yb = x[idx].to(dev), y[idx].to(dev)
            loss = adapter_loss(adapters(xb), {h: t[yb] for h, t in class_targets.items()},
                                spec.cosine_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(adapters.parameters(), spec.grad_clip)
            opt.step()
            total += loss.item() * len(idx)
        epoch_loss = total / len(x)
    adapters.eval()
    return epoch_loss


@torch.no_grad()
def predict(adapters: AdapterSet, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Adapter outputs for every row of x, per head."""
    adapters.eval()
    dev = next(adapters.parameters()).device
    parts = [adapters(x[i:i + batch_size].to(dev)) for i in range(0, len(x), batch_size)]
    return {h: torch.cat([p[h].cpu() for p in parts]) for h in parts[0]}


def class_means(outputs: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class mean of each head's output, keyed "<head>/<class index>" for classes present in y."""
    return {f"{h}/{c}": out[y == c].mean(0) for h, out in outputs.items() for c in y.unique().tolist()}
