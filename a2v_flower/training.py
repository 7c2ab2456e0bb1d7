"""Plain training loops shared by sites and server: adapters fitted to class text targets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from a2v_flower.metrics import similarity
from a2v_flower.models.adapters import AdapterSet
from a2v_flower.schema import TrainSpec

LOSSES = ("mse", "contrastive", "mse+contrastive")


def contrastive_logits(outputs: dict[str, torch.Tensor], class_targets: dict[str, torch.Tensor],
                       temperature: float, present: torch.Tensor | None = None, absent_scale: float = 1.0
                       ) -> torch.Tensor:
    """(B, C) cosine similarity to every class target, centred as retrieval centres it, / temperature;
    logits of classes not in `present` (bool (C,)) scaled by `absent_scale` (restricted softmax)."""
    logits = similarity(outputs, class_targets) / temperature
    if present is not None and absent_scale != 1.0:
        logits = torch.where(present, logits, absent_scale * logits)
    return logits


def adapter_loss(outputs: dict[str, torch.Tensor], y: torch.Tensor, class_targets: dict[str, torch.Tensor],
                 spec: TrainSpec, teacher: dict[str, torch.Tensor] | None = None,
                 present: torch.Tensor | None = None) -> torch.Tensor:
    """MSE (+ cosine) to each sample's target and/or cross-entropy over all class targets, per spec.loss.

    Targets are the class targets of labels `y`, or with `teacher` the teacher outputs of the batch (kd):
    MSE then pulls toward the teacher's output and the cross-entropy matches the teacher's softmax.
    """
    loss = torch.zeros(())
    if spec.loss in ("mse", "mse+contrastive"):
        want = teacher if teacher is not None else {h: t[y] for h, t in class_targets.items()}
        for head, out in outputs.items():  # summed over heads
            loss = loss + F.mse_loss(out, want[head])
            if spec.cosine_weight:
                cos = F.cosine_similarity(out.flatten(1), want[head].flatten(1))
                loss = loss + spec.cosine_weight * (1 - cos).mean()
    if spec.loss in ("contrastive", "mse+contrastive"):  # averaged over heads inside `similarity`
        logits = contrastive_logits(outputs, class_targets, spec.temperature, present, spec.absent_scale)
        label = y if teacher is None else contrastive_logits(teacher, class_targets, spec.temperature).softmax(1)
        loss = loss + F.cross_entropy(logits, label)
    return loss


class AdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments, a step count per tensor) for
    the adapters' loop. torch.optim imports torch._dynamo on first use: 1.4 s of CPU in every ClientApp process,
    and in deployment every message starts one."""

    def __init__(self, params, *, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.weight_decay, (self.beta1, self.beta2), self.eps = lr, weight_decay, betas, eps
        self.state = [{"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                      for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, st in zip(self.params, self.state):
            if p.grad is None:
                continue
            st["step"] += 1
            p.mul_(1 - self.lr * self.weight_decay)
            st["exp_avg"].lerp_(p.grad, 1 - self.beta1)
            st["exp_avg_sq"].mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
            denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - self.beta2 ** st["step"])).add_(self.eps)
            p.addcdiv_(st["exp_avg"], denom, value=-self.lr / (1 - self.beta1 ** st["step"]))


def train_adapters(adapters: AdapterSet, x: torch.Tensor, y: torch.Tensor,
                   class_targets: dict[str, torch.Tensor], spec: TrainSpec, seed: int = 0,
                   teacher: dict[str, torch.Tensor] | None = None) -> float:
    """Fit `adapters` so that x[i] maps to class y[i] (or to teacher[head][i]); returns the last epoch's mean loss.

    With spec.proximal_mu the weights are held near the ones the adapters started from (FedProx).
    """
    opt = AdamW(adapters.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    dev = next(adapters.parameters()).device  # data follow the model (CPU or CUDA)
    class_targets = {h: t.to(dev) for h, t in class_targets.items()}
    present = torch.zeros(len(next(iter(class_targets.values()))), dtype=torch.bool, device=dev)
    present[y.unique().to(dev)] = True  # classes in this training data (restricted softmax)
    anchor = [p.detach().clone() for p in adapters.parameters()] if spec.proximal_mu else []
    adapters.train()
    epoch_loss = float("nan")
    for _ in range(spec.local_epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), spec.batch_size):
            idx = order[i:i + spec.batch_size]
            xb, yb = x[idx].to(dev), y[idx].to(dev)
            tb = {h: t[idx].to(dev) for h, t in teacher.items()} if teacher is not None else None
            loss = adapter_loss(adapters(xb), yb, class_targets, spec, tb, present)
            if anchor:
                loss = loss + spec.proximal_mu / 2 * sum((p - a).pow(2).sum()
                                                         for p, a in zip(adapters.parameters(), anchor))
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
